"""C++ CPU prefix attention vs the reference path and vs HF-style attention over concatenated prefixes.

Baselines copy each row's prefix out of the bank and concatenate it with the row's own keys (what PEFT does;
the gather is inside the timed region), then run HF-eager-style attention (matmul, additive mask, softmax,
matmul) or PyTorch SDPA (what HF's default "sdpa" attention calls); workload and baselines are
``attention_workload.py``'s. "reference" is prefixrt's oracle backend.

Shapes: one GPT-2-small attention layer (12 heads, head dim 64), fp32 and bf16.
* decode: 32 rows over 8 prefixes (ids interleaved), P=200, 64 cached tokens + the new one, one query per row;
* prefill: 8 rows over 4 prefixes, P=200, T=128, causal; also its backward (training).

Two ways to run it:
* ``python -m pytest benchmarks/bench_cpp_attention.py --benchmark-only`` (pytest-benchmark);
* ``python benchmarks/bench_cpp_attention.py``: times every case, measures this machine's memory copy / read
  bandwidth and matmul rate in the same run, prints a table and writes ``benchmarks/results/cpu_attention.json``
  and ``cpu_attention.png`` / ``.md`` (CPU, threads, versions, commit, date, load average: other jobs on a shared
  machine show up there).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from attention_workload import (
    bytes_moved,
    eager_concat,
    flops,
    make_args,
    public_op,
    sdpa_concat,
    with_leaves,
)

from prefixrt import ops
from prefixrt.ops.cpp.backend import cpp_backward, cpp_forward
from prefixrt.ops.reference_backend import reference_backward

HEADS, HEAD_DIM, PREFIX_LEN = 12, 64, 200
DECODE = dict(rows=32, prefixes=8, q_len=1, k_len=65, causal=True)
PREFILL = dict(rows=8, prefixes=4, q_len=128, k_len=128, causal=True)
RESULTS = Path(__file__).resolve().parent / "results"


def make_workload(rows, prefixes, q_len, k_len, causal, dtype=torch.float32) -> ops.AttentionArgs:
    """One call at these shapes (P-token entries, ``HEADS`` heads of ``HEAD_DIM``). Prefill k/v are transposed
    views of ``[B, T, H, D]`` (fresh projections, as HF hands them over); decode k/v are contiguous
    ``[B, H, T, D]`` (a KV cache)."""
    return make_args(rows=rows, prefixes=prefixes, prefix_len=PREFIX_LEN, q_len=q_len, k_len=k_len, heads=HEADS,
                     head_dim=HEAD_DIM, dtype=dtype, causal=causal,
                     kv_layout="contiguous" if q_len == 1 else "transposed")  # fmt: skip


# -- the ways to compute it


def cpp(args: ops.AttentionArgs):
    return public_op(args, "cpp")


def reference(args: ops.AttentionArgs):
    return public_op(args, "reference")


def eager(args: ops.AttentionArgs):
    return eager_concat(args, PREFIX_LEN)


def sdpa(args: ops.AttentionArgs):
    return sdpa_concat(args, PREFIX_LEN)


METHODS: dict[str, Callable] = {
    "cpp": cpp,
    "reference": reference,
    "eager-concat": eager,
    "sdpa-concat": sdpa,
}


def backward_closures(args: ops.AttentionArgs) -> dict[str, Callable]:
    """The backward alone (forward results precomputed), C++ vs the reference's explicit softmax backward."""
    out, lse = cpp_forward(args)
    dout = torch.randn_like(out)
    return {
        "cpp": lambda: cpp_backward(args, dout, out, lse),
        "reference": lambda: reference_backward(args, dout, out, lse),
    }


# -- pytest-benchmark cases


def _record(benchmark):
    benchmark.extra_info.update(cpu=cpu_name(), threads=torch.get_num_threads(), torch=torch.__version__)
    return benchmark


def _forward(benchmark, shape: dict, method: str) -> None:
    args = make_workload(**shape)
    with torch.no_grad():
        _record(benchmark)(METHODS[method], args)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.benchmark(group="cpu-decode-attention-fp32")
def test_decode(benchmark, method):
    _forward(benchmark, DECODE, method)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.benchmark(group="cpu-prefill-attention-fp32")
