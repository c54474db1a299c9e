"""``prefixrt bench train``: one prefix-tuning training step, three ways, in one run (see
:mod:`prefixrt.bench.training`): prefixrt's mixed-task batches, HF PEFT one task per step, and the frozen base
model without any prefix (the floor). Prints a table, writes JSON (device, versions, commit, date, load, figures,
targets) and a PNG plot.
"""

from __future__ import annotations

import argparse
from pathlib import Path

# The targets on a 2-core CPU: prefixrt at least PEFT's tokens/s, and within 10% of the frozen base.
TARGETS = {"speedup_vs_peft": 1.0, "fraction_of_frozen_base": 0.9}


def add_parser(sub) -> None:
    from prefixrt.bench.training import ARMS

    t = sub.add_parser(
        "train",
        help="a prefix-tuning training step: prefixrt vs HF PEFT vs the frozen base",
        description=__doc__,
    )
    t.add_argument("--models", nargs="+", default=["gpt2", "bart"], choices=["gpt2", "bart"],
                   help="gpt2: GPT-2-small shapes; bart: BART-base shapes, prefixes at all three sites")  # fmt: skip
    t.add_argument("--tasks", type=int, default=8)
    t.add_argument("--rows-per-task", type=int, default=4)
    t.add_argument("--seq-len", type=int, default=64, help="tokens per row (BART: source and target each)")
    t.add_argument("--prefix-lengths", type=int, nargs="+", default=None,
                   help="one per model (default: 10 for gpt2, 200 for bart, the paper's settings)")  # fmt: skip
    t.add_argument("--steps", type=int, default=3, help="timed steps per arm")
    t.add_argument("--warmup", type=int, default=1, help="untimed steps per arm before timing")
    t.add_argument(
        "--repeats", type=int, default=1, help="rounds over all arms, order rotated (fastest kept)"
    )
    t.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    t.add_argument(
        "--backend", default="auto", help="prefixrt attention backend (auto, reference, cpp, triton)"
    )
    t.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    t.add_argument("--small", action="store_true", help="2-layer, 64-wide models (a quick check)")
    t.add_argument("--out", type=Path, default=Path("benchmarks/results/train_cpu.json"))
    t.add_argument("--plot", type=Path, default=None, help="PNG path (default: next to --out)")


