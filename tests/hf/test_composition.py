"""An attached model among the rest of transformers: models that share one config object, GPT-2 with
cross-attention, the mask functions transformers passes (packed sequences, or/and overlays, sliding windows),
4-D masks, a bank in another dtype, and what ``detach`` leaves behind."""

import inspect

import pytest
import torch
from support.tiny import VOCAB, left_padded, random_bank, random_ids, tiny_bart, tiny_gpt2
from transformers import BartForConditionalGeneration, GPT2Config, GPT2LMHeadModel
from transformers.masking_utils import (
    create_causal_mask,
    create_sliding_window_causal_mask,
    sliding_window_overlay,
)

import prefixrt
from prefixrt import ops
from prefixrt.hf import positions
from prefixrt.hf.attention import KeyMask, UnsupportedMask, own_keys

GPT2 = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=128, bos_token_id=0, eos_token_id=1)


def _module_state(model) -> dict:
    """Every module attribute by identity, and the hooks: what attach may change and detach must restore."""
    state = {}
    for name, module in model.named_modules():
        for key, value in vars(module).items():
            if key in ("_parameters", "_buffers", "_modules"):
                continue
            state[(name, key)] = (
                value if isinstance(value, (bool, int, float, str, type(None))) else id(value)
            )
        for hooks in ("_forward_pre_hooks", "_forward_hooks"):
            state[(name, hooks, "n")] = len(getattr(module, hooks))
    return state


# -- shared configs ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "bart"])
def test_attaching_one_of_two_models_that_share_a_config_leaves_the_other_unchanged(family):
    if family == "gpt2":
        config = GPT2Config(**GPT2)
        torch.manual_seed(0)
        first, second = GPT2LMHeadModel(config).eval(), GPT2LMHeadModel(config).eval()
    else:
        config = tiny_bart().config
        torch.manual_seed(0)
        first, second = (
            BartForConditionalGeneration(config).eval(),
            BartForConditionalGeneration(config).eval(),
        )
    assert first.config is second.config is config  # transformers shares the object
    ids, mask = left_padded([5, 7], 7, seed=41)
    extra = {"decoder_input_ids": ids[:, -3:]} if family == "bart" else {}
    implementation = config._attn_implementation
    before = second(ids, attention_mask=mask, **extra).logits
    first_before = first(ids, attention_mask=mask, **extra).logits
    state = _module_state(first)

    bank = random_bank(first, {"a": 4})
    prefixrt.attach(first, bank)
    assert first.config is not config and config._attn_implementation == implementation
    first(ids, attention_mask=mask, prefix_ids=bank.ids(["a", None]), **extra)
    torch.testing.assert_close(second(ids, attention_mask=mask, **extra).logits, before, rtol=0, atol=0)
    second.generate(ids, attention_mask=mask, max_new_tokens=2, pad_token_id=1)  # still the plain model

    prefixrt.detach(first)
    assert first.config is config and config._attn_implementation == implementation
    assert all(getattr(m, "config", config) is config for m in first.modules())
    assert _module_state(first) == state
    torch.testing.assert_close(first(ids, attention_mask=mask, **extra).logits, first_before, rtol=0, atol=0)


def test_attaching_both_models_that_share_a_config_keeps_each_on_its_bank():
    config = GPT2Config(**GPT2)
    torch.manual_seed(0)
    first, second = GPT2LMHeadModel(config).eval(), GPT2LMHeadModel(config).eval()
    ids = random_ids(2, 5, seed=42)
    bank_one, bank_two = random_bank(first, {"a": 3}, seed=1), random_bank(second, {"a": 6}, seed=2)
    alone = {}
    for name, model, bank in (("one", first, bank_one), ("two", second, bank_two)):
        prefixrt.attach(model, bank)
        alone[name] = model(ids, prefix_ids=bank.ids(["a", None])).logits
        prefixrt.detach(model)
    prefixrt.attach(first, bank_one)
    prefixrt.attach(second, bank_two)
    torch.testing.assert_close(first(ids, prefix_ids=bank_one.ids(["a", None])).logits, alone["one"])
    torch.testing.assert_close(second(ids, prefix_ids=bank_two.ids(["a", None])).logits, alone["two"])


