"""prefixrt.tasks metrics: known values, the E2E scorer's settings, multi-reference grouping, reports."""

from __future__ import annotations

import json
import math
import re
from collections import Counter

import pytest

from prefixrt.tasks import (
    NOT_COMPUTED,
    bleu,
    chrf,
    cider_d,
    collapse,
    format_markdown_table,
    load_e2e_csv,
    mean_std,
    nist,
    rouge,
    rouge_l_coco,
    score,
    ter,
    write_e2e_scorer_files,
    write_scores,
)
from prefixrt.tasks.coco import ptb_like_tokenize

# ----------------------------------------------------------------------------------------------------------------
# the official E2E scorer's example: 10 outputs, their references blank-line separated


def read_scorer_refs(path) -> list[list[str]]:
    """The E2E scorer's reference format: one reference per line, sources separated by a blank line."""
    groups: list[list[str]] = [[]]
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            groups[-1].append(line)
        elif groups[-1]:
            groups.append([])
    return [g for g in groups if g]


@pytest.fixture(scope="module")
def scorer_example(shared_data):
    d = shared_data / "e2e-metrics-example"
    hyps = [line.strip() for line in (d / "baseline-output.txt").read_text(encoding="utf-8").splitlines()]
    refs = read_scorer_refs(d / "devel-conc.txt")
    assert len(hyps) == len(refs) == 10
    assert sorted({len(r) for r in refs}) != [len(refs[0])]  # variable reference counts: None padding matters
    return hyps, refs


def mteval_bleu(hyps, refs) -> float:
    """An independent oracle: mteval-v13a BLEU (lowercased), written from the script's definition.

    Tokenization: mteval-v13a's language-dependent rules; n-gram counts clipped by the maximum count in any one
    reference; the reference length of a segment is the one closest to the hypothesis (ties: the shorter).
    """

    def tok(s: str) -> list[str]:
        s = f" {s.lower()} "
        s = re.sub(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])", r" \1 ", s)
        s = re.sub(r"([^0-9])([\.,])", r"\1 \2 ", s)
        s = re.sub(r"([\.,])([^0-9])", r" \1 \2", s)
        s = re.sub(r"([0-9])(-)", r"\1 \2 ", s)
        return s.split()

    hits, totals, sys_len, ref_len = [0] * 4, [0] * 4, 0, 0
    for h, rs in zip(hyps, refs, strict=True):
        ht, rts = tok(h), [tok(r) for r in rs]
        sys_len += len(ht)
        ref_len += min((abs(len(r) - len(ht)), len(r)) for r in rts)[1]
        for n in range(1, 5):
            hc = Counter(tuple(ht[i : i + n]) for i in range(len(ht) - n + 1))
            mx: Counter = Counter()
            for r in rts:
                mx |= Counter(tuple(r[i : i + n]) for i in range(len(r) - n + 1))
            hits[n - 1] += sum(min(c, mx[g]) for g, c in hc.items())
            totals[n - 1] += max(len(ht) - n + 1, 0)
    logp = sum(math.log(h / t) for h, t in zip(hits, totals, strict=True)) / 4
    bp = 1.0 if sys_len > ref_len else math.exp(1 - ref_len / sys_len)
    return 100 * bp * math.exp(logp)


def test_e2e_bleu_is_the_documented_sacrebleu_setting(scorer_example):
    import sacrebleu

    hyps, refs = scorer_example
    width = max(len(r) for r in refs)
    streams = [[r[j] if j < len(r) else None for r in refs] for j in range(width)]
    direct = sacrebleu.corpus_bleu(hyps, streams, lowercase=True, tokenize="13a").score
    assert bleu(hyps, refs) == direct
    assert bleu(hyps, refs) == pytest.approx(mteval_bleu(hyps, refs), abs=1e-9)
    assert 50 < direct < 95  # a real, non-degenerate score (72.03 with sacrebleu 2.6)
    # the setting matters: case-sensitive BLEU differs on this example
    assert sacrebleu.corpus_bleu(hyps, streams, tokenize="13a").score != pytest.approx(direct)


def test_coco_metrics_match_the_official_pipeline(scorer_example):
    # Fixed expectations computed once with pycocoevalcap 1.2 (the coco-caption code the E2E scorer ships) and its
    # Java Stanford PTBTokenizer on these files: CIDEr 2.303943135258847, ROUGE_L 0.7909526131515365.
    hyps, refs = scorer_example
    assert cider_d(hyps, refs) == pytest.approx(2.303943135258847, abs=1e-12)
    assert rouge_l_coco(hyps, refs) == pytest.approx(0.7909526131515365, abs=1e-12)


