"""Every error is its HTTP status with OpenAI's body ``{"error": {"message", "type", "param", "code"}}``, seen
through the ``openai`` client (its exception classes) and raw HTTP."""

from __future__ import annotations

import httpx
import openai
import pytest
from serve_support import API_KEY


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param
    return body["error"]


def post(server, path: str, body, key: str | None = API_KEY, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    return httpx.post(server.url + path, json=body, headers=headers, timeout=30, **kw)


def test_401_without_or_with_a_wrong_api_key(main_server):
    from openai import OpenAI

    for key in ("wrong", ""):
        bad = OpenAI(base_url=main_server.url + "/v1", api_key=key or "x", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    for path, method in (
        ("/v1/models", "GET"),
        ("/v1/completions", "POST"),
        ("/v1/prefixes/alpha", "DELETE"),
    ):
        r = httpx.request(method, main_server.url + path, json={}, timeout=10)
        err = assert_openai_error(r, 401)
        assert err["code"] == "invalid_api_key"
    assert httpx.get(main_server.url + "/health", timeout=10).status_code == 200  # open without a key
    assert httpx.get(main_server.url + "/metrics", timeout=10).status_code == 200


def test_404_unknown_model(client, main_server):
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="no-such-prefix", prompt="hi", max_tokens=2)
    assert err.value.body["param"] == "model" and err.value.body["code"] == "model_not_found"
    assert "no-such-prefix" in err.value.body["message"] and "alpha" in err.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-prefix")
    assert_openai_error(httpx.get(main_server.url + "/v1/nothing-here", timeout=10, headers={
        "Authorization": f"Bearer {API_KEY}"}), 404)  # fmt: skip


@pytest.mark.parametrize(
    "field, value",
    [
        ("logprobs", 1),
        ("echo", True),
        ("best_of", 3),
        ("suffix", "the end"),
        ("logit_bias", {"50256": -100}),
        ("presence_penalty", 0.5),
        ("frequency_penalty", -1.0),
    ],
)
def test_400_unsupported_field_names_it(client, field, value):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="alpha", prompt="hi", max_tokens=2, **{field: value})
    assert err.value.body["param"] == field
    assert err.value.body["code"] == "unsupported_parameter"
    assert field in err.value.body["message"]


def test_neutral_values_of_unsupported_fields_are_accepted(client):
    out = client.completions.create(
        model="alpha",
        prompt="hi",
        max_tokens=2,
        echo=False,
        best_of=1,
        presence_penalty=0,
        frequency_penalty=0.0,
    )
    assert out.choices[0].finish_reason in ("length", "stop")


def test_400_unknown_field_and_unsupported_chat_fields(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="alpha", prompt="hi", max_tokens=2, extra_body={"guided_json": {}})
    assert err.value.body["param"] == "guided_json"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(
            model="alpha",
            prompt="hi",
            max_tokens=2,
            stream=True,
            stream_options={"include_usage": True, "x": 1},
        )
    assert err.value.body["param"] == "stream_options.x"


def test_400_chat_without_a_chat_template(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}])
    assert err.value.body["code"] == "no_chat_template"
    assert "chat template" in err.value.body["message"]


def test_400_too_long_names_both_numbers(client, offline):
    """The main server's model has 128 positions; prefix beta takes 20 of them."""
    prompt = [464] * 90
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="gpt2-tiny", prompt=prompt, max_tokens=40)
    message = err.value.body["message"]
    assert "128" in message and "90" in message and "40" in message, message
    assert err.value.body["param"] == "max_tokens" and err.value.body["code"] == "context_length_exceeded"
    ok = client.completions.create(
        model="gpt2-tiny", prompt=prompt, max_tokens=38, temperature=0
    )  # 90 + 38 = 128
    assert ok.usage.completion_tokens >= 1
    with pytest.raises(openai.BadRequestError) as err:  # fits the model, not once the prefix shifts positions
        client.completions.create(model="beta", prompt=prompt, max_tokens=38)
    assert "20" in err.value.body["message"] and "beta" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:  # the engine's pool: --max-prompt-tokens 100
        client.completions.create(model="gpt2-tiny", prompt=[464] * 101, max_tokens=1)
    assert "101" in err.value.body["message"] and "100" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:  # --max-new-tokens 64
        client.completions.create(model="gpt2-tiny", prompt="hi", max_tokens=65)
    assert "65" in err.value.body["message"] and "64" in err.value.body["message"]


def test_422_validation_and_400_bad_json(main_server):
    err = assert_openai_error(post(main_server, "/v1/completions", {"model": "alpha", "prompt": "x", "max_tokens": "many"}), 422, "max_tokens")  # fmt: skip
    assert "many" in err["message"]
    assert_openai_error(post(main_server, "/v1/completions", {"model": "alpha", "prompt": "x", "temperature": 9}), 422, "temperature")  # fmt: skip
    assert_openai_error(post(main_server, "/v1/completions", {"prompt": "x"}), 422, "model")
    r = httpx.post(main_server.url + "/v1/completions", content=b"{not json", timeout=10,
                   headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})  # fmt: skip
    assert_openai_error(r, 400)
    assert_openai_error(post(main_server, "/v1/completions", [1, 2]), 400)


def test_error_answers_are_counted_in_metrics(main_server):
    before = main_server.metrics().get('prefixrt_http_errors_total{status="404"}', 0)
    post(main_server, "/v1/completions", {"model": "nope", "prompt": "x"})
    assert main_server.metrics()['prefixrt_http_errors_total{status="404"}'] == before + 1
