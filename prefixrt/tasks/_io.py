"""Shared helpers of the file loaders: open a data file with an error that names it and its format."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["require_file"]


def require_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a :class:`Path` if it is an existing file, else FileNotFoundError naming it and ``what``."""
    p = Path(path)
    if not p.is_file():
        kind = "is a directory" if p.is_dir() else "not found"
        raise FileNotFoundError(f"{p}: {kind}; expected {what}")
    return p