# -- models attach refuses ------------------------------------------------------------------------------------
def test_gpt2_with_cross_attention_is_refused_at_attach_and_left_untouched():
    model = tiny_gpt2(add_cross_attention=True)
    bank = prefixrt.PrefixBank.for_model(model)
    state = _module_state(model)
    with pytest.raises(ValueError, match="add_cross_attention=True"):
        prefixrt.attach(model, bank)
    assert not prefixrt.is_attached(model)
    assert _module_state(model) == state


# -- masks ----------------------------------------------------------------------------------------------------
@pytest.fixture
def gpt2():
    model = tiny_gpt2()
    bank = random_bank(model, {"short": 3, "long": 9})
    prefixrt.attach(model, bank)
    return model, bank


def test_a_4d_attention_mask_is_refused_with_a_clear_error(gpt2):
    model, bank = gpt2
    ids = random_ids(2, 5, seed=43)
    four_d = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    with pytest.raises(UnsupportedMask, match=r"4-D attention_mask.*2-D \[batch, keys\]"):
        model(ids, attention_mask=four_d, prefix_ids=bank.ids(["short", None]))
    bart = tiny_bart()
    bart_bank = random_bank(bart, {"a": 2})
    prefixrt.attach(bart, bart_bank)
    with pytest.raises(ValueError, match="4-D attention_mask"):
        bart(
            ids,
            attention_mask=torch.ones(2, 1, 5, 5),
            decoder_input_ids=ids,
            prefix_ids=bart_bank.ids(["a", None]),
        )


def test_packed_sequences_are_refused_and_unpacked_position_ids_are_honoured(gpt2):
    model, bank = gpt2
    ids, prefix_ids = random_ids(2, 8, seed=44), bank.ids(["long", None])
    plain = model(ids, prefix_ids=prefix_ids, use_cache=False).logits
    # position ids without a restart: transformers finds no packing, the same logits
    unpacked = torch.arange(8)[None].expand(2, -1)
    torch.testing.assert_close(
        model(ids, position_ids=unpacked, prefix_ids=prefix_ids, use_cache=False).logits,
        plain,
        rtol=0,
        atol=0,
    )
    packed = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]]).expand(2, -1)
    with pytest.raises(UnsupportedMask, match="Packed sequences"):
        model(ids, position_ids=packed, prefix_ids=prefix_ids, use_cache=False)


def _embeds(batch, length):
    return torch.zeros(batch, length, 0)


def test_and_or_mask_functions_are_honoured_when_they_change_nothing_and_refused_otherwise(gpt2):
    model, _ = gpt2
    _, mask = left_padded([4, 6], 6, seed=45)
    common = dict(config=model.config, inputs_embeds=_embeds(2, 6), attention_mask=mask, cache=None)
    plain = create_causal_mask(**common)

    def everything(batch_idx, head_idx, q_idx, kv_idx):
        return kv_idx >= 0

    honoured = create_causal_mask(**common, and_mask_function=everything)
    assert isinstance(honoured, KeyMask) and honoured.causal_ok is True
    torch.testing.assert_close(honoured.padding, plain.padding)
    with pytest.raises(UnsupportedMask, match="cannot honour the attention mask function"):
        create_causal_mask(**common, and_mask_function=sliding_window_overlay(2))
    # an overlay that turns the causal mask bidirectional is refused where the decoder's causal site reads it
    bidirectional = create_causal_mask(**common, or_mask_function=everything)
    assert bidirectional.causal_ok is False and bidirectional.bidirectional_ok is True
    k = torch.randn(2, 2, 6, 16)
    with pytest.raises(UnsupportedMask, match="causal rule"):
        own_keys("decoder", True, 6, k, k, bidirectional)


