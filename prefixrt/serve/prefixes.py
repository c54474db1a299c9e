"""Prefixes loaded and removed while the server runs (``POST /v1/prefixes``, ``DELETE /v1/prefixes/{name}``).

Only files under the server's ``--prefix-dir`` can be read: a path is resolved (``..`` and symbolic links
followed) and refused (403) when it ends up outside. Reading and checking a file happens off the engine thread;
only the bank change itself runs on it (see :class:`prefixrt.serve.engine_loop.EngineLoop.call`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from prefixrt.bank import BankFileError, PrefixBank
from prefixrt.bank.peft_io import PeftAdapterError, read_peft_prefix
from prefixrt.serve.errors import APIError

__all__ = ["read_entry", "resolve_under"]


def resolve_under(root: Path, relative: str, param: str) -> Path:
    """``root / relative`` resolved; a 403 when it leaves ``root``, a 400 when it does not exist."""
    root = root.resolve()
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise APIError(
            403,
            f"{param} {relative!r} is outside the server's --prefix-dir; only paths under it can be loaded",
            param=param,
            code="path_not_allowed",
        )
    if not path.exists():
        raise APIError(
            400, f"{param} {relative!r}: no such file or directory under --prefix-dir", param=param
        )
    return path


def read_entry(
    root: Path, bank: PrefixBank, *, bank_file: str | None, entry: str | None, peft: str | None, name: str
) -> dict[str, torch.Tensor]:
    """The K/V of one prefix, ``{site: [layers, 2, heads, P, head_dim]}``, read from a bank file's entry or a
    PEFT adapter directory under ``root`` and checked against ``bank``'s architecture (400 otherwise)."""
    if (bank_file is None) == (peft is None):
        raise APIError(400, "give exactly one of 'bank' (a bank file) and 'peft' (a PEFT adapter directory)")
    if peft is not None:
        path = resolve_under(root, peft, "peft")
        try:
            kv = read_peft_prefix(path, bank.spec)
        except (PeftAdapterError, ValueError, OSError) as err:
            raise APIError(400, f"peft {peft!r}: {err}", param="peft") from None
    else:
        path = resolve_under(root, bank_file, "bank")
        try:
            source = PrefixBank.load(path, device="cpu")
        except (BankFileError, OSError) as err:
            raise APIError(400, f"bank {bank_file!r}: {err}", param="bank") from None
        wanted = entry or name
        if wanted not in source:
            raise APIError(
                400, f"bank {bank_file!r} has no entry {wanted!r}; it holds {source.names}", param="entry"
            )
        try:
            source.check_compatible(bank.spec)
        except ValueError as err:
            raise APIError(400, f"bank {bank_file!r}: {err}", param="bank") from None
        kv = source.entry(wanted)
        kv = {site: t for site, t in kv.items() if t.shape[3] > 0}
    return kv  # shapes, NaN and inf are checked by bank.add, on the loop thread
