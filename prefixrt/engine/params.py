"""Per-request generation settings for :class:`prefixrt.Engine`."""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["SamplingParams"]


@dataclass(frozen=True)
class SamplingParams:
    """How one engine request is decoded. ``None`` means "as HF ``generate()`` would default it" (e.g. top-k 50
    when sampling, the model's ``eos_token_id``).

    ``generate_kwargs()`` are the matching :func:`prefixrt.generate` keyword arguments: a request gives the same
    tokens as ``prefixrt.generate(model, prompt[None], prefix_ids=..., seed=params.seed, **params.generate_kwargs())``.
    """

    max_new_tokens: int = 16
    min_new_tokens: int | None = None
    do_sample: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    bad_words_ids: list | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None
    seed: int | None = None

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}")

    def generate_kwargs(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None and k != "seed"}
