"""The paper's settings per task kind (table-to-text with GPT-2, summarization with BART), and how a data source
tells its kind.

=========================  =======================  ==========================================================
setting                    table-to-text            summarization (XSUM)
=========================  =======================  ==========================================================
prefix length              10                       200 (the best length in the paper's Figure 4)
source / target tokens     whole                    512 / 60 (the paper truncates articles to 512 BPE tokens;
                                                    the original code trains on targets of <= 60 tokens)
decoding                   beam 5, no length        beam 6, length penalty 0.8 ("length normalization"),
                           penalty, <= 100 new      11..62 decoder tokens (the original code's
                           tokens (original code)   ``min_length=11``, ``max_length=62``: 10..61 new tokens)
=========================  =======================  ==========================================================

Both kinds train with AdamW, a linear schedule, ``mid_dim`` 512 and 5 epochs by default (``prefixrt train``);
the paper's per-dataset values are in ``docs/reproducing.md``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from prefixrt.tasks.hub import HUB_FIELDS
from prefixrt.tasks.loading import guess_format

__all__ = ["KIND_DEFAULTS", "KindDefaults", "kind_of"]


@dataclass(frozen=True)
class KindDefaults:
    """Defaults of one task kind (see the module docstring)."""

    prefix_length: int
    max_source_tokens: int | None
    max_target_tokens: int | None
    num_beams: int
    length_penalty: float
    max_new_tokens: int
    min_new_tokens: int


# One entry per kind of prefixrt.tasks.metrics.TASK_KINDS.
KIND_DEFAULTS: dict[str, KindDefaults] = {
    "table-to-text": KindDefaults(10, None, None, 5, 1.0, 100, 0),
    "summarization": KindDefaults(200, 512, 60, 6, 0.8, 61, 10),
}


def kind_of(source: str | os.PathLike, format: str | None = None) -> str:
    """``"table-to-text"`` or ``"summarization"`` for a data source.

    A local E2E, DART or WebNLG file is table-to-text and a JSONL file summarization (``format`` overrides the
    guess from the suffix); a Hub dataset is table-to-text when :data:`~prefixrt.tasks.hub.HUB_FIELDS` reads its
    source as a table or triples, else summarization.
    """
    path = Path(source)
    if format is None and path.exists():
        format = guess_format(path)
    elif format is None and path.suffix.lower() in (".csv", ".json", ".xml", ".jsonl"):
        format = "jsonl" if path.suffix.lower() == ".jsonl" else "e2e"
    if format is not None:
        return "summarization" if format == "jsonl" else "table-to-text"
    known = HUB_FIELDS.get(str(source))
    return "table-to-text" if known is not None and known[2] in ("e2e", "triples") else "summarization"
