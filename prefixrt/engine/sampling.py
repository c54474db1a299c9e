"""Token selection: greedy argmax, or one draw per row from its own generator.

Every row samples with its own ``torch.Generator``, so a row's tokens depend only on its seed and its own
distribution, never on which other rows share the batch (the engine relies on this to give a request the same
tokens whatever joins or leaves around it). ``prefixrt.generate(seed=s)`` seeds output row ``r`` with ``s + r``;
without a seed or generator, ``s`` is drawn from torch's global generator (so ``torch.manual_seed`` before the
call makes it reproducible, as with HF).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["base_seed", "row_generators", "select"]


def base_seed(seed: int | None, generator: torch.Generator | None) -> int:
    """The seed of output row 0: ``seed``, else a draw from ``generator``, else from the global generator."""
    if seed is not None:
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        return seed
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    return int(torch.randint(0, 2**62, (1,), generator=generator))


def row_generators(seeds: list[int], device) -> list[torch.Generator]:
    gens = []
    for seed in seeds:
        g = torch.Generator(device=device)
        g.manual_seed(seed)
        gens.append(g)
    return gens


def select(scores: torch.Tensor, do_sample: bool, generators: list[torch.Generator] | None) -> torch.Tensor:
    """Next token per row from processed ``scores [n, V]``: argmax, or a softmax draw with ``generators[i]``."""
    if not do_sample:
        return torch.argmax(scores, dim=-1)
    probs = nn.functional.softmax(scores, dim=-1)
    out = torch.empty(scores.shape[0], dtype=torch.long, device=scores.device)
    for i, g in enumerate(generators):
        out[i] = torch.multinomial(probs[i], num_samples=1, generator=g)[0]
    return out
