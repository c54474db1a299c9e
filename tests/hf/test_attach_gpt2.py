"""GPT-2 with a prefix bank attached: equal to the base model for id -1, to the prefix-in-cache formulation
(what PEFT and the original code compute) for every entry, row-independent in mixed batches, and undone by detach."""

import pytest
import torch
from support.tiny import left_padded, random_bank, random_ids, tiny_gpt2
from transformers import DynamicCache

import prefixrt


def prefix_in_cache_logits(model, bank, name, input_ids, attention_mask, start_position=None):
    """The formulation of PEFT / the original code on the unpatched model: the prefix K/V as a past cache."""
    kv = bank.entry(name)["decoder"]
    length = kv.shape[3]
    cache = DynamicCache(config=model.config)
    for layer in range(kv.shape[0]):
        cache.update(
            kv[layer, 0][None].expand(input_ids.shape[0], -1, -1, -1),
            kv[layer, 1][None].expand(input_ids.shape[0], -1, -1, -1),
            layer,
        )
    mask = torch.cat([torch.ones(input_ids.shape[0], length, dtype=attention_mask.dtype), attention_mask], 1)
    kwargs = {}
    if start_position is not None:
        kwargs["position_ids"] = torch.arange(input_ids.shape[1])[None] + start_position
    return model(input_ids, attention_mask=mask, past_key_values=cache, **kwargs).logits


@pytest.fixture
def setup():
    model = tiny_gpt2()
    bank = random_bank(model, {"short": 3, "long": 17, "other": 5})
    return model, bank


def test_no_prefix_rows_equal_the_base_model(setup):
    model, bank = setup
    ids, mask = left_padded([7, 4, 9], 9)
    base = model(ids, attention_mask=mask).logits
    prefixrt.attach(model, bank)
    out = model(ids, attention_mask=mask, prefix_ids=torch.tensor([-1, -1, -1])).logits
    real = mask.bool()
    torch.testing.assert_close(out[real], base[real])


@pytest.mark.parametrize("padding", ["left", "right", "none"])
def test_each_entry_equals_the_prefix_in_cache_formulation(setup, padding):
    model, bank = setup
    ids = random_ids(3, 8, seed=1)
    mask = torch.ones(3, 8, dtype=torch.long)
    if padding == "left":
        mask[1, :3] = 0
    elif padding == "right":
        mask[2, 5:] = 0
    names = ["long", "short", "other"]
    expected = [
        prefix_in_cache_logits(model, bank, n, ids[r : r + 1], mask[r : r + 1]) for r, n in enumerate(names)
    ]
    prefixrt.attach(model, bank)
    out = model(ids, attention_mask=mask, prefix_ids=bank.ids(names)).logits
    for row in range(3):
        real = mask[row].bool()
        torch.testing.assert_close(out[row][real], expected[row][0][real], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("padding", ["left", "right"])
def test_mixed_batch_rows_equal_rows_alone(setup, padding):
    model, bank = setup
    ids, mask = left_padded([6, 9, 3, 9, 5], 9, seed=2)
    if padding == "right":
        ids, mask = ids.flip(1), mask.flip(1)
    # Like the base model, forward() takes positions from position_ids (as generate() does for left padding).
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    prefix_ids = bank.ids(["long", "short", None, "long", "other"])
    prefixrt.attach(model, bank)
    batch = model(ids, attention_mask=mask, position_ids=position_ids, prefix_ids=prefix_ids).logits
    for row in range(5):
        real = mask[row].bool()
        alone = model(ids[row : row + 1, real], prefix_ids=prefix_ids[row : row + 1]).logits
        torch.testing.assert_close(batch[row, real], alone[0], atol=2e-5, rtol=1e-4)


def test_position_offset_zero_starts_real_tokens_at_position_zero(setup):
    model, bank = setup
    ids = random_ids(1, 6, seed=3)
    mask = torch.ones(1, 6, dtype=torch.long)
    expected = prefix_in_cache_logits(model, bank, "long", ids, mask, start_position=0)
    shifted = prefix_in_cache_logits(model, bank, "long", ids, mask)
    assert not torch.allclose(expected, shifted)
    prefixrt.attach(model, bank, position_offset="zero")
    out = model(ids, attention_mask=mask, prefix_ids=bank.ids(["long"])).logits
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)


def test_incremental_decoding_with_cache_equals_full_forward(setup):
    model, bank = setup
    ids, mask = left_padded([8, 5], 8, seed=4)
    prefix_ids = bank.ids(["long", "short"])
    prefixrt.attach(model, bank)
    full = model(ids, attention_mask=mask, prefix_ids=prefix_ids).logits
    first = model(ids[:, :6], attention_mask=mask[:, :6], prefix_ids=prefix_ids, use_cache=True)
    cache = first.cache if hasattr(first, "cache") else first.past_key_values
    assert cache.get_seq_length() == 6  # the cache holds real tokens only, never the prefix
    step = model(ids[:, 6:], attention_mask=mask, prefix_ids=prefix_ids, past_key_values=cache)
    torch.testing.assert_close(step.logits, full[:, 6:], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["greedy", "beam"])
