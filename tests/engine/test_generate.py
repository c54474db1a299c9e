"""prefixrt.generate: exactly HF generate()'s tokens on the attached model (greedy, beam search, processors),
mixed prefixes with -1 rows, left padding, GPT-2 and BART; refusals name the argument; sampling follows the
processed distribution and is reproducible."""

import pytest
import torch
from support.tiny import VOCAB, left_padded, random_bank, random_ids, tiny_bart, tiny_gpt2
from transformers import GenerationConfig
from transformers.generation import logits_process as lp

import prefixrt
from prefixrt.engine import UnsupportedGenerationArgument, generate
from prefixrt.engine.batch import Batch
from prefixrt.hf.models.gpt2 import GPT2Runner


def _attached(kind, backend="auto"):
    # Larger initial weights than HF's default so random models emit varied tokens (BART would repeat one).
    if kind == "gpt2":
        model = tiny_gpt2(seed=1, initializer_range=0.3)
    else:
        model = tiny_bart(seed=1, init_std=0.3)
    bank = random_bank(model, {"long": 11, "short": 3, "other": 6}, seed=2)
    return prefixrt.attach(model, bank, backend=backend), bank


@pytest.fixture(scope="module", params=["gpt2", "bart"])
def attached(request):
    return _attached(request.param)


def _inputs(bank):
    ids, mask = left_padded([6, 9, 3, 9, 5], 9, seed=3)
    return ids, mask, bank.ids(["long", None, "short", "long", "other"])


def _frequent_token(model, ids, mask, pids):
    """A token the greedy run emits early in some rows but not others: used as EOS so rows finish at
    different steps (and some do not)."""
    out = model.generate(
        ids,
        attention_mask=mask,
        prefix_ids=pids,
        max_new_tokens=6,
        min_new_tokens=6,
        eos_token_id=None,
        pad_token_id=1,
    )
    new = out[:, -6:]
    counts = torch.bincount(new[:, 1:4].reshape(-1), minlength=VOCAB)
    return int(counts.argmax())


def _both(model, ids, mask, pids, **kwargs):
    ref = model.generate(ids, attention_mask=mask, prefix_ids=pids, **kwargs)
    out = generate(model, ids, attention_mask=mask, prefix_ids=pids, **kwargs)
    return ref, out


def test_greedy_equals_hf(attached):
    model, bank = attached
    ids, mask, pids = _inputs(bank)
    eos = _frequent_token(model, ids, mask, pids)
    ref, out = _both(model, ids, mask, pids, max_new_tokens=12, eos_token_id=eos, pad_token_id=1)
    assert torch.equal(out, ref)
    finished_early = (ref[:, -1] == 1).sum()
    assert 0 < finished_early < ids.shape[0], "the test wants rows that finish at different steps"


@pytest.mark.parametrize(
    "beams, returns, length_penalty, early_stopping",
    [(3, 1, 1.0, False), (4, 2, 0.5, True), (4, 4, -0.7, "never"), (2, 2, 2.0, False), (5, 3, 1.0, True)],
)
def test_beam_search_equals_hf(attached, beams, returns, length_penalty, early_stopping):
    model, bank = attached
    ids, mask, pids = _inputs(bank)
    eos = _frequent_token(model, ids, mask, pids)
    ref, out = _both(
        model,
        ids,
        mask,
        pids,
        max_new_tokens=9,
        num_beams=beams,
        num_return_sequences=returns,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        eos_token_id=eos,
        pad_token_id=1,
    )
    assert out.shape == ref.shape
    assert torch.equal(out, ref)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(min_new_tokens=5),
        dict(repetition_penalty=1.6),
        dict(bad_words_ids=[[5], [7, 8], [11, 12, 13]]),
        dict(no_repeat_ngram_size=2),
        dict(
            min_new_tokens=3, repetition_penalty=0.8, bad_words_ids=[[4]], num_beams=3, num_return_sequences=2
        ),
        dict(max_length=14),
    ],
    ids=["min_new", "repetition", "bad_words", "no_repeat", "beam_mix", "max_length"],
)
def test_processors_equal_hf(attached, kwargs):
    model, bank = attached
    ids, mask, pids = _inputs(bank)
    eos = _frequent_token(model, ids, mask, pids)
    kwargs = {"max_new_tokens": 10, **kwargs} if "max_length" not in kwargs else kwargs
    ref, out = _both(model, ids, mask, pids, eos_token_id=eos, pad_token_id=1, **kwargs)
    assert torch.equal(out, ref)


def test_generation_config_object_and_model_defaults(attached):
    model, bank = attached
    ids, mask, pids = _inputs(bank)
    config = GenerationConfig(max_new_tokens=7, num_beams=2, pad_token_id=1, eos_token_id=None)
    ref, out = _both(model, ids, mask, pids, generation_config=config)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("kind", ["gpt2", "bart"])