def run(args: argparse.Namespace) -> int:
    import torch

    from prefixrt.bench.training import PEFT_SITES, SWAPPED_MODULES, TrainWorkload, run_arm
    from prefixrt.commands.bench import _load
    from prefixrt.commands.bench import environment as bench_environment

    if args.threads:
        torch.set_num_threads(args.threads)
    lengths = args.prefix_lengths or [{"gpt2": 10, "bart": 200}[m] for m in args.models]
    if len(lengths) != len(args.models):
        raise SystemExit("prefixrt bench train: give one --prefix-lengths value per --models entry")
    environment = {**bench_environment(), "peft": __import__("peft").__version__}
    results, summary = [], []
    for model_kind, prefix_len in zip(args.models, lengths, strict=True):
        workload = TrainWorkload(
            model=model_kind,
            tasks=args.tasks,
            rows_per_task=args.rows_per_task,
            seq_len=args.seq_len,
            prefix_len=prefix_len,
            steps=args.steps,
            warmup=args.warmup,
            small=args.small,
        )
        only = {"prefixrt_peft_sites": PEFT_SITES, "prefixrt_torch_modules": SWAPPED_MODULES}
        arms = [a for a in args.arms if model_kind in only.get(a, (model_kind,))]
        runs: dict[str, list[dict]] = {a: [] for a in arms}
        for round_ in range(args.repeats):
            shift = round_ % len(arms)
            for arm in arms[shift:] + arms[:shift]:
                load = _load()
                result = run_arm(arm, workload, backend=args.backend)
                result.update(load_before=load, load_after=_load())
                runs[arm].append(result)
                print(
                    f"  {model_kind:<5} P={prefix_len:<4} {arm:<22} {result['step_s']:8.2f} s/step  "
                    f"{result['tokens_per_s']:8.1f} tok/s  (load {load:.1f})",
                    flush=True,
                )
        best = {arm: min(r, key=lambda x: x["step_s"]) for arm, r in runs.items()}
        for arm in arms:
            results.append({"model": model_kind, "prefix_len": prefix_len, "arm": arm, **best[arm],
                            "runs": runs[arm]})  # fmt: skip
        entry = {"model": model_kind, "prefix_len": prefix_len}
        if "prefixrt" in best:
            ours = best["prefixrt"]["tokens_per_s"]
            entry["prefixrt_backend"] = best["prefixrt"].get("backend")
            if "peft" in best:
                entry["speedup_vs_peft"] = ours / best["peft"]["tokens_per_s"]
                entry["met_speedup_vs_peft"] = entry["speedup_vs_peft"] >= TARGETS["speedup_vs_peft"]
            if "peft" in best and "prefixrt_peft_sites" in best:  # the same sites, the same work
                entry["speedup_vs_peft_on_its_sites"] = (
                    best["prefixrt_peft_sites"]["tokens_per_s"] / best["peft"]["tokens_per_s"]
                )
            if "frozen_base" in best and "prefixrt_torch_modules" in best:  # the prefixes' own cost
                entry["torch_modules_fraction_of_frozen_base"] = (
                    best["prefixrt_torch_modules"]["tokens_per_s"] / best["frozen_base"]["tokens_per_s"]
                )
            if "frozen_base" in best:
                entry["fraction_of_frozen_base"] = ours / best["frozen_base"]["tokens_per_s"]
                entry["met_fraction_of_frozen_base"] = (
                    entry["fraction_of_frozen_base"] >= TARGETS["fraction_of_frozen_base"]
                )
        summary.append(entry)
    report = {
        "workload": {
            **TrainWorkload().to_dict(),
            "models": args.models,
            "prefix_lengths": lengths,
            "tasks": args.tasks,
            "rows_per_task": args.rows_per_task,
            "seq_len": args.seq_len,
            "steps": args.steps,
            "warmup": args.warmup,
            "small": args.small,
        },  # fmt: skip
        "environment": environment,
        "targets": TARGETS,
        "results": results,
        "summary": summary,
    }
    _print_table(results, summary)
    from prefixrt.fileio import atomic_write_json

    atomic_write_json(args.out, report)
    plot = args.plot or args.out.with_suffix(".png")
    _plot(results, environment, plot)
    print(f"wrote {args.out} and {plot}")
    return 0


def _print_table(results: list[dict], summary: list[dict]) -> None:
    print(f"\n{'model':<6} {'P':>4}  {'arm':<22} {'s/step':>8} {'tok/s':>8} {'loss':>8}")
    for r in results:
        print(
            f"{r['model']:<6} {r['prefix_len']:>4}  {r['arm']:<22} {r['step_s']:8.2f} {r['tokens_per_s']:8.1f} "
            f"{r['last_loss']:8.3f}"
        )
    for s in summary:
        parts = []
        if "speedup_vs_peft" in s:
            parts.append(f"{s['speedup_vs_peft']:.2f}x PEFT (target >= {TARGETS['speedup_vs_peft']}x)")
        if "speedup_vs_peft_on_its_sites" in s:
            parts.append(
                f"{s['speedup_vs_peft_on_its_sites']:.2f}x PEFT on PEFT's sites (decoder and cross only)"
            )
        if "fraction_of_frozen_base" in s:
            parts.append(
                f"{s['fraction_of_frozen_base']:.0%} of the frozen base (target >= "
                f"{TARGETS['fraction_of_frozen_base']:.0%})"
            )
        if "torch_modules_fraction_of_frozen_base" in s:
            parts.append(
                f"with torch's own dropout and GELU {s['torch_modules_fraction_of_frozen_base']:.0%} of it"
            )
        print(
            f"{s['model']} P={s['prefix_len']}: prefixrt ({s.get('prefixrt_backend')}) at " + ", ".join(parts)
        )


def _plot(results: list[dict], environment: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r["model"], r["prefix_len"]) for r in results))
    arms = list(dict.fromkeys(r["arm"] for r in results))
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(arms)
    for i, arm in enumerate(arms):
        by = {(r["model"], r["prefix_len"]): r["tokens_per_s"] for r in results if r["arm"] == arm}
        ax.bar([j + i * width for j in range(len(groups))], [by.get(g, 0) for g in groups], width, label=arm)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], [f"{m} P={p}" for m, p in groups])
    ax.set_title("training tokens / s (higher is better)")
    ax.legend(fontsize=8)
    fig.suptitle(f"prefix-tuning step, {environment['cpu']} ({environment['threads']} threads)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