def test_nist_matches_the_e2e_scorer_algorithm(scorer_example):
    # The E2E scorer's own NIST (metrics/pymteval.py, restated line by line in a scratch script) gives
    # 7.7888876095555775 on these files.
    hyps, refs = scorer_example
    assert nist(hyps, refs) == pytest.approx(7.7888876095555775, abs=1e-9)


@pytest.mark.parametrize(
    ("text", "ptb"),
    [  # the Stanford PTBTokenizer's output as coco-caption post-processes it (lowercased, punctuation dropped)
        (
            "The Golden Palace is a highly rated Chinese coffee shop in the riverside area that ranges  £20-25.",
            "the golden palace is a highly rated chinese coffee shop in the riverside area that ranges # 20-25",
        ),
        (
            "Alimentum looks like a location where people or families aren't allowed",
            "alimentum looks like a location where people or families are n't allowed",
        ),
        (
            "Holy Moly samples Border Song (Holy Moses) by Aretha Franklin.",
            "holy moly samples border song -lrb- holy moses -rrb- by aretha franklin",
        ),
        ("Albany, Oregon is in the U.S.", "albany oregon is in the u.s."),
        ("James O'Connor is the incumbent in louisiana.", "james o'connor is the incumbent in louisiana"),
        (
            'A highly rated coffee shop "The Punter" serving English food priced between £20 - £25 and is child friendly',
            "a highly rated coffee shop the punter serving english food priced between # 20 # 25 and is child friendly",
        ),
        (
            "The AIDS journal was published by Lippincott, Williams &amp; Wilkins in the UK.",
            "the aids journal was published by lippincott williams & wilkins in the uk",
        ),
        (
            "The runway length of Alpena County Regional Airport is 1,533.",
            "the runway length of alpena county regional airport is 1,533",
        ),
        ("It is in the city center., near Burger King.", "it is in the city center. near burger king"),
    ],
)
def test_ptb_like_tokenizer(text, ptb):
    assert " ".join(ptb_like_tokenize(text)) == ptb


# ----------------------------------------------------------------------------------------------------------------
# maxima and hand-computed values


def test_identical_hypotheses_and_references_give_the_maximum():
    refs = [
        ["the vaults is a pub near the river ."],
        ["blue spice serves french food in the city centre ."],
        ["aromi is a family friendly coffee shop ."],
    ]
    hyps = [r[0] for r in refs]
    assert bleu(hyps, refs) == pytest.approx(100.0)
    assert chrf(hyps, refs) == pytest.approx(100.0)
    assert ter(hyps, refs) == 0.0
    assert rouge(hyps, refs) == {"ROUGE_1": 100.0, "ROUGE_2": 100.0, "ROUGE_L": 100.0}
    assert rouge_l_coco(hyps, refs) == pytest.approx(1.0)
    assert cider_d(hyps, refs) == pytest.approx(10.0)
    other = ["a pub .", "french food here .", "coffee shop aromi ."]
    assert nist(hyps, refs) > nist(other, refs)
    assert bleu(other, refs) < 100 and ter(other, refs) > 0 and cider_d(other, refs) < 10


def test_nist_hand_computed():
    # one segment, hypothesis = reference = "a b": info(a) = info(b) = log2(2/1) = 1, info(a b) = log2(1/1) = 0
    assert nist(["a b"], [["a b"]]) == pytest.approx(1.0)
    # reference "a a b", hypothesis "a b": counts () 3, a 2, b 1, (a a) 1, (a b) 1
    # unigrams: (log2(3/2) + log2(3/1)) / 2; bigram (a b): log2(2/1) = 1, over 1 bigram;
    # length 2/3 of the reference: the penalty is exactly 0.5
    expected = 0.5 * (math.log2(4.5) / 2 + 1.0)
    assert nist(["a b"], [["a a b"]]) == pytest.approx(expected)


def test_cider_hand_computed():
    # two segments; unigram/bigram idf = log(2) - log(1) for all n-grams (each in one segment); orders 3, 4 empty.
    # segment 1 "a b" vs "a b": cosine 1 for n = 1, 2 -> 10 * (1 + 1 + 0 + 0) / 4 = 5
    # segment 2 "c x" vs "c d": unigram min(c)*c / (sqrt(2) * sqrt(2)) = 0.5, bigram 0 -> 10 * 0.5 / 4 = 1.25
    assert cider_d(["a b", "c x"], [["a b"], ["c d"]]) == pytest.approx((5 + 1.25) / 2)


def test_rouge_best_reference_per_source():
    out = rouge(["the cat sat"], [["a dog ran far away", "the cat sat"]], ("rougeL",), use_stemmer=False)
    assert out == {"ROUGE_L": 100.0}


# ----------------------------------------------------------------------------------------------------------------
# multi-reference grouping


