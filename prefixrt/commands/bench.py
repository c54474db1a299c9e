"""``prefixrt bench generate``: the end-to-end mixed-prefix generation benchmark, baselines in the same run.

Builds the workload of :mod:`prefixrt.bench.generation` (GPT-2-small size, random weights, N prefixes x M requests,
32-token prompts, 64 new tokens, greedy) for each prefix length, runs every method (PEFT-style per-prefix batches,
HF ``generate()`` on the attached model, ``prefixrt.generate``, ``prefixrt.Engine``), checks they produce the same
tokens, prints a table, and writes JSON (device, versions, commit, date, load average, figures, targets) and a
PNG plot.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

NAME = "bench"
HELP = (
    "Benchmarks (`prefixrt bench generate`: mixed-prefix generation vs PEFT-style and attached HF generate; "
    "`prefixrt bench train`: a training step vs HF PEFT and the frozen base; "
    "`prefixrt bench serve`: the HTTP server under load)."
)

# The speed-up targets for prefixrt.generate: on a 2-core CPU with 8 prefixes x 4 requests; on a GPU with 64 x 4.
TARGETS = {"cpu": {"peft_style": 3.0, "hf_attached": 1.5}, "cuda": {"peft_style": 10.0}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from prefixrt.bench.generation import METHODS
    from prefixrt.commands import bench_train

    sub = parser.add_subparsers(dest="bench", required=True)
    bench_train.add_parser(sub)
    g = sub.add_parser(
        "generate",
        help="end-to-end mixed-prefix generation vs PEFT-style and attached HF generate()",
        description=__doc__,
    )
    g.add_argument("--prefixes", type=int, default=8, help="distinct prefixes (N)")
    g.add_argument("--per-prefix", type=int, default=4, help="requests per prefix (M)")
    g.add_argument("--prefix-lengths", type=int, nargs="+", default=[10, 200], help="P values")
    g.add_argument("--prompt-len", type=int, default=32)
    g.add_argument("--new-tokens", type=int, default=64)
    g.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    g.add_argument(
        "--repeats", type=int, default=1, help="rounds over all methods, order rotated (fastest kept)"
    )
    g.add_argument(
        "--warmup-tokens",
        type=int,
        default=None,
        help="before timing, run every method once with this many new tokens (compiles kernels, fills caches); "
        "default: 4 on CUDA, 0 on CPU",
    )
    g.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    g.add_argument("--device", default="cpu", help="torch device for the model, bank and prompts (cpu, cuda)")
    g.add_argument(
        "--backend", default="auto", help="prefixrt attention backend (auto, reference, cpp, triton)"
    )
    g.add_argument(
        "--small", action="store_true", help="a 2-layer, 64-wide model with a 1000-token vocabulary"
    )
    g.add_argument("--out", type=Path, default=Path("generate_bench.json"), help="JSON output")
    g.add_argument("--plot", type=Path, default=None, help="PNG output (default: --out with .png)")
    from prefixrt.commands.bench_serve import add_serve_parser

    add_serve_parser(sub)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _commit() -> str:
    if os.environ.get("PREFIXRT_COMMIT"):
        return os.environ["PREFIXRT_COMMIT"]  # a copied tree's .git may lag (the device machine's did)
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return head + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _load() -> float:
    try:
        return float(open("/proc/loadavg", encoding="utf-8").read().split()[0])
    except OSError:
        return float("nan")


def _decode_backend(bank, backend: str) -> str:
    import torch

    from prefixrt import ops

    spec = bank.spec.sites["decoder"]
    q = torch.empty(1, spec.num_heads, 1, spec.head_dim, device=bank.device, dtype=bank.dtype)
    return ops.select_backend(backend, ops.AttentionCall.of(q, q, True, 0.0, False)).name


def run(args: argparse.Namespace) -> int:
    if args.bench == "train":
        from prefixrt.commands import bench_train

        return bench_train.run(args)
    if args.bench == "serve":
        from prefixrt.commands.bench_serve import run_serve

        return run_serve(args)
    import torch

    import prefixrt
    from prefixrt.bench.generation import Workload, build, matmul_floor, measure, run_method

    if args.threads:
        torch.set_num_threads(args.threads)
    shape = dict(layers=2, hidden=64, heads=4, vocab=1000) if args.small else {}
    model = None
    floors: dict[int, float] = {}  # prefix length -> seconds of the model's weight matmuls alone
    results, environment = (
        [],
        {
            "cpu": cpu_name(),
            "device": args.device,
            "gpu": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else None,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "python": sys.version.split()[0],
            "prefixrt_commit": _commit(),
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "platform": platform.platform(),
        },
    )
    for prefix_len in args.prefix_lengths:
        workload = Workload(
            prefixes=args.prefixes,
            per_prefix=args.per_prefix,
            prefix_len=prefix_len,
            prompt_len=args.prompt_len,
            new_tokens=args.new_tokens,
            **shape,
        )
        model, bank, input_ids, prefix_ids = build(workload, model, device=args.device)
        environment["decode_backend"] = _decode_backend(bank, args.backend)
        _warm_up(args, model, bank, input_ids, prefix_ids, workload)
        outputs, runs = {}, {m: [] for m in args.methods}
        tokens = workload.rows * workload.new_tokens
        for round_ in range(args.repeats):
            shift = round_ % len(args.methods)  # rotate the order so a change of load hits every method alike
            for method in args.methods[shift:] + args.methods[:shift]:
                _prepare(model, bank, method, args.backend)
                load = _load()
                out, seconds, peak = measure(
                    _bind(run_method, method, model, bank, input_ids, prefix_ids, workload), args.device
                )
                runs[method].append(
                    {
                        "seconds": seconds,
                        "peak_memory_bytes": peak,
                        "load_before": load,
                        "load_after": _load(),
                    }
                )
                outputs[method] = out
                print(
                    f"  P={prefix_len:<4} {method:<18} {seconds:8.2f} s  {tokens / seconds:8.1f} tok/s  "
                    f"(load {load:.1f})",
                    flush=True,
                )
        for method in args.methods:
            best = min(runs[method], key=lambda r: r["seconds"])
            peaks = [r["peak_memory_bytes"] for r in runs[method] if r["peak_memory_bytes"] is not None]
            results.append(
                {
                    "prefix_len": prefix_len,
                    "method": method,
                    "tokens": tokens,
                    "tokens_per_s": tokens / best["seconds"],
                    "seconds": best["seconds"],
                    "peak_memory_bytes": max(peaks) if peaks else None,
                    "runs": runs[method],
                }
            )
        if prefixrt.is_attached(model):
            prefixrt.detach(model)
        floors[prefix_len] = matmul_floor(model, workload)
        reference = outputs.get("hf_attached", next(iter(outputs.values())))
        for r in results:
            if r["prefix_len"] == prefix_len:
                r["same_tokens_as_hf_attached"] = bool(torch.equal(outputs[r["method"]], reference))
    summary = _summarize(results, args, floors)
    report = {
        "workload": {
            **Workload(
                prefixes=args.prefixes,
                per_prefix=args.per_prefix,
                prompt_len=args.prompt_len,
                new_tokens=args.new_tokens,
                **shape,
            ).to_dict(),
            "prefix_lengths": args.prefix_lengths,
        },
        "environment": environment,
        "memory_measure": (
            "peak CUDA memory allocated over the run, minus what was allocated before"
            if args.device.startswith("cuda")
            else "peak RSS growth over the run (Linux VmHWM reset via /proc/self/clear_refs, minus VmRSS "
            "before); includes torch CPU allocations"
        ),
        "results": results,
        "summary": summary,
    }
    _print_table(results, summary)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    plot = args.plot or args.out.with_suffix(".png")
    _plot(results, environment, plot, summary)
    print(f"wrote {args.out} and {plot}")
    return 0


def _prepare(model, bank, method: str, backend: str) -> None:
    """PEFT-style runs on the plain model; every other method on the model attached to ``bank``."""
    import prefixrt

    attached = prefixrt.is_attached(model)
    if method == "peft_style" and attached:
        prefixrt.detach(model)
    elif method != "peft_style" and not attached:
        prefixrt.attach(model, bank, backend=backend)


def _warm_up(args, model, bank, input_ids, prefix_ids, workload) -> None:
    """Run each method once, untimed, with a few new tokens: Triton compiles its kernels on first use."""
    import dataclasses

    from prefixrt.bench.generation import run_method

    tokens = (
        args.warmup_tokens if args.warmup_tokens is not None else (4 if args.device.startswith("cuda") else 0)
    )
    if tokens <= 0:
        return
    short = dataclasses.replace(workload, new_tokens=tokens)
    for method in args.methods:
        _prepare(model, bank, method, args.backend)
        run_method(method, model, bank, input_ids, prefix_ids, short)


def _bind(fn, *args):
    return lambda: fn(*args)


def _summarize(results: list[dict], args, floors: dict[int, float]) -> list[dict]:
    summary = []
    for prefix_len in args.prefix_lengths:
        rows = {r["method"]: r for r in results if r["prefix_len"] == prefix_len}
        ours = rows.get("prefixrt_generate")
        if ours is None:
            continue
        entry = {"prefix_len": prefix_len}
        if prefix_len in floors:
            # No method that runs the model's layers as they are can beat this: it bounds every speed-up.
            entry["matmul_floor_s"] = floors[prefix_len]
            for method, row in rows.items():
                entry[f"most_possible_speedup_over_{method}"] = row["seconds"] / floors[prefix_len]
        targets = TARGETS["cuda" if args.device.startswith("cuda") else "cpu"]
        for baseline, target in targets.items():
            if baseline in rows:
                speedup = ours["tokens_per_s"] / rows[baseline]["tokens_per_s"]
                entry[f"speedup_vs_{baseline}"] = speedup
                entry[f"target_vs_{baseline}"] = target
                entry[f"met_vs_{baseline}"] = speedup >= target
        summary.append(entry)
    return summary


def _print_table(results: list[dict], summary: list[dict]) -> None:
    print(f"\n{'P':>4}  {'method':<18} {'seconds':>8} {'tok/s':>8} {'peak mem MB':>12} {'same tokens':>12}")
    for r in results:
        peak = "n/a" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**20:.0f}"
        print(
            f"{r['prefix_len']:>4}  {r['method']:<18} {r['seconds']:8.2f} {r['tokens_per_s']:8.1f} {peak:>12} "
            f"{str(r.get('same_tokens_as_hf_attached')):>12}"
        )
    for s in summary:
        parts = [
            f"{k.removeprefix('speedup_vs_')}: {v:.2f}x (target {s['target_vs_' + k.removeprefix('speedup_vs_')]}x)"
            for k, v in s.items()
            if k.startswith("speedup_vs_") and "target_vs_" + k.removeprefix("speedup_vs_") in s
        ]
        print(f"P={s['prefix_len']}: prefixrt.generate vs " + ", ".join(parts))
        if "matmul_floor_s" in s:
            print(
                f"  the model's weight matmuls alone take {s['matmul_floor_s']:.2f} s: no method can be more than "
                f"{s.get('most_possible_speedup_over_hf_attached', float('nan')):.2f}x faster than hf_attached"
            )


def _plot(results: list[dict], environment: dict, path: Path, summary: list[dict] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["prefix_len"] for r in results})
    methods = list(dict.fromkeys(r["method"] for r in results))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        xs = [j + i * width for j in range(len(lengths))]
        by_len = {r["prefix_len"]: r for r in results if r["method"] == method}
        axes[0].bar(
            xs, [by_len[p]["tokens_per_s"] if p in by_len else 0 for p in lengths], width, label=method
        )
        axes[1].bar(
            xs,
            [(by_len[p]["peak_memory_bytes"] or 0) / 2**20 if p in by_len else 0 for p in lengths],
            width,
            label=method,
        )
    for ax, title in zip(
        axes, ("tokens / s (higher is better)", "peak memory growth, MB (lower is better)"), strict=True
    ):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(lengths))], [f"P={p}" for p in lengths])
        ax.set_title(title)
    floors = {e["prefix_len"]: e["matmul_floor_s"] for e in summary or () if "matmul_floor_s" in e}
    tokens = {r["prefix_len"]: r["tokens"] for r in results}
    for j, p in enumerate(lengths):
        if p in floors:  # the speed of the weight matmuls alone: no bar can rise above it
            axes[0].hlines(tokens[p] / floors[p], j - width / 2, j + 0.8 - width / 2, colors="black",
                           linestyles="dashed", label="weight matmuls alone" if j == 0 else None)  # fmt: skip
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(
        f"mixed-prefix generation, {environment['gpu'] or environment['cpu']} ({environment['threads']} threads), "
        f"backend {environment.get('decode_backend')}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="prefixrt bench")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