def test_prefill(benchmark, method):
    _forward(benchmark, PREFILL, method)


@pytest.mark.parametrize("method", ["cpp", "reference"])
@pytest.mark.benchmark(group="cpu-prefill-backward-fp32")
def test_prefill_backward(benchmark, method):
    _record(benchmark)(backward_closures(make_workload(**PREFILL))[method])


# -- standalone run: a table, JSON and a plot


def cpu_name() -> str:
    if platform.system() == "Linux":
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


class CacheFlush:
    """Evicts the caches between timed calls (reads and writes 64 MiB, twice a 32 MiB L3): in a model, the
    other layers' weights and K/V pass through the cache between two calls of one layer's attention, so a
    decode step streams its K/V from memory. Without it a 23 MB decode workload would sit in L3."""

    def __init__(self, mib: int = 64):
        self.buffer = torch.zeros(mib * 2**20 // 4)

    def __call__(self) -> None:
        self.buffer.add_(1.0)


FLUSH = CacheFlush()


def timeit(
    fn: Callable,
    min_time: float = 0.5,
    min_runs: int = 3,
    max_runs: int = 200,
    clock: Callable = time.perf_counter,
    before: Callable | None = None,
) -> dict:
    """Median and min time (ms, by ``clock``) of ``fn()`` over repeated calls after two warm-up calls;
    ``before()`` runs untimed before every timed call."""
    fn()
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < min_time and len(times) < max_runs):
        if before is not None:
            before()
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times), "runs": len(times)}


def single_thread_cpu_ms(fn: Callable, min_time: float, before: Callable | None = None) -> float:
    """Median CPU time (ms) of ``fn()`` on one thread: robust to other jobs on a shared machine, which
    stretch wall times (a descheduled OpenMP thread holds up the whole team for a time slice)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return timeit(fn, min_time=min_time, clock=time.thread_time, before=before)["median_ms"]
    finally:
        torch.set_num_threads(threads)


def machine_rates() -> dict:
    """This machine's memory copy / read bandwidth and matmul rates, measured now with torch."""
    x = torch.randn(64 * 2**20)  # 256 MiB
    y = torch.empty_like(x)
    copy = timeit(lambda: y.copy_(x), min_time=1.0)
    read = timeit(lambda: x.sum(), min_time=1.0)
    rates = {
        "copy_GBps": 2 * x.numel() * 4 / copy["min_ms"] / 1e6,  # read + write
        "read_GBps": x.numel() * 4 / read["min_ms"] / 1e6,
    }
    # bf16 matmul is emulated on CPUs without AVX512-BF16/AMX (about 1 GFLOP/s): a smaller one suffices
    for dtype, n in ((torch.float32, 2048), (torch.bfloat16, 512)):
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        mm = timeit(lambda a=a, b=b: a @ b, min_time=1.0)
        rates[f"matmul_{str(dtype)[6:]}_GFLOPs"] = 2 * n**3 / mm["min_ms"] / 1e6
    return rates