def test_sliding_windows_are_honoured_when_they_cover_the_keys_and_refused_otherwise(gpt2):
    model, _ = gpt2
    _, mask = left_padded([4, 6], 6, seed=46)
    for window, honoured in ((64, True), (3, False)):
        config = model.config.__class__(**{**model.config.to_dict(), "sliding_window": window})
        config._attn_implementation = "prefixrt"
        call = dict(config=config, inputs_embeds=_embeds(2, 6), attention_mask=mask, cache=None)
        if honoured:
            assert create_sliding_window_causal_mask(**call).causal_ok is True
        else:
            with pytest.raises(UnsupportedMask, match="sliding windows"):
                create_sliding_window_causal_mask(**call)


def test_a_non_causal_gpt2_config_is_refused_at_the_causal_site():
    """transformers' "is_causal=False" turns GPT-2's mask bidirectional; prefixrt's decoder site is causal."""
    model = tiny_gpt2(is_causal=False)
    bank = random_bank(model, {"a": 2})
    prefixrt.attach(model, bank)
    with pytest.raises(UnsupportedMask, match="does not follow that site's causal rule"):
        model(random_ids(2, 5, seed=47), prefix_ids=bank.ids(["a", None]), use_cache=False)


@pytest.mark.parametrize("q_len", [1, 4])
def test_the_tensor_position_path_selects_the_keys_the_host_path_selects(q_len):
    """Inside torch.compile a static cache's position stays a tensor (keys rotated for Tq > 1, slots masked for
    Tq == 1); eagerly it is read and the keys are cut. Both give the same attention."""
    g = torch.Generator().manual_seed(48)
    batch, heads, capacity, dim, visible = 3, 2, 12, 16, 7
    q = torch.randn(batch, heads, q_len, dim, generator=g)
    k, v = (torch.randn(batch, heads, capacity, dim, generator=g) for _ in range(2))
    padding = torch.ones(batch, capacity, dtype=torch.bool)
    padding[0, :2] = False  # left padding of row 0
    padding[:, visible:] = False  # what transformers pads a static cache's empty slots with
    bank = ops.BankLayer(
        torch.randn(heads, 5, dim, generator=g),
        torch.randn(heads, 5, dim, generator=g),
        torch.tensor([0, 2, 5]),
    )
    plan = ops.StepPlan.build(torch.tensor([1, -1, 0]), [2, 3])
    outs = []
    for position in (visible, torch.tensor(visible)):
        keys, values, mask = own_keys(
            "decoder", True, q_len, k, v, KeyMask(padding, capacity, position, True, False)
        )
        assert keys.shape[2] == (visible if isinstance(position, int) else capacity)
        outs.append(ops.prefix_attention(q, keys, values, bank, plan, key_padding_mask=mask, causal=True)[0])
    torch.testing.assert_close(outs[1], outs[0], atol=1e-6, rtol=1e-5)


# -- per-forward work -------------------------------------------------------------------------------------------
def test_hooks_read_no_signature_per_forward(gpt2, monkeypatch):
    model, bank = gpt2
    ids = random_ids(2, 5, seed=49)
    expected = model(ids, prefix_ids=bank.ids(["short", None])).logits

    class NoSignature:
        Parameter = inspect.Parameter

        @staticmethod
        def signature(*args, **kwargs):
            raise AssertionError("inspect.signature called in a forward")

    monkeypatch.setattr(positions, "inspect", NoSignature)
    torch.testing.assert_close(model(ids, prefix_ids=bank.ids(["short", None])).logits, expected)


def test_a_bank_in_another_dtype_is_cast_once_at_attach(monkeypatch):
    model = tiny_gpt2()
    bank = random_bank(model, {"a": 3})
    ids = random_ids(2, 5, seed=50)
    prefixrt.attach(model, bank)
    expected = model(ids, prefix_ids=bank.ids(["a", None])).logits
    prefixrt.detach(model)
    bank.to(torch.float64)
    with pytest.warns(UserWarning, match="cast to torch.float32 in place"):
        prefixrt.attach(model, bank)
    assert bank.dtype == torch.float32
    casts = []
    original = ops.BankLayer.to
    monkeypatch.setattr(ops.BankLayer, "to", lambda self, dtype: casts.append(dtype) or original(self, dtype))
    torch.testing.assert_close(model(ids, prefix_ids=bank.ids(["a", None])).logits, expected)
    assert casts == []  # no per-layer cast of the bank
