"""Score tables (Markdown) and JSON files, seed averages, and the official E2E scorer's input files.

Every file is written atomically (a temp file in the same directory, then ``os.replace``), so a reader never
sees half a report.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from prefixrt.fileio import atomic_write_json, atomic_write_text
from prefixrt.tasks._corpus import check_corpus
from prefixrt.tasks.metrics import NOT_COMPUTED

__all__ = ["format_markdown_table", "mean_std", "write_e2e_scorer_files", "write_scores"]


def _fmt(v: Any, digits: int) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.{digits}f}"
    return "n/a" if v is None else str(v)


def format_markdown_table(
    results: Mapping[str, Mapping[str, Any]], *, digits: int = 2, row_header: str = "task", note: bool = True
) -> str:
    """A Markdown table with one row per entry of ``results`` and one column per metric (union, in order seen).

    Parameters
    ----------
    results : mapping of str to mapping of str to value
        Row name (task, run, ``"e2e (mean)"``...) -> metric name -> number (or None / NaN, shown as n/a).
    digits : int
        Decimals of float values.
    note : bool
        Append a line naming the metrics that are not computed offline (:data:`NOT_COMPUTED`).
    """
    cols: list[str] = []
    for row in results.values():
        cols.extend(c for c in row if c not in cols)
    lines = [
        "| " + " | ".join([row_header, *cols]) + " |",
        "| " + " | ".join(["---"] + ["---:"] * len(cols)) + " |",
    ]
    for name, row in results.items():
        lines.append("| " + " | ".join([str(name), *(_fmt(row.get(c), digits) for c in cols)]) + " |")
    text = "\n".join(lines) + "\n"
    if note:
        text += "\nNot computed offline: " + "; ".join(f"{k} ({v})" for k, v in NOT_COMPUTED.items()) + ".\n"
    return text


def write_scores(
    out_dir: str | os.PathLike, name: str, scores: Mapping[str, Any], *, meta: Mapping[str, Any] | None = None
) -> tuple[Path, Path]:
    """Write ``{name}.json`` (scores, metadata, what is not computed) and ``{name}.md`` (the table) in ``out_dir``.

    Returns the two paths.
    """
    out = Path(out_dir)
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    atomic_write_json(
        json_path,
        {"name": name, "scores": dict(scores), "meta": dict(meta or {}), "not_computed": NOT_COMPUTED},
    )
    atomic_write_text(md_path, f"# {name}\n\n" + format_markdown_table({name: scores}))
    return json_path, md_path


def mean_std(runs: Sequence[Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Per-metric mean, sample standard deviation and count over several runs (the low-data seeds).

    Returns ``{metric: {"mean": .., "std": .., "n": ..}}``; ``std`` is 0 for a single run. A metric missing
    from some runs is averaged over the runs that have it.
    """
    if not runs:
        raise ValueError("mean_std needs at least one run")
    keys: list[str] = []
    for r in runs:
        keys.extend(k for k in r if k not in keys)
    out = {}
    for k in keys:
        xs = [float(r[k]) for r in runs if k in r]
        m = sum(xs) / len(xs)
        sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
        out[k] = {"mean": m, "std": sd, "n": float(len(xs))}
    return out


def write_e2e_scorer_files(
    out_dir: str | os.PathLike, hyps: Sequence[str], refs: Sequence[Sequence[str]], *, name: str = "outputs"
) -> tuple[Path, Path]:
    """Write ``{name}.txt`` (one output per line) and ``{name}-refs.txt`` (each source's references, blank-line
    separated): the inputs of the official scorer, ``measure_scores.py {name}-refs.txt {name}.txt``."""
    refs = check_corpus(hyps, refs)
    for i, text in enumerate([*hyps, *(r for rs in refs for r in rs)]):
        if "\n" in text:
            raise ValueError(f"text {i} contains a newline; the scorer's format is one sentence per line")
    out = Path(out_dir)
    hyp_path, ref_path = out / f"{name}.txt", out / f"{name}-refs.txt"
    atomic_write_text(hyp_path, "".join(h + "\n" for h in hyps))
    atomic_write_text(ref_path, "\n".join("".join(r + "\n" for r in rs) for rs in refs))
    return hyp_path, ref_path
