"""Hugging Face Hub datasets by name (needs the optional ``datasets`` package and a network connection).

Kept thin on purpose: it maps a few known datasets' fields onto :class:`Example` and otherwise reads the
``src_field``/``tgt_field`` the caller names. Local files are the supported path; this is a convenience.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from typing import Any

from prefixrt.tasks.examples import Example, grouped_examples
from prefixrt.tasks.linearize import linearize_e2e_mr, linearize_triples

__all__ = ["HUB_FIELDS", "load_hub_dataset", "rows_to_examples"]

# Known dataset names -> (source field, target field, source kind). "e2e" linearizes an MR, "triples" a DART
# tripleset (annotations carry the texts), "text" takes the field as it is.
HUB_FIELDS: dict[str, tuple[str, str, str]] = {
    "e2e_nlg": ("meaning_representation", "human_reference", "e2e"),
    "tuetschek/e2e_nlg": ("meaning_representation", "human_reference", "e2e"),
    "GEM/e2e_nlg": ("meaning_representation", "target", "e2e"),
    "dart": ("tripleset", "annotations", "triples"),
    "Yale-LILY/dart": ("tripleset", "annotations", "triples"),
    "GEM/dart": ("tripleset", "target", "triples"),
    "xsum": ("document", "summary", "text"),
    "EdinburghNLP/xsum": ("document", "summary", "text"),
}


def load_hub_dataset(
    name: str,
    split: str = "train",
    *,
    config: str | None = None,
    src_field: str | None = None,
    tgt_field: str | None = None,
    kind: str | None = None,
) -> list[Example]:
    """Load ``name``'s ``split`` from the Hugging Face Hub as a list of :class:`Example`.

    Parameters
    ----------
    name : str
        A dataset name (``"e2e_nlg"``, ``"EdinburghNLP/xsum"``, ...). Names in :data:`HUB_FIELDS` need no fields.
    split : str
        The split (``"train"``, ``"validation"``, ``"test"``).
    config : str, optional
        The dataset's configuration name.
    src_field, tgt_field, kind : str, optional
        Override (or, for unknown names, give) the source field, the target field and how to read the source:
        ``"e2e"`` (MR to linearize), ``"triples"`` (a triple set) or ``"text"`` (default ``"src"``, ``"tgt"``,
        ``"text"``).

    Raises
    ------
    ImportError
        If ``datasets`` is not installed (it is not a prefixrt dependency).
    RuntimeError
        If the dataset cannot be fetched (no network, unknown name); the message names it.
    """
    try:
        datasets = importlib.import_module("datasets")
    except ImportError as err:
        raise ImportError(
            f"loading {name!r} from the Hugging Face Hub needs the 'datasets' package (pip install datasets); "
            "or pass a local file (E2E .csv, DART/WebNLG .json/.xml, .jsonl)"
        ) from err
    known = HUB_FIELDS.get(name, ("src", "tgt", "text"))
    src_field, tgt_field, kind = src_field or known[0], tgt_field or known[1], kind or known[2]
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except (
        Exception
    ) as err:  # datasets raises many types (ConnectionError, FileNotFoundError, DatasetNotFoundError)
        raise RuntimeError(
            f"could not load Hugging Face dataset {name!r} (config={config!r}, split={split!r}): {err}. "
            "Is the machine online and the name right? A local file path always works."
        ) from err
    return rows_to_examples(ds, src_field=src_field, tgt_field=tgt_field, kind=kind, where=f"{name}[{split}]")


def _texts(value: Any) -> list[str]:
    """Targets of one row: a string, a list of strings, DART's annotations (list of dicts or dict of lists)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        return [str(t) for t in value.get("text", [])]
    return [v["text"] if isinstance(v, Mapping) else str(v) for v in value]


def rows_to_examples(
    rows: Iterable[Mapping[str, Any]],
    *,
    src_field: str,
    tgt_field: str,
    kind: str = "text",
    where: str = "dataset",
) -> list[Example]:
    """Map dataset rows onto Examples; rows with the same source become one multi-reference group."""
    if kind not in ("e2e", "triples", "text"):
        raise ValueError(f"kind must be 'e2e', 'triples' or 'text', got {kind!r}")
    pairs: list[tuple[str, str, list[str]]] = []
    for i, row in enumerate(rows):
        if src_field not in row:
            raise KeyError(f"{where}, row {i}: no field {src_field!r} (fields: {sorted(row)})")
        raw = row[src_field]
        if kind == "e2e":
            src = linearize_e2e_mr(raw)
        elif kind == "triples":
            src = linearize_triples(raw, lowercase_property=True)
        else:
            src = str(raw)
        key = raw if isinstance(raw, str) else repr(raw)
        pairs.append((key, src, _texts(row.get(tgt_field))))
    return grouped_examples(pairs, where)  # the key is the raw source: one source per key
