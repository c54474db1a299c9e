"""Checks shared by the metrics: one hypothesis per segment, at least one reference each."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["check_corpus", "ref_streams"]


def check_corpus(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> list[list[str]]:
    """Validate a (hypotheses, references-per-segment) corpus; returns the references as lists.

    Raises ValueError naming the problem: no segments, different numbers of hypotheses and reference lists, a
    segment without references, or a reference list given as a bare string (a common slip that would silently
    split it into characters).
    """
    if isinstance(hyps, str) or isinstance(refs, str):
        raise ValueError(
            "hyps must be a sequence of strings and refs a sequence of reference lists, not a string"
        )
    if len(hyps) == 0:
        raise ValueError("no hypotheses to score")
    if len(hyps) != len(refs):
        raise ValueError(
            f"{len(hyps)} hypotheses but {len(refs)} reference lists; expected one list per hypothesis"
        )
    out = []
    for i, rs in enumerate(refs):
        if isinstance(rs, str):
            raise ValueError(f"references of segment {i} are a string; expected a list of reference strings")
        rs = list(rs)
        if not rs:
            raise ValueError(f"segment {i} has no reference")
        out.append(rs)
    return out


def ref_streams(refs: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """Transpose per-segment reference lists into sacrebleu's reference streams, padded with None."""
    width = max(len(rs) for rs in refs)
    return [[rs[j] if j < len(rs) else None for rs in refs] for j in range(width)]
