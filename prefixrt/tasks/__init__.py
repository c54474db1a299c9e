"""Tasks: the data and metrics layer of training and evaluation (the top floor; nothing below imports it).

Data
    :func:`load_examples` (a path or a Hub name) and the loaders behind it -- :func:`load_e2e_csv`,
    :func:`load_dart`, :func:`load_webnlg`, :func:`load_triples_json`, :func:`load_triples_xml`,
    :func:`load_jsonl`, :func:`load_hub_dataset` -- all return a list of :class:`Example`, one per
    (source, reference); :func:`collapse` gives one per source with all references, :func:`subsample` the
    low-data sets.
Layouts and batches
    :func:`encode_examples` / :func:`encode_causal` / :func:`encode_prompt` / :func:`encode_seq2seq` build the
    paper's ``src <bos> tgt <eos>`` (GPT-2) and encoder/decoder (BART) rows, :func:`decode_generated` reads
    ``generate``'s output back; :class:`Collator` pads them and adds
    ``task_ids``; :class:`MixedTaskDataset` and :class:`MixedTaskBatchSampler` mix tasks in one batch.
Task kinds
    :func:`kind_of` and :data:`KIND_DEFAULTS`: the paper's prefix length, truncation and decoding per kind.
Metrics and reports
    :func:`score` (``"table-to-text"`` or ``"summarization"``), the single metrics, :func:`write_scores`,
    :func:`format_markdown_table`, :func:`mean_std`.
"""

from prefixrt.tasks.coco import cider_d, rouge_l_coco
from prefixrt.tasks.collate import Collator, pad_token_id_for
from prefixrt.tasks.e2e import load_e2e_csv
from prefixrt.tasks.encode import (
    LAYOUTS,
    Encoded,
    decode_generated,
    encode_causal,
    encode_examples,
    encode_prompt,
    encode_seq2seq,
    layout_for,
)
from prefixrt.tasks.examples import DataFormatError, Example, collapse, references, subsample
from prefixrt.tasks.hub import load_hub_dataset
from prefixrt.tasks.jsonl import load_jsonl
from prefixrt.tasks.kinds import KIND_DEFAULTS, KindDefaults, kind_of
from prefixrt.tasks.linearize import linearize_e2e_mr, linearize_triples, parse_e2e_mr
from prefixrt.tasks.loading import FORMATS, guess_format, load_examples
from prefixrt.tasks.metrics import NOT_COMPUTED, TASK_KINDS, bleu, chrf, rouge, score, ter
from prefixrt.tasks.mixed import MixedTaskBatchSampler, MixedTaskDataset
from prefixrt.tasks.nist import nist
from prefixrt.tasks.report import format_markdown_table, mean_std, write_e2e_scorer_files, write_scores
from prefixrt.tasks.triples import load_dart, load_triples_json, load_triples_xml, load_webnlg

__all__ = [
    "FORMATS",
    "KIND_DEFAULTS",
    "LAYOUTS",
    "NOT_COMPUTED",
    "TASK_KINDS",
    "Collator",
    "DataFormatError",
    "Encoded",
    "Example",
    "KindDefaults",
    "MixedTaskBatchSampler",
    "MixedTaskDataset",
    "bleu",
    "chrf",
    "cider_d",
    "collapse",
    "decode_generated",
    "encode_causal",
    "encode_examples",
    "encode_prompt",
    "encode_seq2seq",
    "format_markdown_table",
    "guess_format",
    "kind_of",
    "layout_for",
    "linearize_e2e_mr",
    "linearize_triples",
    "load_dart",
    "load_e2e_csv",
    "load_examples",
    "load_hub_dataset",
    "load_jsonl",
    "load_triples_json",
    "load_triples_xml",
    "load_webnlg",
    "mean_std",
    "nist",
    "pad_token_id_for",
    "parse_e2e_mr",
    "references",
    "rouge",
    "rouge_l_coco",
    "score",
    "subsample",
    "ter",
    "write_e2e_scorer_files",
    "write_scores",
]
