"""prefixrt.tasks data layer: loaders on the real files in ../shared/data, layouts, batches, low-data draws."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
from torch.utils.data import DataLoader

from prefixrt.tasks import (
    Collator,
    DataFormatError,
    Example,
    MixedTaskBatchSampler,
    MixedTaskDataset,
    collapse,
    decode_generated,
    encode_causal,
    encode_examples,
    encode_prompt,
    encode_seq2seq,
    guess_format,
    layout_for,
    linearize_e2e_mr,
    linearize_triples,
    load_dart,
    load_e2e_csv,
    load_examples,
    load_jsonl,
    load_triples_json,
    load_triples_xml,
    load_webnlg,
    pad_token_id_for,
    parse_e2e_mr,
    references,
    subsample,
)

# ----------------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def e2e_dev(shared_data):
    return load_e2e_csv(shared_data / "e2e" / "devset.csv")


@pytest.fixture(scope="module")
def gpt2_tok(shared_data):
    from transformers import GPT2TokenizerFast

    return GPT2TokenizerFast.from_pretrained(str(shared_data / "gpt2-tokenizer"))


@pytest.fixture(scope="module")
def bart_tok(shared_data):
    from transformers import BartTokenizer

    return BartTokenizer.from_pretrained(str(shared_data / "bart-tokenizer"))


WEBNLG_XML = """<?xml version='1.0' encoding='utf-8'?>
<benchmark><entries>
  <entry category="Airport" eid="Id1" size="2">
    <modifiedtripleset>
      <mtriple>Aarhus_Airport | cityServed | "Aarhus, Denmark"</mtriple>
      <mtriple>Aarhus_Airport | elevationAboveTheSeaLevel | 25.0</mtriple>
    </modifiedtripleset>
    <lex comment="good" lid="Id1">Aarhus Airport serves Aarhus, Denmark, 25 metres above sea level.</lex>
    <lex comment="bad" lid="Id2">garbled</lex>
    <lex comment="good" lid="Id3"><text>Aarhus airport is 25 m above the sea.</text><template>x</template></lex>
  </entry>
  <entry category="Airport" eid="Id2" size="1">
    <modifiedtripleset><mtriple>Abilene | isPartOf | Texas</mtriple></modifiedtripleset>
    <lex comment="good" lid="Id1">Abilene is in Texas.</lex>
  </entry>
