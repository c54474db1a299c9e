"""One entry point for the command line: a local path (format from its suffix) or a Hugging Face dataset name."""

from __future__ import annotations

import os
from pathlib import Path

from prefixrt.tasks.e2e import load_e2e_csv
from prefixrt.tasks.examples import Example
from prefixrt.tasks.hub import load_hub_dataset
from prefixrt.tasks.jsonl import load_jsonl
from prefixrt.tasks.triples import load_dart, load_webnlg

__all__ = ["FORMATS", "guess_format", "load_examples"]

FORMATS = ("e2e", "dart", "webnlg", "jsonl")
_SUFFIXES = (".csv", ".json", ".jsonl", ".xml")


def guess_format(path: str | os.PathLike) -> str:
    """The data format of a local path.

    ``.csv`` -> ``e2e``; ``.jsonl`` -> ``jsonl``; ``.json`` -> ``dart`` when its first entry has a
    ``tripleset``, else ``webnlg``; ``.xml`` -> ``dart`` when the file name contains "dart", else ``webnlg``;
    a directory -> ``webnlg``. Pass ``format=`` to :func:`load_examples` to override.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if p.is_dir():
        return "webnlg"
    if suffix == ".csv":
        return "e2e"
    if suffix == ".jsonl":
        return "jsonl"
    if suffix == ".xml":
        return "dart" if "dart" in p.name.lower() else "webnlg"
    if suffix == ".json":
        with p.open(encoding="utf-8") as fh:
            head = fh.read(4096)
        return "dart" if '"tripleset"' in head else "webnlg"
    raise ValueError(
        f"{p}: cannot tell the data format from the suffix {suffix!r}; expected one of {_SUFFIXES} "
        f"or pass format= one of {FORMATS}"
    )


def load_examples(
    source: str | os.PathLike, *, format: str | None = None, split: str = "train", **hub_kwargs
) -> list[Example]:
    """Load a data set from a local path, or by name from the Hugging Face Hub.

    Parameters
    ----------
    source : str or path-like
        A local file or directory (E2E ``.csv``, DART ``.json``/``.xml``, WebNLG ``.xml``/directory/``.json``,
        ``.jsonl``), or a Hub dataset name (anything that is not an existing path and has no data-file suffix).
    format : {"e2e", "dart", "webnlg", "jsonl"}, optional
        The local file's format; guessed by :func:`guess_format` when omitted.
    split : str
        The split, for Hub datasets only.
    **hub_kwargs
        ``config``, ``src_field``, ``tgt_field``, ``kind`` for :func:`prefixrt.tasks.hub.load_hub_dataset`.

    Returns
    -------
    list of Example
        One row per (source, reference); see :class:`prefixrt.tasks.examples.Example`.
    """
    p = Path(source)
    if not p.exists():
        if p.suffix.lower() in _SUFFIXES or str(source).startswith((".", "/", "~")):
            raise FileNotFoundError(
                f"{p}: not found; expected a data file ({', '.join(_SUFFIXES)}) or a directory"
            )
        return load_hub_dataset(str(source), split, **hub_kwargs)
    if hub_kwargs:
        raise TypeError(f"{sorted(hub_kwargs)} apply to Hub datasets only, not to the local path {p}")
    fmt = format or guess_format(p)
    if fmt == "e2e":
        return load_e2e_csv(p)
    if fmt == "dart":
        return load_dart(p)
    if fmt == "webnlg":
        return load_webnlg(p)
    if fmt == "jsonl":
        return load_jsonl(p)
    raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
