"""The paper's linearizations of structured inputs into source strings.

* E2E meaning representations: ``name[The Vaults], eatType[pub]`` -> ``name : The Vaults | eatType : pub``.
* Triple sets (DART, WebNLG): ``subject : property : object`` per triple, joined by `` | ``.

The original prefix-tuning code (XiangLi1999/PrefixTuning, ``LineByLineTriplesTextDataset`` and
``LineByLineWebNLGTextDataset``) lowercases DART properties and, for WebNLG, writes `` | `` before *every* triple
(so the source starts with `` | ``); both are options here, and the DART / WebNLG loaders turn on the one their
dataset used. (Its E2E files were a pre-tokenized release that also renamed ``eatType`` to ``Type`` and split
``£30`` into ``£ 30``; the loaders here read the official CSV and keep its attribute names and values as they are.)
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

__all__ = ["linearize_e2e_mr", "linearize_triples", "parse_e2e_mr"]

# One ``key[value]`` slot of an E2E MR: a key without brackets or commas, a value without ``]``.
_SLOT = re.compile(r"\s*([^\[\],]+?)\s*\[([^\]]*)\]\s*(,|$)")


def parse_e2e_mr(mr: str) -> list[tuple[str, str]]:
    """Split an E2E meaning representation into ``(attribute, value)`` pairs, in order.

    >>> parse_e2e_mr("name[The Vaults], eatType[pub], priceRange[more than £30]")
    [('name', 'The Vaults'), ('eatType', 'pub'), ('priceRange', 'more than £30')]

    Raises
    ------
    ValueError
        If ``mr`` is not a comma-separated list of ``key[value]`` slots.
    """
    slots, pos = [], 0
    while pos < len(mr):
        m = _SLOT.match(mr, pos)
        if m is None:
            raise ValueError(
                f"malformed E2E MR {mr!r}: expected 'key[value], key[value], ...' at offset {pos}"
            )
        slots.append((m.group(1), m.group(2).strip()))
        pos = m.end()
        if m.group(3) == "" and pos < len(mr):
            raise ValueError(f"malformed E2E MR {mr!r}: trailing text at offset {pos}")
    if not slots:
        raise ValueError(f"malformed E2E MR {mr!r}: no 'key[value]' slot")
    return slots


def linearize_e2e_mr(mr: str) -> str:
    """The paper's E2E source string: ``key : value`` slots joined by `` | ``.

    >>> linearize_e2e_mr("name[The Vaults], eatType[pub]")
    'name : The Vaults | eatType : pub'
    """
    return " | ".join(f"{k} : {v}" for k, v in parse_e2e_mr(mr))


def linearize_triples(
    triples: Iterable[Sequence[str]], *, lowercase_property: bool = False, leading_separator: bool = False
) -> str:
    """The paper's triple-set source string: ``subject : property : object`` joined by `` | ``.

    Parameters
    ----------
    triples : iterable of (subject, property, object)
        The triple set, in order.
    lowercase_property : bool
        Lowercase the property, as the original code does for DART.
    leading_separator : bool
        Put `` | `` before the first triple too, as the original code does for WebNLG.

    >>> linearize_triples([("Mars Hill College", "JOINED", "1973"), ("Mars Hill College", "LOCATION", "NC")],
    ...                   lowercase_property=True)
    'Mars Hill College : joined : 1973 | Mars Hill College : location : NC'
    """
    parts = []
    for t in triples:
        if len(t) != 3:
            raise ValueError(f"a triple must have 3 fields (subject, property, object), got {list(t)!r}")
        s, p, o = (str(x).strip() for x in t)
        parts.append(f"{s} : {p.lower() if lowercase_property else p} : {o}")
    if not parts:
        raise ValueError("empty triple set")
    return (" | " if leading_separator else "") + " | ".join(parts)
