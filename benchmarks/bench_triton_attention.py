"""Triton prefix attention vs the ways prefix-tuning is usually run: forward, forward+backward and decode.

Baselines copy each row's prefix out of the bank and concatenate it with the row's own keys (what PEFT does),
then run HF-eager-style attention (matmul, masked softmax in fp32, matmul) or PyTorch SDPA; the gather is
inside the timed region. Decode also compares with per-row prefix copies already sitting in every row's KV
cache (PEFT's cache layout: no gather per step, but every row reads its own copy).

Shapes: GPT-2-medium attention (16 heads, head dim 64), bf16, one layer.
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
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from prefixrt import ops

HAS_CUDA = torch.cuda.is_available()
HEADS, HEAD_DIM, DTYPE = 16, 64, torch.bfloat16
PREFILL = dict(rows=64, prefixes=8, prefix_len=200, q_len=512, k_len=512)
DECODE_CACHED = (64, 256, 512)
DECODE = dict(rows=256, prefixes=8, prefix_len=200)
# Datasheet peaks (dense bf16 TFLOP/s, HBM GB/s) by device-name fragment; the run also measures its own.
SPEC_PEAKS = {"H200": (989.0, 4800.0), "H100": (989.0, 3350.0), "A100": (312.0, 2039.0)}


@dataclass
class Workload:
    """One attention call: own q/k/v ``[B, H, T*, D]``, a bank ``[H, N*P, D]`` of equal-length entries."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    bank_k: torch.Tensor
    bank_v: torch.Tensor
    prefix_ids: torch.Tensor
    bank_offsets: torch.Tensor
    prefix_len: int
    causal: bool

    @property
    def op_args(self):
        return (self.q, self.k, self.v, self.bank_k, self.bank_v, self.prefix_ids, self.bank_offsets)

    def flops(self) -> float:
        """Forward FLOPs over the visible (query, key) pairs: ``4 * D`` per pair per head."""
        b, h, tq, d = self.q.shape
        tk = self.k.shape[2]
        own = sum(min(tk, i + 1 + tk - tq) for i in range(tq)) if self.causal else tq * tk
        return 4.0 * d * h * b * (tq * self.prefix_len + own)

    def bytes_read(self) -> float:
        """Bytes that must move: each distinct prefix once, each row's own K/V, q and out."""
        b, h, tq, d = self.q.shape
        item = self.q.element_size()
        distinct = int(self.prefix_ids.unique().numel())
        return item * h * d * (2 * distinct * self.prefix_len + 2 * b * self.k.shape[2] + 2 * b * tq)


def make_workload(rows, prefixes, prefix_len, q_len, k_len, causal, requires_grad=False, device="cuda"):
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape):
        t = torch.randn(*shape, generator=g).to(device=device, dtype=DTYPE)
        return t.requires_grad_(requires_grad)

    q, k, v = (
        randn(rows, HEADS, q_len, HEAD_DIM),
        randn(rows, HEADS, k_len, HEAD_DIM),
        randn(rows, HEADS, k_len, HEAD_DIM),
    )
    bank_k, bank_v = (
        randn(HEADS, prefixes * prefix_len, HEAD_DIM),
        randn(HEADS, prefixes * prefix_len, HEAD_DIM),
    )
    offsets = torch.arange(prefixes + 1, device=device) * prefix_len
    ids = torch.arange(rows, device=device) % prefixes
    return Workload(q, k, v, bank_k, bank_v, ids, offsets, prefix_len, causal)


# -- the implementations ----------------------------------------------------------------------------------------
def gather_concat(w: Workload):
    """Each row's prefix copied out of the bank and concatenated with its keys, and the visibility mask
    ``[Tq, P + Tk]`` (None when every key is visible: no causal cut, e.g. one decode query)."""
    index = w.bank_offsets[w.prefix_ids][:, None] + torch.arange(w.prefix_len, device=w.q.device)  # [B, P]
    keys = torch.cat([w.bank_k[:, index].transpose(0, 1), w.k], dim=2)  # [B, H, P + Tk, D]
    values = torch.cat([w.bank_v[:, index].transpose(0, 1), w.v], dim=2)
    tq, tk = w.q.shape[2], w.k.shape[2]
    if not w.causal or tq == 1:
        return keys, values, None
    own = torch.ones(tq, tk, dtype=torch.bool, device=w.q.device).tril(tk - tq)
    visible = torch.cat([torch.ones(tq, w.prefix_len, dtype=torch.bool, device=w.q.device), own], dim=1)
    return keys, values, visible


def eager(w: Workload, keys=None, values=None, visible=None):
    """HF eager attention: matmul, masked softmax in fp32, matmul."""
    if keys is None:
        keys, values, visible = gather_concat(w)
    scores = (w.q @ keys.transpose(-1, -2)) * HEAD_DIM**-0.5
    if visible is not None:
        scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(w.q.dtype) @ values


