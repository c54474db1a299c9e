"""The fine-tuning baseline (``prefixrt.train.finetune``, ``prefixrt train --finetune``) and low-data mode
(``--low-data N --seeds ...``: one run per seed, averaged)."""

import json

import pytest
import torch
from support.threads import one_thread  # noqa: F401  (fixture)
from support.training import PAD, VOCAB, tiny_model

import prefixrt
from prefixrt.cli import main
from prefixrt.tasks import Encoded, load_e2e_csv
from prefixrt.train import CheckpointError, RunOptions, TrainConfig, finetune, load_checkpoint, load_tuner
from prefixrt.train.loop import CHECKPOINT_FILE

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_gpt2(dropout: float = 0.0):
    return tiny_model("gpt2", dropout=dropout, initializer_range=0.02)  # GPT-2's own init scale


def toy_data(n: int = 12, seed: int = 0) -> dict:
    """Random sources, one fixed target: a pattern the model can pick up in a few steps."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        src = torch.randint(3, VOCAB - 1, (4,), generator=g).tolist()
        rows.append(Encoded([*src, VOCAB - 1, 10, 11, 12, VOCAB - 1], [-100] * 5 + [10, 11, 12, VOCAB - 1]))
    return {"a": rows}


def test_finetune_trains_the_whole_model_and_lowers_the_loss(tmp_path):
    model = tiny_gpt2()
    model.requires_grad_(False)  # flags are restored afterwards, whatever they were
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = TrainConfig(lr=1e-2, batch_size=4, max_steps=12, log_every=3, seed=0)
    dev = toy_data(4, seed=1)
    options = RunOptions(pad_token_id=PAD, config=config, progress=False, dev_data=dev, eval_every=6)
    result = finetune(model, toy_data(), options)
    assert result.step == 12
    assert result.trainable_parameters == sum(p.numel() for p in model.parameters())
    losses = [r["loss"] for r in result.log if "loss" in r]  # the step-0 row holds the dev loss only
    assert len(losses) == 4 and losses[-1] < 0.5 * losses[0]
    assert [r["step"] for r in result.dev] == [0, 6, 12]
    assert result.dev[-1]["dev_loss"] < result.dev[0]["dev_loss"]
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert "transformer.wte.weight" in changed and "transformer.h.1.mlp.c_fc.weight" in changed
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_finetune_checkpoint_resumes_bit_for_bit(tmp_path):
    config = TrainConfig(lr=3e-3, batch_size=4, max_steps=6, warmup_steps=2, log_every=2, seed=1)
    full = tiny_gpt2(dropout=0.1)  # dropout on: the RNG state must be restored too
    options = RunOptions(pad_token_id=PAD, config=config, progress=False)
    finetune(full, toy_data(), options)
    part = tiny_gpt2(dropout=0.1)
    assert finetune(part, toy_data(), options, checkpoint_dir=tmp_path, stop_after=4).step == 4
    resumed = tiny_gpt2(dropout=0.1)  # a fresh copy of the start: the checkpoint restores the trained weights
    assert finetune(resumed, toy_data(), options, checkpoint_dir=tmp_path, resume=True).step == 6
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    checkpoint = load_checkpoint(tmp_path / CHECKPOINT_FILE)
    assert checkpoint.kind == "finetune" and checkpoint.tuner_config is None
    assert (
        "transformer.wte.weight" in checkpoint.model_state and "lm_head.weight" not in checkpoint.model_state
    )
    with pytest.raises(CheckpointError, match="fine-tuning checkpoint"):
        load_tuner(tmp_path / CHECKPOINT_FILE)


def test_dev_rows_survive_a_resume(tmp_path):
    """The log of a stopped and resumed run, dev rows included, is the uninterrupted run's."""
    config = TrainConfig(lr=3e-3, batch_size=4, max_steps=6, log_every=2, seed=2)
    options = RunOptions(
        pad_token_id=PAD, config=config, progress=False, dev_data=toy_data(4, seed=1), eval_every=3
    )
    full = finetune(tiny_gpt2(), toy_data(), options)
    files = dict(checkpoint_dir=tmp_path / "ckpt", log_path=tmp_path / "log.csv")
    finetune(tiny_gpt2(), toy_data(), options, stop_after=4, **files)
    resumed = finetune(tiny_gpt2(), toy_data(), options, resume=True, **files)
    assert [r["step"] for r in full.dev] == [0, 3, 6]
    assert resumed.log == full.log


