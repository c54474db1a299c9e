"""The small server (``bart-tiny``, one row, one waiting place): BART completions, chat completions through a chat
template, overload (503 with ``Retry-After``), and a waiting request whose prefix is removed."""

from __future__ import annotations

import httpx
import openai
import pytest
from serve_support import BART_PREFIXES
from test_errors import assert_openai_error
from test_prefixes_and_disconnects import wait_for

LONG = {"max_tokens": 400, "temperature": 0, "stream": True}  # min_tokens=400 too: no early EOS


def test_bart_completion_is_the_decoders_text(small_client, offline_bart):
    tok = offline_bart.tokenizer
    for model in ("bart-tiny", *BART_PREFIXES):
        source = f"Summarize this source for {model}."
        out = small_client.completions.create(model=model, prompt=source, max_tokens=10, temperature=0,
                                              extra_body={"return_token_ids": True})  # fmt: skip
        prefix = None if model == "bart-tiny" else model
        expected = offline_bart.tokens(tok(source).input_ids, prefix, 10)
        assert out.choices[0].model_extra["token_ids"] == expected, model
        assert out.choices[0].text == offline_bart.text(expected)
        assert out.usage.prompt_tokens == len(tok(source).input_ids)


def test_chat_completion_through_the_template(small_client, offline_bart):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    out = small_client.chat.completions.create(model="summ", messages=messages, max_tokens=6, temperature=0,
                                               extra_body={"return_token_ids": True})  # fmt: skip
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    rendered = "system: be brief\nuser: hello\nassistant:"
    expected = offline_bart.tokens(offline_bart.tokenizer(rendered).input_ids, "summ", 6)
    assert out.choices[0].model_extra["token_ids"] == expected
    assert out.choices[0].message.content == offline_bart.text(expected)
    chunks = list(small_client.chat.completions.create(model="summ", messages=messages, max_tokens=6,
                                                       temperature=0, stream=True))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == out.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == out.choices[0].finish_reason
    with pytest.raises(openai.BadRequestError) as err:
        small_client.chat.completions.create(model="summ", messages=messages, logprobs=True)
    assert err.value.body["param"] == "logprobs"


def _long_stream(server, model: str, http: httpx.Client):
    body = {"model": model, "prompt": "keep going", "min_tokens": 400, **LONG}
    return http.stream("POST", server.url + "/v1/completions", json=body)


def test_overload_is_a_503_with_retry_after(small_server):
    """One row runs A, one waiting place holds B: C is refused at once."""
    with httpx.Client(timeout=60) as http:
        with _long_stream(small_server, "bart-tiny", http) as a:
            assert a.status_code == 200
            a_lines = a.iter_lines()  # kept: a dropped iterator closes the connection (a disconnect)
            assert next(x for x in a_lines if x).startswith("data: ")  # A runs
            with _long_stream(small_server, "bart-tiny", http) as b:
                assert b.status_code == 200  # B waits
                r = http.post(small_server.url + "/v1/completions",
                              json={"model": "bart-tiny", "prompt": "c", "max_tokens": 2})  # fmt: skip
                err = assert_openai_error(r, 503)
                assert err["code"] == "overloaded" and int(r.headers["Retry-After"]) >= 1
                assert "--max-waiting" in err["message"]
                from openai import OpenAI

                client = OpenAI(base_url=small_server.url + "/v1", api_key="x", max_retries=0)
                with pytest.raises(openai.InternalServerError) as e:
                    client.completions.create(model="bart-tiny", prompt="c", max_tokens=2)
                assert e.value.status_code == 503
    # A and B were aborted when their streams closed: the server takes requests again
    wait_for(lambda: small_server.metrics()["prefixrt_num_requests_running"] == 0, what="the aborts")
    r = httpx.post(small_server.url + "/v1/completions", json={"model": "bart-tiny", "prompt": "c", "max_tokens": 2},
                   timeout=30)  # fmt: skip
    assert r.status_code == 200


def test_a_waiting_request_whose_prefix_is_removed_gets_an_error(small_server):
    r = httpx.post(
        small_server.url + "/v1/prefixes", json={"name": "extra", "bank": "extra.safetensors"}, timeout=30
    )
    assert r.status_code == 201, r.text
    with httpx.Client(timeout=60) as http:
        with _long_stream(small_server, "extra", http) as a:
            a_lines = a.iter_lines()  # kept: a dropped iterator closes the connection (a disconnect)
            assert next(x for x in a_lines if x).startswith("data: ")  # A runs with the prefix
            body = {"model": "extra", "prompt": "waits", "max_tokens": 3, "stream": True}
            with http.stream("POST", small_server.url + "/v1/completions", json=body) as b:
                assert b.status_code == 200  # B waits for the row
                assert http.delete(small_server.url + "/v1/prefixes/extra").status_code == 200
                r = http.post(small_server.url + "/v1/completions", json={"model": "extra", "prompt": "x"})
                assert_openai_error(r, 404, "model")
                rest = [x for x in a_lines if x]  # A runs to its end
                assert rest[-1] == "data: [DONE]"
                assert len(rest) > 300  # one chunk per token with text: A was not cut short
                assert '"finish_reason":"stop"' in rest[-2]  # BART forces EOS as its last token
                b_lines = [x for x in b.iter_lines() if x]
    assert b_lines[-1] == "data: [DONE]"
    import json

    error = json.loads(b_lines[-2][len("data: "):])["error"]  # fmt: skip
    assert "removed" in error["message"] and error["param"] == "model"
