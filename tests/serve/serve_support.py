"""What the serve tests share: servers, ``python -m prefixrt serve`` as a subprocess on 127.0.0.1, on a free port the OS
picks (``--port 0``; the server prints it), waited for through ``/health`` with a bounded timeout, and stopped by
its PID (terminate, then kill after a timeout) in the fixture's finalizer.

The servers (each started once per test session and worker):

* ``main_server``: ``gpt2-tiny`` (128 positions) with a bank file of three prefixes and a PEFT adapter, an API
  key, prefix updates on (``--prefix-dir``), 8 rows;
* ``small_server``: ``bart-tiny`` with one row and one waiting place (overload, a waiting request whose prefix
  is removed), a chat template, prefix updates on.

``offline`` rebuilds the main server's model and bank in the test process, attached, for ``prefixrt.generate``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
from support.paths import REPO_ROOT, SHARED_DATA

from prefixrt.serve.bench import stop_process

API_KEY = "test-key-123"
STARTUP_TIMEOUT_S = 180  # imports and model build on a loaded 2-core machine
GPT2_CONFIG = ["initializer_range=0.1", "n_positions=128"]  # varied greedy tokens; short context for the 400s
GPT2_PREFIXES = {"alpha": 10, "beta": 20, "gamma": 7}  # in the bank file
PEFT_NAME, PEFT_LENGTH = "delta", 6
BART_PREFIXES = {"summ": 8, "para": 4}
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@dataclass
class Server:
    """A running ``prefixrt serve`` subprocess."""

    proc: subprocess.Popen
    url: str  # http://127.0.0.1:PORT
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_kb(self) -> int:
        """The server process's resident set (VmRSS), in kB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def metrics(self) -> dict[str, float]:
        """``/metrics`` as ``{"name{labels}": value}`` (comments dropped)."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    def stop(self, timeout: float = 15.0) -> None:
        stop_process(self.proc, timeout)


def start_server(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PREFIXRT_SHARED_DATA": str(SHARED_DATA), "OMP_NUM_THREADS": "1"}
    env.pop("PREFIXRT_API_KEY", None)  # each server is given its key (or none) explicitly
    out = open(log, "w")  # a file, not a pipe: a full pipe would block the server
    return subprocess.Popen(
        [sys.executable, "-m", "prefixrt", "serve", "--port", "0", "--threads", "1", *args],
        stdout=out,
        stderr=subprocess.STDOUT,
        cwd=REPO_ROOT,
        env=env,
    )


def wait_ready(proc: subprocess.Popen, log: Path, timeout: float = STARTUP_TIMEOUT_S) -> Server:
    """Wait (bounded) for the printed address, then for ``/health`` to answer 200."""
    deadline = time.monotonic() + timeout
    url = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefixrt serve exited with {proc.returncode}:\n{log.read_text()}")
        if url is None:
            found = re.search(r"on (http://127\.0\.0\.1:\d+)/v1", log.read_text())
            url = found.group(1) if found else None
        if url is not None:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    return Server(proc, url, log)
            except httpx.HTTPError:
                pass
        time.sleep(0.2)
    proc.kill()
    proc.wait(10)
    raise RuntimeError(f"prefixrt serve was not ready within {timeout} s:\n{log.read_text()}")


def random_bank(model, lengths: dict[str, int], seed: int):
    import prefixrt

    bank = prefixrt.PrefixBank.for_model(model)
    g = torch.Generator().manual_seed(seed)
    for name, length in lengths.items():
        kv = {
            site: torch.randn(s.num_layers, 2, s.num_heads, length, s.head_dim, generator=g)
            for site, s in bank.spec.sites.items()
        }
        bank.add(name, kv)
    return bank


def gpt2_model_and_tokenizer():
    from prefixrt.train.models import load_model_and_tokenizer, parse_overrides

    return load_model_and_tokenizer(
        "gpt2-tiny", tokenizer=SHARED_DATA / "gpt2-tokenizer", overrides=parse_overrides(GPT2_CONFIG)
    )


class Offline:
    """The same model, tokenizer and bank as a server, attached, for ``prefixrt.generate``."""

    def __init__(self, model, tokenizer, bank):
        import prefixrt

        self.model, self.tokenizer, self.bank = model, tokenizer, bank
        prefixrt.attach(model, bank)

    def tokens(self, prompt_ids: list[int], prefix: str | None, max_tokens: int, **kwargs) -> list[int]:
        """The new tokens ``prefixrt.generate`` gives for this prompt alone (up to and with EOS)."""
        import prefixrt

        ids = torch.tensor([prompt_ids])
        with torch.no_grad():
            out = prefixrt.generate(
                self.model, ids, prefix_ids=self.bank.ids([prefix]), max_new_tokens=max_tokens, **kwargs
            )
        start = ids.shape[1] if self.model.config.model_type == "gpt2" else 1
        new = out[0, start:].tolist()
        eos = self.model.generation_config.eos_token_id
        if eos in new:
            new = new[: new.index(eos) + 1]
        return new

    def text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
