"""Generic JSON-lines ``{"src": ..., "tgt": ...}`` data (summarization, or any already-linearized task)."""

from __future__ import annotations

import json
import os

from prefixrt.tasks._io import require_file
from prefixrt.tasks.examples import DataFormatError, Example, grouped_examples

__all__ = ["load_jsonl"]


def load_jsonl(path: str | os.PathLike, *, src_key: str = "src", tgt_key: str = "tgt") -> list[Example]:
    """Load a JSON-lines file with one ``{"src": str, "tgt": str}`` object per line.

    ``tgt`` may also be a list of references (one row per reference) or absent/null (a source without
    references). Rows are grouped by an ``"id"`` field when present, else by the source text, so several lines
    with the same source form one multi-reference source. Blank lines are skipped.

    Raises
    ------
    FileNotFoundError
        If ``path`` is not a file.
    DataFormatError
        If a line is not a JSON object with a string ``src_key`` (and a string, list of strings or null
        ``tgt_key``); the message names the file and line.
    """
    what = f'a JSON-lines file of {{"{src_key}": str, "{tgt_key}": str}} objects'
    p = require_file(path, what)
    rows: list[tuple[str, str, list[str]]] = []
    with p.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataFormatError(f"{p}, line {lineno}: not valid JSON ({err}); expected {what}") from err
            src = obj.get(src_key) if isinstance(obj, dict) else None
            tgt = obj.get(tgt_key) if isinstance(obj, dict) else None
            tgts = [tgt] if isinstance(tgt, str) else tgt if tgt is not None else []
            if (
                not isinstance(src, str)
                or not isinstance(tgts, list)
                or not all(isinstance(t, str) for t in tgts)
            ):
                raise DataFormatError(f"{p}, line {lineno}: {line.strip()[:120]!r}; expected {what}")
            rows.append((str(obj.get("id", src)), src, tgts))
    return grouped_examples(rows, str(p))
