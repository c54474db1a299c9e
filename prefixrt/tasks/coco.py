"""CIDEr-D and the ROUGE-L variant of the MS-COCO caption evaluation code, which the E2E scorer reports.

Both are pure Python. The official scorer tokenizes with Stanford's Java PTBTokenizer (lowercased, punctuation
tokens removed); :func:`ptb_like_tokenize` approximates it with a regular expression (contractions split as PTB
does, hyphenated words and numbers kept whole), so scores can differ slightly from the official ones on text
where the two tokenizers disagree.

CIDEr-D (Vedantam et al. 2015, coco-caption's ``CiderD``): for n = 1..4, each sentence is a vector of n-gram
TF-IDF weights ``tf * (log(#segments) - log(max(1, df)))``, with ``df`` the number of segments whose references
contain the n-gram (the corpus IDF). The score of a hypothesis against one reference is, per n, the clipped
cosine ``sum_g min(h_g, r_g) * r_g / (|h| |r|)`` times a length factor ``exp(-(l_h - l_r)^2 / (2 * 6^2))``
(coco-caption measures that length in bigrams); it is averaged over n and over the references and multiplied by
10, then averaged over segments.

ROUGE-L (coco-caption's ``Rouge``): per segment, with LCS the longest common subsequence,
``P = max_r LCS/len(h)``, ``R = max_r LCS/len(r)`` and ``F = (1 + b^2) P R / (R + b^2 P)``, ``b = 1.2``;
averaged over segments.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

from prefixrt.tasks._corpus import check_corpus

__all__ = ["cider_d", "ptb_like_tokenize", "rouge_l_coco"]

# coco-caption's PTBTokenizer drops these tokens after tokenizing (its list is upper case, so the lowercased
# bracket tokens -lrb- etc. survive).
_PUNCT = {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";", '"', "\u2013", "\u2014"}
# PTB's renderings of brackets and the pound sign.
_PTB_SYMBOL = {
    "(": "-lrb-",
    ")": "-rrb-",
    "[": "-lsb-",
    "]": "-rsb-",
    "{": "-lcb-",
    "}": "-rcb-",
    "\u00a3": "#",
}
_ABBREV = r"(?:mr|mrs|ms|dr|jr|sr|st|vs|inc|ltd|co|al|prof|etc|blvd)\.|no\.(?=\s*\d)"
_CLITIC = r"(?:s|re|ve|ll|d|m|em)\b"
_TOKEN = re.compile(
    "|".join(
        [
            rf"(?<!\w)(?:{_ABBREV})(?!\w)",  # known abbreviations keep their period
            r"(?<![\w.])(?:[a-z]\.)+(?!\w)",  # initials and acronyms: j. a.s. u.s.
            r"\w+(?=n't\b)",
            r"n't\b",
            rf"(?<=\w)'{_CLITIC}",  # it 's, we 'll
            rf"\w+'(?!{_CLITIC})\w+",  # o'connor, d'oeuvre
            r"\w+\.(?=,)",  # a period before a comma stays on its word: "center.,"
            r"(?<![\w.])[-+]?\d+(?:[.,/:]\d+)*(?:-\d+(?:[.,/:]\d+)*)*(?![\w-])",  # -3.5 1,000 20-25 4/22 4:02
            r"\w+(?:[-./]\w+)*",
            r"\.\.\.",
            r"--",
            r"[^\w\s]",
        ]
    )
)


def ptb_like_tokenize(text: str) -> list[str]:
    """Lowercase, split roughly as the Penn Treebank tokenizer does, drop punctuation tokens.

    >>> ptb_like_tokenize("Alimentum isn't family-friendly, it's near Burger King (£20-25).")
    ['alimentum', 'is', "n't", 'family-friendly', 'it', "'s", 'near', 'burger', 'king', '-lrb-', '#', '20-25', '-rrb-']
    """
    text = text.lower().replace("&amp;", "&").replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">")
    return [_PTB_SYMBOL.get(t, t) for t in _TOKEN.findall(text) if t not in _PUNCT]


def _ngram_counts(tokens: Sequence[str], max_n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for n in range(1, max_n + 1) for i in range(len(tokens) - n + 1))


def cider_d(
    hyps: Sequence[str],
    refs: Sequence[Sequence[str]],
    *,
    max_n: int = 4,
    sigma: float = 6.0,
    tokenized: bool = False,
) -> float:
    """Corpus CIDEr-D (see the module docstring); the IDF comes from the references of these segments.

    Parameters
    ----------
    hyps : sequence of str
        One output per segment (token lists when ``tokenized``).
    refs : sequence of sequence of str
        The references of each segment.
    """
    refs = check_corpus(hyps, refs)
    tok = (lambda x: list(x)) if tokenized else ptb_like_tokenize
    hyp_c = [_ngram_counts(tok(h), max_n) for h in hyps]
    ref_c = [[_ngram_counts(tok(r), max_n) for r in rs] for rs in refs]

    df: Counter = Counter()
    for rcs in ref_c:
        df.update(set().union(*rcs))
    log_n = math.log(len(refs))

    def vec(c: Counter):
        v = [dict() for _ in range(max_n)]
        norm = [0.0] * max_n
        for g, tf in c.items():
            w = tf * (log_n - math.log(max(1.0, df[g])))
            v[len(g) - 1][g] = w
            norm[len(g) - 1] += w * w
        bigrams = sum(tf for g, tf in c.items() if len(g) == 2)
        return v, [math.sqrt(x) for x in norm], bigrams

    def sim(h, r) -> list[float]:
        (vh, nh, lh), (vr, nr, lr) = h, r
        penalty = math.exp(-((lh - lr) ** 2) / (2 * sigma**2))
        out = []
        for n in range(max_n):
            s = sum(min(w, vr[n].get(g, 0.0)) * vr[n].get(g, 0.0) for g, w in vh[n].items())
            out.append(s / (nh[n] * nr[n]) * penalty if nh[n] and nr[n] else 0.0)
        return out

    total = 0.0
    for hc, rcs in zip(hyp_c, ref_c, strict=True):
        h = vec(hc)
        per_n = [0.0] * max_n
        for rc in rcs:
            per_n = [a + b for a, b in zip(per_n, sim(h, vec(rc)), strict=True)]
        total += 10.0 * sum(per_n) / max_n / len(rcs)
    return total / len(hyps)


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l_coco(
    hyps: Sequence[str], refs: Sequence[Sequence[str]], *, beta: float = 1.2, tokenized: bool = False
) -> float:
    """Corpus ROUGE-L of coco-caption (as the E2E scorer reports it), in [0, 1]; see the module docstring."""
    refs = check_corpus(hyps, refs)
    tok = (lambda x: list(x)) if tokenized else ptb_like_tokenize
    total = 0.0
    for h, rs in zip(hyps, refs, strict=True):
        ht = tok(h)
        p = r = 0.0
        for ref in rs:
            rt = tok(ref)
            lcs = _lcs(ht, rt)
            if ht:
                p = max(p, lcs / len(ht))
            if rt:
                r = max(r, lcs / len(rt))
        if p and r:
            total += (1 + beta**2) * p * r / (r + beta**2 * p)
    return total / len(hyps)
