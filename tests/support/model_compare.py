"""Helpers for the whole-model tests (this module holds no tests): run a model attached through the reference
backend and through a kernel backend, and compare; the tolerances of an attached model's logits."""

import torch

import prefixrt

NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
# An attached model's logits against the same model computed another way (PEFT's forward, text then input).
LOGITS_TOL = {torch.float32: dict(atol=3e-5, rtol=1e-4), torch.float64: dict(atol=1e-10, rtol=1e-9)}


def on_both_backends(model, bank, run, backend: str) -> list:
    """``[run(model) attached through the reference backend, run(model) attached through backend]``."""
    results = []
    for name in ("reference", backend):
        prefixrt.attach(model, bank, backend=name)
        try:
            results.append(run(model))
        finally:
            prefixrt.detach(model)
    return results


def bank_grads(bank, loss) -> dict:
    """The bank's gradient per site after ``loss.backward()``."""
    bank.zero_grad(set_to_none=True)
    loss.backward()
    return {site: p.grad.clone() for site, p in bank.kv.items()}


def close(a: torch.Tensor, b: torch.Tensor, tol: float) -> None:
    """``a`` within ``tol`` of ``b`` (absolute tolerance relative to ``b``'s largest magnitude, at least 1)."""
    torch.testing.assert_close(a, b, atol=tol * max(1.0, b.abs().max().item()), rtol=tol)
