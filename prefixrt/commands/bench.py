"""``prefixrt bench``: the benchmarks, each measuring a user's path against its baselines in the same run.

``generate`` (:mod:`prefixrt.commands.bench_generate`), ``train`` (:mod:`prefixrt.commands.bench_train`),
``serve`` (:mod:`prefixrt.commands.bench_serve`); the helpers here describe the machine a report was made on.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
from pathlib import Path

NAME = "bench"
HELP = (
    "Benchmarks (`prefixrt bench generate`: mixed-prefix generation vs PEFT-style, attached HF generate() and "
    "vLLM; `prefixrt bench train`: a training step vs HF PEFT and the frozen base; "
    "`prefixrt bench serve`: the HTTP server under load)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from prefixrt.commands import bench_generate, bench_serve, bench_train

    sub = parser.add_subparsers(dest="bench", required=True)
    bench_train.add_parser(sub)
    bench_generate.add_parser(sub)
    bench_serve.add_serve_parser(sub)


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


def environment(threads: int | None = None) -> dict:
    """What every benchmark report says about where it ran: CPU, threads, versions, commit, date, platform."""
    import datetime

    import torch

    return {
        "cpu": cpu_name(),
        "threads": threads or torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "python": sys.version.split()[0],
        "prefixrt_commit": _commit(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
    }


def run(args: argparse.Namespace) -> int:
    if args.bench == "train":
        from prefixrt.commands import bench_train

        return bench_train.run(args)
    if args.bench == "serve":
        from prefixrt.commands.bench_serve import run_serve

        return run_serve(args)
    from prefixrt.commands import bench_generate

    return bench_generate.run(args)


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="prefixrt bench")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
