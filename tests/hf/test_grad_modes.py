"""An attached model under ``torch.inference_mode()`` and ``torch.no_grad()``: forward, HF ``generate()`` and
``prefixrt.generate`` run (with ``prefix_ids`` and masks created inside the mode: inference tensors) and give
what they give with gradients enabled."""

import pytest
import torch
from support.tiny import left_padded, random_bank, tiny_bart, tiny_gpt2

import prefixrt

MODES = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad}
GENERATE = dict(max_new_tokens=5, do_sample=False, pad_token_id=1, eos_token_id=None)


def _setup(family):
    model = tiny_gpt2() if family == "gpt2" else tiny_bart()
    bank = random_bank(model, {"short": 3, "long": 11})
    prefixrt.attach(model, bank)
    return model, bank


def _runs(model, bank, family, ids, mask):
    """What each path returns, with ``prefix_ids`` made here (inside the caller's mode)."""
    prefix_ids = bank.ids(["long", None, "short"])
    extra = {"decoder_input_ids": ids[:, -3:]} if family == "bart" else {}
    return {
        "forward": model(ids, attention_mask=mask, prefix_ids=prefix_ids, **extra).logits,
        "hf_generate": model.generate(ids, attention_mask=mask, prefix_ids=prefix_ids, **GENERATE),
        "hf_beam": model.generate(ids, attention_mask=mask, prefix_ids=prefix_ids, num_beams=2, **GENERATE),
        "prefixrt_generate": prefixrt.generate(
            model, ids, attention_mask=mask, prefix_ids=prefix_ids, **GENERATE
        ),
    }


@pytest.mark.parametrize("family", ["gpt2", "bart"])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_forward_and_generate_under_the_mode_equal_the_results_with_grad(family, mode):
    model, bank = _setup(family)
    ids, mask = left_padded([6, 8, 3], 8, seed=21)
    expected = _runs(model, bank, family, ids, mask)
    with MODES[mode]():
        inside_ids, inside_mask = ids.clone(), mask.clone()  # inference tensors under inference_mode
        got = _runs(model, bank, family, inside_ids, inside_mask)
        if mode == "inference_mode":
            assert inside_ids.is_inference() and got["forward"].is_inference()
    for path, value in expected.items():
        torch.testing.assert_close(got[path], value.detach(), rtol=0, atol=0, msg=path)


def test_inference_mode_bank_changes_between_calls_are_seen():
    """No plan or length is cached across a bank change: ids added inside inference mode are read."""
    model, bank = _setup("gpt2")
    ids, mask = left_padded([4, 6], 6, seed=22)
    with torch.inference_mode():
        before = model(ids, attention_mask=mask, prefix_ids=bank.ids(["short", None])).logits
        bank.add("new", torch.randn(2, 2, 2, 7, 16))
        after = model(ids, attention_mask=mask, prefix_ids=bank.ids(["new", None])).logits
    assert not torch.allclose(before[0], after[0])
    torch.testing.assert_close(before[1], after[1], rtol=0, atol=0)
