"""End to end on the CPU: greedy generation with GPT-2 small attached with ``backend="cpp"`` vs ``"reference"``.

GPT-2 small shapes (12 layers, 12 heads, 768 wide) with random weights (nothing downloaded), fp32, 32 rows over 8
prefixes of 200 tokens, 64-token prompts, ``model.generate`` through ``prefixrt.attach``. Per backend it times
prefill (``max_new_tokens=1``) and the full generation, as wall time on all threads and as CPU time on one
thread (robust on a shared machine); decode time per step = (full - prefill) / (new - 1). Both backends must
produce the same tokens.

* ``python -m pytest benchmarks/bench_cpp_generate.py --benchmark-only``: a short case per backend;
* ``python benchmarks/bench_cpp_generate.py``: the table, written to ``benchmarks/results/cpu_generate.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import prefixrt

ROWS, PREFIXES, PREFIX_LEN, PROMPT, NEW_TOKENS = 32, 8, 200, 64, 16
RESULTS = Path(__file__).resolve().parent / "results"


def setup(layers: int = 12):
    """GPT-2 small with random weights, a bank of PREFIXES random prefixes, prompts and interleaved ids."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=layers, pad_token_id=0)).eval().requires_grad_(False)
    bank = prefixrt.PrefixBank.for_model(model)
    g = torch.Generator().manual_seed(0)
    for e in range(PREFIXES):
        bank.add(f"task{e}", {site: 0.5 * torch.randn(s.num_layers, 2, s.num_heads, PREFIX_LEN, s.head_dim, generator=g)
                              for site, s in bank.spec.sites.items()})  # fmt: skip
    ids = torch.randint(1, model.config.vocab_size, (ROWS, PROMPT), generator=g)
    prefix_ids = torch.arange(ROWS) % PREFIXES
    return model, bank, ids, prefix_ids


def generate(model, bank, ids, prefix_ids, backend: str, new_tokens: int) -> torch.Tensor:
    prefixrt.attach(model, bank, backend=backend)
    try:
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), prefix_ids=prefix_ids,
                                  max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  pad_token_id=0)  # fmt: skip
    finally:
        prefixrt.detach(model)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.benchmark(group="cpu-generate-gpt2-2-layers")
def test_generate(benchmark, backend):
    model, bank, ids, prefix_ids = setup(layers=2)
    benchmark.extra_info.update(threads=torch.get_num_threads(), torch=torch.__version__)
    benchmark.pedantic(generate, args=(model, bank, ids, prefix_ids, backend, 4), rounds=3, warmup_rounds=1)


def timed(fn, repeats: int, clock=time.perf_counter) -> tuple[float, torch.Tensor]:
    """Best time of ``fn()`` over ``repeats`` calls (seconds by ``clock``) and its last output."""
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        out = fn()
        best = min(best, clock() - start)
    return best, out


def measure(
    model, bank, ids, prefix_ids, backend: str, repeats: int, one_thread: bool
) -> tuple[dict, torch.Tensor]:
    """Prefill, full generation and decode step of one backend: wall time on all threads, or CPU time on one."""
    threads = torch.get_num_threads()
    clock = time.thread_time if one_thread else time.perf_counter
    torch.set_num_threads(1 if one_thread else threads)
    try:
        prefill, _ = timed(lambda: generate(model, bank, ids, prefix_ids, backend, 1), repeats, clock)
        full, tokens = timed(
            lambda: generate(model, bank, ids, prefix_ids, backend, NEW_TOKENS), repeats, clock
        )
    finally:
        torch.set_num_threads(threads)
    step = (full - prefill) / (NEW_TOKENS - 1)
    row = dict(backend=backend, clock="CPU time, 1 thread" if one_thread else f"wall, {threads} threads",
               prefill_s=prefill, generate_s=full, decode_step_ms=1e3 * step, tokens_per_s=ROWS * NEW_TOKENS / full)  # fmt: skip
    return row, tokens


def main(argv=None) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_cpp_attention import cpu_name, versions

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "cpu_generate.json")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    model, bank, ids, prefix_ids = setup()
    before = os.getloadavg()[0]
    rows, tokens = [], {}
    for one_thread in (False, True):
        for backend in ("cpp", "reference"):
            generate(model, bank, ids, prefix_ids, backend, 2)  # warm-up (and the C++ build)
            row, tokens[backend] = measure(model, bank, ids, prefix_ids, backend, args.repeats, one_thread)
            rows.append(row)
        assert torch.equal(tokens["cpp"], tokens["reference"]), "the backends generated different tokens"
    for row in rows:
        ref = next(r for r in rows if r["backend"] == "reference" and r["clock"] == row["clock"])
        row["speedup_generate"] = ref["generate_s"] / row["generate_s"]
        row["speedup_decode_step"] = ref["decode_step_ms"] / row["decode_step_ms"]
    report = {
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_before_after": [round(before, 2), round(os.getloadavg()[0], 2)],
        "versions": versions(),
        "workload": dict(
            model="GPT-2 small shapes, random weights, fp32",
            rows=ROWS,
            prefixes=PREFIXES,
            prefix_len=PREFIX_LEN,
            prompt=PROMPT,
            new_tokens=NEW_TOKENS,
            greedy=True,
        ),  # fmt: skip
        "timing": f"best of {args.repeats}: wall clock on all threads, and CPU time on one thread (robust to other "
        "jobs on a shared machine); decode step = (generate - prefill) / (new_tokens - 1)",
        "same_tokens": True,
        "results": rows,
    }
    print(f"{report['cpu']}, {report['threads']} threads, load avg {report['loadavg_before_after']}")
    header = ("backend", "clock", "prefill s", "generate s", "step ms", "tok/s", "x gen", "x step")
    print("{:10} {:20} {:>10} {:>11} {:>8} {:>7} {:>6} {:>7}".format(*header))
    for r in rows:
        print(f"{r['backend']:10} {r['clock']:20} {r['prefill_s']:10.2f} {r['generate_s']:11.2f} {r['decode_step_ms']:8.1f} "
              f"{r['tokens_per_s']:7.1f} {r['speedup_generate']:5.1f}x {r['speedup_decode_step']:6.1f}x")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
