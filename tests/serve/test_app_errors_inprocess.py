"""Error answers that a healthy server never gives on its own (500, 503 with the engine down, 403 with prefix
updates off, 405), through the app in-process with an executor that misbehaves on purpose."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from support.tiny import random_bank, tiny_gpt2
from test_errors import assert_openai_error

from prefixrt.serve import ServeConfig, ServeState, create_app


class BrokenLoop:
    """An executor whose submit raises an unexpected error; ``alive`` as told."""

    kv_bytes = 0

    def __init__(self, alive: bool = True):
        self.alive = alive

    def start(self, aloop):
        pass

    def stop(self, timeout: float = 10.0):
        pass

    async def submit(self, *args, **kwargs):
        raise TypeError("a bug in the executor")

    def abort(self, handle, reason="aborted"):
        pass

    async def call(self, fn):
        return fn()


def app_with(loop, **config) -> TestClient:
    from prefixrt.train.models import byte_level_tokenizer

    model = tiny_gpt2()
    state = ServeState(
        config=ServeConfig(model_name="tiny", **config),
        model=model,
        tokenizer=byte_level_tokenizer(),
        bank=random_bank(model, {"p": 4}),
        loop=loop,
        max_batch_size=2,
        max_prompt_tokens=16,
        max_new_tokens=8,
    )
    return TestClient(create_app(state), raise_server_exceptions=False)


BODY = {"model": "p", "prompt": [5, 6, 7], "max_tokens": 2}


def test_500_is_an_openai_error():
    with app_with(BrokenLoop()) as client:
        err = assert_openai_error(client.post("/v1/completions", json=BODY), 500)
        assert err["type"] == "server_error" and "a bug in the executor" in err["message"]
        # the reservation was given back: the next request is refused for the same reason, not a 503
        assert_openai_error(client.post("/v1/completions", json=BODY), 500)


def test_503_while_the_engine_loop_is_down():
    with app_with(BrokenLoop(alive=False)) as client:
        assert_openai_error(client.get("/health"), 503)
        err = assert_openai_error(client.post("/v1/completions", json=BODY), 503)
        assert err["code"] == "engine_down"


@pytest.mark.parametrize("method, path", [("POST", "/v1/prefixes"), ("DELETE", "/v1/prefixes/p")])
def test_403_prefix_updates_are_off_by_default(method, path):
    with app_with(BrokenLoop()) as client:
        err = assert_openai_error(client.request(method, path, json={"name": "q", "bank": "x"}), 403)
        assert "--allow-prefix-updates" in err["message"]


def test_405_and_unknown_routes():
    with app_with(BrokenLoop()) as client:
        assert_openai_error(client.get("/v1/completions"), 405)
        assert_openai_error(client.post("/v2/anything", json={}), 404)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--allow-prefix-updates"], "--prefix-dir"),
        (["--prefix-dir", "/no/such/dir"], "not a directory"),
        (["--max-waiting", "-1"], "--max-waiting"),
    ],
)
def test_bad_command_lines_are_refused_before_anything_is_built(argv, message, capsys):
    from prefixrt.cli import main

    assert main(["serve", *argv]) == 2
    assert message in capsys.readouterr().err
