"""``prefixrt eval`` end to end, and the generation/scoring it runs (``prefixrt.train.evaluate``)."""

import json

import pytest
import torch
from support.threads import one_thread  # noqa: F401  (fixture)

import prefixrt
from prefixrt.cli import main
from prefixrt.tasks import collapse, encode_prompt, load_e2e_csv
from prefixrt.train import PrefixTuner
from prefixrt.train.evaluate import Decoding, evaluate_examples
from prefixrt.train.models import load_model_and_tokenizer

TABLE_METRICS = {"BLEU", "NIST", "CIDEr", "ROUGE_L_coco", "ROUGE_L", "TER", "chrF"}
SUMMARY_METRICS = {"ROUGE_1", "ROUGE_2", "ROUGE_L"}


pytestmark = pytest.mark.usefixtures("one_thread")


def make_bank(path, model_name: str, tasks: dict, tokenizer_dir, seed: int = 0) -> None:
    """An untrained bank for a built-in model (random prefixes: the mechanics, not the scores, are under test)."""
    model, _ = load_model_and_tokenizer(model_name, tokenizer=tokenizer_dir)
    PrefixTuner(model, tasks, mid_dim=16, seed=seed).materialize().save(path)


def e2e_rows(shared_data, n: int):
    return load_e2e_csv(shared_data / "e2e" / "testset_w_refs.csv")[:n]


def test_e2e_eval_writes_table_json_and_scorer_files(tmp_path, shared_data):
    bank = tmp_path / "bank.safetensors"
    make_bank(bank, "gpt2-tiny", {"e2e": 4}, shared_data / "gpt2-tokenizer")
    test = shared_data / "e2e" / "testset_w_refs.csv"
    out = tmp_path / "results"
    code = main([
        "eval", "--model", "gpt2-tiny", "--tokenizer", str(shared_data / "gpt2-tokenizer"), "--bank", str(bank),
        "--task", f"e2e={test}", "--max-examples", "4", "--max-new-tokens", "8", "--out", str(out),
        "--no-progress",
    ])  # fmt: skip
    assert code == 0
    record = json.loads((out / "e2e.json").read_text())
    assert set(record["scores"]) == TABLE_METRICS
    assert all(isinstance(v, float) for v in record["scores"].values())
    assert 0.0 <= record["scores"]["BLEU"] <= 100.0 and record["scores"]["TER"] >= 0.0
    sources = collapse(load_e2e_csv(test))[:4]  # the first 4 MRs and all their references
    meta = record["meta"]
    assert meta["kind"] == "table-to-text"
    assert meta["sources"] == 4 and meta["references"] == sum(len(s.refs) for s in sources) > 4
    # The paper's table-to-text decoding unless overridden: beam 5, no length penalty.
    assert meta["decoding"]["num_beams"] == 5 and meta["decoding"]["length_penalty"] == 1.0
    assert meta["decoding"]["max_new_tokens"] == 8
    assert record["runs"][0]["entry"] == "e2e" and set(record["not_computed"]) >= {"METEOR"}
    table = (out / "e2e.md").read_text()
    assert "| task | BLEU | NIST | CIDEr | ROUGE_L_coco | ROUGE_L | TER | chrF |" in table
    assert "| e2e |" in (out / "results.md").read_text()
    assert set(json.loads((out / "results.json").read_text())) == {"e2e"}
    # The official scorer's inputs: one output per source, each source's references blank-line separated.
    assert len((out / "e2e.outputs.txt").read_text().splitlines()) == 4
    blocks = (out / "e2e.outputs-refs.txt").read_text().strip("\n").split("\n\n")
    assert [b.splitlines() for b in blocks] == [list(s.refs) for s in sources]
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temp files


