"""Whole models attached with ``backend="triton"``: the reference backend's logits, prefix gradients and greedy
tokens (tiny GPT-2 and BART, fp32; on CPU the kernels run in Triton's interpreter)."""

import pytest
import torch
from support.model_compare import (
    NO_DROPOUT,
    assert_bart_logits_and_grads_match,
    assert_gpt2_logits_and_grads_match,
)
from support.model_compare import on_both_backends as compare_backends
from support.tiny import left_padded, random_bank, random_ids, tiny_bart, tiny_gpt2
from support.triton_cases import DEVICE, TOLERANCES

pytestmark = pytest.mark.slow  # whole models through the interpreter: tens of seconds each on CPU
TOL = TOLERANCES[torch.float32]


def on_both_backends(model, bank, run):
    """``run(model)`` with the bank attached through the reference backend, then through the triton backend."""
    return compare_backends(model, bank, run, "triton")


@pytest.fixture
def gpt2():
    model = tiny_gpt2(**NO_DROPOUT).to(DEVICE)
    bank = random_bank(model, {"a": 5, "b": 17, "unused": 3}).to(DEVICE)
    return model, bank


def test_gpt2_logits_and_prefix_gradients(gpt2):
    model, bank = gpt2
    bank.requires_grad_(True)
    ids, mask = left_padded([8, 5, 7, 8], 8, seed=1)
    ids, mask = ids.flip(1).to(DEVICE), mask.flip(1).to(DEVICE)  # right padding, as in training
    prefix_ids = bank.ids(["b", "a", None, "b"], device=DEVICE)
    assert_gpt2_logits_and_grads_match(model, bank, "triton", ids, mask, prefix_ids, TOL.out, TOL.grad)


def test_gpt2_greedy_tokens(gpt2):
    model, bank = gpt2
    ids, mask = left_padded([5, 8, 3, 6], 8, seed=2)
    prefix_ids = bank.ids(["a", None, "b", "a"], device=DEVICE)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=1, eos_token_id=None)
    ref, out = on_both_backends(
        model,
        bank,
        lambda m: m.generate(ids.to(DEVICE), attention_mask=mask.to(DEVICE), prefix_ids=prefix_ids, **kwargs),
    )
    assert torch.equal(out, ref)


@pytest.fixture
def bart():
    # two decoder heads: head dim 16 (the Triton kernels take head dims 16, 32, 64, 128)
    model = tiny_bart(decoder_attention_heads=2).to(DEVICE)
    bank = random_bank(model, {"sum": 7, "t2t": 3, "unused": 2}, scale=0.5).to(DEVICE)
    return model, bank


def test_bart_logits_and_prefix_gradients(bart):
    model, bank = bart
    bank.requires_grad_(True)
    src, src_mask = left_padded([7, 4, 6], 7, seed=3)
    src, src_mask = src.flip(1).to(DEVICE), src_mask.flip(1).to(DEVICE)
    dec = random_ids(3, 5, seed=4).to(DEVICE)
    prefix_ids = bank.ids(["t2t", "sum", None], device=DEVICE)
    assert_bart_logits_and_grads_match(
        model, bank, "triton", src, src_mask, dec, prefix_ids, TOL.out, TOL.grad
    )


def test_bart_greedy_tokens(bart):
    model, bank = bart
    src, src_mask = left_padded([6, 3, 5], 6, seed=5)
    src, src_mask = src.flip(1).to(DEVICE), src_mask.flip(1).to(DEVICE)
    prefix_ids = bank.ids(["sum", None, "t2t"], device=DEVICE)
    kwargs = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    ref, out = on_both_backends(
        model, bank, lambda m: m.generate(src, attention_mask=src_mask, prefix_ids=prefix_ids, **kwargs)
    )
    assert torch.equal(out, ref)