def test_references_are_grouped_by_source(shared_data):
    sources = collapse(load_e2e_csv(shared_data / "e2e" / "devset.csv"))
    refs = [list(s.refs) for s in sources]
    # each output is its source's *last* reference: a perfect score only if every source is scored against all
    # of its own references (not only the first, not another source's, not one row per reference)
    hyps = [r[-1] for r in refs]
    assert bleu(hyps, refs) == pytest.approx(100.0)
    assert bleu(hyps, [[r[0]] for r in refs]) < 60
    shifted = refs[1:] + refs[:1]
    assert bleu(hyps, shifted) < 60


def test_variable_reference_counts():
    # source 0 has three references, source 1 one: the streams are padded with None, not with a reference
    hyps = ["x y z w v", "p q r s t"]
    refs = [["a b c d e", "f g h i j", "x y z w v"], ["p q r s t"]]
    assert bleu(hyps, refs) == pytest.approx(100.0)
    assert ter(hyps, refs) == 0.0 and chrf(hyps, refs) == pytest.approx(100.0)
    # a short output of a one-reference source: padding with "" would make "" its closest reference (length 0)
    # and drop the brevity penalty; None padding keeps the mteval value
    hyps, refs = ["a b c d", "a b"], [["a b c d", "a b c d e"], ["a b c d"]]
    assert bleu(hyps, refs) == pytest.approx(mteval_bleu(hyps, refs), abs=1e-9)
    assert bleu(hyps, refs) < 0.9 * bleu(hyps, [refs[0], refs[1] + [""]])


# ----------------------------------------------------------------------------------------------------------------
# score() and bad input


def test_score_per_task_kind(scorer_example):
    hyps, refs = scorer_example
    t2t = score("table-to-text", hyps, refs)
    assert list(t2t) == ["BLEU", "NIST", "CIDEr", "ROUGE_L_coco", "ROUGE_L", "TER", "chrF"]
    assert t2t["BLEU"] == bleu(hyps, refs) and t2t["ROUGE_L_coco"] == pytest.approx(79.09526131515365)
    assert "METEOR" not in t2t and "METEOR" in NOT_COMPUTED
    assert list(score("summarization", hyps, refs)) == ["ROUGE_1", "ROUGE_2", "ROUGE_L"]


@pytest.mark.parametrize(
    ("hyps", "refs", "match"),
    [
        (["a"], [["a"], ["b"]], "1 hypotheses but 2 reference lists"),
        ([], [], "no hypotheses"),
        (["a", "b"], [["a"], []], "segment 1 has no reference"),
        (["a"], ["a"], "references of segment 0 are a string"),
        ("a", [["a"]], "not a string"),
    ],
)
@pytest.mark.parametrize("metric", [bleu, nist, cider_d, rouge_l_coco, ter, chrf, rouge])
def test_bad_input(metric, hyps, refs, match):
    with pytest.raises(ValueError, match=match):
        metric(hyps, refs)


def test_unknown_task_kind():
    with pytest.raises(ValueError, match="task_kind must be one of"):
        score("translation", ["a"], [["a"]])


# ----------------------------------------------------------------------------------------------------------------
# reports


def test_write_scores(tmp_path):
    scores = {"BLEU": 70.123, "NIST": 8.5}
    json_path, md_path = write_scores(tmp_path / "out", "e2e", scores, meta={"beam": 5})
    data = json.loads(json_path.read_text())
    assert data["scores"] == scores and data["meta"] == {"beam": 5} and "METEOR" in data["not_computed"]
    md = md_path.read_text()
    assert "| task | BLEU | NIST |" in md and "| e2e | 70.12 | 8.50 |" in md and "METEOR" in md
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "e2e.json",
        "e2e.md",
    ]  # no temp files left


def test_markdown_table_union_of_columns():
    table = format_markdown_table({"a": {"BLEU": 1.0}, "b": {"BLEU": 2.0, "TER": None}}, note=False)
    assert table.splitlines() == [
        "| task | BLEU | TER |",
        "| --- | ---: | ---: |",
        "| a | 1.00 | n/a |",
        "| b | 2.00 | n/a |",
    ]


def test_mean_std():
    out = mean_std([{"BLEU": 60.0, "NIST": 8.0}, {"BLEU": 64.0}])
    assert out["BLEU"] == {"mean": 62.0, "std": pytest.approx(math.sqrt(8.0)), "n": 2.0}
    assert out["NIST"] == {"mean": 8.0, "std": 0.0, "n": 1.0}


def test_e2e_scorer_files_round_trip(tmp_path, scorer_example):
    hyps, refs = scorer_example
    hyp_path, ref_path = write_e2e_scorer_files(tmp_path, hyps, refs)
    assert hyp_path.read_text().splitlines() == hyps
    assert read_scorer_refs(ref_path) == refs
    with pytest.raises(ValueError, match="contains a newline"):
        write_e2e_scorer_files(tmp_path, ["a\nb"], [["a"]])
