"""Scores for generated text against one or more references per source.

Every function takes ``hyps`` (one output per source) and ``refs`` (the list of references of each source, any
number >= 1) -- multi-reference scoring groups references by source, as
:func:`prefixrt.tasks.examples.collapse` produces them. Scales follow the paper's tables: BLEU, chrF, TER and
ROUGE in 0..100, NIST and CIDEr on their own scales.

======================  ==========================================================================================
``BLEU``                the official E2E scorer's BLEU: sacrebleu ``corpus_bleu`` with ``lowercase=True``,
                        ``tokenize="13a"`` (mteval-v13a), reference streams padded with None.
``NIST``                NIST-5 as mteval-v13a (:mod:`prefixrt.tasks.nist`), case-insensitive, as the E2E scorer.
``CIDEr``               CIDEr-D of coco-caption (:mod:`prefixrt.tasks.coco`), PTB-like tokenization.
``ROUGE_L_coco``        coco-caption's ROUGE-L (beta 1.2), what the E2E scorer reports, x100.
``ROUGE_L``             rouge-score ``rougeL`` F-measure, best reference per source, mean x100.
``TER``, ``chrF``       sacrebleu ``corpus_ter`` / ``corpus_chrf`` (best reference per segment).
``ROUGE_1/2/L``         summarization: rouge-score F-measure with the Porter stemmer, mean x100.
======================  ==========================================================================================

Not computed offline (see :data:`NOT_COMPUTED`): METEOR, which needs the Java METEOR 1.5 jar with its
paraphrase tables, and the learned metrics of the DART evaluation (BLEURT, BERTScore, MoverScore), which need
model weights.
"""

from __future__ import annotations

from collections.abc import Sequence

from prefixrt.tasks._corpus import check_corpus, ref_streams
from prefixrt.tasks.coco import cider_d, rouge_l_coco
from prefixrt.tasks.nist import nist

__all__ = ["NOT_COMPUTED", "TASK_KINDS", "bleu", "chrf", "rouge", "score", "ter"]

TASK_KINDS = ("table-to-text", "summarization")

NOT_COMPUTED: dict[str, str] = {
    "METEOR": "needs the Java METEOR 1.5 jar and its paraphrase tables (the official scorer's); not run offline",
    "BLEURT": "a learned metric: needs its model weights",
    "BERTScore": "a learned metric: needs its model weights",
    "MoverScore": "a learned metric: needs its model weights",
}


def _sacrebleu():
    try:
        import sacrebleu
    except ImportError as err:
        raise ImportError("BLEU, TER and chrF need sacrebleu: pip install 'prefixrt[metrics]'") from err
    return sacrebleu


def bleu(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (0..100) exactly as the official E2E scorer computes it.

    sacrebleu ``corpus_bleu(hyps, streams, lowercase=True, tokenize="13a")`` with the per-source reference lists
    transposed into streams padded with None (sources may have different numbers of references).
    """
    refs = check_corpus(hyps, refs)
    return float(
        _sacrebleu().corpus_bleu(list(hyps), ref_streams(refs), lowercase=True, tokenize="13a").score
    )


def ter(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """Corpus TER (0..100, lower is better), sacrebleu defaults (case-sensitive, as the DART evaluation)."""
    refs = check_corpus(hyps, refs)
    return float(_sacrebleu().corpus_ter(list(hyps), ref_streams(refs)).score)


def chrf(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """Corpus chrF (0..100), sacrebleu defaults (character 6-grams, beta 2)."""
    refs = check_corpus(hyps, refs)
    return float(_sacrebleu().corpus_chrf(list(hyps), ref_streams(refs)).score)


def rouge(
    hyps: Sequence[str],
    refs: Sequence[Sequence[str]],
    types: Sequence[str] = ("rouge1", "rouge2", "rougeL"),
    *,
    use_stemmer: bool = True,
) -> dict[str, float]:
    """Mean ROUGE F-measure (0..100) per type, with rouge-score; several references: the best one per source.

    Returns
    -------
    dict
        ``{"ROUGE_1": .., "ROUGE_2": .., "ROUGE_L": ..}`` for the default ``types`` (``rougeN`` -> ``ROUGE_N``).
    """
    refs = check_corpus(hyps, refs)
    try:
        from rouge_score import rouge_scorer
    except ImportError as err:
        raise ImportError("ROUGE needs rouge-score: pip install 'prefixrt[metrics]'") from err
    scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=use_stemmer)
    sums = dict.fromkeys(types, 0.0)
    for h, rs in zip(hyps, refs, strict=True):
        s = scorer.score_multi(rs, h) if len(rs) > 1 else scorer.score(rs[0], h)
        for t in types:
            sums[t] += s[t].fmeasure
    return {"ROUGE_" + t.removeprefix("rouge"): 100.0 * v / len(hyps) for t, v in sums.items()}


def score(task_kind: str, hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> dict[str, float]:
    """All offline metrics for a task kind.

    Parameters
    ----------
    task_kind : {"table-to-text", "summarization"}
        ``table-to-text`` (E2E, WebNLG, DART): BLEU, NIST, CIDEr, ROUGE_L_coco, ROUGE_L, TER, chrF.
        ``summarization`` (XSUM): ROUGE_1, ROUGE_2, ROUGE_L (stemmed).
    hyps : sequence of str
        One output per source.
    refs : sequence of sequence of str
        Each source's references.

    Returns
    -------
    dict of str to float
        Metric name -> value (module docstring for scales). Metrics that cannot be computed offline are absent;
        :data:`NOT_COMPUTED` says why.
    """
    refs = check_corpus(hyps, refs)
    if task_kind == "table-to-text":
        return {
            "BLEU": bleu(hyps, refs),
            "NIST": nist(hyps, refs),
            "CIDEr": cider_d(hyps, refs),
            "ROUGE_L_coco": 100.0 * rouge_l_coco(hyps, refs),
            "ROUGE_L": rouge(hyps, refs, ("rougeL",), use_stemmer=False)["ROUGE_L"],
            "TER": ter(hyps, refs),
            "chrF": chrf(hyps, refs),
        }
    if task_kind == "summarization":
        return rouge(hyps, refs, ("rouge1", "rouge2", "rougeL"), use_stemmer=True)
    raise ValueError(f"task_kind must be one of {TASK_KINDS}, got {task_kind!r}")
