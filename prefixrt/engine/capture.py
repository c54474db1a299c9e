"""CUDA graphs for the decode step (CUDA only; never used on CPU).

While the batch's composition (rows, items, prefixes, bank views) does not change, one decode step has static
shapes if attention reads every store at full capacity (the masks, updated in place before each replay, hide
the unused slots). :class:`GraphedDecode` then captures ``batch.run_decode`` (the runner's decode step) once and
replays it each step, with tokens, positions and slot indices copied into static buffers. It re-captures when the composition changes
(after it has been stable for ``min_stable`` steps) and falls back to eager decoding for good if capture fails
-- e.g. when the attention backend synchronizes with the host (the reference backend does), which is not
allowed while capturing.

Tested on a GPU by ``tests/engine/test_cuda_generation.py`` (captured steps give the eager tokens and HF generate()'s;
passed on an H200, see benchmarks/results/gpu_h200.md); on CPU only the fallback runs.
"""

from __future__ import annotations

import warnings

import torch

__all__ = ["GraphedDecode", "maybe_graphed_decode"]


def maybe_graphed_decode(batch, enabled: bool | None = None):
    """``batch.decode``, or a :class:`GraphedDecode` of it on CUDA (``enabled`` None = on CUDA)."""
    on_cuda = batch.runner.device.type == "cuda"
    if enabled is None:
        enabled = on_cuda
    if not (enabled and on_cuda):
        return batch.decode
    return GraphedDecode(batch)


class GraphedDecode:
    """Callable like ``batch.decode(tokens)``; replays a CUDA graph when the batch allows."""

    def __init__(self, batch, min_stable: int = 2):
        self.batch = batch
        self.min_stable = min_stable
        self.failed = False
        self.graph = None
        self.key = None
        self.stable = 0
        # The decode plan the graph was captured with: held here, so the tensors the graph reads stay alive
        # whatever else frees plans, and compared by identity (an id() could be reused by a later plan).
        self.plan = None

    def _composition(self):
        b = self.batch
        gen = b.stores["gen"]
        return (tuple(b.row_item), tuple(b.item_prefix), tuple(b.item_view), gen.uniform())

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        key, plan = self._composition(), self.batch.plan()
        if key != self.key or plan is not self.plan:
            self.key, self.plan, self.stable, self.graph = key, plan, 0, None
        self.stable += 1
        if self.failed or self.stable < self.min_stable:
            return self.batch.decode(tokens)
        b = self.batch
        gen = b.stores["gen"]
        slots = torch.tensor(gen.lengths, dtype=torch.long)  # where this step's token goes, per row
        positions = torch.tensor(b.row_pos, dtype=torch.long)
        if gen.max_length() + 1 > gen.capacity:
            return b.decode(tokens)
        gen.grow()  # eager: lengths and the validity mask (read by the graph)
        b.row_pos = [p + 1 for p in b.row_pos]
        if self.graph is None and not self._capture(tokens, positions, slots):
            return self.logits.clone()  # capture failed after an eager run of this step
        self.tokens.copy_(tokens)
        self.positions.copy_(positions, non_blocking=True)
        self.slots.copy_(slots, non_blocking=True)
        self.graph.replay()
        return self.logits.clone()

    def _capture(self, tokens, positions, slots) -> bool:
        b = self.batch
        device = tokens.device
        self.tokens = tokens.clone()
        self.positions = positions.to(device)
        self.slots = slots.to(device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (allocator, lazy inits); writes the same K/V the graph will
            self.logits = b.run_decode(self.tokens, self.positions, self.slots, full=True)
        torch.cuda.current_stream().wait_stream(side)
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.logits = b.run_decode(self.tokens, self.positions, self.slots, full=True)
        except Exception as err:  # e.g. a backend that syncs with the host
            warnings.warn(
                f"prefixrt: CUDA graph capture of the decode step failed ({err}); decoding eagerly",
                stacklevel=3,
            )
            self.failed = True
            self.logits = b.run_decode(self.tokens, self.positions, self.slots, full=True)
            return False
        self.graph = graph
        return True
