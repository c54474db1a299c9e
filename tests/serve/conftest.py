"""Fixtures of the serve tests: the servers (see serve_support.py), the files they read, offline references."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from serve_support import (
    API_KEY,
    BART_PREFIXES,
    CHAT_TEMPLATE,
    GPT2_CONFIG,
    GPT2_PREFIXES,
    PEFT_LENGTH,
    PEFT_NAME,
    Offline,
    Server,
    gpt2_model_and_tokenizer,
    random_bank,
    start_server,
    wait_ready,
)
from support.paths import SHARED_DATA


@pytest.fixture(scope="session")
def launch(tmp_path_factory):
    """``launch(args, name) -> Server``; every server started is stopped at the end of the session."""
    started: list[Server] = []
    procs: list[subprocess.Popen] = []

    def _launch(args: list[str], name: str) -> Server:
        log = tmp_path_factory.mktemp("logs") / f"{name}.log"
        proc = start_server(args, log)
        procs.append(proc)
        server = wait_ready(proc, log)
        started.append(server)
        return server

    yield _launch
    for proc in procs:
        Server(proc, "", Path()).stop()


@pytest.fixture(scope="session")
def serve_files(tmp_path_factory):
    """The bank files, the PEFT adapter, the prefix dir and the chat template the servers are started with."""
    from prefixrt.train.models import load_model_and_tokenizer

    root = tmp_path_factory.mktemp("serve_files")
    model, _ = gpt2_model_and_tokenizer()
    random_bank(model, GPT2_PREFIXES, seed=1).save(root / "gpt2_bank.safetensors")
    peft = random_bank(model, {PEFT_NAME: PEFT_LENGTH}, seed=2)
    peft.export_peft(PEFT_NAME, root / "peft_delta")
    prefix_dir = root / "prefix_dir"
    prefix_dir.mkdir()
    random_bank(model, {"loadme": 5, "other": 3}, seed=3).save(prefix_dir / "extra.safetensors")
    peft.export_peft(PEFT_NAME, prefix_dir / "peft_delta")
    (root / "outside.safetensors").write_bytes((prefix_dir / "extra.safetensors").read_bytes())
    bart, _ = load_model_and_tokenizer("bart-tiny", tokenizer=SHARED_DATA / "bart-tokenizer")
    random_bank(bart, BART_PREFIXES, seed=4).save(root / "bart_bank.safetensors")
    bart_dir = root / "bart_prefix_dir"
    bart_dir.mkdir()
    random_bank(bart, {"extra": 6}, seed=5).save(bart_dir / "extra.safetensors")
    (root / "chat.jinja").write_text(CHAT_TEMPLATE)
    return root


@pytest.fixture(scope="session")
def main_server(launch, serve_files) -> Server:
    args = ["--model", "gpt2-tiny", "--tokenizer", str(SHARED_DATA / "gpt2-tokenizer")]
    for kv in GPT2_CONFIG:
        args += ["--model-config", kv]
    args += ["--bank", str(serve_files / "gpt2_bank.safetensors")]
    args += ["--peft", f"{PEFT_NAME}={serve_files / 'peft_delta'}"]
    args += ["--api-key", API_KEY, "--allow-prefix-updates", "--prefix-dir", str(serve_files / "prefix_dir")]
    args += ["--max-batch-size", "8", "--max-prompt-tokens", "100", "--max-new-tokens", "64"]
    args += ["--max-waiting", "64"]
    return launch(args, "main")


@pytest.fixture(scope="session")
def small_server(launch, serve_files) -> Server:
    args = ["--model", "bart-tiny", "--tokenizer", str(SHARED_DATA / "bart-tokenizer")]
    args += ["--bank", str(serve_files / "bart_bank.safetensors")]
    args += ["--chat-template", str(serve_files / "chat.jinja")]
    args += ["--allow-prefix-updates", "--prefix-dir", str(serve_files / "bart_prefix_dir")]
    args += [
        "--max-batch-size",
        "1",
        "--max-waiting",
        "1",
        "--max-prompt-tokens",
        "64",
        "--max-new-tokens",
        "400",
    ]
    return launch(args, "small")


@pytest.fixture(scope="session")
def offline(serve_files) -> Offline:
    import prefixrt

    torch.set_num_threads(1)
    model, tokenizer = gpt2_model_and_tokenizer()
    bank = prefixrt.PrefixBank.load(serve_files / "gpt2_bank.safetensors")
    bank.add_peft(PEFT_NAME, serve_files / "peft_delta")
    return Offline(model, tokenizer, bank)


@pytest.fixture(scope="session")
def offline_bart(serve_files) -> Offline:
    import prefixrt
    from prefixrt.train.models import load_model_and_tokenizer

    torch.set_num_threads(1)
    model, tokenizer = load_model_and_tokenizer("bart-tiny", tokenizer=SHARED_DATA / "bart-tokenizer")
    bank = prefixrt.PrefixBank.load(serve_files / "bart_bank.safetensors")
    return Offline(model, tokenizer, bank)


@pytest.fixture
def client(main_server):
    from openai import OpenAI

    return OpenAI(base_url=main_server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture
def small_client(small_server):
    from openai import OpenAI

    return OpenAI(base_url=small_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