def test_reference_backend_equals_hf(kind):
    """With the reference backend (which copies prefixes per row) the engine groups rows by prefix itself and
    merges a prefix part with each row's own part: still HF's tokens."""
    model, bank = _attached(kind, backend="reference")
    ids, mask, pids = _inputs(bank)
    eos = _frequent_token(model, ids, mask, pids)
    for kwargs in (dict(max_new_tokens=10), dict(max_new_tokens=8, num_beams=3, num_return_sequences=2)):
        ref, out = _both(model, ids, mask, pids, eos_token_id=eos, pad_token_id=1, **kwargs)
        assert torch.equal(out, ref)


def test_no_padding_and_all_minus_one_rows(attached):
    model, bank = attached
    ids = random_ids(3, 7, seed=4)
    pids = torch.tensor([-1, -1, -1])
    ref, out = _both(model, ids, None, pids, max_new_tokens=6, eos_token_id=None, pad_token_id=1)
    assert torch.equal(out, ref)


def test_gpt2_attention_mask_inferred_from_pad_like_hf():
    model, bank = _attached("gpt2")
    ids, _ = left_padded([4, 7], 7, seed=5, pad=9)
    pids = bank.ids(["short", "long"])
    ref, out = _both(model, ids, None, pids, max_new_tokens=5, pad_token_id=9, eos_token_id=2)
    assert torch.equal(out, ref)


def test_position_offset_zero():
    model, bank = _attached("gpt2")
    prefixrt.detach(model)
    prefixrt.attach(model, bank, position_offset="zero")
    ids, mask, pids = _inputs(bank)
    ref, out = _both(model, ids, mask, pids, max_new_tokens=6, eos_token_id=None, pad_token_id=1)
    assert torch.equal(out, ref)


def test_finished_rows_leave_the_batch(monkeypatch):
    model, bank = _attached("gpt2")
    ids, mask, pids = _inputs(bank)
    eos = _frequent_token(model, ids, mask, pids)
    rows = []
    original = GPT2Runner.decode

    def spy(self, step):
        rows.append(step.input_ids.shape[0])
        return original(self, step)

    monkeypatch.setattr(GPT2Runner, "decode", spy)
    out = generate(
        model, ids, attention_mask=mask, prefix_ids=pids, max_new_tokens=12, eos_token_id=eos, pad_token_id=1
    )
    finished_at = [(row == eos).nonzero()[0, 0].item() if (row == eos).any() else None for row in out[:, 9:]]
    assert rows == sorted(rows, reverse=True) and rows[-1] < 5
    for step, n in enumerate(rows, start=1):  # decode step s feeds token s-1 (0-based) of each live row
        assert n == sum(1 for f in finished_at if f is None or f >= step)


def test_beams_share_the_prompt_kv(monkeypatch):
    """The prompt K/V is stored once per input (not per beam); only generated K/V are reordered."""
    model, bank = _attached("gpt2")
    ids, mask, pids = _inputs(bank)
    seen = {}
    original = Batch.prefill

    def spy(self, *args, **kwargs):
        seen["batch"] = self
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Batch, "prefill", spy)
    generate(
        model,
        ids,
        attention_mask=mask,
        prefix_ids=pids,
        max_new_tokens=5,
        num_beams=4,
        eos_token_id=None,
        pad_token_id=1,
    )
    stores = seen["batch"].stores
    assert stores["ctx"].rows == 5 and stores["ctx"].capacity == 9
    assert stores["gen"].rows == 20 and stores["gen"].capacity == 5


@pytest.mark.parametrize(
    "kwargs, named",
    [
        (dict(num_beams=4, num_beam_groups=2, diversity_penalty=1.0), "diversity_penalty"),
        (dict(output_scores=True, return_dict_in_generate=True), "return_dict_in_generate"),
        (dict(streamer=object()), "streamer"),
        (
            dict(logits_processor=lp.LogitsProcessorList([lp.TemperatureLogitsWarper(0.5)])),
            "logits_processor",
        ),
        (dict(token_type_ids=torch.zeros(5, 9, dtype=torch.long)), "token_type_ids"),
        (dict(max_time=3.0), "max_time"),
        (dict(encoder_repetition_penalty=1.2), "encoder_repetition_penalty"),
    ],
)
def test_unsupported_arguments_raise_naming_them(kwargs, named):
    model, bank = _attached("gpt2")
    ids, mask, pids = _inputs(bank)
    with pytest.raises(UnsupportedGenerationArgument, match=named):
        generate(model, ids, attention_mask=mask, prefix_ids=pids, max_new_tokens=3, **kwargs)


