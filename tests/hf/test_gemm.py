"""The runners' weight GEMMs: oneDNN on packed weights computes each module's forward (activations fused or not),
is chosen and refused by name, follows weights changed in place, and gives the plain GEMMs' tokens end to end."""

import pytest
import torch
from support.tiny import left_padded, random_bank, tiny_bart, tiny_gpt2
from torch import nn
from transformers.activations import ACT2FN
from transformers.pytorch_utils import Conv1D

import prefixrt
from prefixrt.engine import Engine, SamplingParams
from prefixrt.hf.models import runner_for
from prefixrt.hf.models.gemm import Gemms, gemms_for, packed_available, release_gemms, resolve_gemm

pytestmark = pytest.mark.skipif(not packed_available(), reason="torch built without oneDNN (MKLDNN)")


def _linear(kind: str, bias: bool = True) -> nn.Module:
    torch.manual_seed(3)
    module = nn.Linear(24, 40, bias=bias) if kind == "linear" else Conv1D(40, 24)
    return module.eval().requires_grad_(False)


@pytest.mark.parametrize("kind", ["linear", "conv1d", "linear_no_bias"])
@pytest.mark.parametrize("activation", [None, "gelu_new", "gelu", "gelu_pytorch_tanh", "relu", "silu"])
@pytest.mark.parametrize("shape", [(5, 24), (3, 7, 24), (1, 24), (8, 24), (64, 24), (65, 24), (2, 50, 24)])
def test_packed_gemm_computes_the_modules_forward(kind, activation, shape):
    module = _linear(kind.removesuffix("_no_bias"), bias=not kind.endswith("_no_bias"))
    act = None if activation is None else ACT2FN[activation]
    gemms = Gemms([module], "packed")
    x = torch.randn(*shape)
    want = module(x) if act is None else act(module(x))
    got = gemms(module, x, act)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    # A non-contiguous input (a transposed view) gives the same.
    xt = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    torch.testing.assert_close(gemms(module, xt, act), want, atol=1e-5, rtol=1e-4)


def test_every_row_count_runs_through_a_few_primitives():
    """oneDNN keeps one primitive (~0.6 MB) per row count it has seen: a server seeing every row count would
    grow by hundreds of MB. Row counts are bucketed and every bucket is built at the first call, so memory stays
    flat from then on."""

    def rss_kb() -> int:
        with open("/proc/self/status", encoding="utf-8") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

    torch.manual_seed(0)
    module = nn.Linear(256, 512).eval().requires_grad_(False)
    gemms = Gemms([module], "packed")
    inputs = [torch.randn(m, 256) for m in range(1, 400)]
    with torch.no_grad():
        gemms(module, inputs[0])  # the first call builds every bucket's primitive
        before = rss_kb()
        for x in inputs:
            torch.testing.assert_close(gemms(module, x), module(x), atol=1e-5, rtol=1e-4)
        grown = rss_kb() - before
    assert grown < 8 * 1024, f"{grown} kB more after 399 row counts"


def test_plain_gemms_run_the_module_itself():
    module = _linear("conv1d")
    x = torch.randn(4, 24)
    assert torch.equal(Gemms([module], "plain")(module, x), module(x))


def test_gemm_kinds_are_resolved_and_refused_by_name():
    assert resolve_gemm("auto", torch.device("cpu"), torch.float32) == "packed"
    assert resolve_gemm("auto", torch.device("cpu"), torch.float64) == "plain"
    assert resolve_gemm("plain", torch.device("cpu"), torch.float32) == "plain"
    with pytest.raises(ValueError, match="gemm must be one of"):
        resolve_gemm("fast", torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="gemm='packed' needs fp32"):
        resolve_gemm("packed", torch.device("cpu"), torch.float64)
    with pytest.raises(ValueError, match="gemm must be one of"):
        Engine(tiny_gpt2(), random_bank(tiny_gpt2(), {"a": 2}), gemm="fastest")


def test_packed_weights_are_made_once_per_model_and_again_after_an_in_place_change():
    model = tiny_gpt2()
    first = runner_for(model, "packed").gemm
    assert runner_for(model, "packed").gemm is first  # prefixrt.generate packs once, not at every call
    head = model.lm_head
    x = torch.randn(2, model.config.n_embd)
    before = first(head, x)
    with torch.no_grad():
        head.weight.mul_(2.0)  # tied to wte: the output layer changes in place
    assert not first.fresh()
    again = runner_for(model, "packed").gemm
    assert again is not first
    torch.testing.assert_close(again(head, x), 2.0 * before, atol=1e-5, rtol=1e-4)
    release_gemms(model)
    assert runner_for(model, "packed").gemm is not again


def test_a_model_freed_frees_its_packed_weights():
    import gc
    import weakref

    model = tiny_gpt2()
    gemms = weakref.ref(gemms_for(model, runner_for(model, "plain").linears(), "packed"))
    del model
    gc.collect()
    assert gemms() is None


@pytest.mark.parametrize("family", ["gpt2", "bart"])
def test_engine_and_generate_give_the_same_tokens_with_packed_and_plain_gemms(family):
    model = tiny_gpt2() if family == "gpt2" else tiny_bart()
    bank = random_bank(model, {"a": 3, "b": 11})
    prefixrt.attach(model, bank)
    ids, mask = left_padded([6, 9, 4], 9, seed=5)
    prefix_ids = bank.ids(["a", None, "b"])
    kwargs = dict(max_new_tokens=6, do_sample=False)
    outs = {
        gemm: prefixrt.generate(model, ids, attention_mask=mask, prefix_ids=prefix_ids, gemm=gemm, **kwargs)
        for gemm in ("plain", "packed")
    }
    assert torch.equal(outs["packed"], outs["plain"])
    assert torch.equal(
        outs["plain"], model.generate(ids, attention_mask=mask, prefix_ids=prefix_ids, **kwargs)
    )
    tokens = {}
    for gemm in ("plain", "packed"):
        engine = Engine(model, bank, max_batch_size=3, max_prompt_tokens=9, max_new_tokens=6, gemm=gemm)
        assert engine.runner.gemm.kind == gemm
        params = SamplingParams(max_new_tokens=6)
        rids = [
            engine.add_request(row[m.bool()], prefix=name, params=params)
            for row, m, name in zip(ids, mask, ["a", None, "b"], strict=True)
        ]
        results = engine.run()
        tokens[gemm] = [results[r].tokens for r in rids]
    assert tokens["packed"] == tokens["plain"]
