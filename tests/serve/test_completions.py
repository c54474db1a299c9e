"""``/v1/completions`` and ``/v1/models`` through the ``openai`` client, against ``prefixrt.generate`` offline.

Greedy answers must be ``prefixrt.generate``'s tokens for that request alone, token for token (the server returns
them with the ``return_token_ids`` extension) and its text with the same tokenizer, whatever else the engine runs
at the same time: every check below runs while other requests, with other prefixes, share the batch.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from serve_support import API_KEY, GPT2_PREFIXES, PEFT_NAME

PROMPTS = [
    "The restaurant near the river",
    "name[The Eagle], eatType[coffee shop], food[Japanese]",
    "Once upon a time there was",
    "x",
]
MODELS = ["gpt2-tiny", *GPT2_PREFIXES, PEFT_NAME]


def _prefix(model: str) -> str | None:
    return None if model == "gpt2-tiny" else model


def test_models_lists_the_base_and_every_prefix(client):
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == set(MODELS)
    assert cards["gpt2-tiny"].model_extra.get("parent") is None
    for name in MODELS[1:]:
        assert cards[name].model_extra["parent"] == "gpt2-tiny"
    assert cards["beta"].model_extra["prefix_length"] == {"decoder": GPT2_PREFIXES["beta"]}
    assert client.models.retrieve("alpha").id == "alpha"


def test_greedy_completions_equal_offline_generate_while_others_run(client, offline):
    """20 requests (5 models x 4 prompts, half streamed) at once from 8 threads; each equals generate()."""
    jobs = [
        (m, p, 4 + 3 * (i % 7), i % 2 == 1)
        for i, (m, p) in enumerate((m, p) for m in MODELS for p in PROMPTS)
    ]

    def run(job):
        model, prompt, max_tokens, stream = job
        if not stream:
            out = client.completions.create(
                model=model,
                prompt=prompt,
                max_tokens=max_tokens,
                temperature=0,
                extra_body={"return_token_ids": True},
            )
            choice = out.choices[0]
            return choice.text, choice.model_extra["token_ids"], choice.finish_reason, out.usage
        text, finish, usage = "", None, None
        for chunk in client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        ):
            if chunk.choices:
                text += chunk.choices[0].text
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage is not None:
                usage = chunk.usage
        return text, None, finish, usage

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(run, jobs))
    tok = offline.tokenizer
    for (model, prompt, max_tokens, _), (text, token_ids, finish, usage) in zip(jobs, results, strict=True):
        prompt_ids = tok(prompt).input_ids
        expected = offline.tokens(prompt_ids, _prefix(model), max_tokens)
        if token_ids is not None:
            assert token_ids == expected, (model, prompt)
        assert text == offline.text(expected), (model, prompt)
        assert finish == ("stop" if expected[-1] == tok.eos_token_id else "length")
        assert usage.prompt_tokens == len(prompt_ids)
        assert usage.completion_tokens == len(expected)
        assert usage.total_tokens == len(prompt_ids) + len(expected)


def test_several_prompts_token_ids_and_n(client, offline):
    ids = [offline.tokenizer(p).input_ids for p in PROMPTS[:3]]
    out = client.completions.create(
        model="beta", prompt=ids, max_tokens=5, temperature=0, extra_body={"return_token_ids": True}
    )
    assert [c.index for c in out.choices] == [0, 1, 2]
    for choice, prompt in zip(out.choices, ids, strict=True):
        assert choice.model_extra["token_ids"] == offline.tokens(prompt, "beta", 5)
    single = client.completions.create(model="beta", prompt=ids[0], max_tokens=5, temperature=0, n=2)
    assert [c.index for c in single.choices] == [0, 1]
    assert single.choices[0].text == single.choices[1].text == out.choices[0].text
    assert out.usage.prompt_tokens == sum(len(p) for p in ids)


def test_seeded_sampling_is_reproducible_and_is_generate_with_that_seed(client, offline):
    kwargs = dict(model="alpha", prompt=PROMPTS[0], max_tokens=10, temperature=0.9, top_p=0.95, seed=1234)
    first = client.completions.create(**kwargs, n=2, extra_body={"return_token_ids": True})
    again = client.completions.create(**kwargs, n=2, extra_body={"return_token_ids": True})
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    prompt_ids = offline.tokenizer(PROMPTS[0]).input_ids
    for choice in first.choices:  # choice i samples with seed + i
        expected = offline.tokens(
            prompt_ids,
            "alpha",
            10,
            do_sample=True,
            temperature=0.9,
            top_p=0.95,
            top_k=0,
            seed=1234 + choice.index,
        )
        assert choice.model_extra["token_ids"] == expected
    assert first.choices[0].text != first.choices[1].text  # different seeds, 10 draws from 50257 tokens
    other = client.completions.create(**{**kwargs, "seed": 99})
    assert other.choices[0].text != first.choices[0].text


def test_stop_string_cuts_the_text(client, offline):
    prompt_ids = offline.tokenizer(PROMPTS[2]).input_ids
    full = offline.text(offline.tokens(prompt_ids, "gamma", 20))
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop and stop in full
    expected = full[: full.index(stop)]
    out = client.completions.create(
        model="gamma", prompt=PROMPTS[2], max_tokens=20, temperature=0, stop=[stop, "@@@"]
    )
    assert out.choices[0].text == expected
    assert out.choices[0].finish_reason == "stop"
    streamed, finish = "", None
    for chunk in client.completions.create(
        model="gamma", prompt=PROMPTS[2], max_tokens=20, temperature=0, stop=stop, stream=True
    ):
        streamed += chunk.choices[0].text
        finish = chunk.choices[0].finish_reason or finish
    assert (streamed, finish) == (expected, "stop")


def test_stream_chunks_are_openai_server_sent_events(main_server):
    body = {"model": "alpha", "prompt": "hello", "max_tokens": 3, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream(
        "POST", main_server.url + "/v1/completions", json=body, headers=headers, timeout=30
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert all(c["usage"] is None for c in chunks[:-1])


@pytest.mark.parametrize(
    "prompt",
    ["", [], [[]], [1.5], 42, [[1, 2], "x"]],
    ids=["empty-text", "empty-list", "empty-ids", "floats", "int", "mixed"],
)
def test_prompt_forms(client, prompt):
    """An empty text is generated from the start token (as OpenAI does); the rest are a 400 naming prompt."""
    import openai

    if prompt == "":
        out = client.completions.create(model="alpha", prompt="", max_tokens=2, temperature=0)
        assert out.usage.prompt_tokens == 1
        return
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="alpha", prompt=prompt, max_tokens=2)
    assert err.value.body["param"] == "prompt"
