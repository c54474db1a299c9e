"""The training loop: target-only loss, the loss goes down, exact resume from a checkpoint, per-task updates."""

import csv
import importlib.util
import json

import pytest
import torch
from safetensors import safe_open

from prefixrt.tasks import Encoded
from prefixrt.train import CheckpointError, PrefixTuner, TrainConfig, lm_loss, load_tuner, train
from prefixrt.train.loop import CHECKPOINT_FILE
from prefixrt.train.models import build_model

VOCAB = 64
PAD = 1


def tiny(kind: str, dropout: bool = False, seed: int = 0):
    if kind == "gpt2":
        p = 0.1 if dropout else 0.0
        return build_model(
            "gpt2-tiny",
            seed=seed,
            vocab_size=VOCAB,
            n_embd=32,
            n_head=2,
            resid_pdrop=p,
            embd_pdrop=p,
            attn_pdrop=p,
            initializer_range=0.3,  # a random model whose outputs a prefix can make peaked
        )
    p = 0.1 if dropout else 0.0
    return build_model(
        "bart-tiny",
        seed=seed,
        vocab_size=VOCAB,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        dropout=p,
        attention_dropout=p,
        init_std=0.3,
    )


def task_rows(kind: str, target: list[int], n: int, seed: int) -> list[Encoded]:
    """Rows with a random source and a fixed target (a pattern a prefix can learn)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        src = torch.randint(
            3, VOCAB - 1, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g
        ).tolist()
        if kind == "gpt2":
            sep = eos = VOCAB - 1
            out.append(Encoded([*src, sep, *target, eos], [-100] * (len(src) + 1) + [*target, eos]))
        else:
            out.append(Encoded([0, *src, 2], [0, *target, 2]))
    return out


def data(kind: str, n: int = 10) -> dict:
    return {"a": task_rows(kind, [10, 11, 12, 13], n, 0), "b": task_rows(kind, [20, 21, 22], n, 1)}


def state(tuner: PrefixTuner) -> dict:
    return {k: v.detach().clone() for k, v in tuner.state_dict().items()}


@pytest.mark.parametrize("kind", ["gpt2", "bart"])
def test_lm_loss_is_the_models_target_only_loss(kind):
    from prefixrt.tasks import Collator, layout_for

    model = tiny(kind)
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
    model = tiny(kind)
    tuner = PrefixTuner(model, {"a": 4, "b": 2}, mid_dim=32, seed=0)
    config = TrainConfig(lr=3e-2, batch_size=4, max_steps=25, warmup_steps=3, log_every=5, seed=0)
    result = train(
        model,
        tuner,
        data(kind),
        pad_token_id=PAD,
        config=config,
        progress=False,
        log_path=tmp_path / "loss.csv",
        plot_path=tmp_path / "loss.png",
    )
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

    def fresh():
        model = tiny(kind, dropout=True)
        return model, PrefixTuner(model, {"a": 4, "b": 2}, mid_dim=16, prefix_dropout=0.2, seed=1)

    model, tuner = fresh()
    full = train(model, tuner, data(kind, 7), pad_token_id=PAD, config=config, progress=False)
    expected = state(tuner)

    ckpt = tmp_path / "ckpt"
    model, tuner = fresh()
    part = train(
        model,
        tuner,
        data(kind, 7),
        pad_token_id=PAD,
        config=config,
        progress=False,
        checkpoint_dir=ckpt,
        stop_after=5,
        log_path=tmp_path / "log.csv",
    )
    assert part.step == 5
    torch.manual_seed(999)  # whatever happens in between must not matter
    model, tuner = fresh()
    resumed = train(
        model,
        tuner,
        data(kind, 7),
        pad_token_id=PAD,
        config=config,
        progress=False,
        checkpoint_dir=ckpt,
        resume=True,
        log_path=tmp_path / "log.csv",
    )
    assert resumed.step == 7
    got = state(tuner)
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
    assert resumed.log == full.log


def test_resume_refuses_a_different_run(tmp_path):
    config = TrainConfig(lr=5e-3, batch_size=4, max_steps=4, seed=0)
    model = tiny("gpt2")
    tuner = PrefixTuner(model, {"a": 4, "b": 2}, mid_dim=8, seed=0)
    train(
        model,
        tuner,
        data("gpt2"),
        pad_token_id=PAD,
        config=config,
        progress=False,
        checkpoint_dir=tmp_path,
        stop_after=2,
    )
    with pytest.raises(CheckpointError, match="lr"):
        train(
            model,
            tuner,
            data("gpt2"),
            pad_token_id=PAD,
            config=TrainConfig(lr=1e-3, batch_size=4, max_steps=4),
            progress=False,
            checkpoint_dir=tmp_path,
            resume=True,
        )
    with pytest.raises(CheckpointError, match="data differ"):
        train(
            model,
            tuner,
            data("gpt2", n=9),
            pad_token_id=PAD,
            config=config,
            progress=False,
            checkpoint_dir=tmp_path,
            resume=True,
        )
    other = PrefixTuner(model, {"a": 5, "b": 2}, mid_dim=8, seed=0)
    with pytest.raises(CheckpointError, match="tuner"):
        train(
            model,
            other,
            data("gpt2"),
            pad_token_id=PAD,
            config=config,
            progress=False,
            checkpoint_dir=tmp_path,
            resume=True,
        )


def test_a_task_without_rows_is_not_updated():
    model = tiny("gpt2")
    tuner = PrefixTuner(model, {"a": 4, "b": 2}, mid_dim=8, seed=0)
    before = state(tuner)
    train(
        model,
        tuner,
        {"a": data("gpt2")["a"]},
        pad_token_id=PAD,
        progress=False,
        config=TrainConfig(lr=1e-2, batch_size=4, max_steps=3, weight_decay=0.1),
    )
    after = state(tuner)
    for name in before:
        changed = not torch.equal(before[name], after[name])
        assert changed == name.startswith("prefixes.0."), name


def test_gradient_checkpointing_trains_the_same(tmp_path):
    results = []
    for checkpointing in (False, True):
        model = tiny("gpt2")
        tuner = PrefixTuner(model, {"a": 4, "b": 2}, mid_dim=8, seed=0)
        config = TrainConfig(lr=1e-2, batch_size=4, max_steps=3, gradient_checkpointing=checkpointing)
        train(model, tuner, data("gpt2"), pad_token_id=PAD, config=config, progress=False)
        assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())  # off again
        results.append(state(tuner))
    for name, value in results[0].items():
        torch.testing.assert_close(results[1][name], value, atol=1e-6, rtol=1e-5)


def test_checkpoint_is_safetensors_and_rebuilds_the_tuner(tmp_path):
    model = tiny("bart")
    tuner = PrefixTuner(model, {"a": 4, "b": 2}, mid_dim=8, seed=0)
    train(
        model,
        tuner,
        data("bart"),
        pad_token_id=PAD,
        progress=False,
        checkpoint_dir=tmp_path,
        config=TrainConfig(lr=1e-2, batch_size=4, max_steps=2),
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
    model = tiny("bart")
    tuner = PrefixTuner(model, {"a": 4}, mid_dim=8, seed=0)
    before = {s: kv.detach().clone() for s, kv in tuner.task_kv("a").items()}
    train(
        model,
        tuner,
        {"a": data("bart")["a"]},
        pad_token_id=PAD,
        progress=False,
        config=TrainConfig(lr=1e-2, batch_size=4, max_steps=2),
    )
    for site, kv in tuner.task_kv("a").items():
        assert not torch.allclose(kv, before[site]), site
