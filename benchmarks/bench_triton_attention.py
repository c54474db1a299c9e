"""Triton prefix attention vs the ways prefix-tuning is usually run: forward, forward+backward and decode.

Baselines copy each row's prefix out of the bank and concatenate it with the row's own keys (what PEFT does),
then run HF-eager-style attention (matmul, additive mask, softmax in fp32, matmul) or PyTorch SDPA; the gather
is inside the timed region. Decode also compares with per-row prefix copies already sitting in every row's KV
cache (PEFT's cache layout: no gather per step, but every row reads its own copy). Workload and baselines are
``attention_workload.py``'s.

Shapes: one GPT-2-medium attention layer (16 heads, head dim 64), bf16.
* prefill / training: 64 rows over 8 prefixes (ids interleaved), P=200, T=512, causal;
* decode: 256 rows over 8 prefixes, P=200, 64..512 cached tokens, one query per row.

Two ways to run it (both need a CUDA device; on CPU everything skips):
* ``python -m pytest benchmarks/bench_triton_attention.py --benchmark-only`` (pytest-benchmark);
* ``python benchmarks/bench_triton_attention.py --out benchmarks/results/triton_<gpu>.json``: times every
  case with ``triton.testing.do_bench``, measures the device's bf16 matmul and copy rates in the same run,
  prints a table and writes JSON (device, versions, commit, date, figures, the speed targets).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from attention_workload import (
    Concatenated,
    bytes_moved,
    eager_concat,
    flops,
    gather_concat,
    make_args,
    public_op,
    sdpa_concat,
)

from prefixrt import ops

HAS_CUDA = torch.cuda.is_available()
HEADS, HEAD_DIM, DTYPE, PREFIX_LEN = 16, 64, torch.bfloat16, 200
PREFILL = dict(rows=64, prefixes=8, prefix_len=PREFIX_LEN, q_len=512, k_len=512)
DECODE_CACHED = (64, 256, 512)
DECODE = dict(rows=256, prefixes=8, prefix_len=PREFIX_LEN)
# Datasheet peaks (dense bf16 TFLOP/s, HBM GB/s) by device-name fragment; the run also measures its own.
SPEC_PEAKS = {"H200": (989.0, 4800.0), "H100": (989.0, 3350.0), "A100": (312.0, 2039.0)}


def make_workload(rows, prefixes, prefix_len, q_len, k_len, causal, requires_grad=False, device="cuda"):
    """One call at these shapes (``HEADS`` heads of ``HEAD_DIM``, ``DTYPE``; own K/V contiguous)."""
    return make_args(rows=rows, prefixes=prefixes, prefix_len=prefix_len, q_len=q_len, k_len=k_len, heads=HEADS,
                     head_dim=HEAD_DIM, dtype=DTYPE, device=device, causal=causal,
                     requires_grad=requires_grad)  # fmt: skip


# -- the implementations ----------------------------------------------------------------------------------------
def triton(args: ops.AttentionArgs):
    return public_op(args, "triton")[0]


def eager(args: ops.AttentionArgs, copies: Concatenated | None = None):
    """``copies``: :func:`gather_concat`'s result made beforehand (a cache holding per-row prefix copies)."""
    return eager_concat(args, PREFIX_LEN, copies)


def sdpa(args: ops.AttentionArgs, copies: Concatenated | None = None):
    return sdpa_concat(args, PREFIX_LEN, copies)


FORWARD = {"triton": triton, "eager_concat": eager, "sdpa_concat": sdpa}


def forward_backward(fn, args: ops.AttentionArgs, dout: torch.Tensor):
    def run():
        for t in (args.q, args.k, args.v, args.bank.k, args.bank.v):
            t.grad = None
        fn(args).backward(dout)

    return run


def decode_cases(args: ops.AttentionArgs):
    """Decode implementations; the per-row-copy ones get their cache (prefix inside) built once, untimed."""
    keys, values, visible = gather_concat(args, PREFIX_LEN)
    copies = keys.contiguous(), values.contiguous(), visible
    return {
        "triton": lambda: triton(args),
        "sdpa_concat": lambda: sdpa(args),
        "eager_concat": lambda: eager(args),
        "sdpa_per_row_copies": lambda: sdpa(args, copies),
        "eager_per_row_copies": lambda: eager(args, copies),
    }


# -- pytest-benchmark -------------------------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="the Triton benchmarks need a CUDA device")


def _bench(benchmark, fn, args: ops.AttentionArgs, work: float):
    def run():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(run, warmup_rounds=5, rounds=30, iterations=1)
    mean_s = benchmark.stats.stats.mean
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        tflops=work / mean_s / 1e12,
        gbps=bytes_moved(args, PREFIX_LEN) / mean_s / 1e9,
    )


@needs_cuda
@pytest.mark.benchmark(group="triton-prefill-forward")
@pytest.mark.parametrize("impl", list(FORWARD))
def test_forward(benchmark, impl):
    args = make_workload(**PREFILL, causal=True)
    with torch.no_grad():
        _bench(benchmark, lambda: FORWARD[impl](args), args, flops(args, PREFIX_LEN))


