"""The training loop: target-only loss, the loss goes down, exact resume from a checkpoint, per-task updates."""

import csv
import importlib.util
import json
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open
from support.training import PAD, task_rows, tiny_model

from prefixrt.train import CheckpointError, PrefixTuner, RunOptions, TrainConfig, lm_loss, load_tuner, train
from prefixrt.train.loop import CHECKPOINT_FILE


def data(kind: str, n: int = 10) -> dict:
    return {"a": task_rows(kind, [10, 11, 12, 13], n, 0), "b": task_rows(kind, [20, 21, 22], n, 1)}


def state(tuner: PrefixTuner) -> dict:
    return {k: v.detach().clone() for k, v in tuner.state_dict().items()}


@pytest.mark.parametrize("kind", ["gpt2", "bart"])
def test_lm_loss_is_the_models_target_only_loss(kind):
    from prefixrt.tasks import Collator, layout_for

    model = tiny_model(kind)
    tuner = PrefixTuner(model, {"a": 3, "b": 2}, mid_dim=8, seed=0)
    tuner.attach(model)
    rows = data(kind, 3)
    batch = Collator(PAD, layout=layout_for(model))(rows["a"] + rows["b"])
    ids = tuner.ids(["a"] * 3 + ["b"] * 3)
    loss, row_loss, row_tokens = lm_loss(model, batch, ids)
    expected = model(
        batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"], prefix_ids=ids
    )
    torch.testing.assert_close(loss, expected.loss)
    extra = 1 if kind == "gpt2" else 2  # gpt2: target + <eos>; bart: <s> target </s>
    assert row_tokens.tolist() == [4 + extra] * 3 + [3 + extra] * 3
    torch.testing.assert_close(row_loss.sum() / row_tokens.sum(), loss.detach())


@pytest.mark.parametrize("kind", ["gpt2", "bart"])
def test_loss_decreases_for_every_task(kind, tmp_path):
    model = tiny_model(kind)
    tuner = PrefixTuner(model, {"a": 4, "b": 2}, mid_dim=32, seed=0)
    config = TrainConfig(lr=3e-2, batch_size=4, max_steps=25, warmup_steps=3, log_every=5, seed=0)
    options = RunOptions(
        pad_token_id=PAD,
        config=config,
        progress=False,
        log_path=tmp_path / "loss.csv",
        plot_path=tmp_path / "loss.png",
    )
    result = train(model, tuner, data(kind), options)
    first, last = result.log[0], result.log[-1]
    assert result.step == 25 and len(result.log) == 5
    for key in ("loss", "loss/a", "loss/b"):
        assert last[key] < 0.7 * first[key], (key, first[key], last[key])
    with open(tmp_path / "loss.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == [5, 10, 15, 20, 25]
    assert set(rows[0]) == {"step", "epoch", "lr", "loss", "loss/a", "loss/b"}
    if importlib.util.find_spec("matplotlib") is not None:  # the plot is optional (the "plot" extra)
        assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert result.plot_path == tmp_path / "loss.png"
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert not hasattr(model, "_prefixrt_binding") or model._prefixrt_binding is None  # detached again


@pytest.mark.parametrize("kind", ["gpt2", "bart"])
def test_resume_is_bitwise_identical_to_an_uninterrupted_run(kind, tmp_path):
    """With model dropout and prefix dropout on (RNG state restored), across an epoch boundary, mid-warm-up."""
    config = TrainConfig(lr=5e-3, batch_size=4, max_steps=7, warmup_steps=5, log_every=2, seed=3)
    options = RunOptions(pad_token_id=PAD, config=config, progress=False)
    files = dict(checkpoint_dir=tmp_path / "ckpt", log_path=tmp_path / "log.csv")

    def fresh():
        model = tiny_model(kind, dropout=0.1)
        return model, PrefixTuner(model, {"a": 4, "b": 2}, mid_dim=16, prefix_dropout=0.2, seed=1)

    model, tuner = fresh()
    full = train(model, tuner, data(kind, 7), options)
    expected = state(tuner)

    model, tuner = fresh()
    part = train(model, tuner, data(kind, 7), options, stop_after=5, **files)
    assert part.step == 5
    torch.manual_seed(999)  # whatever happens in between must not matter
    model, tuner = fresh()
    resumed = train(model, tuner, data(kind, 7), options, resume=True, **files)
    assert resumed.step == 7
    got = state(tuner)
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
    assert resumed.log == full.log


def test_resume_refuses_a_different_run(tmp_path):
    config = TrainConfig(lr=5e-3, batch_size=4, max_steps=4, seed=0)
    options = RunOptions(pad_token_id=PAD, config=config, progress=False, checkpoint_dir=tmp_path)
    model = tiny_model("gpt2")
    tuner = PrefixTuner(model, {"a": 4, "b": 2}, mid_dim=8, seed=0)
    train(model, tuner, data("gpt2"), options, stop_after=2)
    resuming = replace(options, resume=True)
    with pytest.raises(CheckpointError, match="lr"):
        train(model, tuner, data("gpt2"), resuming, config=TrainConfig(lr=1e-3, batch_size=4, max_steps=4))
    with pytest.raises(CheckpointError, match="data differ"):
        train(model, tuner, data("gpt2", n=9), resuming)
    other = PrefixTuner(model, {"a": 5, "b": 2}, mid_dim=8, seed=0)
    with pytest.raises(CheckpointError, match="tuner"):
        train(model, other, data("gpt2"), resuming)


def test_a_task_without_rows_is_not_updated():
    model = tiny_model("gpt2")
    tuner = PrefixTuner(model, {"a": 4, "b": 2}, mid_dim=8, seed=0)
    before = state(tuner)
    config = TrainConfig(lr=1e-2, batch_size=4, max_steps=3, weight_decay=0.1)
    train(model, tuner, {"a": data("gpt2")["a"]}, RunOptions(pad_token_id=PAD, config=config, progress=False))
    after = state(tuner)
    for name in before:
        changed = not torch.equal(before[name], after[name])
        assert changed == name.startswith("prefixes.0."), name


def test_gradient_checkpointing_trains_the_same(tmp_path):
    results = []
    for checkpointing in (False, True):
        model = tiny_model("gpt2")
        tuner = PrefixTuner(model, {"a": 4, "b": 2}, mid_dim=8, seed=0)
        config = TrainConfig(lr=1e-2, batch_size=4, max_steps=3, gradient_checkpointing=checkpointing)
        train(model, tuner, data("gpt2"), RunOptions(pad_token_id=PAD, config=config, progress=False))
        assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())  # off again
        results.append(state(tuner))
    for name, value in results[0].items():
        torch.testing.assert_close(results[1][name], value, atol=1e-6, rtol=1e-5)


