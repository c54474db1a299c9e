"""Every KV cache transformers offers GPT-2 and BART, on an attached model: a ``StaticCache`` (whose key tensor is its
whole capacity) gives the dynamic cache's logits and tokens, for mixed prefixes (-1 rows included) and left
padding; every ``cache_implementation`` name ``generate()`` accepts is either equal to the dynamic cache or refused
at the call with an error naming it."""

import pytest
import torch
from support.tiny import left_padded, random_bank, random_ids, tiny_bart, tiny_gpt2
from transformers import DynamicCache, EncoderDecoderCache, QuantizedCache, StaticCache
from transformers.generation.configuration_utils import ALL_CACHE_IMPLEMENTATIONS

import prefixrt
from prefixrt.hf.generation.config import UnsupportedGenerationArgument
from prefixrt.hf.generation.prepare import UnsupportedContinuousBatching
from prefixrt.hf.kv_cache import UnsupportedCache

EXACT = dict(rtol=0, atol=0)
# The cache_implementation names generate() accepts (transformers' list, plus "paged": continuous batching).
NAMES = (*ALL_CACHE_IMPLEMENTATIONS, "paged")
# What an attached model does with each: "equal" (tokens equal the dynamic cache's) or the error it raises.
REFUSED = {
    "offloaded": UnsupportedCache,
    "offloaded_static": UnsupportedCache,
    "offloaded_hybrid": UnsupportedCache,
    "offloaded_hybrid_chunked": UnsupportedCache,
    "quantized": (UnsupportedCache, ImportError, ValueError),  # transformers may refuse first (see the test)
    "paged": UnsupportedContinuousBatching,
}


def _attached_setup(model, seed: int, backend: str):
    """``model`` attached to a bank of three prefixes, and four left-padded rows (one without a prefix):
    ``(model, ids, mask, prefix_ids)``."""
    bank = random_bank(model, {"short": 3, "long": 17, "other": 5})
    prefixrt.attach(model, bank, backend=backend)
    ids, mask = left_padded([7, 9, 4, 6], 9, seed=seed)
    prefix_ids = bank.ids(["long", None, "short", "other"])
    return model, ids, mask, prefix_ids


def _gpt2_setup(backend="auto"):
    return _attached_setup(tiny_gpt2(), 11, backend)


def _bart_setup(backend="auto"):
    return _attached_setup(tiny_bart(), 12, backend)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_gpt2_static_cache_prefill_and_decode_equal_the_dynamic_cache(backend):
    model, ids, mask, prefix_ids = _gpt2_setup(backend)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    caches = {
        "dynamic": DynamicCache(config=model.config),
        "static": StaticCache(config=model.config, max_cache_len=16),
    }
    logits = {}
    for name, cache in caches.items():
        steps = [
            model(
                ids, attention_mask=mask, position_ids=positions, prefix_ids=prefix_ids, past_key_values=cache
            )
        ]
        step_mask, step_positions = mask, positions[:, -1:]
        for token in ([[5], [6], [7], [8]], [[9], [10], [11], [12]]):
            step_mask = torch.cat([step_mask, torch.ones_like(mask[:, :1])], 1)
            step_positions = step_positions + 1
            steps.append(
                model(
                    torch.tensor(token),
                    attention_mask=step_mask,
                    position_ids=step_positions,
                    prefix_ids=prefix_ids,
                    past_key_values=cache,
                )
            )
        logits[name] = [step.logits for step in steps]
    for dynamic, static in zip(logits["dynamic"], logits["static"], strict=True):
        torch.testing.assert_close(static, dynamic, **EXACT)


def test_gpt2_static_cache_without_attention_mask_equals_the_dynamic_cache():
    model, ids, _, prefix_ids = _gpt2_setup()
    dynamic = model(ids, prefix_ids=prefix_ids, past_key_values=DynamicCache(config=model.config)).logits
    static = model(
        ids, prefix_ids=prefix_ids, past_key_values=StaticCache(config=model.config, max_cache_len=16)
    )
    torch.testing.assert_close(static.logits, dynamic, **EXACT)


