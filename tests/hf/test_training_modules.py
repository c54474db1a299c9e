"""fast_training_modules: GPT-2's dropout and tanh-GELU modules are swapped for prefixrt's while training (the
same function in eval mode, prefixrt's Philox masks in train mode, gradients through them), the originals come
back on exit and after an exception, BART is left alone, and ``prefixrt train`` runs with them swapped."""

import pytest
import torch
from support.cpp_cases import cpp_kernels  # noqa: F401  (fixture)
from support.training import PAD, task_rows, tiny_model
from torch import nn

from prefixrt.hf import fast_training_modules
from prefixrt.hf.training_modules import PhiloxDropout, TanhGELU
from prefixrt.train import PrefixTuner, RunOptions, TrainConfig, train

pytestmark = pytest.mark.usefixtures("cpp_kernels")


def kinds(model):
    return sorted(
        type(m).__name__
        for m in model.modules()
        if "ropout" in type(m).__name__ or "GELU" in type(m).__name__
    )


def test_gpt2_modules_are_swapped_and_restored():
    model = tiny_model("gpt2", dropout=0.1)
    originals = list(model.modules())
    count = sum(type(m) is nn.Dropout for m in originals) + sum(
        type(m).__name__ == "NewGELUActivation" for m in originals
    )
    with fast_training_modules(model) as swapped:
        assert swapped == count > 0
        inside = [type(m) for m in model.modules()]
        assert PhiloxDropout in inside and TanhGELU in inside and nn.Dropout not in inside
        assert model.transformer.h[0].attn.attn_dropout.p == pytest.approx(0.1)  # HF reads .p
    assert list(model.modules()) == originals  # the very same objects back


def test_restored_after_an_exception_and_training_mode_carried_back():
    model = tiny_model("gpt2", dropout=0.1).train()
    before = kinds(model)
    with pytest.raises(RuntimeError, match="boom"), fast_training_modules(model):
        model.eval()
        raise RuntimeError("boom")
    assert kinds(model) == before
    assert not any(m.training for m in model.modules())  # eval() inside the block holds for the originals


def test_eval_outputs_match_and_train_mode_draws_prefixrt_masks():
    model = tiny_model("gpt2", dropout=0.3).eval()
    ids = torch.randint(3, 60, (3, 9), generator=torch.Generator().manual_seed(0))
    want = model(ids).logits
    with fast_training_modules(model):
        torch.testing.assert_close(model(ids).logits, want, atol=1e-5, rtol=1e-5)  # fused GELU: same function
        model.train()
        torch.manual_seed(4)
        a = model(ids).logits
        torch.manual_seed(4)
        b = model(ids).logits
        c = model(ids).logits
    assert torch.equal(a, b) and not torch.equal(a, c)  # seeded masks, fresh per step
    assert not torch.allclose(a, want)


def test_bart_is_left_alone():
    model = tiny_model("bart", dropout=0.1)
    before = kinds(model)
    with fast_training_modules(model) as swapped:
        assert swapped == 0 and kinds(model) == before


def test_prefixrt_train_swaps_while_training_and_puts_them_back():
    model = tiny_model("gpt2", dropout=0.1)
    tuner = PrefixTuner(model, {"a": 3}, mid_dim=8, seed=0)
    seen = []
    result = train(
        model,
        tuner,
        {"a": task_rows("gpt2", [10, 11, 12], 6, 0)},
        RunOptions(
            pad_token_id=PAD,
            config=TrainConfig(lr=1e-2, batch_size=3, max_steps=2, seed=0),
            progress=False,
            eval_every=1,
            eval_hook=lambda m, step: (
                seen.append(any(isinstance(x, PhiloxDropout) for x in m.modules())) or {}
            ),
        ),
    )
    assert result.step == 2 and seen and all(seen)
    assert not any(isinstance(x, PhiloxDropout | TanhGELU) for x in model.modules())
