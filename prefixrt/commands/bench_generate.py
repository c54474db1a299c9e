"""``prefixrt bench generate``: the end-to-end mixed-prefix generation benchmark, baselines in the same run.

Builds the workload of :mod:`prefixrt.bench.generation` (GPT-2-small size, random weights, N prefixes x M requests,
32-token prompts, 64 new tokens, greedy) for each prefix length, runs every method (PEFT-style per-prefix batches,
HF ``generate()`` on the attached model, eager and compiled with the static cache, ``prefixrt.generate``,
``prefixrt.Engine`` with packed and with torch's own GEMMs, HF ``generate()`` without prefixes), checks the tokens,
and measures the weight-GEMM floor both ways (torch's ``F.linear`` and the packed oneDNN GEMMs the runners use).
With ``--vllm-python PATH`` (an interpreter with a vLLM CPU build) it also runs vLLM on the same prompts without
prefixes (vLLM cannot serve them: this is the best a vLLM user gets) and checks its tokens against HF's. Prints a
table, writes JSON (device, versions, commit, date, load average, figures, targets) and a PNG plot.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

# prefixrt.generate's speed-up targets: on a 2-core CPU with 8 prefixes x 4 requests; on a GPU with 64 x 4.
TARGETS = {"cpu": {"peft_style": 3.0, "hf_attached": 1.5}, "cuda": {"peft_style": 10.0}}
# The Engine's targets on a CPU: tok/s against vLLM's (no prefix) and the share of the packed-GEMM floor's speed.
ENGINE_TARGETS = {"vllm": 1.3, "packed_floor": 0.8}
# Methods whose tokens are the no-prefix model's (compared with each other, not with the prefixed methods').
NO_PREFIX = ("hf_no_prefix",)
# OpenMP binding variables of this process that the vLLM arm does not inherit.
OMP_BINDING = ("OMP_PROC_BIND", "OMP_PLACES", "GOMP_CPU_AFFINITY", "KMP_AFFINITY")


def add_parser(sub) -> None:
    from prefixrt.bench.generation import METHODS

    g = sub.add_parser(
        "generate",
        help="end-to-end mixed-prefix generation vs PEFT-style, attached HF generate() (eager and compiled) and "
        "vLLM",
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
        "default: 4 on CUDA, 0 on CPU. hf_compiled always runs once untimed with the full workload (it compiles)",
    )
    g.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    g.add_argument("--device", default="cpu", help="torch device for the model, bank and prompts (cpu, cuda)")
    g.add_argument(
        "--backend", default="auto", help="prefixrt attention backend (auto, reference, cpp, triton)"
    )
    g.add_argument(
        "--small", action="store_true", help="a 2-layer, 64-wide model with a 1000-token vocabulary"
    )
    g.add_argument(
        "--vllm-python",
        default=None,
        metavar="PATH",
        help="a Python interpreter with a vLLM CPU build: adds vLLM on the same prompts without prefixes "
        "(started once; its start-up is reported, not timed)",
    )
    g.add_argument("--vllm-rounds", type=int, default=3, help="timed vLLM rounds (fastest kept)")
    g.add_argument("--out", type=Path, default=Path("generate_bench.json"), help="JSON output")
    g.add_argument("--plot", type=Path, default=None, help="PNG output (default: --out with .png)")


def _decode_backend(bank, backend: str) -> str:
    import torch

    from prefixrt import ops

    spec = bank.spec.sites["decoder"]
    q = torch.empty(1, spec.num_heads, 1, spec.head_dim, device=bank.device, dtype=bank.dtype)
    return ops.select_backend(backend, ops.AttentionCall.of(q, q, True, 0.0, False)).name


def _environment(args) -> dict:
    import torch

    from prefixrt.commands.bench import environment

    return {
        **environment(),
        "device": args.device,
        "gpu": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else None,
        "omp_env": {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "GOMP_", "KMP_"))},
    }


def run(args: argparse.Namespace) -> int:
    import torch

    import prefixrt
    from prefixrt.bench.generation import Workload, build, matmul_floor
    from prefixrt.hf.models.gemm import packed_available

    if args.threads:
        torch.set_num_threads(args.threads)
    shape = dict(layers=2, hidden=64, heads=4, vocab=1000) if args.small else {}
    model = None
    floors: dict[int, dict] = {}  # prefix length -> {"plain"|"packed": seconds of the weight matmuls alone}
    results, environment, startup = [], _environment(args), {}
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
        startup.update(_warm_up(args, model, bank, input_ids, prefix_ids, workload))
        results += _time_methods(args, model, bank, input_ids, prefix_ids, workload)
        if prefixrt.is_attached(model):
            prefixrt.detach(model)
        kinds = ("plain", "packed") if args.device == "cpu" and packed_available() else ("plain",)
        floors[prefix_len] = {kind: matmul_floor(model, workload, kind) for kind in kinds}
    vllm = _vllm_arm(args, model, input_ids, results) if args.vllm_python else None
    summary = _summarize(results, args, floors, vllm)
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
            else "peak_memory_bytes: peak RSS growth over the run (Linux VmHWM reset via /proc/self/clear_refs, "
            "minus VmRSS before; includes torch CPU allocations); process_peak_rss_bytes: the whole process's "
            "peak resident memory over the run (model, packed weights, caches)"
        ),
        "startup_s": startup,
        "results": results,
        "vllm": vllm,
        "summary": summary,
    }
    _print_table(results, summary, vllm)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, args.out)
    plot = args.plot or args.out.with_suffix(".png")
    _plot(results, environment, plot, summary, vllm)
    print(f"wrote {args.out} and {plot}")
    return 0


def _time_methods(args, model, bank, input_ids, prefix_ids, workload) -> list[dict]:
    """Every method ``args.repeats`` times (order rotated); one result per method, its fastest run."""
    import torch

    from prefixrt.bench.generation import measure, process_peak_rss, run_method
    from prefixrt.commands.bench import _load

    outputs, runs = {}, {m: [] for m in args.methods}
    tokens = workload.rows * workload.new_tokens
    for round_ in range(args.repeats):
        shift = round_ % len(args.methods)  # rotate the order so a change of load hits every method alike
        for method in args.methods[shift:] + args.methods[:shift]:
            _prepare(model, bank, method, args.backend)
            load = _load()
            out, seconds, peak = measure(
                lambda m=method: run_method(m, model, bank, input_ids, prefix_ids, workload), args.device
            )
            runs[method].append(
                {
                    "seconds": seconds,
                    "peak_memory_bytes": peak,
                    "process_peak_rss_bytes": process_peak_rss(args.device),
                    "load_before": load,
                    "load_after": _load(),
                }
            )
            outputs[method] = out
            print(
                f"  P={workload.prefix_len:<4} {method:<22} {seconds:8.2f} s  {tokens / seconds:8.1f} tok/s  "
                f"(load {load:.1f})",
                flush=True,
            )
    results = []
    prefixed = [m for m in args.methods if m not in NO_PREFIX]
    reference = outputs["hf_attached"] if "hf_attached" in outputs else outputs[(prefixed or args.methods)[0]]
    for method in args.methods:
        best = min(runs[method], key=lambda r: r["seconds"])
        peaks = [r["peak_memory_bytes"] for r in runs[method] if r["peak_memory_bytes"] is not None]
        row = {
            "prefix_len": workload.prefix_len,
            "method": method,
            "tokens": tokens,
            "tokens_per_s": tokens / best["seconds"],
            "seconds": best["seconds"],
            "peak_memory_bytes": max(peaks) if peaks else None,
            "process_peak_rss_bytes": best["process_peak_rss_bytes"],
            "runs": runs[method],
            "new_tokens": outputs[method][:, workload.prompt_len :].tolist(),
        }
        if method not in NO_PREFIX:
            row["same_tokens_as_hf_attached"] = bool(torch.equal(outputs[method], reference))
        results.append(row)
    return results


def _prepare(model, bank, method: str, backend: str) -> None:
    """The attached methods run on the model attached to ``bank``; the others on the plain model."""
    import prefixrt
    from prefixrt.bench.generation import ATTACHED

    attached = prefixrt.is_attached(model)
    if method not in ATTACHED and attached:
        prefixrt.detach(model)
    elif method in ATTACHED and not attached:
        prefixrt.attach(model, bank, backend=backend)


def _warm_up(args, model, bank, input_ids, prefix_ids, workload) -> dict:
    """Untimed first runs: every method with ``--warmup-tokens`` new tokens (Triton compiles its kernels on first
    use), and ``hf_compiled`` with the whole workload (the static cache's size is part of what it compiles for).
    Returns the seconds of each full first run (compile included)."""
    import dataclasses
    import time

    from prefixrt.bench.generation import run_method

    tokens = (
        args.warmup_tokens if args.warmup_tokens is not None else (4 if args.device.startswith("cuda") else 0)
    )
    if tokens > 0:
        short = dataclasses.replace(workload, new_tokens=tokens)
        for method in args.methods:
            _prepare(model, bank, method, args.backend)
            run_method(method, model, bank, input_ids, prefix_ids, short)
    startup = {}
    if "hf_compiled" in args.methods:
        _prepare(model, bank, "hf_compiled", args.backend)
        start = time.perf_counter()
        run_method("hf_compiled", model, bank, input_ids, prefix_ids, workload)
        seconds = startup[f"hf_compiled_P{workload.prefix_len}"] = time.perf_counter() - start
        print(f"  P={workload.prefix_len:<4} hf_compiled first run (compiles): {seconds:.1f} s")
    return startup


def _vllm_arm(args, model, input_ids, results: list[dict]) -> dict | None:
    """Run :mod:`prefixrt.bench.vllm_arm` under ``args.vllm_python`` on the plain model and the same prompts."""
    import prefixrt.bench.vllm_arm as arm
    from prefixrt.commands.bench import _load

    threads = __import__("torch").get_num_threads()
    # vLLM binds its OpenMP threads itself (VLLM_CPU_OMP_THREADS_BIND): an OMP_PROC_BIND / OMP_PLACES meant for
    # prefixrt would fight it (measured on 2 cores: 151 tok/s with OMP_PROC_BIND=close OMP_PLACES=cores inherited, 390 without),
    # so they are not passed on.
    env = {k: v for k, v in os.environ.items() if k not in OMP_BINDING}
    # vLLM's best binding on a small machine: every core computes (its default reserves one for its own loop).
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}")
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    with tempfile.TemporaryDirectory(prefix="prefixrt-vllm-") as folder:
        model.save_pretrained(folder)
        prompts, out = Path(folder) / "prompts.json", Path(folder) / "vllm.json"
        prompts.write_text(json.dumps(input_ids.tolist()), encoding="utf-8")
        command = [args.vllm_python, arm.__file__, "--model", folder, "--prompts", str(prompts)]
        command += [
            "--new-tokens",
            str(args.new_tokens),
            "--rounds",
            str(args.vllm_rounds),
            "--out",
            str(out),
        ]
        print(f"  vLLM arm: {' '.join(command[:2])} ... (start-up compiles, about two minutes)", flush=True)
        load = _load()
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0 or not out.exists():
            tail = (done.stderr or done.stdout)[-2000:]
            print(f"  vLLM arm failed (exit {done.returncode}); its last output:\n{tail}", flush=True)
            return {"error": f"exit {done.returncode}", "output_tail": tail}
        report = json.loads(out.read_text(encoding="utf-8"))
    tokens = len(report["tokens"]) * args.new_tokens
    best = min(report["rounds_s"])
    hf = next((r for r in results if r["method"] == "hf_no_prefix"), None)
    return {
        "tokens": tokens,
        "seconds": best,
        "tokens_per_s": tokens / best,
        "rounds_s": report["rounds_s"],
        "startup_s": report["startup_s"],
        "rss_bytes": report["rss_bytes"],
        "versions": report["versions"],
        "env": report["env"],
        "load_before": load,
        "same_tokens_as_hf_no_prefix": None if hf is None else report["tokens"] == hf["new_tokens"],
    }


def _summarize(results: list[dict], args, floors: dict[int, dict], vllm: dict | None) -> list[dict]:
    summary = []
    for prefix_len in args.prefix_lengths:
        rows = {r["method"]: r for r in results if r["prefix_len"] == prefix_len}
        entry = {"prefix_len": prefix_len}
        for kind, seconds in floors.get(prefix_len, {}).items():
            # No method that runs the model's layers through these GEMMs can beat this: it bounds every speed-up.
            entry[f"{kind}_gemm_floor_s"] = seconds
        if "plain" in floors.get(prefix_len, {}):
            entry["matmul_floor_s"] = floors[prefix_len]["plain"]
        ours = rows.get("prefixrt_generate")
        if ours is not None:
            targets = TARGETS["cuda" if args.device.startswith("cuda") else "cpu"]
            for baseline, target in targets.items():
                if baseline in rows:
                    speedup = ours["tokens_per_s"] / rows[baseline]["tokens_per_s"]
                    entry[f"speedup_vs_{baseline}"] = speedup
                    entry[f"target_vs_{baseline}"] = target
                    entry[f"met_vs_{baseline}"] = speedup >= target
        engine = rows.get("prefixrt_engine")
        if engine is not None and "packed" in floors.get(prefix_len, {}):
            share = floors[prefix_len]["packed"] / engine["seconds"]
            entry["engine_share_of_packed_floor"] = share
            entry["engine_share_target"] = ENGINE_TARGETS["packed_floor"]
            entry["engine_share_met"] = share >= ENGINE_TARGETS["packed_floor"]
        if engine is not None and vllm and "tokens_per_s" in vllm:
            ratio = engine["tokens_per_s"] / vllm["tokens_per_s"]
            entry["engine_vs_vllm"] = ratio
            entry["engine_vs_vllm_target"] = ENGINE_TARGETS["vllm"]
            entry["engine_vs_vllm_met"] = ratio >= ENGINE_TARGETS["vllm"]
        summary.append(entry)
    return summary


def _print_table(results: list[dict], summary: list[dict], vllm: dict | None) -> None:
    print(
        f"\n{'P':>4}  {'method':<22} {'seconds':>8} {'tok/s':>8} {'peak mem MB':>12} {'process MB':>11} "
        f"{'same tokens':>12}"
    )
    for r in results:
        peak = "n/a" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**20:.0f}"
        rss = (
            "n/a" if r.get("process_peak_rss_bytes") is None else f"{r['process_peak_rss_bytes'] / 2**20:.0f}"
        )
        same = r.get("same_tokens_as_hf_attached", "(no prefix)")
        print(
            f"{r['prefix_len']:>4}  {r['method']:<22} {r['seconds']:8.2f} {r['tokens_per_s']:8.1f} {peak:>12} "
            f"{rss:>11} {str(same):>12}"
        )
    if vllm and "tokens_per_s" in vllm:
        print(
            f"   -  {'vllm (no prefix)':<22} {vllm['seconds']:8.2f} {vllm['tokens_per_s']:8.1f} {'':>12} "
            f"{vllm['rss_bytes'] / 2**20:11.0f} {str(vllm['same_tokens_as_hf_no_prefix']):>12}  "
            f"(start-up {vllm['startup_s']:.0f} s, {vllm['env']})"
        )
    for s in summary:
        parts = [
            f"{k.removeprefix('speedup_vs_')}: {v:.2f}x (target {s['target_vs_' + k.removeprefix('speedup_vs_')]}x)"
            for k, v in s.items()
            if k.startswith("speedup_vs_") and "target_vs_" + k.removeprefix("speedup_vs_") in s
        ]
        if parts:
            print(f"P={s['prefix_len']}: prefixrt.generate vs " + ", ".join(parts))
        floors = ", ".join(
            f"{kind} {s[f'{kind}_gemm_floor_s']:.2f} s"
            for kind in ("plain", "packed")
            if f"{kind}_gemm_floor_s" in s
        )
        if floors:
            print(f"  the model's weight GEMMs alone take: {floors}")
        if "engine_share_of_packed_floor" in s:
            print(
                f"  Engine at {100 * s['engine_share_of_packed_floor']:.0f}% of the packed-GEMM floor's speed "
                f"(target {100 * s['engine_share_target']:.0f}%)"
            )
        if "engine_vs_vllm" in s:
            print(
                f"  Engine at {s['engine_vs_vllm']:.2f}x vLLM's tok/s (target {s['engine_vs_vllm_target']}x)"
            )


def _plot(results, environment: dict, path: Path, summary: list[dict], vllm: dict | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["prefix_len"] for r in results})
    methods = list(dict.fromkeys(r["method"] for r in results))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
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
    tokens = {r["prefix_len"]: r["tokens"] for r in results}
    styles = {
        "plain": ("dashed", "weight GEMMs alone (F.linear)"),
        "packed": ("dotted", "weight GEMMs alone (packed)"),
    }
    for j, s in enumerate(summary):
        p = s["prefix_len"]
        for kind, (style, label) in styles.items():
            if (
                f"{kind}_gemm_floor_s" in s and p in tokens
            ):  # no bar of a method using these GEMMs rises above it
                axes[0].hlines(tokens[p] / s[f"{kind}_gemm_floor_s"], j - width / 2, j + 0.8 - width / 2,
                               colors="black", linestyles=style, label=label if j == 0 else None)  # fmt: skip
    if vllm and "tokens_per_s" in vllm:
        axes[0].axhline(vllm["tokens_per_s"], color="red", linewidth=1, label="vLLM, no prefix (best round)")
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(
        f"mixed-prefix generation, {environment['gpu'] or environment['cpu']} ({environment['threads']} threads), "
        f"backend {environment.get('decode_backend')}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