def test_finetune_refuses_an_attached_model():
    model = tiny_gpt2()
    bank = prefixrt.PrefixBank.for_model(model)
    prefixrt.attach(model, bank)
    with pytest.raises(ValueError, match="detach"):
        finetune(
            model, toy_data(), RunOptions(pad_token_id=PAD, config=TrainConfig(max_steps=1), progress=False)
        )


@pytest.mark.slow
def test_cli_finetune_writes_a_model_that_eval_reads_without_bank(tmp_path, shared_data):
    out = tmp_path / "ft"
    common = [
        "--model", "gpt2-tiny", "--tokenizer", str(shared_data / "gpt2-tokenizer"),
        "--model-config", "n_layer=1", "--model-config", "n_embd=32",
    ]  # fmt: skip
    dev = shared_data / "e2e" / "testset_w_refs.csv"
    code = main([
        "train", "--finetune", *common, "--task", f"e2e={shared_data / 'e2e' / 'devset.csv'}", "--max-rows", "20",
        "--dev", f"e2e={dev}", "--dev-max-rows", "10", "--dev-generate", "2", "--max-steps", "4", "--batch-size", "5",
        "--lr", "1e-3", "--no-progress", "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert (out / "loss.csv").is_file() and (out / "summary.json").is_file()
    run = json.loads((out / "summary.json").read_text())
    assert (
        run["setting"]["method"] == "fine-tuning" and run["setting"]["tasks"]["e2e"]["prefix_length"] is None
    )
    metrics = run["runs"][0]["metrics"]
    assert {"train_loss", "dev_loss", "dev_loss_start", "dev_BLEU/e2e", "dev_ROUGE_L/e2e"} <= set(metrics)
    results = tmp_path / "results"
    code = main([
        "eval", "--model", str(out), "--task", f"e2e={dev}", "--max-examples", "2", "--num-beams", "2",
        "--max-new-tokens", "5", "--no-progress", "--out", str(results),
    ])  # fmt: skip
    assert code == 0
    record = json.loads((results / "e2e.json").read_text())
    assert record["runs"][0]["bank"] is None and record["runs"][0]["entry"] is None
    assert record["meta"]["sources"] == 2


@pytest.mark.slow
def test_low_data_seeds_are_averaged(tmp_path, shared_data):
    data = shared_data / "e2e" / "devset.csv"
    out = tmp_path / "low" / "bank.safetensors"
    code = main([
        "train", "--model", "gpt2-tiny", "--tokenizer", str(shared_data / "gpt2-tokenizer"),
        "--task", f"e2e={data}", "--max-rows", "200", "--low-data", "3", "--seeds", "1,2",
        "--dev", f"e2e={shared_data / 'e2e' / 'testset_w_refs.csv'}", "--dev-max-rows", "8",
        "--max-steps", "2", "--batch-size", "4", "--mid-dim", "16", "--lr", "1e-3", "--no-progress",
        "--checkpoint-dir", str(tmp_path / "ckpt"), "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    summary = json.loads((tmp_path / "low" / "bank.summary.json").read_text())
    runs = summary["runs"]
    assert [r["run"] for r in runs] == ["seed1", "seed2"] and summary["setting"]["low_data"] == 3
    # Each seed trains on its own draw of 3 sources (with all their rows).
    rows = load_e2e_csv(data)[:200]
    for r in runs:
        assert r["sources"] == {"e2e": 3}
        assert r["rows"]["e2e"] < len(rows)
    assert runs[0]["rows"] != runs[1]["rows"] or runs[0]["metrics"] != runs[1]["metrics"]
    for metric in ("train_loss", "dev_loss"):
        values = [r["metrics"][metric] for r in runs]
        assert summary["mean_std"][metric]["mean"] == pytest.approx(sum(values) / 2)
        assert summary["mean_std"][metric]["std"] == pytest.approx(abs(values[0] - values[1]) / 2**0.5)
    table = (tmp_path / "low" / "bank.summary.md").read_text()
    assert "| seed1 |" in table and "| mean |" in table and "| std |" in table
    banks = [prefixrt.PrefixBank.load(tmp_path / "low" / f"bank.seed{s}.safetensors") for s in (1, 2)]
    assert not torch.equal(banks[0].entry("e2e")["decoder"], banks[1].entry("e2e")["decoder"])
    assert (tmp_path / "ckpt" / "seed1" / CHECKPOINT_FILE).is_file()
    assert (tmp_path / "low" / "bank.seed2.loss.csv").is_file()