def versions() -> dict:
    def run(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
        except Exception:  # noqa: BLE001  (git or a compiler missing: just say so)
            return "unknown"

    from prefixrt.ops.cpp.build import simd_target

    return {
        "commit": run(["git", "-C", str(Path(__file__).parent), "rev-parse", "--short", "HEAD"]),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "compiler": run([os.environ.get("CXX", "c++"), "--version"]).splitlines()[0:1],
        "simd": simd_target(),
    }


# (rows, heads, q_len, k_len, head_dim, prefix_len, entries, causal): small to large, decode to long prefill
SWEEP = [
    (1, 1, 1, 1, 64, 0, 1, True),
    (1, 2, 4, 4, 16, 1, 1, True),
    (4, 12, 1, 10, 64, 10, 1, True),
    (2, 12, 16, 16, 64, 10, 1, True),
    (1, 12, 512, 512, 64, 0, 1, True),
    (64, 12, 1, 512, 64, 200, 8, True),
    (8, 12, 32, 300, 64, 200, 4, False),
    (4, 16, 128, 128, 128, 50, 4, True),
]


def _time_backend(args: ops.AttentionArgs, backend: str, min_time: float) -> tuple[float, float, float]:
    """Forward (no grad) and forward + backward through the public op: one-thread CPU-time medians (ms), and
    the forward's min wall time on all threads."""

    def forward():
        with torch.no_grad():
            public_op(args, backend)

    def train():
        public_op(with_leaves(args), backend)[0].sum().backward()

    return (
        single_thread_cpu_ms(forward, min_time),
        single_thread_cpu_ms(train, min_time),
        timeit(forward, min_time=min_time)["min_ms"],
    )


def sweep(min_time: float) -> list[dict]:
    """cpp vs reference from tiny to large calls, forward and forward+backward (what "auto" ranks on)."""
    rows = []
    for b, h, tq, tk, d, p, n, causal in SWEEP:
        args = make_args(
            rows=b, prefixes=n, prefix_len=p, q_len=tq, k_len=tk, heads=h, head_dim=d, causal=causal
        )
        row = dict(
            shape=dict(
                rows=b, heads=h, q_len=tq, k_len=tk, head_dim=d, prefix_len=p, entries=n, causal=causal
            )
        )
        for backend in ("cpp", "reference"):
            times = _time_backend(args, backend, min_time)
            row[f"{backend}_fwd_ms"], row[f"{backend}_fwd_bwd_ms"], row[f"{backend}_fwd_wall_min_ms"] = times
        row["speedup_fwd"] = row["reference_fwd_ms"] / row["cpp_fwd_ms"]
        row["speedup_fwd_bwd"] = row["reference_fwd_bwd_ms"] / row["cpp_fwd_bwd_ms"]
        row["speedup_fwd_wall_min"] = row["reference_fwd_wall_min_ms"] / row["cpp_fwd_wall_min_ms"]
        rows.append(row)
    return rows


def _row(
    case: str, dtype: torch.dtype, method: str, fn: Callable, flops: float, nbytes: float, min_time: float
):
    t = timeit(fn, min_time=min_time, before=FLUSH)
    slow = method == "eager-concat" and dtype == torch.bfloat16  # seconds per call: no single-thread run
    cpu1 = float("nan") if slow else single_thread_cpu_ms(fn, min_time, before=FLUSH)
    best = t["min_ms"]
    return dict(case=case, dtype=str(dtype)[6:], method=method, **t, cpu1_ms=cpu1,
                GBps=nbytes / best / 1e6, GFLOPs=flops / best / 1e6)  # fmt: skip


def run_all(quick: bool = False) -> dict:
    rates = machine_rates()
    rows = []
    min_time = 0.2 if quick else 1.0
    for case, shape in (("decode", DECODE), ("prefill", PREFILL)):
        for dtype in (torch.float32, torch.bfloat16):
            args = make_workload(**shape, dtype=dtype)
            work, nbytes = flops(args, PREFIX_LEN), bytes_moved(args, PREFIX_LEN)
            with torch.no_grad():
                for method, fn in METHODS.items():
                    fwd = lambda fn=fn, args=args: fn(args)  # noqa: E731
                    rows.append(_row(case, dtype, method, fwd, work, nbytes, min_time))
            if case == "prefill":
                for method, fn in backward_closures(args).items():
                    rows.append(
                        _row("prefill-backward", dtype, method, fn, 2.5 * work, float("nan"), min_time)
                    )
    for row in rows:
        ref = next(r for r in rows if r["case"] == row["case"] and r["dtype"] == row["dtype"]
                   and r["method"] == "reference")  # fmt: skip
        row["speedup_vs_reference"] = ref["median_ms"] / row["median_ms"]
        row["speedup_min_vs_reference"] = ref["min_ms"] / row["min_ms"]
        row["speedup_cpu1_vs_reference"] = ref["cpu1_ms"] / row["cpu1_ms"]
    return {
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_before_after": None,
        "versions": versions(),
        "machine": rates,
        "shapes": {
            "heads": HEADS,
            "head_dim": HEAD_DIM,
            "prefix_len": PREFIX_LEN,
            "decode": DECODE,
            "prefill": PREFILL,
        },  # fmt: skip
        "timing": "median and min wall clock over >= 3 calls and >= 1 s after 2 warm-up calls, all threads, "
        "caches flushed (64 MiB read+written) before every timed call; cpu1 = median CPU time of the same call "
        "on one thread",
        "bytes": "GB/s = (distinct prefixes' K/V once + each row's K/V + q + out) / min wall time",
        "flops": "GFLOP/s = 4*D per visible (query, key) pair and head / min wall time; backward counts 2.5x",
        "results": rows,
        "sweep": sweep(min_time),
    }


def print_table(report: dict) -> None:
    m = report["machine"]
    print(f"{report['cpu']}, {report['threads']} threads, torch {report['versions']['torch']}, "
          f"commit {report['versions']['commit']}, load avg {report['loadavg_before_after']}")  # fmt: skip
    print(f"machine: copy {m['copy_GBps']:.1f} GB/s (read+write), read {m['read_GBps']:.1f} GB/s, "
          f"matmul fp32 {m['matmul_float32_GFLOPs']:.1f} GFLOP/s, bf16 {m['matmul_bfloat16_GFLOPs']:.2f} GFLOP/s")  # fmt: skip
    print(f"{'case':17} {'dtype':9} {'method':13} {'median ms':>10} {'vs ref':>7} {'min ms':>8} {'vs ref':>7} "
          f"{'1-thr CPU ms':>12} {'vs ref':>7} {'GB/s':>7} {'GFLOP/s':>8}")  # fmt: skip
    for r in report["results"]:
        print(f"{r['case']:17} {r['dtype']:9} {r['method']:13} {r['median_ms']:10.3f} "
              f"{r['speedup_vs_reference']:6.1f}x {r['min_ms']:8.3f} {r['speedup_min_vs_reference']:6.1f}x "
              f"{r['cpu1_ms']:12.3f} {r['speedup_cpu1_vs_reference']:6.1f}x {r['GBps']:7.2f} {r['GFLOPs']:8.1f}")  # fmt: skip
    print(
        "sweep (rows, heads, Tq, Tk, D, P, entries, causal): one-thread CPU ms cpp / ref of the forward and of"
    )
    print("forward + backward; min wall ms of the forward on all threads")
    for r in report["sweep"]:
        print(f"{str(tuple(r['shape'].values())):42} fwd {r['cpp_fwd_ms']:8.3f} / {r['reference_fwd_ms']:8.3f} "
              f"({r['speedup_fwd']:4.1f}x)  fwd+bwd {r['cpp_fwd_bwd_ms']:8.3f} / {r['reference_fwd_bwd_ms']:8.3f} "
              f"({r['speedup_fwd_bwd']:4.1f}x)  wall {r['cpp_fwd_wall_min_ms']:8.3f} / "
              f"{r['reference_fwd_wall_min_ms']:8.3f} ({r['speedup_fwd_wall_min']:4.1f}x)")  # fmt: skip


def write_markdown(report: dict, path: Path) -> None:
    """The tables of ``report`` as markdown (the JSON next to it has every number)."""
    m, v = report["machine"], report["versions"]
    lines = [
        "# C++ CPU prefix attention: measured results",
        "",
        f"{report['cpu']}, {report['threads']} threads; torch {v['torch']}, Python {v['python']}, "
        f"{' '.join(v['compiler'])}, SIMD {v['simd']}; commit {v['commit']}; {report['date']}; "
        f"load average {report['loadavg_before_after'][0]} before, {report['loadavg_before_after'][1]} after "
        "(a shared machine: other jobs ran meanwhile).",
        "",
        f"This machine in the same run: memory copy {m['copy_GBps']:.1f} GB/s (read + write), read "
        f"{m['read_GBps']:.1f} GB/s; matmul fp32 {m['matmul_float32_GFLOPs']:.1f} GFLOP/s, bf16 "
        f"{m['matmul_bfloat16_GFLOPs']:.2f} GFLOP/s (no bf16 FMA on this CPU).",
        "",
        f"Timing: {report['timing']}. {report['bytes']}. {report['flops']}.",
        "",
        "| case | dtype | method | median ms | vs ref | min ms | vs ref | 1 thread, CPU ms | vs ref | GB/s "
        "(min) | % of read BW | GFLOP/s (min) | % of fp32 matmul |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["results"]:
        bw = f"{r['GBps']:.2f} | {100 * r['GBps'] / m['read_GBps']:.0f}%" if r["GBps"] == r["GBps"] else "| "
        lines.append(
            f"| {r['case']} | {r['dtype']} | {r['method']} | {r['median_ms']:.3f} | "
            f"{r['speedup_vs_reference']:.1f}x | {r['min_ms']:.3f} | {r['speedup_min_vs_reference']:.1f}x | "
            f"{r['cpu1_ms']:.3f} | {r['speedup_cpu1_vs_reference']:.1f}x | {bw} | {r['GFLOPs']:.1f} | "
            f"{100 * r['GFLOPs'] / m['matmul_float32_GFLOPs']:.0f}% |"
        )
    lines += [
        "",
        "Sweep, cpp vs reference through the public op: one-thread CPU-time medians (ms) of the forward (no grad)",
        "and of forward + backward, and the forward's min wall time on all threads:",
        "",
        "| rows, heads, Tq, Tk, D, P, entries, causal | cpp fwd | ref fwd | x | cpp fwd+bwd | ref fwd+bwd | x "
        "| cpp fwd wall | ref fwd wall | x |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["sweep"]:
        lines.append(
            f"| {', '.join(str(x) for x in r['shape'].values())} | {r['cpp_fwd_ms']:.3f} | "
            f"{r['reference_fwd_ms']:.3f} | {r['speedup_fwd']:.1f}x | {r['cpp_fwd_bwd_ms']:.3f} | "
            f"{r['reference_fwd_bwd_ms']:.3f} | {r['speedup_fwd_bwd']:.1f}x | {r['cpp_fwd_wall_min_ms']:.3f} | "
            f"{r['reference_fwd_wall_min_ms']:.3f} | {r['speedup_fwd_wall_min']:.1f}x |"
        )
    path.write_text("\n".join(lines) + "\n")


def plot(report: dict, path: Path) -> None:
    """Bars per case and method: median wall time on all threads (left), one-thread CPU time (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    groups = sorted({(r["case"], r["dtype"]) for r in results}, key=lambda g: (g[0], g[1] != "float32"))
    methods = list(dict.fromkeys(r["method"] for r in results))
    fig, axes = plt.subplots(1, 2, figsize=(15, 4.8), sharey=True)
    width = 0.8 / len(methods)
    panels = (
        ("median_ms", f"median wall ms, {report['threads']} threads"),
        ("cpu1_ms", "CPU ms on one thread"),
    )
    for ax, (key, label) in zip(axes, panels, strict=True):
        for i, method in enumerate(methods):
            xs, ys = [], []
            for j, group in enumerate(groups):
                hit = [r for r in results if (r["case"], r["dtype"], r["method"]) == (*group, method)]
                if hit and hit[0][key] == hit[0][key]:  # skip NaN (not measured)
                    xs.append(j + i * width)
                    ys.append(hit[0][key])
            ax.bar_label(ax.bar(xs, ys, width, label=method), fmt="%.3g", fontsize=6)
        ax.set_xticks(
            [j + 0.4 - width / 2 for j in range(len(groups))], [f"{c}\n{d}" for c, d in groups], fontsize=8
        )
        ax.set_yscale("log")
        ax.set_title(label, fontsize=9)
    axes[0].set_ylabel("ms per call (log scale)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"prefix attention, one GPT-2-small layer: {report['cpu']}, commit {report['versions']['commit']}, "
                 f"load avg {report['loadavg_before_after']}", fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "cpu_attention.json")
    parser.add_argument("--quick", action="store_true", help="shorter timing loops")
    args = parser.parse_args(argv)
    before = os.getloadavg()
    report = run_all(args.quick)
    report["loadavg_before_after"] = [round(before[0], 2), round(os.getloadavg()[0], 2)]
    print_table(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    plot(report, args.out.with_suffix(".png"))
    write_markdown(report, args.out.with_suffix(".md"))
    print(f"wrote {args.out} and its .png and .md", file=sys.stderr)


if __name__ == "__main__":
    main()
