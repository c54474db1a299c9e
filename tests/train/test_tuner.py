"""PrefixTuner: gradients reach only the prefixes, each task only from its own rows, checkpointing gives the same
gradients, the MLP and direct parameterizations agree, and materialized banks reproduce the tuner's outputs."""

import pytest
import torch

import prefixrt
from prefixrt.train import PrefixTuner, lm_loss
from prefixrt.train.loop import set_gradient_checkpointing
from prefixrt.train.models import build_model

VOCAB = 96
NO_DROPOUT = {
    "gpt2": {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
    "bart": {"dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0},
}
# Tolerances per dtype for gradients and logits compared across different batchings.
TOL = {torch.float32: {"atol": 1e-5, "rtol": 1e-4}, torch.float64: {"atol": 1e-10, "rtol": 1e-9}}


def tiny(kind: str, dtype=torch.float32, seed: int = 0, dropout: bool = False):
    name = "gpt2-tiny" if kind == "gpt2" else "bart-tiny"
    overrides = {} if dropout else NO_DROPOUT[kind]
    dims = {"n_embd": 32, "n_head": 2} if kind == "gpt2" else {"d_model": 32, "decoder_attention_heads": 4}
    return build_model(name, seed=seed, vocab_size=VOCAB, **dims, **overrides).to(dtype)


def batch_for(kind: str, lengths, seed: int = 0) -> dict:
    """Right-padded rows of the given lengths; causal labels -100 on a 2-token source and padding."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(3, VOCAB, (len(lengths), width), generator=g)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    ids = ids.masked_fill(mask == 0, 1)
    if kind == "gpt2":
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :2] = -100
    else:
        labels = torch.randint(3, VOCAB, (len(lengths), 5), generator=g)
        labels[0, 4:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def rows(batch: dict, index) -> dict:
    index = torch.as_tensor(index)
    out = {k: v[index] for k, v in batch.items()}
    width = int(out["attention_mask"].sum(1).max())  # re-trim: the rows alone are padded to their own width
    out["input_ids"], out["attention_mask"] = out["input_ids"][:, :width], out["attention_mask"][:, :width]
    if out["labels"].shape[1] == batch["input_ids"].shape[1]:
        out["labels"] = out["labels"][:, :width]
    return out


def grads(tuner: PrefixTuner) -> dict:
    return {n: (p.grad.clone() if p.grad is not None else None) for n, p in tuner.named_parameters()}


@pytest.mark.parametrize("kind", ["gpt2", "bart"])
@pytest.mark.parametrize("reparam", ["mlp", "none"])
def test_gradients_reach_only_prefix_parameters(kind, reparam):
    model = tiny(kind)
    model.requires_grad_(True)  # the tuner must freeze it
    tuner = PrefixTuner(model, {"a": 5, "b": 3}, reparam=reparam, mid_dim=16, seed=0)
    assert not any(p.requires_grad for p in model.parameters())
    tuner.attach(model)
    batch = batch_for(kind, [7, 5, 6])
    loss, _, _ = lm_loss(model, batch, tuner.ids(["a", "b", None]))
    loss.backward()
    assert all(p.grad is None for p in model.parameters())
    for name, grad in grads(tuner).items():
        assert grad is not None and grad.abs().sum() > 0, name
    assert {n for n, _ in tuner.named_parameters()} == {
        n for n, p in tuner.named_parameters() if p.requires_grad
    }


def test_bart_all_three_sites_train():
    model = tiny("bart")
    tuner = PrefixTuner(model, {"a": 4, "b": 6}, mid_dim=16, seed=0)
    tuner.attach(model)
    batch = batch_for("bart", [6, 4])
    lm_loss(model, batch, tuner.ids(["a", "b"]))[0].backward()
    for task in ("a", "b"):
        modules = tuner.prefixes[tuner.id_of(task)]
        assert set(modules) == {"encoder", "decoder", "cross"}
        for site, module in modules.items():
            grad = module.mlp[2].weight.grad
            assert grad is not None and grad.abs().sum() > 0, (task, site)


@pytest.mark.parametrize("kind", ["gpt2", "bart"])
@pytest.mark.parametrize("reparam", ["mlp", "none"])
def test_mixed_batch_gradient_per_task_equals_its_rows_alone(kind, reparam):
    """Summed loss: task t's gradient from the mixed batch equals the gradient from t's rows alone."""
    dtype = torch.float64
    model = tiny(kind, dtype)
    tuner = PrefixTuner(model, {"a": 5, "b": 3}, reparam=reparam, mid_dim=16, seed=1)
    tuner.attach(model)
    batch = batch_for(kind, [9, 4, 7, 6, 5], seed=3)
    names = ["a", "b", None, "a", "b"]

    lm_loss(model, batch, tuner.ids(names), reduction="sum")[0].backward()
    mixed = grads(tuner)
    for task in ("a", "b"):
        index = [i for i, n in enumerate(names) if n == task]
        tuner.zero_grad(set_to_none=True)
        lm_loss(model, rows(batch, index), tuner.ids([task] * len(index)), reduction="sum")[0].backward()
        alone = grads(tuner)
        for pname in (
            n for n, _ in tuner.named_parameters() if n.startswith(f"prefixes.{tuner.id_of(task)}.")
        ):
            torch.testing.assert_close(mixed[pname], alone[pname], **TOL[dtype], msg=pname)
        other = tuner.id_of("b" if task == "a" else "a")
        for pname, g in alone.items():
            if pname.startswith(f"prefixes.{other}."):
                assert g is None or not g.any(), f"{pname} got gradient from the other task's rows"


@pytest.mark.parametrize("kind", ["gpt2", "bart"])
def test_gradient_checkpointing_gives_the_same_gradients(kind):
    """Also with dropout (model and prefix) and two forwards before one backward: the replay reads its own K/V."""
    model = tiny(kind, dropout=True)
    tuner = PrefixTuner(model, {"a": 5, "b": 3}, mid_dim=16, prefix_dropout=0.3, seed=0)
    tuner.attach(model)
    batches = [batch_for(kind, [6, 5, 4], seed=s) for s in (0, 1)]
    ids = tuner.ids(["a", "b", "a"])

    def run(checkpointing: bool) -> dict:
        set_gradient_checkpointing(model, checkpointing)
        model.train()
        tuner.train()
        tuner.zero_grad(set_to_none=True)
        torch.manual_seed(1234)
        losses = [lm_loss(model, b, ids)[0] for b in batches]
        sum(losses).backward()
        return grads(tuner)

    plain, checkpointed = run(False), run(True)
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
    assert layers, "gradient checkpointing was not switched on"
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("kind", ["gpt2", "bart"])
def test_mlp_and_direct_agree_given_the_same_kv(kind):
    """A direct tuner set to the MLP's K/V gives the same logits, and its K/V gradient is the MLP's K/V gradient."""
    model = tiny(kind, torch.float64)
    mlp = PrefixTuner(model, {"a": 4, "b": 2}, reparam="mlp", mid_dim=16, seed=0)
    direct = PrefixTuner(model, {"a": 4, "b": 2}, reparam="none", seed=5)
    assert mlp.dtype == direct.dtype == torch.float64  # a float64 model gets float64 prefixes
    for task in mlp.names:
        assert direct.init_from_kv(task, {s: t.detach() for s, t in mlp.task_kv(task).items()}) == 0.0
    batch = batch_for(kind, [6, 4, 5])
    out = {}
    for label, tuner in (("mlp", mlp), ("direct", direct)):
        tuner.attach(model)
        view = tuner.view()
        for kv in view.kv.values():
            kv.retain_grad()
        model_out = lm_loss(model, batch, tuner.ids(["a", "b", None]), prefix_source=view)
        model_out[0].backward()
        out[label] = (model_out[0].detach(), {s: kv.grad for s, kv in view.kv.items() if kv.shape[3]})
        tuner.detach(model)
    torch.testing.assert_close(out["mlp"][0], out["direct"][0], **TOL[torch.float64])
    for site, grad in out["mlp"][1].items():
        torch.testing.assert_close(grad, out["direct"][1][site], **TOL[torch.float64])
    # The direct tuner's parameter gradient is that K/V gradient, split per task.
    for task in direct.names:
        for site, module in direct.prefixes[direct.id_of(task)].items():
            o = direct.offsets(site)
            i = direct.id_of(task)
            torch.testing.assert_close(module.kv.grad, out["direct"][1][site][:, :, :, o[i] : o[i + 1]])


@pytest.mark.parametrize("kind", ["gpt2", "bart"])
def test_materialized_bank_gives_the_tuners_logits_and_tokens(kind):
    model = tiny(kind)
    tuner = PrefixTuner(model, {"a": 5, "b": 3}, mid_dim=16, prefix_dropout=0.5, seed=0)
    tuner.eval()  # no prefix dropout
    batch = batch_for(kind, [6, 6, 6])
    ids = ["a", "b", None]

    @torch.no_grad()
    def logits_and_tokens(prefix_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kwargs = {"attention_mask": batch["attention_mask"], "prefix_ids": prefix_ids}
        if kind == "bart":
            kwargs["decoder_input_ids"] = batch["labels"].clamp(min=3)
        logits = model(batch["input_ids"], **kwargs).logits
        tokens = model.generate(
            batch["input_ids"],
            attention_mask=batch["attention_mask"],
            prefix_ids=prefix_ids,
            max_new_tokens=5,
            do_sample=False,
            num_beams=2,
            pad_token_id=1,
        )
        return logits, tokens

    tuner.attach(model)
    tuned, tuned_tokens = logits_and_tokens(tuner.ids(ids))
    tuner.detach(model)
    bank = tuner.materialize()
    assert bank.names == ["a", "b"] and bank.lengths("decoder").tolist() == [5, 3]
    prefixrt.attach(model, bank)
    banked, banked_tokens = logits_and_tokens(bank.ids(ids))
    prefixrt.detach(model)
    torch.testing.assert_close(banked, tuned, atol=0, rtol=0)
    assert torch.equal(banked_tokens, tuned_tokens)


def test_materialize_into_an_existing_bank_and_subset():
    model = tiny("gpt2")
    bank = prefixrt.PrefixBank.for_model(model)
    bank.add("other", torch.zeros(2, 2, 2, 7, 16))
    tuner = PrefixTuner(model, {"a": 5, "b": 3}, mid_dim=16, seed=0)
    tuner.materialize(bank, names=["b"])
    assert bank.names == ["other", "b"]
    torch.testing.assert_close(bank.entry("b")["decoder"], tuner.task_kv("b")["decoder"].detach())
    with pytest.raises(ValueError, match="already in the bank"):
        tuner.materialize(bank, names=["b"])
    tuner.materialize(bank, names=["b"], replace=True)


def test_prefix_dropout_only_in_training_mode():
    model = tiny("gpt2")
    tuner = PrefixTuner(model, {"a": 6}, mid_dim=16, prefix_dropout=0.5, seed=0)
    clean = tuner.task_kv("a")["decoder"]
    tuner.train()
    dropped = tuner()["decoder"]
    zeros = (dropped == 0).float().mean()
    assert 0.3 < zeros < 0.7
    kept = dropped != 0
    torch.testing.assert_close(dropped[kept], 2 * clean[kept])  # inverted dropout scaling
    tuner.eval()
    torch.testing.assert_close(tuner()["decoder"], clean)


@pytest.mark.parametrize("kind", ["gpt2", "bart"])
def test_init_from_kv_makes_the_mlp_output_the_words(kind):
    model = tiny(kind)
    tuner = PrefixTuner(model, {"a": 6, "b": 4}, mid_dim=16, seed=0)
    g = torch.Generator().manual_seed(0)
    target = {
        site: torch.randn(s.num_layers, 2, s.num_heads, 6, s.head_dim, generator=g)
        for site, s in tuner.spec.sites.items()
    }
    before_b = {s: t.detach().clone() for s, t in tuner.task_kv("b").items()}
    error = tuner.init_from_kv("a", target)
    assert error < 1e-4
    for site, kv in tuner.task_kv("a").items():
        torch.testing.assert_close(kv, target[site], atol=1e-4, rtol=1e-4)
    for site, kv in tuner.task_kv("b").items():
        assert torch.equal(kv, before_b[site])
    with pytest.raises(ValueError, match="has prefix length 4"):
        tuner.init_from_kv("b", target)


@pytest.mark.parametrize("kind", ["gpt2", "bart"])
def test_init_from_text(kind):
    from prefixrt.hf.text_prefix import text_prefix_kv

    model = tiny(kind)
    words = torch.tensor([5, 9, 17, 33])
    expected = text_prefix_kv(model, words)
    tuner = PrefixTuner(
        model, {"a": None, "b": 3}, init="text", init_text={"a": words, "b": words[:3]}, mid_dim=16
    )
    assert tuner.task_lengths == {"a": 4, "b": 3}
    assert set(expected) == set(tuner.sites)
    for site, kv in tuner.task_kv("a").items():
        torch.testing.assert_close(kv, expected[site], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="has prefix length 3"):
        tuner.init_from_text("b", words, model)


def test_bad_arguments_raise_clear_errors():
    model = tiny("gpt2")
    with pytest.raises(ValueError, match="reparam"):
        PrefixTuner(model, {"a": 4}, reparam="lstm")
    with pytest.raises(ValueError, match="positive int"):
        PrefixTuner(model, {"a": 0})
    with pytest.raises(ValueError, match="unknown site"):
        PrefixTuner(model, {"a": 4}, sites=["encoder"])
    with pytest.raises(ValueError, match="needs init_text"):
        PrefixTuner(model, {"a": 4}, init="text")
    tuner = PrefixTuner(model, {"a": 4}, mid_dim=8, seed=0)
    with pytest.raises(KeyError, match="unknown task"):
        tuner.ids(["b"])
    tuner.attach(model)
    with pytest.raises(ValueError, match="no task of this tuner"):
        model(torch.tensor([[3, 4]]), prefix_ids=torch.tensor([1]))
    tuner.detach(model)
    with pytest.raises(ValueError, match="was built for"):
        tuner.attach(tiny("bart"))


def test_detach_removes_everything():
    model = tiny("gpt2")
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        before = model(ids).logits
    tuner = PrefixTuner(model, {"a": 4}, mid_dim=8, seed=0)
    tuner.attach(model)
    assert len(model.base_model._forward_pre_hooks) == 2  # positions + the tuner's per-forward K/V
    tuner.detach(model)
    assert not model.base_model._forward_pre_hooks and not prefixrt.is_attached(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, atol=0, rtol=0)


def test_bart_sites_subset_leaves_others_empty():
    model = tiny("bart")
    words = torch.tensor([5, 9, 17])
    tuner = PrefixTuner(
        model, {"a": None}, sites=["decoder"], init="text", init_text=words, mid_dim=8, seed=0
    )
    assert tuner.lengths("encoder").tolist() == [0] and tuner.lengths("decoder").tolist() == [3]
    tuner.attach(model)
    batch = batch_for("bart", [5, 5])
    lm_loss(model, batch, tuner.ids(["a", None]))[0].backward()
    assert tuner.prefixes[0]["decoder"].mlp[2].weight.grad.abs().sum() > 0
    bank = tuner.materialize()
    assert bank.lengths("encoder").tolist() == [0] and bank.lengths("cross").tolist() == [0]


def test_seeded_construction_leaves_global_rng_alone():
    model = tiny("gpt2")
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    a = PrefixTuner(model, {"a": 4}, mid_dim=8, seed=3)
    assert torch.equal(torch.rand(3), expected)
    b = PrefixTuner(model, {"a": 4}, mid_dim=8, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
