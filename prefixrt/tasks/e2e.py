"""The E2E NLG challenge CSV: columns ``mr,ref``, several rows (references) per MR, CRLF line ends."""

from __future__ import annotations

import csv
import os

from prefixrt.tasks._io import require_file
from prefixrt.tasks.examples import DataFormatError, Example
from prefixrt.tasks.linearize import linearize_e2e_mr

__all__ = ["load_e2e_csv"]

_WHAT = "an E2E CSV file with header 'mr,ref' (or 'mr' alone for a test set without references)"


def load_e2e_csv(path: str | os.PathLike, *, linearize: bool = True) -> list[Example]:
    """Load an E2E CSV file: one :class:`Example` per row, grouped by MR.

    Parameters
    ----------
    path : path-like
        ``trainset.csv``, ``devset.csv``, ``testset_w_refs.csv`` (header ``mr,ref``) or ``testset.csv``
        (header ``MR``; rows then have ``tgt=None`` and no references).
    linearize : bool
        Turn each MR into the paper's ``name : X | eatType : Y`` source (default); False keeps the raw MR.

    Returns
    -------
    list of Example
        In file order; ``group`` is the raw MR, ``refs`` all references of that MR (wherever they occur).

    Raises
    ------
    FileNotFoundError
        If ``path`` is not a file.
    DataFormatError
        If the header is not ``mr,ref`` / ``mr``, a row has the wrong number of fields, or an MR is malformed;
        the message names the file and line.
    """
    p = require_file(path, _WHAT)
    rows: list[tuple[str, str | None]] = []
    try:
        with p.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            cols = [h.strip().lower() for h in header] if header else []
            if cols not in (["mr", "ref"], ["mr"]):
                raise DataFormatError(f"{p}: header {header!r}; expected {_WHAT}")
            for row in reader:
                if not row:
                    continue
                if len(row) != len(cols):
                    raise DataFormatError(
                        f"{p}, line {reader.line_num}: {len(row)} fields {row!r}; expected {len(cols)} ({','.join(cols)})"
                    )
                mr, ref = row[0].strip(), (row[1].strip() if len(cols) == 2 else None)
                if not mr:
                    raise DataFormatError(f"{p}, line {reader.line_num}: empty MR")
                rows.append((mr, ref))
    except (UnicodeDecodeError, csv.Error) as err:
        raise DataFormatError(f"{p}: not readable as UTF-8 CSV ({err}); expected {_WHAT}") from err

    refs: dict[str, list[str]] = {}
    for mr, ref in rows:
        acc = refs.setdefault(mr, [])
        if ref is not None:
            acc.append(ref)
    src: dict[str, str] = {}
    for mr in refs:
        try:
            src[mr] = linearize_e2e_mr(mr) if linearize else mr
        except ValueError as err:
            raise DataFormatError(f"{p}: {err}") from err
    return [Example(src=src[mr], tgt=ref, refs=tuple(refs[mr]), group=mr) for mr, ref in rows]
