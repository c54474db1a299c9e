"""Dev-set evaluation during training: the mean target cross-entropy per task, over all processes."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from prefixrt.tasks import MixedTaskDataset
from prefixrt.train.loss import lm_loss

__all__ = ["DevSet"]


class DevSet:
    """Dev rows in fixed batches, sharded over processes; :meth:`loss` gives the mean target cross-entropy."""

    def __init__(self, data, collate, task_names, batch_size, layout, dist):
        self.dataset = MixedTaskDataset(data)
        self.collate, self.tasks, self.dist = collate, task_names, dist
        # Sorted by length: less padding. Batch k goes to process k % world_size.
        order = sorted(range(len(self.dataset)), key=lambda i: len(self.dataset[i].input_ids))
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        self.batches = batches[dist.rank :: dist.world_size]

    def loss(self, model: nn.Module, target: Any) -> dict[str, float]:
        device = target.device
        index = {t: i for i, t in enumerate(self.tasks)}
        stats = torch.zeros(2, len(self.tasks), dtype=torch.float64, device=device)
        for indices in self.batches:
            batch = self.collate([self.dataset[i] for i in indices])
            tensors = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")}
            prefix_ids = target.prefix_ids(batch["task_ids"].to(device))
            _, row_loss, row_tokens = lm_loss(model, tensors, prefix_ids, reduction="sum")
            rows = torch.tensor([index[t] for t in batch["tasks"]], device=device)
            stats[0].index_add_(0, rows, row_loss.to(stats.dtype))
            stats[1].index_add_(0, rows, row_tokens.to(stats.dtype))
        self.dist.all_reduce_(stats)
        sums, toks = stats.tolist()
        out = {"dev_loss": sum(sums) / max(sum(toks), 1)}
        for t, i in index.items():
            if toks[i]:
                out[f"dev_loss/{t}"] = sums[i] / toks[i]
        return out