def test_gpt2_chunked_prefill_into_a_static_cache_equals_one_prefill():
    """A second multi-token forward into a static cache: the causal rule is aligned on the cache position."""
    model, ids, mask, prefix_ids = _gpt2_setup()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    whole = model(ids, attention_mask=mask, position_ids=positions, prefix_ids=prefix_ids).logits
    cache = StaticCache(config=model.config, max_cache_len=20)
    first = model(
        ids[:, :5],
        attention_mask=mask[:, :5],
        position_ids=positions[:, :5],
        prefix_ids=prefix_ids,
        past_key_values=cache,
    )
    second = model(
        ids[:, 5:],
        attention_mask=mask,
        position_ids=positions[:, 5:],
        prefix_ids=prefix_ids,
        past_key_values=cache,
    )
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), whole, atol=2e-5, rtol=1e-4)


def test_bart_static_cache_prefill_and_decode_equal_the_dynamic_cache():
    model, ids, mask, prefix_ids = _bart_setup()
    decoder_ids, decoder_mask = left_padded([3, 4, 2, 4], 4, seed=13, pad=1)

    def caches(kind):
        if kind == "dynamic":
            return EncoderDecoderCache(DynamicCache(config=model.config), DynamicCache(config=model.config))
        return EncoderDecoderCache(
            StaticCache(config=model.config, max_cache_len=12),
            StaticCache(config=model.config, max_cache_len=ids.shape[1]),
        )

    logits = {}
    for kind in ("dynamic", "static"):
        cache = caches(kind)
        common = dict(attention_mask=mask, prefix_ids=prefix_ids, past_key_values=cache)
        steps = [model(ids, decoder_input_ids=decoder_ids, decoder_attention_mask=decoder_mask, **common)]
        step_mask = decoder_mask
        for token in ([[5], [6], [7], [8]], [[9], [10], [11], [12]]):
            step_mask = torch.cat([step_mask, torch.ones_like(step_mask[:, :1])], 1)
            steps.append(
                model(
                    encoder_outputs=(steps[0].encoder_last_hidden_state,),
                    decoder_input_ids=torch.tensor(token),
                    decoder_attention_mask=step_mask,
                    **common,
                )
            )
        logits[kind] = [step.logits for step in steps]
    for dynamic, static in zip(logits["dynamic"], logits["static"], strict=True):
        torch.testing.assert_close(static, dynamic, **EXACT)


@pytest.mark.parametrize("family", ["gpt2", "bart"])
@pytest.mark.parametrize("mode", ["greedy", "beam"])
def test_generate_with_a_static_cache_gives_the_dynamic_cache_tokens(family, mode):
    model, ids, mask, prefix_ids = _gpt2_setup() if family == "gpt2" else _bart_setup()
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=1, eos_token_id=None)
    if mode == "beam":
        kwargs.update(num_beams=3, num_return_sequences=2)
    dynamic = model.generate(ids, attention_mask=mask, prefix_ids=prefix_ids, **kwargs)
    static = model.generate(
        ids, attention_mask=mask, prefix_ids=prefix_ids, cache_implementation="static", **kwargs
    )
    torch.testing.assert_close(static, dynamic, **EXACT)


@pytest.mark.parametrize("family", ["gpt2", "bart"])
@pytest.mark.parametrize("name", NAMES)
def test_every_cache_implementation_is_equal_or_refused_by_name(family, name):
    model, ids, mask, prefix_ids = _gpt2_setup() if family == "gpt2" else _bart_setup()
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=1, eos_token_id=None)
    if name not in REFUSED:
        dynamic = model.generate(ids, attention_mask=mask, prefix_ids=prefix_ids, **kwargs)
        out = model.generate(
            ids, attention_mask=mask, prefix_ids=prefix_ids, cache_implementation=name, **kwargs
        )
        torch.testing.assert_close(out, dynamic, **EXACT)
        return
    with pytest.raises(REFUSED[name]) as error:
        model.generate(ids, attention_mask=mask, prefix_ids=prefix_ids, cache_implementation=name, **kwargs)
    # "quantized": without optimum-quanto, transformers refuses first ("KV cache quantization"; BART: "does not
    # support the quantized cache"); with it, the cache is built and the first forward refuses it (as fp8 below).
    assert (name if name != "quantized" else "quantiz") in str(error.value)


