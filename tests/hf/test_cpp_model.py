"""Whole models attached with ``backend="cpp"``: the reference backend's logits, prefix gradients and greedy tokens
(tiny GPT-2 and BART with random weights, fp32, on the CPU)."""

import pytest
import torch
from support.cpp_cases import TOLERANCES, cpp_kernels, one_thread  # noqa: F401  (fixtures)
from support.model_compare import (
    NO_DROPOUT,
    assert_bart_logits_and_grads_match,
    assert_gpt2_logits_and_grads_match,
)
from support.model_compare import on_both_backends as compare_backends
from support.tiny import left_padded, random_bank, random_ids, tiny_bart, tiny_gpt2

import prefixrt
from prefixrt.ops.registry import get_backend

pytestmark = pytest.mark.usefixtures("cpp_kernels", "one_thread")
TOL = TOLERANCES[torch.float32]
MODEL_TOL = 1e-4  # logits after a few layers: each layer's attention is within TOL.out of the oracle


def on_both_backends(model, bank, run):
    """``run(model)`` with the bank attached through the reference backend, then through the cpp backend."""
    return compare_backends(model, bank, run, "cpp")


@pytest.fixture
def gpt2():
    model = tiny_gpt2(n_positions=512, **NO_DROPOUT)  # positions continue after a 200-token prefix
    bank = random_bank(model, {"a": 5, "b": 17, "long": 200, "unused": 3})
    return model, bank


def test_gpt2_logits_and_prefix_gradients(gpt2):
    model, bank = gpt2
    bank.requires_grad_(True)
    ids, mask = left_padded([8, 5, 7, 8, 2], 8, seed=1)
    ids, mask = ids.flip(1), mask.flip(1)  # right padding, as in training
    prefix_ids = bank.ids(["b", "a", None, "long", "b"])
    assert_gpt2_logits_and_grads_match(model, bank, "cpp", ids, mask, prefix_ids, MODEL_TOL, MODEL_TOL)


def test_gpt2_greedy_tokens(gpt2):
    model, bank = gpt2
    ids, mask = left_padded([5, 8, 3, 6, 8], 8, seed=2)
    prefix_ids = bank.ids(["a", None, "b", "a", "long"])
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=1, eos_token_id=None)
    ref, out = on_both_backends(
        model, bank, lambda m: m.generate(ids, attention_mask=mask, prefix_ids=prefix_ids, **kwargs)
    )
    assert torch.equal(out, ref)


@pytest.fixture
def bart():
    model = tiny_bart(max_position_embeddings=256)  # 4 decoder heads of dim 8, 2 encoder heads of dim 16
    bank = random_bank(model, {"sum": 7, "t2t": 3, "long": 40, "unused": 2}, scale=0.5)
    return model, bank


def test_bart_logits_and_prefix_gradients(bart):
    model, bank = bart
    bank.requires_grad_(True)
    src, src_mask = left_padded([7, 4, 6, 2], 7, seed=3)
    src, src_mask = src.flip(1), src_mask.flip(1)
    dec = random_ids(4, 5, seed=4)
    prefix_ids = bank.ids(["t2t", "sum", None, "long"])
    assert_bart_logits_and_grads_match(
        model, bank, "cpp", src, src_mask, dec, prefix_ids, MODEL_TOL, MODEL_TOL
    )


def test_bart_greedy_tokens(bart):
    model, bank = bart
    src, src_mask = left_padded([6, 3, 5, 6], 6, seed=5)
    src, src_mask = src.flip(1), src_mask.flip(1)
    prefix_ids = bank.ids(["sum", None, "t2t", "long"])
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    ref, out = on_both_backends(
        model, bank, lambda m: m.generate(src, attention_mask=src_mask, prefix_ids=prefix_ids, **kwargs)
    )
    assert torch.equal(out, ref)


def test_attach_auto_uses_cpp_on_cpu(gpt2, monkeypatch):
    """With "auto", CPU attention in an attached model runs the C++ kernels (calls counted at the backend)."""
    monkeypatch.delenv("PREFIXRT_BACKEND", raising=False)
    cpp = get_backend("cpp")
    original, calls = cpp.forward, []

    def counting(*args):
        calls.append(args[0].q.shape)
        return original(*args)

    monkeypatch.setattr(cpp, "forward", counting)
    model, bank = gpt2
    prefixrt.attach(model, bank, backend="auto")
    try:
        with torch.no_grad():
            model(random_ids(2, 4, seed=6), prefix_ids=bank.ids(["a", "b"]))
    finally:
        prefixrt.detach(model)
    assert len(calls) == model.config.n_layer