@needs_cuda
@pytest.mark.benchmark(group="triton-prefill-forward-backward")
@pytest.mark.parametrize("impl", list(FORWARD))
def test_forward_backward(benchmark, impl):
    args = make_workload(**PREFILL, causal=True, requires_grad=True)
    dout = torch.randn_like(args.q)
    _bench(benchmark, forward_backward(FORWARD[impl], args, dout), args, 3.5 * flops(args, PREFIX_LEN))


@needs_cuda
@pytest.mark.benchmark(group="triton-decode")
@pytest.mark.parametrize("cached", DECODE_CACHED)
@pytest.mark.parametrize(
    "impl", ["triton", "sdpa_concat", "eager_concat", "sdpa_per_row_copies", "eager_per_row_copies"]
)
def test_decode(benchmark, impl, cached):
    args = make_workload(**DECODE, q_len=1, k_len=cached, causal=True)
    with torch.no_grad():
        _bench(benchmark, decode_cases(args)[impl], args, flops(args, PREFIX_LEN))


# -- standalone run: one command, a table and a JSON file -----------------------------------------------------------
def measure_peaks() -> dict:
    """This device's bf16 matmul rate and copy bandwidth, measured now (the datasheet peaks beside them)."""
    from triton.testing import do_bench

    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    matmul_ms = do_bench(lambda: a @ a)
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    copy_ms = do_bench(lambda: y.copy_(x))
    name = torch.cuda.get_device_name()
    spec = next((peaks for key, peaks in SPEC_PEAKS.items() if key in name), (None, None))
    return {
        "measured_bf16_matmul_tflops": 2 * n**3 / matmul_ms / 1e9,
        "measured_copy_gbps": 2 * x.numel() / copy_ms / 1e6,
        "spec_bf16_dense_tflops": spec[0],
        "spec_hbm_gbps": spec[1],
    }


def graph_ms(fn, rep: int = 100) -> float | None:
    """GPU time of ``fn`` replayed as a CUDA graph (no launch overhead); None (reported) if it cannot be
    compiled or captured."""
    from triton.testing import do_bench_cudagraph

    try:
        return do_bench_cudagraph(fn, rep=rep)
    except Exception as err:  # report it, keep the other figures
        print(f"CUDA graph timing failed: {type(err).__name__}: {str(err)[:200]}", file=sys.stderr)
        return None


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def run_all() -> list[dict]:
    from triton.testing import do_bench

    results = []

    def record(case, impl, ms, args, work, ms_cuda_graph=None, **extra):
        nbytes = bytes_moved(args, PREFIX_LEN)
        row = dict(case=case, impl=impl, ms=ms, tflops=work / ms / 1e9, gbps=nbytes / ms / 1e6)
        if ms_cuda_graph:
            row.update(ms_cuda_graph=ms_cuda_graph, gbps_cuda_graph=nbytes / ms_cuda_graph / 1e6)
        results.append(dict(row, **extra))

    args = make_workload(**PREFILL, causal=True)
    with torch.no_grad():
        expected = sdpa(args)
        for impl, fn in FORWARD.items():
            record("forward", impl, do_bench(lambda fn=fn: fn(args)), args, flops(args, PREFIX_LEN),
                   max_abs_diff_vs_sdpa=_max_diff(fn(args), expected))  # fmt: skip
    del args, expected
    args = make_workload(**PREFILL, causal=True, requires_grad=True)
    dout = torch.randn_like(args.q)
    for impl, fn in FORWARD.items():
        ms = do_bench(forward_backward(fn, args, dout))
        record("forward_backward", impl, ms, args, 3.5 * flops(args, PREFIX_LEN))
    del args, dout
    for cached in DECODE_CACHED:
        args = make_workload(**DECODE, q_len=1, k_len=cached, causal=True)
        with torch.no_grad():
            cases = decode_cases(args)
            expected = cases["sdpa_per_row_copies"]()
            for impl, fn in cases.items():
                # A decode step is a few microseconds of GPU work, so a plain call measures the launch
                # overhead; generation replays the step as a CUDA graph (prefixrt.engine.capture), so the
                # graph time is the one the targets use.
                record(f"decode_cached{cached}", impl, do_bench(fn), args, flops(args, PREFIX_LEN),
                       ms_cuda_graph=graph_ms(fn), max_abs_diff_vs_sdpa=_max_diff(fn(), expected))  # fmt: skip
    return results