def test_generate_mixed_batch_rows_equal_rows_alone(setup, mode):
    model, bank = setup
    ids, mask = left_padded([5, 8, 3], 8, seed=5)
    prefix_ids = bank.ids(["short", None, "long"])
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=1, eos_token_id=None)
    if mode == "beam":
        kwargs.update(num_beams=3, num_return_sequences=2)
    prefixrt.attach(model, bank)
    batch = model.generate(ids, attention_mask=mask, prefix_ids=prefix_ids, **kwargs)
    per = kwargs.get("num_return_sequences", 1)
    for row in range(3):
        n = int(mask[row].sum())
        alone = model.generate(ids[row : row + 1, -n:], prefix_ids=prefix_ids[row : row + 1], **kwargs)
        torch.testing.assert_close(batch[row * per : (row + 1) * per, -(n + 6) :], alone)


def test_generate_no_prefix_rows_equal_base_generate(setup):
    model, bank = setup
    ids, mask = left_padded([5, 8], 8, seed=6)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=1, eos_token_id=None)
    base = model.generate(ids, attention_mask=mask, **kwargs)
    prefixrt.attach(model, bank)
    out = model.generate(ids, attention_mask=mask, prefix_ids=torch.tensor([-1, -1]), **kwargs)
    torch.testing.assert_close(out, base)


def test_sampling_with_prefix_runs_and_is_seeded(setup):
    model, bank = setup
    ids, mask = left_padded([4, 6], 6, seed=7)
    prefixrt.attach(model, bank)
    kwargs = dict(
        max_new_tokens=5,
        do_sample=True,
        top_k=20,
        top_p=0.9,
        pad_token_id=1,
        eos_token_id=None,
        num_return_sequences=2,
    )
    torch.manual_seed(0)
    first = model.generate(ids, attention_mask=mask, prefix_ids=bank.ids(["long", "short"]), **kwargs)
    torch.manual_seed(0)
    second = model.generate(ids, attention_mask=mask, prefix_ids=bank.ids(["long", "short"]), **kwargs)
    assert first.shape == (4, 11)
    torch.testing.assert_close(first, second)


def test_detach_restores_the_original_model(setup):
    model, bank = setup
    ids, mask = left_padded([6, 4], 6, seed=8)
    implementation = model.config._attn_implementation
    before = model(ids, attention_mask=mask).logits
    prefixrt.attach(model, bank)
    assert prefixrt.is_attached(model)
    prefixrt.detach(model)
    assert not prefixrt.is_attached(model)
    assert model.config._attn_implementation == implementation
    assert "prepare_inputs_for_generation" not in vars(model)
    assert not any(hasattr(m, "_prefixrt_site") for m in model.modules())
    assert not model.transformer._forward_pre_hooks
    torch.testing.assert_close(model(ids, attention_mask=mask).logits, before, rtol=0, atol=0)
    prefixrt.attach(model, bank)  # and it can be attached again
    model(ids, attention_mask=mask, prefix_ids=bank.ids(["short", None]))


def test_state_dict_is_untouched_by_attach(setup):
    model, bank = setup
    keys = set(model.state_dict())
    prefixrt.attach(model, bank)
    assert set(model.state_dict()) == keys


@pytest.mark.parametrize(
    "prefix_ids,error",
    [
        (None, "pass prefix_ids"),
        (torch.tensor([0]), r"prefix_ids must be a LongTensor \[batch=2\]"),
        (torch.tensor([0, 7]), "not in the bank"),
        (torch.tensor([-2, 0]), "not in the bank"),
        (torch.tensor([0.0, 1.0]), "integer"),
    ],
)
def test_bad_prefix_ids_raise_clear_errors(setup, prefix_ids, error):
    model, bank = setup
    prefixrt.attach(model, bank)
    ids = random_ids(2, 4)
    kwargs = {} if prefix_ids is None else {"prefix_ids": prefix_ids}
    with pytest.raises(ValueError, match=error):
        model(ids, **kwargs)


def test_removed_entry_id_is_rejected(setup):
    model, bank = setup
    prefixrt.attach(model, bank)
    stale = bank.ids(["short"])
    bank.remove("short")
    with pytest.raises(ValueError, match="not in the bank"):
        model(random_ids(1, 4), prefix_ids=stale)


def test_attach_rejects_a_bank_for_another_architecture(setup):
    model, _ = setup
    other = random_bank(tiny_gpt2(n_layer=3), {"x": 2})
    with pytest.raises(ValueError, match="bank was built for gpt2"):
        prefixrt.attach(model, other)
    assert not prefixrt.is_attached(model)


def test_attach_twice_and_unknown_options_are_refused(setup):
    model, bank = setup
    with pytest.raises(ValueError, match="position_offset"):
        prefixrt.attach(model, bank, position_offset="middle")
    with pytest.raises(ValueError, match="backend must be one of"):
        prefixrt.attach(model, bank, backend="flash")
    prefixrt.attach(model, bank)
    with pytest.raises(RuntimeError, match="already attached"):
        prefixrt.attach(model, bank)
