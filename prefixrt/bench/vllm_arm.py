"""The vLLM arm of ``prefixrt bench generate``: run under *another* interpreter, one with a vLLM CPU build.

vLLM cannot serve prefixes (it dropped soft-prompt adapters), so this arm is the plain model on the same
prompts: the best a vLLM user gets. ``prefixrt bench generate --vllm-python PATH`` saves the benchmark's model
to a folder and runs::

    PATH -m prefixrt.bench.vllm_arm --model DIR --prompts FILE --new-tokens N --rounds R --out FILE

with the environment vLLM's CPU backend reads (``VLLM_CPU_OMP_THREADS_BIND``, ...). This file imports nothing of
prefixrt (the vLLM interpreter need not have prefixrt installed: it is run by path when it is not).

It writes JSON: the tokens of every request (for the token-for-token check against HF), the wall time of each
round (prefill included; the engine is built and warmed up once, untimed), vLLM's start-up time, and the peak
resident memory of this process and its children.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time


def _peak_rss_bytes() -> int:
    """Peak resident memory of this process plus the largest of its waited-for children (Linux: KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return 1024 * (own + children)


def _current_rss_bytes() -> int:
    """Resident memory of this process and every live descendant (vLLM runs its engine core in a child)."""
    total = 0
    pids = [os.getpid()]
    seen = set()
    while pids:
        pid = pids.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            with open(f"/proc/{pid}/status", encoding="utf-8") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            with open(f"/proc/{pid}/task/{pid}/children", encoding="utf-8") as f:
                pids.extend(int(c) for c in f.read().split())
        except OSError:
            continue
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a Hugging Face model folder (config + weights)")
    parser.add_argument("--prompts", required=True, help="JSON file: a list of token-id lists")
    parser.add_argument("--new-tokens", type=int, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    with open(args.prompts, encoding="utf-8") as f:
        prompts = json.load(f)
    started = time.perf_counter()
    from vllm import LLM, SamplingParams  # imported here: its import alone takes seconds

    llm = LLM(model=args.model, dtype="float32", skip_tokenizer_init=True, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True, detokenize=False)
    requests = [{"prompt_token_ids": p} for p in prompts]
    llm.generate(requests, params, use_tqdm=False)  # warm-up: compiles and sizes every path once
    startup_s = time.perf_counter() - started

    rounds, tokens, rss = [], None, 0
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        outputs = llm.generate(requests, params, use_tqdm=False)
        rounds.append(time.perf_counter() - t0)
        rss = max(rss, _current_rss_bytes())
        tokens = [list(o.outputs[0].token_ids) for o in outputs]
    import torch
    import vllm

    result = {
        "rounds_s": rounds,
        "tokens": tokens,
        "startup_s": startup_s,
        "rss_bytes": rss,
        "peak_rss_bytes": _peak_rss_bytes(),
        "versions": {"vllm": vllm.__version__, "torch": torch.__version__, "python": sys.version.split()[0]},
        "env": {k: v for k, v in os.environ.items() if k.startswith(("VLLM_CPU", "OMP_", "KMP_"))},
    }
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f)
    os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