def targets(results: list[dict], peaks: dict) -> dict:
    """The speed targets (Triton against eager and SDPA, the share of the bf16 peak and of the bandwidth
    roofline, decode against per-row copies), each with the measured value and whether it is met."""
    ms = {(r["case"], r["impl"]): r for r in results}
    out = {}
    fb = lambda impl: ms[("forward_backward", impl)]["ms"]
    out["fwd_bwd_vs_eager >= 2"] = fb("eager_concat") / fb("triton")
    out["fwd_bwd_vs_sdpa >= 1.3"] = fb("sdpa_concat") / fb("triton")
    peak = peaks["spec_bf16_dense_tflops"] or peaks["measured_bf16_matmul_tflops"]
    out["forward_fraction_of_bf16_peak >= 0.4"] = ms[("forward", "triton")]["tflops"] / peak
    bandwidth = peaks["spec_hbm_gbps"] or peaks["measured_copy_gbps"]
    for cached in DECODE_CACHED:
        case = f"decode_cached{cached}"
        # GPU time (CUDA graph replay) where every implementation could be captured, else wall time per call.
        rows = [ms[(case, impl)] for impl in ("triton", "sdpa_per_row_copies", "eager_per_row_copies")]
        graph = all(r.get("ms_cuda_graph") for r in rows)
        key = "ms_cuda_graph" if graph else "ms"
        mine = ms[(case, "triton")]
        out[f"{case}_fraction_of_bandwidth_roofline >= 0.7"] = (
            mine["gbps_cuda_graph" if graph else "gbps"] / bandwidth
        )
        copies = min(rows[1][key], rows[2][key])
        out[f"{case}_vs_per_row_copies >= 3"] = copies / mine[key]
    return {k: {"value": v, "met": v >= float(k.rsplit(">= ", 1)[1])} for k, v in out.items()}


def _git(*args) -> str:
    if args[0] == "rev-parse" and os.environ.get("PREFIXRT_COMMIT"):
        return os.environ["PREFIXRT_COMMIT"]  # a copied tree's .git may lag (the device machine's did)
    try:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def plot(report: dict, path: Path) -> None:
    """Milliseconds per implementation for every case (log scale; decode as CUDA-graph GPU time)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r["case"] for r in report["results"]))
    impls = list(dict.fromkeys(r["impl"] for r in report["results"]))
    ms = {(r["case"], r["impl"]): r.get("ms_cuda_graph") or r["ms"] for r in report["results"]}
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(impls)
    for i, impl in enumerate(impls):
        xs = [j + i * width for j, c in enumerate(cases) if (c, impl) in ms]
        ax.bar(xs, [ms[(c, impl)] for c in cases if (c, impl) in ms], width, label=impl)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))], cases, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("ms (lower is better; decode: CUDA-graph GPU time)")
    ax.legend(fontsize=8)
    ax.set_title(
        f"prefix attention, {report['device']}, {report['dtype']}, torch {report['torch']}, "
        f"triton {report['triton']}, commit {report['commit'][:10]}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON here (and a PNG beside it)")
    parser.add_argument(
        "--plot-from", type=Path, help="only draw the PNG of an existing JSON (no GPU needed)"
    )
    args = parser.parse_args(argv)
    if args.plot_from:
        plot(json.loads(args.plot_from.read_text()), args.plot_from.with_suffix(".png"))
        return 0
    if not HAS_CUDA:
        print("no CUDA device: the Triton benchmarks only run on a GPU", file=sys.stderr)
        return 1
    import triton as triton_lib

    peaks = measure_peaks()
    results = run_all()
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton_lib.__version__,
        "commit": _git("rev-parse", "HEAD"),
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dtype": str(DTYPE),
        "shapes": {
            "heads": HEADS,
            "head_dim": HEAD_DIM,
            "prefill": PREFILL,
            "decode": DECODE,
            "decode_cached": DECODE_CACHED,
        },  # fmt: skip
        "peaks": peaks,
        "results": results,
        "targets": targets(results, peaks),
    }
    print(
        f"{report['device']}  torch {report['torch']}  triton {report['triton']}  commit {report['commit'][:10]}"
    )
    print(f"measured: bf16 matmul {peaks['measured_bf16_matmul_tflops']:.0f} TFLOP/s, copy {peaks['measured_copy_gbps']:.0f} GB/s;"
          f" datasheet: {peaks['spec_bf16_dense_tflops']} TFLOP/s, {peaks['spec_hbm_gbps']} GB/s")  # fmt: skip
    print(f"{'case':<22}{'impl':<22}{'ms':>10}{'TFLOP/s':>10}{'GB/s':>10}{'graph ms':>10}{'graph GB/s':>11}")
    for r in results:
        graph = r.get("ms_cuda_graph")
        extra = f"{graph:>10.3f}{r['gbps_cuda_graph']:>11.0f}" if graph else ""
        print(f"{r['case']:<22}{r['impl']:<22}{r['ms']:>10.3f}{r['tflops']:>10.1f}{r['gbps']:>10.0f}{extra}")
    for name, t in report["targets"].items():
        print(f"{'MET ' if t['met'] else 'MISS'} {name}: {t['value']:.2f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        plot(report, args.out.with_suffix(".png"))
        print(f"wrote {args.out} and its .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