def test_checkpoint_is_safetensors_and_rebuilds_the_tuner(tmp_path):
    model = tiny_model("bart")
    tuner = PrefixTuner(model, {"a": 4, "b": 2}, mid_dim=8, seed=0)
    config = TrainConfig(lr=1e-2, batch_size=4, max_steps=2)
    train(
        model,
        tuner,
        data("bart"),
        RunOptions(pad_token_id=PAD, config=config, progress=False),
        checkpoint_dir=tmp_path,
    )
    path = tmp_path / CHECKPOINT_FILE
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["format"] == "prefixrt.train-checkpoint"
    assert json.loads(meta["trainer"])["step"] == 2
    assert {"rng/cpu"} <= keys and any(k.startswith("optimizer/") for k in keys)
    assert any(k.endswith("mlp.2.weight") for k in keys)  # the MLP is kept (a bank drops it)
    rebuilt = load_tuner(path)
    for name, value in tuner.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[name], value), name
    bank = rebuilt.materialize()
    assert bank.names == ["a", "b"]
    for site in ("encoder", "decoder", "cross"):
        assert bank.lengths(site).tolist() == [4, 2]
        torch.testing.assert_close(bank.entry("a")[site], tuner.task_kv("a")[site].detach())


def test_bart_training_moves_all_three_sites():
    model = tiny_model("bart")
    tuner = PrefixTuner(model, {"a": 4}, mid_dim=8, seed=0)
    before = {s: kv.detach().clone() for s, kv in tuner.task_kv("a").items()}
    config = TrainConfig(lr=1e-2, batch_size=4, max_steps=2)
    train(model, tuner, {"a": data("bart")["a"]}, RunOptions(pad_token_id=PAD, config=config, progress=False))
    for site, kv in tuner.task_kv("a").items():
        assert not torch.allclose(kv, before[site]), site


def test_keyword_options_are_the_run_options():
    """``train(..., pad_token_id=..., config=...)`` is ``train(..., RunOptions(...))``; keywords override options."""
    config = TrainConfig(lr=1e-2, batch_size=4, max_steps=2)
    results = []
    for call in ("keywords", "options", "override"):
        model = tiny_model("gpt2")
        tuner = PrefixTuner(model, {"a": 4, "b": 2}, mid_dim=8, seed=0)
        if call == "keywords":
            result = train(model, tuner, data("gpt2"), pad_token_id=PAD, config=config, progress=False)
        elif call == "options":
            result = train(
                model, tuner, data("gpt2"), RunOptions(pad_token_id=PAD, config=config, progress=False)
            )
        else:
            options = RunOptions(pad_token_id=PAD, config=TrainConfig(max_steps=1), progress=False)
            result = train(model, tuner, data("gpt2"), options, config=config)
        assert result.step == 2
        results.append((result.log, state(tuner)))
    for log, params in results[1:]:
        assert log == results[0][0]
        for name, value in results[0][1].items():
            assert torch.equal(params[name], value), name
    model = tiny_model("gpt2")
    tuner = PrefixTuner(model, {"a": 4, "b": 2}, mid_dim=8, seed=0)
    with pytest.raises(TypeError, match="eval_evry"):
        train(model, tuner, data("gpt2"), pad_token_id=PAD, eval_evry=2)
    with pytest.raises(TypeError, match="RunOptions"):
        train(model, tuner, data("gpt2"), PAD)


@pytest.mark.parametrize("kind", ["gpt2", "bart"])
def test_micro_batches_take_the_whole_batch_step(kind):
    """Gradients accumulated over micro-batches of 3 rows give the update of the whole 8-row batch (no dropout:
    the same arithmetic up to summation order), the same log, and the result names the backend that ran."""
    config = TrainConfig(lr=3e-2, batch_size=8, max_steps=3, log_every=1, seed=0)
    runs = {}
    for micro in (None, 3):
        model = tiny_model(kind)
        tuner = PrefixTuner(model, {"a": 4, "b": 2}, mid_dim=16, seed=0)
        result = train(
            model,
            tuner,
            data(kind),
            RunOptions(pad_token_id=PAD, config=config, progress=False, micro_batch_size=micro),
        )
        runs[micro] = (state(tuner), result)
    (whole, whole_result), (micro, micro_result) = runs[None], runs[3]
    for name in whole:
        torch.testing.assert_close(
            micro[name], whole[name], atol=1e-4, rtol=1e-4
        )  # Adam amplifies fp32 order
    for a, b in zip(whole_result.log, micro_result.log, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert whole_result.attention_backend in ("cpp", "reference")
    with pytest.raises(ValueError, match="micro_batch_size must be a positive int"):
        RunOptions(pad_token_id=PAD, micro_batch_size=0)