def test_beam_sampling_and_model_config_settings_raise():
    model, bank = _attached("bart")
    ids, mask, pids = _inputs(bank)
    with pytest.raises(UnsupportedGenerationArgument, match="beam sampling"):
        generate(
            model, ids, attention_mask=mask, prefix_ids=pids, do_sample=True, num_beams=2, max_new_tokens=3
        )
    model.generation_config.encoder_no_repeat_ngram_size = 2  # set by the model, not the call: still refused
    with pytest.raises(UnsupportedGenerationArgument, match="encoder_no_repeat_ngram_size"):
        generate(model, ids, attention_mask=mask, prefix_ids=pids, max_new_tokens=3)


def test_needs_attached_model_and_prefix_ids():
    model = tiny_gpt2()
    ids = random_ids(2, 4)
    with pytest.raises(RuntimeError, match="attach"):
        generate(model, ids, prefix_ids=torch.tensor([-1, -1]), max_new_tokens=2)
    model, bank = _attached("gpt2")
    with pytest.raises(ValueError, match="prefix_ids"):
        generate(model, ids, max_new_tokens=2)
    with pytest.raises(ValueError, match="not in the bank"):
        generate(model, ids, prefix_ids=torch.tensor([0, 7]), max_new_tokens=2)


# -- sampling ---------------------------------------------------------------------------------------------------


def test_sampling_is_reproducible(attached):
    model, bank = attached
    ids, mask, pids = _inputs(bank)
    kwargs = dict(
        max_new_tokens=8,
        do_sample=True,
        top_k=30,
        temperature=0.9,
        eos_token_id=None,
        pad_token_id=1,
        num_return_sequences=2,
    )
    a = generate(model, ids, attention_mask=mask, prefix_ids=pids, seed=11, **kwargs)
    b = generate(model, ids, attention_mask=mask, prefix_ids=pids, seed=11, **kwargs)
    c = generate(model, ids, attention_mask=mask, prefix_ids=pids, seed=12, **kwargs)
    start = 9 if model.config.model_type == "gpt2" else 1
    assert a.shape == (10, start + 8) and torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(5)
    d = generate(model, ids, attention_mask=mask, prefix_ids=pids, **kwargs)
    torch.manual_seed(5)
    e = generate(model, ids, attention_mask=mask, prefix_ids=pids, **kwargs)
    f = generate(
        model, ids, attention_mask=mask, prefix_ids=pids, generator=torch.Generator().manual_seed(3), **kwargs
    )
    g = generate(
        model, ids, attention_mask=mask, prefix_ids=pids, generator=torch.Generator().manual_seed(3), **kwargs
    )
    assert torch.equal(d, e) and torch.equal(f, g)


def _chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    stat = ((counts - expected) ** 2 / expected).sum()
    df = torch.tensor(float(probs.numel() - 1), dtype=torch.float64)
    return float(1 - torch.special.gammainc(df / 2, stat.double() / 2))


@pytest.mark.parametrize(
    "warper", [dict(top_k=8, temperature=0.7), dict(top_p=0.6), dict(top_k=12, top_p=0.9)]
)
def test_sampling_follows_the_processed_distribution(warper):
    """Many independent draws of the first token (one row per draw, one generator each): tokens outside the
    top-k / top-p support never appear, and frequencies fit HF's renormalized distribution (chi-square)."""
    model, bank = _attached("gpt2")
    draws = 3000
    prompt = random_ids(1, 6, seed=8)
    pid = bank.ids(["long"])
    logits = model(prompt, prefix_ids=pid).logits[:, -1].float()
    config = GenerationConfig(do_sample=True, **warper)
    warpers = lp.LogitsProcessorList()
    if "temperature" in warper:
        warpers.append(lp.TemperatureLogitsWarper(warper["temperature"]))
    warpers.append(lp.TopKLogitsWarper(config.top_k if "top_k" in warper else 50))
    if "top_p" in warper:
        warpers.append(lp.TopPLogitsWarper(warper["top_p"]))
    probs = torch.softmax(warpers(prompt, logits), dim=-1)[0].double()
    support = probs > 0
    out = generate(
        model,
        prompt.expand(draws, -1),
        prefix_ids=pid.expand(draws),
        max_new_tokens=1,
        seed=123,
        eos_token_id=None,
        pad_token_id=1,
        do_sample=True,
        **warper,
    )
    counts = torch.bincount(out[:, -1], minlength=VOCAB).double()
    assert counts[~support].sum() == 0, "a token outside the top-k/top-p support was drawn"
    assert int(support.sum()) > 1
    p_value = _chi_square_p_value(counts[support], probs[support])
    assert p_value > 1e-3, f"frequencies do not fit the distribution (p={p_value:.2e})"
    tv = 0.5 * (counts / draws - probs).abs().sum()
    assert tv < 0.06
