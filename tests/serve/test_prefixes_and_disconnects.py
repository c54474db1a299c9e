"""Prefixes loaded and removed while the server runs, and clients that go away mid-stream (main server)."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from serve_support import API_KEY
from test_errors import assert_openai_error, post

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def wait_for(predicate, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def delete(server, name: str) -> httpx.Response:
    return httpx.delete(f"{server.url}/v1/prefixes/{name}", headers=AUTH, timeout=30)


def test_load_a_bank_entry_and_a_peft_adapter_then_remove_them(client, main_server, offline, serve_files):
    import prefixrt

    r = post(main_server, "/v1/prefixes", {"name": "loadme", "bank": "extra.safetensors"})
    assert r.status_code == 201, r.text
    assert r.json()["id"] == "loadme" and r.json()["parent"] == "gpt2-tiny"
    r = post(
        main_server, "/v1/prefixes", {"name": "other-name", "bank": "extra.safetensors", "entry": "other"}
    )
    assert r.status_code == 201, r.text
    r = post(main_server, "/v1/prefixes", {"name": "delta2", "peft": "peft_delta"})
    assert r.status_code == 201, r.text
    assert {"loadme", "other-name", "delta2"} <= {m.id for m in client.models.list().data}

    source = prefixrt.PrefixBank.load(serve_files / "prefix_dir" / "extra.safetensors")
    offline.bank.add("loadme", source.entry("loadme"))
    try:
        ids = offline.tokenizer("The loaded prefix").input_ids
        out = client.completions.create(model="loadme", prompt=ids, max_tokens=8, temperature=0,
                                        extra_body={"return_token_ids": True})  # fmt: skip
        assert out.choices[0].model_extra["token_ids"] == offline.tokens(ids, "loadme", 8)
        delta = client.completions.create(model="delta", prompt=ids, max_tokens=8, temperature=0)
        delta2 = client.completions.create(model="delta2", prompt=ids, max_tokens=8, temperature=0)
        assert delta.choices[0].text == delta2.choices[0].text  # the same adapter under two names
    finally:
        offline.bank.remove("loadme")

    assert_openai_error(
        post(main_server, "/v1/prefixes", {"name": "loadme", "bank": "extra.safetensors"}), 409
    )
    for name in ("loadme", "other-name", "delta2"):
        r = delete(main_server, name)
        assert r.status_code == 200 and r.json() == {"id": name, "object": "model", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="loadme", prompt="x", max_tokens=2)
    assert_openai_error(delete(main_server, "loadme"), 404, "model")
    assert_openai_error(delete(main_server, "gpt2-tiny"), 400)


def test_prefix_paths_must_stay_under_the_prefix_dir(main_server, serve_files):
    outside = serve_files / "outside.safetensors"  # a valid bank file, one level above --prefix-dir
    for path in ("../outside.safetensors", str(outside), "sub/../../outside.safetensors"):
        err = assert_openai_error(post(main_server, "/v1/prefixes", {"name": "x", "bank": path}), 403, "bank")
        assert "--prefix-dir" in err["message"]
    assert_openai_error(post(main_server, "/v1/prefixes", {"name": "x", "peft": "/etc"}), 403, "peft")
    assert_openai_error(post(main_server, "/v1/prefixes", {"name": "x", "bank": "missing.safetensors"}), 400)
    assert_openai_error(
        post(main_server, "/v1/prefixes", {"name": "x", "bank": "extra.safetensors"}), 400, "entry"
    )
    assert_openai_error(post(main_server, "/v1/prefixes", {"name": "x"}), 400)
    assert_openai_error(
        post(main_server, "/v1/prefixes", {"name": "gpt2-tiny", "bank": "extra.safetensors"}), 400
    )


def _metric(server, name: str) -> float:
    return server.metrics().get(name, 0.0)


def test_a_client_that_disconnects_mid_stream_is_aborted(main_server, offline):
    """The stream is closed after two chunks of 64: the request is aborted (not run to its end) and the engine's
    running count is back to 0 within a few steps."""
    aborted = 'prefixrt_requests_total{finish_reason="aborted",model="gamma"}'
    before = _metric(main_server, aborted)
    body = {"model": "gamma", "prompt": "a long one", "max_tokens": 64, "min_tokens": 64, "temperature": 0,
            "stream": True}  # fmt: skip
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", main_server.url + "/v1/completions", json=body, headers=AUTH) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            received = [line for line, _ in zip((x for x in lines if x), range(2), strict=False)]
            assert len(received) == 2
            steps_at_close = _metric(main_server, "prefixrt_engine_steps_total")
    wait_for(lambda: _metric(main_server, aborted) == before + 1, what="the abort")
    wait_for(lambda: _metric(main_server, "prefixrt_num_requests_running") == 0, what="running back to 0")
    steps = _metric(main_server, "prefixrt_engine_steps_total") - steps_at_close
    # Measured: 1. The abort is applied before the engine's next step (test_engine_loop.py checks that exactly);
    # here the asyncio thread must also notice the closed socket while the engine thread keeps stepping, so a
    # few steps of slack on a loaded machine; a request that was not aborted would run its 62 remaining steps.
    assert steps <= 8, f"the engine ran {steps} more steps after the client left"
    # a non-streaming client that goes away is aborted too
    before = _metric(main_server, aborted)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            main_server.url + "/v1/completions", json={**body, "stream": False}, headers=AUTH, timeout=0.3
        )
    wait_for(lambda: _metric(main_server, aborted) == before + 1, what="the non-streaming abort")
    wait_for(lambda: _metric(main_server, "prefixrt_num_requests_running") == 0, what="running back to 0")


def test_removing_a_prefix_in_use_lets_its_running_request_finish(client, main_server, offline, serve_files):
    """A request that runs when its prefix is removed finishes with the removed prefix's tokens; new requests
    naming it get a 404."""
    import prefixrt

    assert post(main_server, "/v1/prefixes", {"name": "inuse", "bank": "extra.safetensors", "entry": "other"}).status_code == 201  # fmt: skip
    ids = offline.tokenizer("Removed while running").input_ids
    stream = client.completions.create(
        model="inuse", prompt=ids, max_tokens=64, temperature=0, stream=True, extra_body={"min_tokens": 64}
    )
    chunks = iter(stream)
    text = next(chunks).choices[0].text
    assert delete(main_server, "inuse").status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="inuse", prompt=ids, max_tokens=2)
    finish = None
    for chunk in chunks:
        text += chunk.choices[0].text
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "length"
    source = prefixrt.PrefixBank.load(serve_files / "prefix_dir" / "extra.safetensors")
    offline.bank.add("inuse", source.entry("other"))
    try:
        expected = offline.tokens(ids, "inuse", 64, min_new_tokens=64)
    finally:
        offline.bank.remove("inuse")
    assert text == offline.text(expected)
