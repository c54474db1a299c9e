"""Sweep block configurations of the Triton kernels on this GPU at the benchmark's shapes.

The launchers pick from short fixed lists (``prefixrt.ops.triton.configs``) with no autotuner, so that a choice
is deterministic and every entry is tested. This script times candidate configurations (forced through each
launcher's ``config=``) on the shapes of ``bench_triton_attention.py`` -- forward, backward and decode -- with
CUDA-graph timing (GPU time, no launch overhead), checks each output against the default configuration's, and
prints the fastest ones; put a winner into the lists by hand (and the CPU tests then exercise it).

    python benchmarks/tune_triton_configs.py --out out/tune.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_triton_attention import DECODE, PREFILL, graph_ms, make_workload  # noqa: E402

from prefixrt.ops.triton.configs import KernelConfig, smem_bytes  # noqa: E402
from prefixrt.ops.triton.decode import prefix_decode  # noqa: E402
from prefixrt.ops.triton.launch import prefix_attention_bwd, prefix_attention_fwd  # noqa: E402

SMEM_LIMIT = 220 * 1024  # Hopper's per-block limit is 227 KiB


def candidates(kind: str) -> list[KernelConfig]:
    # Kept small: every candidate compiles (seconds each), and device time is scarce.
    if kind == "decode":
        grid = itertools.product((16, 32), (32, 64, 128), (2, 4, 8), (2,))
    elif kind == "fwd":
        grid = itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3))
    else:
        grid = itertools.product((32, 64, 128), (32, 64), (4, 8), (1, 2))
    out = []
    for m, n, warps, stages in grid:
        config = KernelConfig(m, n, num_warps=warps, num_stages=stages)
        if smem_bytes(config, 64, 2, "bwd" if kind == "bwd" else "fwd") <= SMEM_LIMIT:
            out.append(config)
    return out


def sweep(kind: str, top: int) -> list[dict]:
    if kind == "decode":
        args = make_workload(**DECODE, q_len=1, k_len=256, causal=True)
        run = lambda c, splits=None: prefix_decode(args, kv_splits=splits, config=c)[0]
    else:
        args = make_workload(**PREFILL, causal=True)
        if kind == "fwd":
            run = lambda c: prefix_attention_fwd(args, config=c)[0]
        else:
            out, lse = prefix_attention_fwd(args)
            dout = torch.randn_like(out)
            run = lambda c: prefix_attention_bwd(args, dout, out, lse, config=c)[0]
    with torch.no_grad():
        expected = run(None).float()
        rows = []
        configs = [(c, None) for c in candidates(kind)]
        if kind == "decode":
            configs += [(None, s) for s in (1, 2, 4, 8, 16)]
        for config, splits in configs:
            label = f"{config}" if splits is None else f"default config, kv_splits={splits}"
            fn = (lambda c=config, s=splits: run(c, s)) if kind == "decode" else (lambda c=config: run(c))
            try:
                diff = (fn().float() - expected).abs().max().item()
            except Exception as err:
                print(f"  {label}: failed: {type(err).__name__}: {str(err)[:120]}", flush=True)
                continue
            ms = graph_ms(fn, rep=30)
            if ms is not None:
                rows.append({"config": label, "ms": ms, "max_abs_diff_vs_default": diff})
        default_ms = graph_ms(lambda: run(None), rep=30)
    rows.sort(key=lambda r: r["ms"])
    print(f"== {kind}: default {default_ms:.4f} ms", flush=True)
    for r in rows[:top]:
        print(f"  {r['ms']:.4f} ms  diff {r['max_abs_diff_vs_default']:.2e}  {r['config']}", flush=True)
    return [{"default_ms": default_ms}] + rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kinds", nargs="+", default=["fwd", "decode"])
    parser.add_argument("--top", type=int, default=8)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    report = {"device": torch.cuda.get_device_name()}
    for kind in args.kinds:
        report[kind] = sweep(kind, args.top)
        if args.out:  # written after every kind: a timeout still leaves the finished ones
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