def sdpa(w: Workload, keys=None, values=None, visible=None):
    """PyTorch SDPA on the concatenated K/V, with a boolean mask when some key is hidden."""
    if keys is None:
        keys, values, visible = gather_concat(w)
    return torch.nn.functional.scaled_dot_product_attention(w.q, keys, values, attn_mask=visible)


def triton(w: Workload):
    return ops.prefix_attention(*w.op_args, causal=w.causal, backend="triton")[0]


FORWARD = {"triton": triton, "eager_concat": eager, "sdpa_concat": sdpa}


def forward_backward(fn, w: Workload, dout: torch.Tensor):
    def run():
        for t in (w.q, w.k, w.v, w.bank_k, w.bank_v):
            t.grad = None
        fn(w).backward(dout)

    return run


def decode_cases(w: Workload):
    """Decode implementations; the per-row-copy ones get their cache (prefix inside) built once, untimed."""
    keys, values, visible = gather_concat(w)
    keys, values = keys.contiguous(), values.contiguous()
    return {
        "triton": lambda: triton(w),
        "sdpa_concat": lambda: sdpa(w),
        "eager_concat": lambda: eager(w),
        "sdpa_per_row_copies": lambda: sdpa(w, keys, values, visible),
        "eager_per_row_copies": lambda: eager(w, keys, values, visible),
    }


# -- pytest-benchmark -------------------------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="the Triton benchmarks need a CUDA device")


def _bench(benchmark, fn, w: Workload, flops: float):
    def run():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(run, warmup_rounds=5, rounds=30, iterations=1)
    mean_s = benchmark.stats.stats.mean
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        tflops=flops / mean_s / 1e12,
        gbps=w.bytes_read() / mean_s / 1e9,
    )


@needs_cuda
@pytest.mark.benchmark(group="triton-prefill-forward")
@pytest.mark.parametrize("impl", list(FORWARD))
def test_forward(benchmark, impl):
    w = make_workload(**PREFILL, causal=True)
    with torch.no_grad():
        _bench(benchmark, lambda: FORWARD[impl](w), w, w.flops())


@needs_cuda
@pytest.mark.benchmark(group="triton-prefill-forward-backward")
@pytest.mark.parametrize("impl", list(FORWARD))
def test_forward_backward(benchmark, impl):
    w = make_workload(**PREFILL, causal=True, requires_grad=True)
    dout = torch.randn_like(w.q)
    _bench(benchmark, forward_backward(FORWARD[impl], w, dout), w, 3.5 * w.flops())


@needs_cuda
@pytest.mark.benchmark(group="triton-decode")
@pytest.mark.parametrize("cached", DECODE_CACHED)
@pytest.mark.parametrize(
    "impl", ["triton", "sdpa_concat", "eager_concat", "sdpa_per_row_copies", "eager_per_row_copies"]
)
def test_decode(benchmark, impl, cached):
    w = make_workload(**DECODE, q_len=1, k_len=cached, causal=True)
    with torch.no_grad():
        _bench(benchmark, decode_cases(w)[impl], w, w.flops())


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

    def record(case, impl, ms, w, flops, ms_cuda_graph=None, **extra):
        row = dict(case=case, impl=impl, ms=ms, tflops=flops / ms / 1e9, gbps=w.bytes_read() / ms / 1e6)
        if ms_cuda_graph:
            row.update(ms_cuda_graph=ms_cuda_graph, gbps_cuda_graph=w.bytes_read() / ms_cuda_graph / 1e6)
        results.append(dict(row, **extra))

    w = make_workload(**PREFILL, causal=True)
    with torch.no_grad():
        expected = sdpa(w)
        for impl, fn in FORWARD.items():
            record("forward", impl, do_bench(lambda fn=fn: fn(w)), w, w.flops(),
                   max_abs_diff_vs_sdpa=_max_diff(fn(w), expected))  # fmt: skip
    del w, expected
    w = make_workload(**PREFILL, causal=True, requires_grad=True)
    dout = torch.randn_like(w.q)
    for impl, fn in FORWARD.items():
        record("forward_backward", impl, do_bench(forward_backward(fn, w, dout)), w, 3.5 * w.flops())
    del w, dout
    for cached in DECODE_CACHED:
        w = make_workload(**DECODE, q_len=1, k_len=cached, causal=True)
        with torch.no_grad():
            cases = decode_cases(w)
            expected = cases["sdpa_per_row_copies"]()
            for impl, fn in cases.items():
                # A decode step is a few microseconds of GPU work, so a plain call measures the launch
                # overhead; generation replays the step as a CUDA graph (prefixrt.engine.capture), so the
                # graph time is the one the targets use.
                record(f"decode_cached{cached}", impl, do_bench(fn), w, w.flops(),
                       ms_cuda_graph=graph_ms(fn), max_abs_diff_vs_sdpa=_max_diff(fn(), expected))  # fmt: skip
    return results


def targets(results: list[dict], peaks: dict) -> dict:
    """The speed targets (each ratio's threshold is in its name), with the measured value and whether it is met."""
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
