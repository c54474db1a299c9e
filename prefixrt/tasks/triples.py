"""Triple-set data: DART (JSON and XML) and WebNLG (XML, or a JSON list of ``{"triples", "texts"}``).

Both XML files follow the WebNLG layout::

    <entry eid="Id1" ...>
      <modifiedtripleset><mtriple>subject | property | object</mtriple>...</modifiedtripleset>
      <lex comment="..." lid="Id1">text</lex>...
    </entry>

(WebNLG 2.x nests the text as ``<lex><text>...</text></lex>``; both forms are read.) The DART defaults lowercase
the property, the WebNLG defaults start the source with `` | `` and keep only ``comment="good"`` texts -- what the
original prefix-tuning code did for each dataset (see :mod:`prefixrt.tasks.linearize`).
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefixrt.tasks._io import require_file
from prefixrt.tasks.examples import DataFormatError, Example
from prefixrt.tasks.linearize import linearize_triples

__all__ = ["load_dart", "load_triples_json", "load_triples_xml", "load_webnlg"]

_DART = {"lowercase_property": True, "leading_separator": False}
_WEBNLG = {"lowercase_property": False, "leading_separator": True}
_JSON_WHAT = (
    'a JSON list of DART entries {"tripleset": [[s, p, o], ...], "annotations": [{"text": ...}, ...]} '
    'or of {"triples": [[s, p, o], ...], "texts": [...]}'
)
_XML_WHAT = "a WebNLG/DART XML file of <entry> elements with <modifiedtripleset><mtriple>s | p | o</mtriple> and <lex>"


def _rows(
    entries: Sequence[tuple[str, list[list[str]], list[str]]],
    where: str,
    lowercase_property: bool,
    leading_separator: bool,
) -> list[Example]:
    """One Example per (entry, text); ``entries`` holds (group, triples, texts)."""
    out = []
    for group, triples, texts in entries:
        try:
            src = linearize_triples(
                triples, lowercase_property=lowercase_property, leading_separator=leading_separator
            )
        except ValueError as err:
            raise DataFormatError(f"{where}, entry {group}: {err}") from err
        refs = tuple(texts)
        if not refs:
            out.append(Example(src=src, tgt=None, refs=(), group=group))
        out.extend(Example(src=src, tgt=t, refs=refs, group=group) for t in refs)
    return out


def load_triples_json(
    path: str | os.PathLike, *, lowercase_property: bool = False, leading_separator: bool = False
) -> list[Example]:
    """Load a JSON list of triple sets with texts (DART's entries, or ``{"triples", "texts"}`` records).

    Parameters
    ----------
    path : path-like
        The JSON file. Each entry is either DART's ``{"tripleset": [[s, p, o], ...], "annotations":
        [{"source": ..., "text": ...}, ...]}`` or ``{"triples": [[s, p, o], ...], "texts": [str, ...]}``.
    lowercase_property, leading_separator : bool
        Linearization options (:func:`prefixrt.tasks.linearize.linearize_triples`).

    Returns
    -------
    list of Example
        One per (entry, text), in file order; ``group`` is the entry's index as a string.
    """
    p = require_file(path, _JSON_WHAT)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataFormatError(f"{p}: not valid JSON ({err}); expected {_JSON_WHAT}") from err
    if not isinstance(data, list):
        raise DataFormatError(f"{p}: top level is {type(data).__name__}; expected {_JSON_WHAT}")
    entries = []
    for i, e in enumerate(data):
        try:
            entries.append((str(i), *_json_entry(e)))
        except (KeyError, TypeError, ValueError) as err:
            raise DataFormatError(f"{p}, entry {i}: {err!r}; expected {_JSON_WHAT}") from err
    return _rows(entries, str(p), lowercase_property, leading_separator)


def _json_entry(e: Any) -> tuple[list[list[str]], list[str]]:
    if not isinstance(e, dict):
        raise TypeError(f"entry is a {type(e).__name__}, not an object")
    if "tripleset" in e:
        triples, texts = e["tripleset"], [a["text"] for a in e.get("annotations", [])]
    else:
        triples, texts = e["triples"], list(e.get("texts", []))
    if not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must be strings")
    return [list(t) for t in triples], [t.strip() for t in texts]


def load_triples_xml(
    path: str | os.PathLike,
    *,
    lowercase_property: bool = False,
    leading_separator: bool = False,
    lex_comment: str | None = None,
) -> list[Example]:
    """Load a WebNLG-format XML file (WebNLG, DART's XML release), or every ``*.xml`` under a directory.

    Parameters
    ----------
    path : path-like
        An XML file, or a directory whose ``*.xml`` files (recursively, in sorted order) are read in turn --
        WebNLG ships its train and dev sets as one file per category and size.
    lowercase_property, leading_separator : bool
        Linearization options (:func:`prefixrt.tasks.linearize.linearize_triples`).
    lex_comment : str, optional
        Keep only ``<lex>`` whose ``comment`` attribute equals this (WebNLG marks texts ``good``/``bad``);
        texts without the attribute are kept. None keeps all.

    Returns
    -------
    list of Example
        One per (entry, text), in file order; ``group`` is ``eid`` (prefixed by the file's relative path when a
        directory is read, as WebNLG restarts ids in every file).
    """
    p = Path(path)
    if p.is_dir():
        files = sorted(p.rglob("*.xml"))
        if not files:
            raise FileNotFoundError(f"{p}: directory holds no *.xml file; expected {_XML_WHAT}")
        out = []
        for f in files:
            out.extend(
                _xml_file(
                    f, f"{f.relative_to(p).as_posix()}:", lowercase_property, leading_separator, lex_comment
                )
            )
        return out
    p = require_file(p, _XML_WHAT)
    return _xml_file(p, "", lowercase_property, leading_separator, lex_comment)


def _xml_file(p: Path, tag: str, lowercase_property: bool, leading_separator: bool, lex_comment: str | None):
    try:
        root = ET.parse(p).getroot()
    except ET.ParseError as err:
        raise DataFormatError(f"{p}: not well-formed XML ({err}); expected {_XML_WHAT}") from err
    entries = []
    for k, entry in enumerate(root.iter("entry")):
        group = tag + entry.get("eid", str(k))
        triples = []
        for m in entry.iter("mtriple"):
            fields = (m.text or "").split(" | ")
            if len(fields) != 3:
                raise DataFormatError(
                    f"{p}, entry {group}: <mtriple> {m.text!r}; expected 'subject | property | object'"
                )
            triples.append(fields)
        if not triples:
            raise DataFormatError(f"{p}, entry {group}: no <mtriple>; expected {_XML_WHAT}")
        texts = []
        for lex in entry.findall("lex"):
            if lex_comment is not None and lex.get("comment", lex_comment) != lex_comment:
                continue
            node = lex.find("text")
            text = ((node.text if node is not None else lex.text) or "").strip()
            if text:
                texts.append(text)
        entries.append((group, triples, texts))
    if not entries:
        raise DataFormatError(f"{p}: no <entry> element; expected {_XML_WHAT}")
    return _rows(entries, str(p), lowercase_property, leading_separator)


def load_dart(path: str | os.PathLike) -> list[Example]:
    """DART (``.json`` or ``.xml``) with the original code's linearization (properties lowercased)."""
    if Path(path).suffix.lower() == ".xml":
        return load_triples_xml(path, **_DART)
    return load_triples_json(path, **_DART)


def load_webnlg(path: str | os.PathLike) -> list[Example]:
    """WebNLG (XML file, directory of XML files, or ``{"triples", "texts"}`` JSON) with the original code's
    linearization (a leading `` | ``) and only ``comment="good"`` texts from XML."""
    if Path(path).suffix.lower() == ".json":
        return load_triples_json(path, **_WEBNLG)
    return load_triples_xml(path, lex_comment="good", **_WEBNLG)
