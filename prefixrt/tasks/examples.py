"""The example type every loader returns, and the operations on lists of examples.

A loader returns one :class:`Example` per (source, reference) pair -- the rows a model trains on -- and every row
carries all references of its source in ``refs`` and a ``group`` key shared by the rows of that source.
:func:`collapse` turns such a list into one entry per source, the unit that generation and multi-reference
scoring work on; :func:`subsample` draws the paper's low-data training sets (n sources with all their rows).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["DataFormatError", "Example", "collapse", "grouped_examples", "references", "subsample"]


class DataFormatError(ValueError):
    """A data file that exists but does not hold what its format requires; the message names the file."""


@dataclass(frozen=True)
class Example:
    """One (source, target) row.

    Attributes
    ----------
    src : str
        The linearized source (E2E ``name : X | area : Y``, triples ``s : p : o | ...``) or a document.
    tgt : str or None
        The target this row trains on; ``None`` for a source given without references (a blind test set).
    refs : tuple of str
        All references of this row's source, in file order (``tgt`` is one of them); empty when ``tgt`` is None.
    group : str
        The key shared by all rows of one source (E2E: the raw MR; DART/WebNLG: the entry id; JSONL: ``id`` or
        the source text). Unique within one loaded list, not across tasks.
    """

    src: str
    tgt: str | None
    refs: tuple[str, ...]
    group: str


def grouped_examples(sources: Iterable[tuple[str, str, Sequence[str]]], where: str) -> list[Example]:
    """The rows a loader returns for ``(group, source, targets)`` records, in record order.

    One :class:`Example` per target, each carrying all references of its group (the targets of every record
    with that group, in order); a group without targets gives one row per record with ``tgt=None``.

    Raises
    ------
    DataFormatError
        If one group key comes with two different sources (the message names ``where``).
    """
    records = list(sources)
    refs: dict[str, list[str]] = {}
    srcs: dict[str, str] = {}
    for group, src, tgts in records:
        if srcs.setdefault(group, src) != src:
            raise DataFormatError(f"{where}: id {group!r} is used for two different sources")
        refs.setdefault(group, []).extend(tgts)
    out = []
    for group, src, tgts in records:
        rs = tuple(refs[group])
        out.extend(Example(src=src, tgt=t, refs=rs, group=group) for t in tgts)
        if not rs:
            out.append(Example(src=src, tgt=None, refs=(), group=group))
    return out


def collapse(examples: Sequence[Example]) -> list[Example]:
    """One example per source, in order of first appearance, with all references of that source.

    ``tgt`` of each result is the source's first reference (or None). The references of a group are merged over
    its rows as a multiset maximum: rows that all carry the group's full ``refs`` (what the loaders return) give
    exactly those references, repeated ones included (the E2E files repeat some references, and the official
    scorer counts them); rows that carry only their own ``tgt`` give one reference per distinct target.

    >>> rows = [Example("s", "a", ("a", "b"), "g"), Example("s", "b", ("a", "b"), "g")]
    >>> collapse(rows)
    [Example(src='s', tgt='a', refs=('a', 'b'), group='g')]
    """
    order: list[str] = []
    first: dict[str, Example] = {}
    refs: dict[str, list[str]] = {}
    counts: dict[str, Counter] = {}
    for ex in examples:
        if ex.group not in first:
            order.append(ex.group)
            first[ex.group] = ex
            refs[ex.group], counts[ex.group] = [], Counter()
        elif ex.src != first[ex.group].src:
            raise ValueError(
                f"group {ex.group!r} holds two different sources: {first[ex.group].src!r} and {ex.src!r}"
            )
        acc, have = refs[ex.group], counts[ex.group]
        want = Counter(ex.refs)
        for r in ex.refs:
            if have[r] < want[r]:
                acc.append(r)
                have[r] += 1
        if ex.tgt is not None and not have[ex.tgt]:
            acc.append(ex.tgt)
            have[ex.tgt] += 1
    out = []
    for g in order:
        rs = tuple(refs[g])
        out.append(Example(src=first[g].src, tgt=rs[0] if rs else None, refs=rs, group=g))
    return out


def references(examples: Sequence[Example]) -> list[list[str]]:
    """The reference lists of :func:`collapse`'s sources, ready for :func:`prefixrt.tasks.metrics.score`."""
    return [list(ex.refs) for ex in collapse(examples)]


def subsample(examples: Sequence[Example], n: int, seed: int) -> list[Example]:
    """The rows of ``n`` sources drawn at random (all references of each), reproducibly for a given seed.

    This is the paper's low-data setting: the sources are drawn uniformly without replacement from the groups
    in file order, so the same (examples, n, seed) always gives the same rows, and the returned rows keep their
    original order.

    Parameters
    ----------
    examples : sequence of Example
        The full set (one row per reference).
    n : int
        Number of sources to keep, ``1 <= n <= number of sources``.
    seed : int
        Seed of the draw.
    """
    groups = list(dict.fromkeys(ex.group for ex in examples))
    if not 1 <= n <= len(groups):
        raise ValueError(f"subsample: n={n} must be between 1 and the number of sources ({len(groups)})")
    keep = set(random.Random(seed).sample(groups, n))
    return [ex for ex in examples if ex.group in keep]
