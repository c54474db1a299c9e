"""Atomic file writes (a reader never sees a half-written bank, checkpoint or report), and the tagged safetensors
files that banks and checkpoints are: written atomically, read with checks."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "TaggedSafetensors",
    "atomic_write",
    "atomic_write_text",
    "atomic_write_json",
    "read_tagged_safetensors",
]


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> None:
    """Call ``write(tmp_path)`` on a temp file next to ``path``, then rename it over ``path``.

    The rename is atomic on POSIX, so ``path`` holds either the old or the new content, never a partial file;
    when ``write`` raises, ``path`` is untouched and the temp file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, _default_file_mode())  # mkstemp makes 0600; a saved bank is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _default_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_tagged_safetensors(
    path: Path,
    format_name: str,
    format_version: str,
    error: type[Exception],
    *,
    missing: str,
    kind: str,
    version_kind: str,
) -> tuple[dict[str, str], dict[str, Any]]:
    """``(metadata, tensors)`` of a safetensors file whose metadata says ``format=format_name`` and
    ``version=format_version``; raises ``error`` naming the file when it is missing ("<missing> '<path>' does
    not exist"), unreadable, not a prefixrt ``kind``, or of another ``version_kind`` format version."""
    from safetensors import safe_open

    if not path.is_file():
        raise error(f"{missing} {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # safetensors raises several types for truncated or foreign files
        raise error(f"{str(path)!r} is not a readable safetensors file ({err})") from err
    if metadata.get("format") != format_name:
        raise error(f"{str(path)!r} is not a prefixrt {kind} (metadata format={metadata.get('format')!r})")
    if metadata.get("version") != format_version:
        raise error(
            f"{str(path)!r} has {version_kind} format version {metadata.get('version')!r}; "
            f"this prefixrt reads version {format_version}"
        )
    return metadata, tensors


@dataclass(frozen=True)
class TaggedSafetensors:
    """One of prefixrt's safetensors file formats: metadata ``format=name`` and ``version=version``; ``error``,
    ``missing``, ``kind`` and ``version_kind`` say what :func:`read_tagged_safetensors` raises for a bad file."""

    name: str
    version: str
    error: type[Exception]
    missing: str
    kind: str
    version_kind: str

    def write(self, path: str | os.PathLike, tensors: dict[str, Any], metadata: dict[str, str]) -> None:
        """Write ``tensors`` to ``path`` atomically, with ``metadata`` after the format's two tags."""
        from safetensors.torch import save_file

        tagged = {"format": self.name, "version": self.version, **metadata}
        atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=tagged))

    def read(self, path: Path) -> tuple[dict[str, str], dict[str, Any]]:
        """``(metadata, tensors)`` of a file of this format; raises ``error`` as :func:`read_tagged_safetensors`."""
        return read_tagged_safetensors(
            path,
            self.name,
            self.version,
            self.error,
            missing=self.missing,
            kind=self.kind,
            version_kind=self.version_kind,
        )