</entries></benchmark>
"""


# ----------------------------------------------------------------------------------------------------------------
# linearization


def test_e2e_mr_linearization():
    mr = "name[The Vaults], eatType[pub], priceRange[more than £30], customer rating[5 out of 5], near[Café Adriatic]"
    assert parse_e2e_mr(mr)[3] == ("customer rating", "5 out of 5")
    assert linearize_e2e_mr(mr) == (
        "name : The Vaults | eatType : pub | priceRange : more than £30 | customer rating : 5 out of 5 | "
        "near : Café Adriatic"
    )


@pytest.mark.parametrize(
    "bad", ["", "name The Vaults", "name[The Vaults] eatType[pub]", "name[The Vaults], x"]
)
def test_e2e_mr_malformed(bad):
    with pytest.raises(ValueError, match="malformed E2E MR"):
        parse_e2e_mr(bad)


def test_triple_linearization_options():
    t = [("A", "BIRTH_PLACE", "B"), ("A", "team", "C")]
    assert linearize_triples(t) == "A : BIRTH_PLACE : B | A : team : C"
    assert linearize_triples(t, lowercase_property=True) == "A : birth_place : B | A : team : C"
    assert linearize_triples(t, leading_separator=True) == " | A : BIRTH_PLACE : B | A : team : C"
    with pytest.raises(ValueError, match="3 fields"):
        linearize_triples([("A", "B")])


# ----------------------------------------------------------------------------------------------------------------
# loaders on the real files


def test_e2e_devset(e2e_dev):
    assert len(e2e_dev) == 4672
    sources = collapse(e2e_dev)
    assert len(sources) == 547
    assert sum(len(s.refs) for s in sources) == 4672
    first = e2e_dev[0]
    assert first.group == "name[Alimentum], area[city centre], familyFriendly[no]"
    assert first.src == "name : Alimentum | area : city centre | familyFriendly : no"
    assert first.tgt == "There is a place in the city centre, Alimentum, that is not family-friendly."
    # the first six rows share that MR: one group, six references, every row carries all six
    assert len(first.refs) == 6 and all(ex.refs == first.refs for ex in e2e_dev[:6])
    assert [ex.tgt for ex in e2e_dev[:6]] == list(first.refs)
    assert e2e_dev[6].group != first.group
    assert sources[0] == Example(first.src, first.refs[0], first.refs, first.group)


def test_e2e_testset(shared_data):
    rows = load_e2e_csv(shared_data / "e2e" / "testset_w_refs.csv")
    assert len(rows) == 4693
    assert len(collapse(rows)) == 630
    assert rows[0].src == "name : Blue Spice | eatType : coffee shop | area : city centre"
    assert load_examples(shared_data / "e2e" / "testset_w_refs.csv") == rows


def test_dart_json(shared_data):
    rows = load_dart(shared_data / "dart" / "dart-v1.1.1-full-dev.json")
    assert len(rows) == 6980 and len(collapse(rows)) == 2768
    # properties lowercased, as the original prefix-tuning code does for DART
    assert (
        rows[0].src
        == "Mars Hill College : joined : 1973 | Mars Hill College : location : Mars Hill, North Carolina"
    )
    assert rows[0].tgt == "A school from Mars Hill, North Carolina, joined in 1973."
    assert guess_format(shared_data / "dart" / "dart-v1.1.1-full-dev.json") == "dart"


def test_dart_test_xml(shared_data):
    rows = load_dart(shared_data / "dart" / "dart-v1.1.1-full-test.xml")
    sources = collapse(rows)
    # 5,097 entries with 12,552 <lex>; one of them (entry Id116) is empty and is skipped
    assert len(sources) == 5097 and len(rows) == 12551
    assert sources[0].group == "Id1"
    assert sources[0].src == (
        "Hawaii Five-O : notes : Episode: The Flight of the Jewels | [TABLECONTEXT] : [title] : Jeff Daniels | "
        "[TABLECONTEXT] : title : Hawaii Five-O"
    )
    assert guess_format(shared_data / "dart" / "dart-v1.1.1-full-test.xml") == "dart"


def test_webnlg_xml_file_and_directory(tmp_path):
    (tmp_path / "a").mkdir()
    f = tmp_path / "a" / "2triples_Airport.xml"
    f.write_text(WEBNLG_XML, encoding="utf-8")
    rows = load_webnlg(f)
    assert [r.tgt for r in rows] == [
        "Aarhus Airport serves Aarhus, Denmark, 25 metres above sea level.",
        "Aarhus airport is 25 m above the sea.",  # nested <text> (WebNLG 2.x); the "bad" text is dropped
        "Abilene is in Texas.",
    ]
    assert (
        rows[0].src
        == ' | Aarhus_Airport : cityServed : "Aarhus, Denmark" | Aarhus_Airport : elevationAboveTheSeaLevel : 25.0'
    )
    assert len(collapse(rows)) == 2 and rows[0].refs == (rows[0].tgt, rows[1].tgt)
    assert len(load_triples_xml(f)) == 4  # no comment filter: all texts
    (tmp_path / "b.xml").write_text(WEBNLG_XML.replace("Abilene", "Austin"), encoding="utf-8")
    both = load_examples(tmp_path)  # a directory: every *.xml, ids prefixed by the file
    assert len(both) == 6 and len(collapse(both)) == 4
    assert {r.group for r in both} == {
        "a/2triples_Airport.xml:Id1",
        "a/2triples_Airport.xml:Id2",
        "b.xml:Id1",
        "b.xml:Id2",
    }


def test_triples_json_records(tmp_path):
    f = tmp_path / "webnlg.json"
    f.write_text(
        json.dumps([{"triples": [["A", "p", "B"]], "texts": ["A p B.", "B is A's p."]}]), encoding="utf-8"
    )
    rows = load_triples_json(f)
    assert [(r.src, r.tgt, r.group) for r in rows] == [
        ("A : p : B", "A p B.", "0"),
        ("A : p : B", "B is A's p.", "0"),
    ]
    assert load_examples(f)[0].src == " | A : p : B"  # .json without "tripleset" -> WebNLG defaults


def test_jsonl(tmp_path):
    f = tmp_path / "sum.jsonl"
    lines = [
        {"src": "doc one", "tgt": "sum one"},
        {"src": "doc two", "tgt": ["sum two a", "sum two b"]},
        {"src": "doc one", "tgt": "sum one bis"},  # same source: joins the first line's group
        {"src": "doc three"},
    ]
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n", encoding="utf-8")
    rows = load_jsonl(f)
    assert [r.tgt for r in rows] == ["sum one", "sum two a", "sum two b", "sum one bis", None]
    assert rows[0].refs == ("sum one", "sum one bis")
    assert references(rows) == [["sum one", "sum one bis"], ["sum two a", "sum two b"], []]
    assert load_examples(f) == rows


def test_hub_name_uses_datasets_lazily(monkeypatch):
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return [
            {"meaning_representation": "name[A], eatType[pub]", "human_reference": "A is a pub."},
            {"meaning_representation": "name[A], eatType[pub]", "human_reference": "The pub A."},
        ]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    rows = load_examples("e2e_nlg", split="validation")
    assert calls == [("e2e_nlg", None, "validation")]
    assert rows[0].src == "name : A | eatType : pub" and rows[1].refs == ("A is a pub.", "The pub A.")


def test_hub_name_without_datasets_or_network(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    with pytest.raises(ImportError, match="needs the 'datasets' package"):
        load_examples("EdinburghNLP/xsum")

    def offline(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(RuntimeError, match="could not load Hugging Face dataset 'EdinburghNLP/xsum'.*online"):
        load_examples("EdinburghNLP/xsum")


# ----------------------------------------------------------------------------------------------------------------
# bad input: every error names the file and what was expected


def test_missing_files(tmp_path):
    for loader, name in [
        (load_e2e_csv, "x.csv"),
        (load_dart, "x.json"),
        (load_webnlg, "x.xml"),
        (load_jsonl, "x.jsonl"),
    ]:
        with pytest.raises(FileNotFoundError, match=rf"{name}: not found; expected"):
            loader(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="not found; expected a data file"):
        load_examples(tmp_path / "nope.csv")


@pytest.mark.parametrize(
    ("name", "content", "loader", "match"),
    [
        (
            "h.csv",
            "meaning,text\r\nname[A],A.\r\n",
            load_e2e_csv,
            r"header \['meaning', 'text'\]; expected an E2E CSV",
        ),
        (
            "f.csv",
            'mr,ref\r\n"name[A]","A.",extra\r\n',
            load_e2e_csv,
            r"line 2: 3 fields .* expected 2 \(mr,ref\)",
        ),
        ("m.csv", 'mr,ref\r\n"name A","A."\r\n', load_e2e_csv, r"malformed E2E MR 'name A'"),
        (
            "j.json",
            '[{"tripleset": [["a", "b", "c"]], "annotations": [',
            load_dart,
            r"not valid JSON .*expected a JSON list",
        ),
        ("o.json", '{"tripleset": []}', load_dart, r"top level is dict; expected a JSON list"),
        (
            "t.json",
            '[{"tripleset": [["a", "b"]], "annotations": []}]',
            load_dart,
            r"entry 0: a triple must have 3 fields",
        ),
        ("x.xml", "<benchmark><entry>", load_webnlg, r"not well-formed XML .*expected a WebNLG/DART XML"),
        ("e.xml", "<benchmark></benchmark>", load_webnlg, r"no <entry> element"),
        (
            "q.xml",
            "<b><entry><mtriple>a | b</mtriple></entry></b>",
            load_webnlg,
            r"entry 0: <mtriple> 'a \| b'; expected 'subject \| property \| object'",
        ),
        (
            "l.jsonl",
            '{"src": "a", "tgt": "b"}\n{"src": 3}\n',
            load_jsonl,
            r"line 2: .* expected a JSON-lines file",
        ),
        ("n.jsonl", '{"src": "a", "tgt": "b"}\nnot json\n', load_jsonl, r"line 2: not valid JSON"),
    ],
)
def test_malformed_files(tmp_path, name, content, loader, match):
    f = tmp_path / name
    f.write_text(content, encoding="utf-8")
    with pytest.raises(DataFormatError, match=match) as info:
        loader(f)
    assert str(f) in str(info.value)


# ----------------------------------------------------------------------------------------------------------------
# grouping and low-data draws


def test_collapse_merges_rows_and_rejects_conflicts():
    rows = [Example("s", "a", ("a",), "g"), Example("t", "x", ("x",), "h"), Example("s", "b", ("b",), "g")]
    assert collapse(rows) == [Example("s", "a", ("a", "b"), "g"), Example("t", "x", ("x",), "h")]
    with pytest.raises(ValueError, match="two different sources"):
        collapse([Example("s", "a", ("a",), "g"), Example("other", "b", ("b",), "g")])


def test_subsample_reproducible(e2e_dev):
    a, b = subsample(e2e_dev, 10, seed=1), subsample(e2e_dev, 10, seed=1)
    assert a == b
    assert len(collapse(a)) == 10
    groups = {ex.group for ex in a}
    assert a == [ex for ex in e2e_dev if ex.group in groups]  # every row of each drawn source, in file order
    assert {ex.group for ex in subsample(e2e_dev, 10, seed=2)} != groups
    with pytest.raises(ValueError, match="between 1 and the number of sources \\(547\\)"):
        subsample(e2e_dev, 548, seed=0)


# ----------------------------------------------------------------------------------------------------------------
# layouts


def test_gpt2_layout(gpt2_tok, e2e_dev):
    ex = e2e_dev[0]
    row = encode_causal(ex.src, ex.tgt, gpt2_tok)
    src_ids = gpt2_tok.encode(" " + ex.src)
    tgt_ids = gpt2_tok.encode(ex.tgt)
    assert row.input_ids == [*src_ids, 50256, *tgt_ids, 50256]
    n_src = len(src_ids) + 1  # source and the <bos> separator
    assert row.labels[:n_src] == [-100] * n_src
    assert row.labels[n_src:] == [*tgt_ids, 50256]  # loss on the target and <eos> only
    assert gpt2_tok.decode(row.input_ids) == f" {ex.src}<|endoftext|>{ex.tgt}<|endoftext|>"
    prompt = encode_prompt(ex.src, gpt2_tok)
    assert prompt.labels is None and prompt.input_ids == row.input_ids[:n_src]
    short = encode_causal(ex.src, ex.tgt, gpt2_tok, max_source_tokens=3, max_target_tokens=2)
    assert short.input_ids == [*src_ids[:3], 50256, *tgt_ids[:2], 50256]


def test_bart_layout(bart_tok):
    row = encode_seq2seq("name : A | food : Thai", "A serves Thai food.", bart_tok)
    assert row.input_ids[0] == 0 and row.input_ids[-1] == 2
    assert row.labels[0] == 0 and row.labels[-1] == 2
    assert bart_tok.decode(row.labels, skip_special_tokens=True) == "A serves Thai food."
    assert len(encode_seq2seq("a b c d e f g", "x y z", bart_tok, max_source_tokens=4).input_ids) == 4
    assert encode_seq2seq("a", None, bart_tok).labels is None


def test_decode_generated_inverts_the_layouts(gpt2_tok, bart_tok, e2e_dev):
    # causal: a left-padded prompt batch, then the continuation, its <eos>, and padding after it
    sources = collapse(e2e_dev)[:2]
    prompts = encode_examples(sources, gpt2_tok, "causal", prompts=True)
    batch = Collator(50256, padding_side="left")(prompts)
    width = batch["input_ids"].shape[1]
    conts = [gpt2_tok.encode(s.tgt) + [50256] for s in sources]
    tail = max(len(c) for c in conts) + 2
    seqs = torch.full((2, width + tail), 50256)
    seqs[:, :width] = batch["input_ids"]
    for i, c in enumerate(conts):
        seqs[i, width : width + len(c)] = torch.tensor(c)
    assert decode_generated(seqs, gpt2_tok, "causal", prompt_width=width) == [s.tgt for s in sources]
    # seq2seq: decoder start </s>, <s>, the text, </s>, <pad>
    ids = bart_tok("A serves Thai food.")["input_ids"]
    assert decode_generated([[2, *ids, 1, 1]], bart_tok, "seq2seq") == ["A serves Thai food."]


def test_layout_for():
    from transformers import BartConfig, GPT2Config

    assert layout_for(GPT2Config()) == "causal" and layout_for(BartConfig()) == "seq2seq"


def test_encode_examples_needs_targets(gpt2_tok):
    with pytest.raises(ValueError, match="has no target"):
        encode_examples([Example("s", None, (), "g")], gpt2_tok, "causal")
    with pytest.raises(ValueError, match="layout must be one of"):
        encode_examples([], gpt2_tok, "decoder")


# ----------------------------------------------------------------------------------------------------------------
# batches


def test_collate_causal_right_padding(gpt2_tok, e2e_dev):
    rows = encode_examples(e2e_dev[:3], gpt2_tok, "causal", task="e2e")
    pad = pad_token_id_for(gpt2_tok)
    assert pad == 50256
    batch = Collator(pad, task_ids={"e2e": 4})(rows)
    B, T = batch["input_ids"].shape
    assert B == 3 and T == max(len(r.input_ids) for r in rows)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        assert batch["input_ids"][i, :n].tolist() == r.input_ids
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (T - n)
        assert batch["labels"][i].tolist() == r.labels + [-100] * (T - n)
        # -100 exactly on source, separator and padding
        sep = r.input_ids.index(50256)
        assert (batch["labels"][i] == -100).nonzero().flatten().tolist() == [*range(sep + 1), *range(n, T)]
    assert batch["task_ids"].tolist() == [4, 4, 4] and batch["task_ids"].dtype == torch.long
    assert batch["groups"] == [r.group for r in rows]


def test_collate_prompts_left_padding(gpt2_tok, e2e_dev):
    sources = collapse(e2e_dev)[:4]
    rows = encode_examples(sources, gpt2_tok, "causal", prompts=True, task="e2e")
    batch = Collator(50256, padding_side="left", task_ids={"e2e": 0})(rows)
    assert "labels" not in batch
    assert batch["input_ids"][:, -1].tolist() == [50256] * 4  # every prompt ends with the separator
    assert batch["attention_mask"][:, -1].tolist() == [1] * 4
    for i, r in enumerate(rows):
        assert batch["input_ids"][i, -len(r.input_ids) :].tolist() == r.input_ids
        assert int(batch["attention_mask"][i].sum()) == len(r.input_ids)


def test_collate_seq2seq(bart_tok):
    rows = [
        encode_seq2seq("short", "a much longer target sentence here", bart_tok, task="xsum"),
        encode_seq2seq("a much longer source document sentence", "tiny", bart_tok, task="e2e"),
    ]
    batch = Collator(pad_token_id_for(bart_tok), layout="seq2seq", task_ids={"e2e": 0, "xsum": 1})(rows)
    assert batch["input_ids"][0, len(rows[0].input_ids) :].eq(1).all()  # BART <pad> = 1
    assert batch["labels"].shape[1] == len(rows[0].labels)
    assert batch["labels"][1].tolist() == rows[1].labels + [-100] * (
        len(rows[0].labels) - len(rows[1].labels)
    )
    assert batch["task_ids"].tolist() == [1, 0]


def test_collate_errors(gpt2_tok):
    from prefixrt.tasks import Encoded

    c = Collator(0, task_ids={"e2e": 0})
    with pytest.raises(KeyError, match=r"task\(s\) \['dart'\] have no id"):
        c([Encoded([1, 2], [1, 2], "dart")])
    with pytest.raises(ValueError, match="mixes rows with and without labels"):
        c([Encoded([1], [1], "e2e"), Encoded([1], None, "e2e")])
    with pytest.raises(ValueError, match="empty batch"):
        c([])


def _rows(task, n):
    from prefixrt.tasks import Encoded

    return [Encoded([i + 1] * (i % 3 + 1), [i + 1] * (i % 3 + 1), None, f"{task}{i}") for i in range(n)]


def test_mixed_task_batches():
    ds = MixedTaskDataset({"e2e": _rows("e", 13), "dart": _rows("d", 7)})
    assert len(ds) == 20 and ds.locate(13) == ("dart", 0)
    assert ds[13].task == "dart" and ds[0].task == "e2e"
    sampler = MixedTaskBatchSampler(len(ds), 4, seed=3)
    epoch0 = list(sampler)
    assert epoch0 == list(MixedTaskBatchSampler(len(ds), 4, seed=3))  # seeded
    assert sorted(i for b in epoch0 for i in b) == list(range(20)) and len(epoch0) == len(sampler) == 5
    sampler.set_epoch(1)
    assert list(sampler) != epoch0
    # the batches mix the tasks, and the collator gives each row its own task id
    loader = DataLoader(
        ds,
        batch_sampler=MixedTaskBatchSampler(len(ds), 4, seed=3),
        collate_fn=Collator(0, task_ids={"e2e": 0, "dart": 1}),
    )
    batches = list(loader)
    assert any(len(set(b["tasks"])) == 2 for b in batches)
    for b in batches:
        assert b["task_ids"].tolist() == [0 if t == "e2e" else 1 for t in b["tasks"]]
        assert all(g.startswith(t[0]) for g, t in zip(b["groups"], b["tasks"], strict=True))


@pytest.mark.parametrize(("n", "world", "drop_last"), [(37, 2, False), (37, 3, True), (17, 4, False)])
def test_sharded_batches_match_one_process(n, world, drop_last):
    one = list(MixedTaskBatchSampler(n, 5 * world, seed=7, drop_last=drop_last))
    ranks = [
        list(MixedTaskBatchSampler(n, 5, seed=7, drop_last=drop_last, rank=r, world_size=world))
        for r in range(world)
    ]
    assert len({len(r) for r in ranks}) == 1 and len(ranks[0]) == len(
        MixedTaskBatchSampler(n, 5, drop_last=drop_last, world_size=world)
    )
    for step, batch in enumerate(one):
        parts = [r[step] for r in ranks]
        assert len({len(p) for p in parts}) == 1  # same rows per process
        if step < len(one) - 1 or drop_last:
            assert sorted(i for p in parts for i in p) == sorted(batch)  # together: the one-process batch
    seen = {i for r in ranks for b in r for i in b}
    assert seen == set(range(n)) if not drop_last else seen <= set(range(n))
