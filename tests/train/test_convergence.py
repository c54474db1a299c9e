"""Convergence (as Liger-Kernel tests its kernels): a tiny GPT-2 and a tiny BART (prefixes at all three sites)
trained 50 steps with dropout on, once per backend from the same seed: every backend draws the same dropout
masks as the reference (one counter-based stream), so the loss curves agree step by step."""

import math

import pytest
from support.training import PAD, task_rows, tiny_model

from prefixrt.ops import available_backends
from prefixrt.train import PrefixTuner, RunOptions, TrainConfig, train

STEPS = 50
BACKENDS = [b for b in ("cpp", "triton") if b in available_backends()]


def curve(kind: str, backend: str) -> tuple[list[float], str]:
    heads = (
        {} if kind == "gpt2" else dict(encoder_attention_heads=2, decoder_attention_heads=2)
    )  # head dim 16
    model = tiny_model(kind, dropout=0.1, **heads)
    tuner = PrefixTuner(model, {"a": 4, "b": 3}, mid_dim=16, seed=0, prefix_dropout=0.1)
    tuner.attach(model, backend=backend)
    data = {"a": task_rows(kind, [10, 11, 12], 12, 0), "b": task_rows(kind, [20, 21], 12, 1)}
    config = TrainConfig(lr=1e-2, batch_size=4, max_steps=STEPS, log_every=1, seed=0)
    result = train(model, tuner, data, RunOptions(pad_token_id=PAD, config=config, progress=False))
    tuner.detach(model)
    return [row["loss"] for row in result.log], result.attention_backend


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gpt2", "bart"])
def test_loss_curves_agree_with_the_reference_step_by_step(kind):
    reference, ran = curve(kind, "reference")
    assert ran == "reference" and len(reference) == STEPS
    assert reference[-1] < reference[0]  # it trains
    for backend in BACKENDS:
        losses, ran = curve(kind, backend)
        assert ran == backend
        for step, (got, want) in enumerate(zip(losses, reference, strict=True)):
            assert math.isclose(got, want, rel_tol=1e-4, abs_tol=1e-4), (
                f"{backend} step {step}: {got} vs {want}"
            )
