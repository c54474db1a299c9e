"""Token selection: greedy argmax, or one draw per row from its own generator.

Every row samples with its own ``torch.Generator``, so a row's tokens depend only on its seed and its own
distribution, never on which other rows share the batch (the engine relies on this to give a request the same
tokens whatever joins or leaves around it). ``prefixrt.generate(seed=s)`` seeds output row ``r`` with ``s + r``;
without a seed or generator, ``s`` is drawn from torch's global generator (so ``torch.manual_seed`` before the
call makes it reproducible, as with HF).

For the Engine: :class:`SettingsCache` builds each request's generation config and HF logits processors (the
glue to :mod:`prefixrt.hf.generation`), and :func:`select_for_requests` picks every running request's token.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from prefixrt.hf.generation import config as cfg
from prefixrt.hf.generation.processors import build_processors

__all__ = ["Settings", "SettingsCache", "base_seed", "row_generators", "select", "select_for_requests"]


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


# -- engine requests ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    """What decoding one request needs besides its tokens: the final GenerationConfig, HF's logits processors
    (:func:`~prefixrt.hf.generation.processors.build_processors`) and whether it samples."""

    config: object
    processors: object
    sample: bool


class SettingsCache:
    """:class:`Settings` per (params, decoder input length), built as ``prefixrt.generate`` builds them for one
    request alone, shared by the requests that have both equal (the processors keep no per-row state without a
    padding mask). Holds the ``size`` most recently used."""

    def __init__(self, model, device, size: int = 64):
        self.model, self.device, self.size = model, device, size
        self._cache: OrderedDict[tuple, Settings] = OrderedDict()

    def __len__(self) -> int:
        return len(self._cache)

    def get(self, params, input_length: int, prompt: torch.Tensor) -> Settings:
        """``params`` a SamplingParams; ``input_length`` the decoder's; ``prompt [n]`` the request's input."""
        key = (repr(params.generate_kwargs()), input_length)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        settings = self._build(params, input_length, prompt)
        self._cache[key] = settings
        while len(self._cache) > self.size:
            self._cache.popitem(last=False)
        return settings

    def _build(self, params, input_length: int, prompt: torch.Tensor) -> Settings:
        model = self.model
        resolved = cfg.resolve(model, None, params.generate_kwargs())
        if resolved.mode not in ("greedy", "sample"):
            raise cfg.UnsupportedGenerationArgument(
                f"the Engine runs greedy search and sampling, not {resolved.mode}"
            )
        config = resolved.config
        cfg.special_tokens(model, config, False, self.device, 1)
        cfg.prepare_lengths(model, resolved, input_length)
        processors = build_processors(model, config, input_length, prompt[None], None, self.device)
        return Settings(config, processors, resolved.mode == "sample")


def select_for_requests(logits: torch.Tensor, requests: list) -> list[int]:
    """The next token of each request (``logits [n, V]``, row ``i`` is ``requests[i]``): one batched argmax for
    the plain greedy ones, the request's processors and generator for the others."""
    scores = logits.float()
    plain = [i for i, r in enumerate(requests) if not r.processors and r.generator is None]
    out = [0] * len(requests)
    if plain:
        idx = torch.tensor(plain, device=scores.device)
        for i, t in zip(plain, torch.argmax(scores[idx], dim=-1).tolist(), strict=True):
            out[i] = t
    for i, r in enumerate(requests):
        if i in plain:
            continue
        s = scores[i : i + 1]
        if r.processors:
            s = r.processors(_sequence(r), s)
        out[i] = int(select(s, r.generator is not None, [r.generator] if r.generator else None)[0])
    return out


def _sequence(request) -> torch.Tensor:
    """What HF's processors see for this request: ``[1, L]`` (decoder prompt, then the generated tokens)."""
    head = request.decoder_prompt
    return torch.cat([head, torch.tensor(request.tokens, dtype=torch.long, device=head.device)])[None]
