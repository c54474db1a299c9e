"""The loss log of a run (CSV, rewritten atomically) and its loss-curve plot (PNG)."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from prefixrt.fileio import atomic_write, atomic_write_text

__all__ = ["LossLog", "plot_losses"]


class LossLog:
    """The CSV loss log: one row per ``log_every`` steps, rewritten atomically (small file).

    Training rows carry ``loss`` and ``loss/<task>`` (each averages the target tokens of the steps since the
    last row); dev evaluations add ``dev_loss``, ``dev_loss/<task>`` and whatever an eval hook returns, to the
    row of their step (a row of its own when no training row has that step, e.g. step 0).
    """

    def __init__(self, path: Path | None, tasks: list[str]):
        self.path, self.tasks = path, tasks
        self.columns = ["step", "epoch", "lr", "loss", *[f"loss/{t}" for t in tasks]]
        self.rows: list[dict[str, float]] = []
        self._reset_window()

    def _reset_window(self) -> None:
        self.loss_sum, self.tokens = 0.0, 0
        self.task_sum = dict.fromkeys(self.tasks, 0.0)
        self.task_tokens = dict.fromkeys(self.tasks, 0)

    def window(self) -> dict[str, Any]:
        """The steps not yet logged (saved in checkpoints, so a resumed run logs exactly the same rows)."""
        return {
            "loss_sum": self.loss_sum,
            "tokens": self.tokens,
            "task_sum": self.task_sum,
            "task_tokens": self.task_tokens,
        }

    def resume(self, step: int, window: Mapping[str, Any] | None) -> None:
        """Keep the rows of an earlier run up to ``step`` (a run may have logged past its last checkpoint)."""
        if window:
            self.loss_sum, self.tokens = window["loss_sum"], window["tokens"]
            self.task_sum.update(window["task_sum"])
            self.task_tokens.update(window["task_tokens"])
        if self.path is None or not self.path.is_file():
            return
        with self.path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            self.columns.extend(c for c in reader.fieldnames or () if c not in self.columns)
            for row in reader:
                if int(row["step"]) <= step:  # empty cells: values the row never had (as in memory)
                    self.rows.append({k: float(v) for k, v in row.items() if v != ""})

    def add_totals(self, task_sum: Mapping[str, float], task_tokens: Mapping[str, int]) -> None:
        """Add one step's summed cross-entropy and target tokens per task."""
        for task in self.tasks:
            self.loss_sum += task_sum[task]
            self.tokens += task_tokens[task]
            self.task_sum[task] += task_sum[task]
            self.task_tokens[task] += task_tokens[task]

    def add(self, tasks: list[str], row_loss: torch.Tensor, row_tokens: torch.Tensor) -> None:
        """Add one step's per-row summed cross-entropy and target tokens."""
        task_sum, task_tokens = dict.fromkeys(self.tasks, 0.0), dict.fromkeys(self.tasks, 0)
        for task, loss, tokens in zip(tasks, row_loss.tolist(), row_tokens.tolist(), strict=True):
            task_sum[task] += loss
            task_tokens[task] += tokens
        self.add_totals(task_sum, task_tokens)

    def flush(self, step: int, epoch: float, lr: float) -> dict[str, float] | None:
        if self.tokens == 0:
            return None
        row = {"step": step, "epoch": epoch, "lr": lr, "loss": self.loss_sum / self.tokens}
        for t in self.tasks:
            row[f"loss/{t}"] = self.task_sum[t] / self.task_tokens[t] if self.task_tokens[t] else math.nan
        self.rows.append(row)
        self._reset_window()
        self.write()
        return row

    def record(self, step: int, epoch: float, values: Mapping[str, float]) -> dict[str, float]:
        """Add ``values`` (dev metrics) to the row of ``step``, or to a new row."""
        if self.rows and self.rows[-1]["step"] == step:
            row = self.rows[-1]
        else:
            row = {"step": step, "epoch": epoch}
            self.rows.append(row)
        for key, value in values.items():
            if key not in self.columns:
                self.columns.append(key)
            row[key] = float(value)
        self.write()
        return row

    def write(self) -> None:
        if self.path is None:
            return
        lines = [",".join(self.columns)]
        for row in self.rows:
            values = (row.get(c, math.nan) for c in self.columns)
            lines.append(",".join("" if math.isnan(v) else repr(v) for v in values))
        atomic_write_text(self.path, "\n".join(lines) + "\n")


def plot_losses(
    rows: Sequence[Mapping[str, float]],
    tasks: Sequence[str],
    path: str | os.PathLike,
    title: str = "prefix-tuning loss",
) -> bool:
    """Write the loss curve (all tasks, each task, and the dev loss when logged) as a PNG; False when matplotlib
    is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False

    def series(key: str) -> tuple[list[float], list[float]]:
        points = [(r["step"], r[key]) for r in rows if not math.isnan(r.get(key, math.nan))]
        return [s for s, _ in points], [v for _, v in points]

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*series("loss"), label="train (all tasks)", linewidth=2)
    if len(tasks) > 1:
        for t in tasks:
            ax.plot(*series(f"loss/{t}"), label=f"train {t}", linewidth=1)
    steps, dev = series("dev_loss")
    if dev:
        ax.plot(steps, dev, "o--", label="dev (all tasks)", linewidth=2)
        if len(tasks) > 1:
            for t in tasks:
                ax.plot(*series(f"dev_loss/{t}"), "x:", label=f"dev {t}", linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (target tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return True
