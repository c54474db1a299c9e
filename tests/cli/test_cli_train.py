"""``prefixrt train`` end to end (GPT-2 and BART, several tasks, resume) and ``prefixrt demo``."""

import importlib.util
import json

import pytest
import torch

import prefixrt
from prefixrt.cli import main
from prefixrt.commands.train import parse_task
from prefixrt.train.models import build_model


def write_jsonl(path, n: int = 6):
    rows = [{"src": f"city : Paris | stars : {i}", "tgt": f"A {i} star hotel in Paris."} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def common(tmp_path, *extra):
    return [
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--mid-dim",
        "16",
        "--no-progress",
        "--lr",
        "1e-3",
        *extra,
    ]


def test_train_two_tasks_writes_a_loadable_bank(tmp_path, shared_data):
    toy = write_jsonl(tmp_path / "toy.jsonl")
    out = tmp_path / "banks" / "tables.safetensors"
    code = main([
        "train", "--model", "gpt2-tiny", "--tokenizer", str(shared_data / "gpt2-tokenizer"),
        "--task", f"e2e={shared_data / 'e2e' / 'devset.csv'}:4", "--task", f"toy={toy}", "--prefix-len", "3",
        "--max-rows", "6", "--out", str(out), *common(tmp_path),
    ])  # fmt: skip
    assert code == 0
    bank = prefixrt.PrefixBank.load(out)
    assert bank.names == ["e2e", "toy"] and bank.lengths("decoder").tolist() == [4, 3]
    assert (tmp_path / "banks" / "tables.loss.csv").is_file()
    if importlib.util.find_spec("matplotlib") is not None:  # the plot is optional (the "plot" extra)
        assert (tmp_path / "banks" / "tables.loss.png").is_file()
    # The same built-in model, rebuilt from its name and seed, takes the bank.
    model = build_model("gpt2-tiny", seed=0)
    prefixrt.attach(model, bank)
    with torch.no_grad():
        logits = model(torch.tensor([[464, 3290], [464, 3290]]), prefix_ids=bank.ids(["e2e", "toy"])).logits
    assert logits.shape == (2, 2, 50257) and torch.isfinite(logits).all()


def test_train_bart_trains_all_three_sites(tmp_path, shared_data):
    out = tmp_path / "bart.safetensors"
    code = main([
        "train", "--model", "bart-tiny", "--tokenizer", str(shared_data / "bart-tokenizer"),
        "--task", f"toy={write_jsonl(tmp_path / 'toy.jsonl')}:5", "--out", str(out), *common(tmp_path),
    ])  # fmt: skip
    assert code == 0
    bank = prefixrt.PrefixBank.load(out)
    assert bank.spec.model_type == "bart"
    for site in ("encoder", "decoder", "cross"):
        assert bank.lengths(site).tolist() == [5]


def test_stop_and_resume_gives_the_uninterrupted_bank(tmp_path, shared_data):
    toy = write_jsonl(tmp_path / "toy.jsonl", n=10)
    args = [
        "train", "--model", "gpt2-tiny", "--tokenizer", str(shared_data / "gpt2-tokenizer"),
        "--task", f"toy={toy}:3", "--max-steps", "4", "--batch-size", "3", "--mid-dim", "16", "--no-progress",
        "--warmup-steps", "2", "--prefix-dropout", "0.1",
    ]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "full.safetensors")]) == 0
    ckpt = str(tmp_path / "ckpt")
    part = tmp_path / "part.safetensors"
    assert main([*args, "--out", str(part), "--checkpoint-dir", ckpt, "--stop-after", "2"]) == 0
    assert main([*args, "--out", str(part), "--checkpoint-dir", ckpt, "--resume"]) == 0
    full = prefixrt.PrefixBank.load(tmp_path / "full.safetensors").entry("toy")["decoder"]
    resumed = prefixrt.PrefixBank.load(part).entry("toy")["decoder"]
    assert torch.equal(full, resumed)


def test_parse_task():
    assert parse_task("e2e=data/train.csv:10", 5) == ("e2e", "data/train.csv", 10)
    assert parse_task("e2e=data/train.csv", 5) == ("e2e", "data/train.csv", 5)
    assert parse_task("x=C:/data/a.jsonl", 7) == ("x", "C:/data/a.jsonl", 7)
    with pytest.raises(ValueError, match="NAME=PATH"):
        parse_task("data/train.csv", 5)


def test_train_reports_bad_input(tmp_path, capsys):
    code = main(
        ["train", "--task", f"e2e={tmp_path / 'missing.csv'}", "--out", str(tmp_path / "b.safetensors")]
    )
    assert code == 2
    assert "missing.csv" in capsys.readouterr().err
    code = main(
        ["train", "--model", "gpt3-huge", "--task", "a=b.jsonl", "--out", str(tmp_path / "b.safetensors")]
    )
    assert code == 2
    assert "built-in" in capsys.readouterr().err


def test_demo_runs(capsys, shared_data):
    assert main(["demo", "--steps", "2", "--rows", "16"]) == 0
    out = capsys.readouterr().out
    assert "prefix_ids=[0, 1, -1]" in out
    for label in ("e2e]", "name]", "no prefix]"):
        assert label in out