def test_summarization_eval_uses_rouge_and_the_papers_decoding(tmp_path, shared_data):
    data = tmp_path / "xsum.jsonl"
    rows = [
        {"src": f"The council met on day {i}. It voted on roads.", "tgt": f"Council vote {i}."}
        for i in range(3)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bank = tmp_path / "bart.safetensors"
    make_bank(bank, "bart-tiny", {"xsum": 3}, shared_data / "bart-tokenizer")
    out = tmp_path / "results"
    code = main([
        "eval", "--model", "bart-tiny", "--tokenizer", str(shared_data / "bart-tokenizer"), "--bank", str(bank),
        "--task", f"xsum={data}", "--max-new-tokens", "12", "--out", str(out), "--no-progress",
    ])  # fmt: skip
    assert code == 0
    record = json.loads((out / "xsum.json").read_text())
    assert set(record["scores"]) == SUMMARY_METRICS
    decoding = record["meta"]["decoding"]
    assert record["meta"]["kind"] == "summarization" and record["meta"]["max_source_tokens"] == 512
    assert (decoding["num_beams"], decoding["length_penalty"], decoding["min_new_tokens"]) == (6, 0.8, 10)
    assert len((out / "xsum.outputs.txt").read_text().splitlines()) == 3


def test_generates_once_per_unique_source_and_scores_against_all_references(shared_data):
    """A stand-in ``generate`` that answers each prompt with its source's first reference: the outputs must come
    back in the sources' order (they are batched by length) and score BLEU 100 against the grouped references."""
    rows = e2e_rows(shared_data, 60)  # several MRs, each with several reference rows
    sources = collapse(rows)
    assert len(sources) < len(rows)
    model, tokenizer = load_model_and_tokenizer("gpt2-tiny", tokenizer=shared_data / "gpt2-tokenizer")
    answer = {tuple(encode_prompt(s.src, tokenizer).input_ids): s.refs[0] for s in sources}
    seen = []

    def fake_generate(input_ids, attention_mask, **kwargs):
        assert kwargs["num_beams"] == 5 and "prefix_ids" not in kwargs
        out = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
            prompt = tuple(i for i, m in zip(ids, mask, strict=True) if m)
            seen.append(prompt)
            out.append(ids + tokenizer.encode(answer[prompt]) + [tokenizer.eos_token_id])
        width = max(len(r) for r in out)
        return torch.tensor([r + [tokenizer.eos_token_id] * (width - len(r)) for r in out])

    model.generate = fake_generate
    result = evaluate_examples(
        model,
        tokenizer,
        rows,
        "table-to-text",
        prefix_id=None,
        decoding=Decoding.for_kind("table-to-text", batch_size=3),
    )
    assert sorted(seen) == sorted(answer) and len(seen) == len(sources)  # each source once
    assert result.hyps == [" ".join(s.refs[0].split()) for s in sources]  # outputs: one line, single spaces
    assert (
        result.num_references == sum(len(s.refs) for s in sources) >= len(rows)
    )  # all of each source's refs
    assert result.scores["BLEU"] == pytest.approx(100.0) and result.scores["TER"] == pytest.approx(0.0)


def test_several_banks_are_averaged(tmp_path, shared_data):
    banks = []
    for seed in (1, 2):
        banks.append(tmp_path / f"bank.seed{seed}.safetensors")
        make_bank(banks[-1], "gpt2-tiny", {"e2e": 3}, shared_data / "gpt2-tokenizer", seed=seed)
    out = tmp_path / "results"
    code = main([
        "eval", "--model", "gpt2-tiny", "--tokenizer", str(shared_data / "gpt2-tokenizer"),
        "--bank", str(banks[0]), "--bank", str(banks[1]), "--task", f"e2e={shared_data / 'e2e' / 'devset.csv'}",
        "--max-examples", "3", "--num-beams", "1", "--max-new-tokens", "6", "--out", str(out), "--no-progress",
    ])  # fmt: skip
    assert code == 0
    record = json.loads((out / "e2e.json").read_text())
    assert [r["run"] for r in record["runs"]] == ["bank.seed1", "bank.seed2"]
    for metric in TABLE_METRICS:
        values = [r["scores"][metric] for r in record["runs"]]
        assert record["scores"][metric] == pytest.approx(sum(values) / 2)
        assert record["std"][metric] == pytest.approx(abs(values[0] - values[1]) / 2**0.5)
    table = (out / "e2e.md").read_text()
    for row in ("| bank.seed1 |", "| bank.seed2 |", "| mean |", "| std |"):
        assert row in table
    assert (out / "e2e.bank.seed1.outputs.txt").is_file() and (out / "e2e.bank.seed2.outputs.txt").is_file()
    assert "e2e (mean of 2)" in (out / "results.md").read_text()


def test_prefix_entry_choice_and_bad_input(tmp_path, shared_data, capsys):
    bank = tmp_path / "bank.safetensors"
    make_bank(bank, "gpt2-tiny", {"e2e": 3}, shared_data / "gpt2-tokenizer")
    dev = shared_data / "e2e" / "devset.csv"
    base = [
        "eval",
        "--model",
        "gpt2-tiny",
        "--tokenizer",
        str(shared_data / "gpt2-tokenizer"),
        "--bank",
        str(bank),
    ]
    fast = ["--max-examples", "2", "--num-beams", "1", "--max-new-tokens", "4", "--no-progress"]
    # A task named differently from the bank entry, mapped with --prefix; and the same data without a prefix.
    code = main([
        *base, "--task", f"restaurants={dev}", "--prefix", "restaurants=e2e", "--task", f"plain={dev}",
        "--prefix", "plain=none", *fast, "--out", str(tmp_path / "ok"),
    ])  # fmt: skip
    assert code == 0
    runs = {
        n: json.loads((tmp_path / "ok" / f"{n}.json").read_text())["runs"][0]
        for n in ("restaurants", "plain")
    }
    assert runs["restaurants"]["entry"] == "e2e" and runs["plain"]["entry"] is None
    capsys.readouterr()
    assert main([*base, "--task", f"dart={dev}", *fast, "--out", str(tmp_path / "bad")]) == 2
    assert "no entry 'dart'" in capsys.readouterr().err
    assert (
        main([*base, "--task", f"e2e={dev}", "--kind", "e2e=poetry", *fast, "--out", str(tmp_path / "b")])
        == 2
    )
    assert "table-to-text" in capsys.readouterr().err
    missing = tmp_path / "missing.safetensors"
    assert (
        main([*base[:-2], "--bank", str(missing), "--task", f"e2e={dev}", "--out", str(tmp_path / "c")]) == 2
    )
    assert "missing.safetensors" in capsys.readouterr().err


def test_bank_and_model_must_match(tmp_path, shared_data, capsys):
    bank = tmp_path / "bart.safetensors"
    make_bank(bank, "bart-tiny", {"e2e": 3}, shared_data / "bart-tokenizer")
    code = main([
        "eval", "--model", "gpt2-tiny", "--tokenizer", str(shared_data / "gpt2-tokenizer"), "--bank", str(bank),
        "--task", f"e2e={shared_data / 'e2e' / 'devset.csv'}", "--max-examples", "1", "--out", str(tmp_path / "r"),
    ])  # fmt: skip
    assert code == 2
    assert "bart" in capsys.readouterr().err
    assert prefixrt.PrefixBank.load(bank).names == ["e2e"]


def test_task_kinds_and_the_papers_decoding(shared_data):
    from prefixrt.tasks import KIND_DEFAULTS, kind_of
    from prefixrt.train.models import parse_overrides

    assert kind_of(shared_data / "e2e" / "devset.csv") == "table-to-text"
    assert kind_of(shared_data / "dart" / "dart-v1.1.1-full-test.xml") == "table-to-text"
    assert kind_of("missing/train.jsonl") == kind_of("EdinburghNLP/xsum") == "summarization"
    assert kind_of("GEM/e2e_nlg") == kind_of("data.jsonl", format="e2e") == "table-to-text"
    assert (
        KIND_DEFAULTS["table-to-text"].prefix_length == 10
        and KIND_DEFAULTS["summarization"].prefix_length == 200
    )
    xsum = Decoding.for_kind("summarization", num_beams=None, batch_size=4)  # None: keep the default
    assert (xsum.num_beams, xsum.length_penalty, xsum.min_new_tokens, xsum.max_new_tokens) == (6, 0.8, 10, 61)
    assert xsum.generate_kwargs() == {
        "num_beams": 6, "max_new_tokens": 61, "do_sample": False, "length_penalty": 0.8, "min_new_tokens": 10,
    }  # fmt: skip
    greedy = Decoding.for_kind("table-to-text", num_beams=1).generate_kwargs()
    assert "length_penalty" not in greedy and "min_new_tokens" not in greedy
    with pytest.raises(ValueError, match="kind"):
        Decoding.for_kind("poetry")
    assert parse_overrides(["initializer_range=0.1", "n_layer=1", "activation_function=gelu"]) == {
        "initializer_range": 0.1, "n_layer": 1, "activation_function": "gelu",
    }  # fmt: skip
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_overrides(["initializer_range"])