def test_a_quantized_cache_that_transformers_builds_is_refused_by_name():
    """transformers' fp8 backend needs no extra package: generate() builds the QuantizedCache, the first forward
    refuses it (its keys are lossy, so the logits would not be the dynamic cache's)."""
    model, ids, mask, prefix_ids = _gpt2_setup()
    with pytest.raises(UnsupportedCache, match="cache_implementation='quantized'"):
        model.generate(
            ids,
            attention_mask=mask,
            prefix_ids=prefix_ids,
            max_new_tokens=3,
            pad_token_id=1,
            cache_implementation="quantized",
            cache_config={"backend": "fp8"},
        )
    with pytest.raises(UnsupportedCache, match="QuantizedCache"):
        model(ids, prefix_ids=prefix_ids, past_key_values=QuantizedCache(backend="fp8", config=model.config))


def test_offloading_caches_passed_to_forward_are_refused_by_name():
    model, ids, _, prefix_ids = _gpt2_setup()
    with pytest.raises(UnsupportedCache, match="'offloaded'"):
        model(ids, prefix_ids=prefix_ids, past_key_values=DynamicCache(config=model.config, offloading=True))
    with pytest.raises(UnsupportedCache, match="'offloaded_static'"):
        model(
            ids,
            prefix_ids=prefix_ids,
            past_key_values=StaticCache(config=model.config, max_cache_len=16, offloading=True),
        )


def test_continuous_batching_entry_points_are_refused():
    model, ids, _, _ = _gpt2_setup()
    with pytest.raises(UnsupportedContinuousBatching, match="prefixrt.Engine"):
        model.generate_batch(inputs=ids.tolist(), max_new_tokens=2)
    prefixrt.detach(model)
    assert "init_continuous_batching" not in vars(model)


def test_a_cross_attention_cache_larger_than_the_source_is_refused():
    """A user-built BART cache whose cross-attention StaticCache has more slots than the source: the keys do not
    match the source mask (transformers' own attention fails on it too)."""
    model, ids, mask, prefix_ids = _bart_setup()
    cache = EncoderDecoderCache(
        StaticCache(config=model.config, max_cache_len=12), StaticCache(config=model.config, max_cache_len=16)
    )
    with pytest.raises(ValueError, match="keys but its mask describes"):
        model(
            ids,
            attention_mask=mask,
            decoder_input_ids=random_ids(4, 3),
            prefix_ids=prefix_ids,
            past_key_values=cache,
        )


@pytest.mark.parametrize("name", NAMES)
def test_prefixrt_generate_accepts_the_caches_an_attached_model_runs_and_refuses_the_others(name):
    """prefixrt.generate runs its own preallocated cache: a cache_implementation that gives the dynamic cache's
    tokens on the attached model changes nothing; the others are refused by name, as generate() refuses them."""
    model, ids, mask, prefix_ids = _gpt2_setup()
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=1, eos_token_id=None)
    if name in REFUSED:
        with pytest.raises(UnsupportedGenerationArgument, match="cache_implementation"):
            prefixrt.generate(
                model, ids, attention_mask=mask, prefix_ids=prefix_ids, cache_implementation=name, **kwargs
            )
        return
    expected = model.generate(ids, attention_mask=mask, prefix_ids=prefix_ids, **kwargs)
    got = prefixrt.generate(
        model, ids, attention_mask=mask, prefix_ids=prefix_ids, cache_implementation=name, **kwargs
    )
    torch.testing.assert_close(got, expected, **EXACT)
