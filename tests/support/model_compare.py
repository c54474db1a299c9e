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


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each real token of ``ids`` given the ones before it (``mask == 0``: padding, ignored)."""
    labels = ids.masked_fill(mask == 0, -100)
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100
    )


def assert_no_grad_reached(bank, grads: dict, name: str, site: str = "decoder") -> None:
    """The bank rows of entry ``name`` got exactly zero gradient at ``site`` (no row used the entry)."""
    entry = bank.id_of(name)
    span = slice(int(bank.offsets(site)[entry]), int(bank.offsets(site)[entry + 1]))
    assert not grads[site][:, :, :, span].any()


def assert_gpt2_logits_and_grads_match(
    model, bank, backend: str, ids, mask, prefix_ids, logits_tol: float, grads_tol: float
) -> None:
    """GPT-2's logits at the real tokens, and the bank's gradient of the next-token loss, are the same attached
    through ``backend`` as through the reference backend; entry ``"unused"`` gets no gradient."""

    def run(m):
        logits = m(ids, attention_mask=mask, prefix_ids=prefix_ids).logits
        return logits.detach(), bank_grads(bank, next_token_loss(logits, ids, mask))

    (ref_logits, ref_grads), (logits, grads) = on_both_backends(model, bank, run, backend)
    real = mask.bool()
    close(logits[real], ref_logits[real], logits_tol)
    close(grads["decoder"], ref_grads["decoder"], grads_tol)
    assert_no_grad_reached(bank, grads, "unused")


def assert_bart_logits_and_grads_match(
    model, bank, backend: str, src, src_mask, dec, prefix_ids, logits_tol: float, grads_tol: float
) -> None:
    """BART's logits, and the bank's gradient at every site (each nonzero) of their mean square, are the same
    attached through ``backend`` as through the reference backend."""

    def run(m):
        logits = m(src, attention_mask=src_mask, decoder_input_ids=dec, prefix_ids=prefix_ids).logits
        return logits.detach(), bank_grads(bank, logits.square().mean())

    (ref_logits, ref_grads), (logits, grads) = on_both_backends(model, bank, run, backend)
    close(logits, ref_logits, logits_tol)
    for site in ("encoder", "decoder", "cross"):
        assert ref_grads[site].abs().sum() > 0, site
        close(grads[site], ref_grads[site], grads_tol)
