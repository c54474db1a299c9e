"""NIST (Doddington 2002) as mteval-v13a defines it, with a variable number of references per segment.

For n-gram order ``n = 1..N`` (N = 5)::

    info(w_1..w_n) = log2( count(w_1..w_{n-1}) / count(w_1..w_n) )      counts over all reference sentences;
                                                                          count() of the empty n-gram = #ref words
    NIST = BP * sum_n  [ sum over segments of sum over the hypothesis's n-grams that occur in that segment's
                         references (clipped to the max count in one reference) of info ]
                       / [ number of hypothesis n-grams in the corpus ]
    BP   = exp( beta * log(min(L_sys / L_ref, 1))^2 ),   beta = log(0.5) / log(1.5)^2
                                                           (BP = 0.5 when the output is 2/3 of the reference length)

``L_sys`` is the number of hypothesis words, ``L_ref`` the sum over segments of the mean reference length.
Text is lowercased and tokenized with the mteval-v13a tokenizer (sacrebleu's ``13a``), as the E2E scorer does.
Unlike the E2E scorer's Python port, a hypothesis shorter than n contributes zero (not a negative number) of
n-grams, as in mteval-v13a itself; the two agree whenever every hypothesis has at least N words.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

from prefixrt.tasks._corpus import check_corpus

__all__ = ["nist"]

_BETA = math.log(0.5) / math.log(1.5) ** 2


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _tokenizer():
    try:
        from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a
    except ImportError as err:
        raise ImportError(
            "NIST needs sacrebleu for the mteval-v13a tokenizer: pip install 'prefixrt[metrics]'"
        ) from err
    tok = Tokenizer13a()
    return lambda text: tok(text.lower()).split()


def nist(
    hyps: Sequence[str], refs: Sequence[Sequence[str]], max_n: int = 5, *, tokenized: bool = False
) -> float:
    """Corpus NIST-``max_n`` of ``hyps`` against per-segment reference lists.

    Parameters
    ----------
    hyps : sequence of str
        One system output per segment (or token lists when ``tokenized``).
    refs : sequence of sequence of str
        The references of each segment (any number >= 1 per segment).
    max_n : int
        Highest n-gram order (5 for the E2E challenge).
    tokenized : bool
        Inputs are already token lists: no lowercasing or tokenization.
    """
    refs = check_corpus(hyps, refs)
    tok = (lambda x: list(x)) if tokenized else _tokenizer()
    hyp_toks = [tok(h) for h in hyps]
    ref_toks = [[tok(r) for r in rs] for rs in refs]

    # -- information weights from the counts of n-grams over all reference sentences
    counts: Counter = Counter()
    for rs in ref_toks:
        for r in rs:
            counts[()] += len(r)
            for n in range(1, max_n + 1):
                counts.update(_ngrams(r, n))

    def info(g: tuple) -> float:
        return math.log2(counts[g[:-1]] / counts[g])

    # -- matched information per order, and the hypotheses' n-gram totals
    gained = [0.0] * (max_n + 1)
    total = [0] * (max_n + 1)
    sys_len, ref_len = 0, 0.0
    for h, rs in zip(hyp_toks, ref_toks, strict=True):
        sys_len += len(h)
        ref_len += sum(len(r) for r in rs) / len(rs)
        for n in range(1, max_n + 1):
            hg = _ngrams(h, n)
            total[n] += sum(hg.values())
            clip: Counter = Counter()
            for r in rs:
                clip |= _ngrams(r, n)  # max count in any one reference
            gained[n] += sum(min(c, clip[g]) * info(g) for g, c in hg.items() if g in clip)
    score = sum(gained[n] / total[n] for n in range(1, max_n + 1) if total[n])

    # -- length penalty
    ratio = sys_len / ref_len if ref_len else 0.0
    bp = 1.0 if ratio >= 1 else 0.0 if ratio <= 0 else math.exp(_BETA * math.log(ratio) ** 2)
    return bp * score
