"""``torch.compile`` of an attached GPT-2: the compiled model gives the eager logits, and the graph calls the op.

transformers' own GPT-2 compiles with ``fullgraph=True`` with and without a mask and a cache, so these tests ask
the same of the attached model. A recording backend (it keeps each FX graph and runs it as is) checks the graph;
one slow test runs inductor.
"""

import pytest
import torch
from support.tiny import left_padded, random_bank, random_kv, tiny_bart, tiny_gpt2
from transformers import DynamicCache, StaticCache

import prefixrt
import prefixrt.ops.library  # registers torch.ops.prefixrt.prefix_attention

OP = torch.ops.prefixrt.prefix_attention.default


class Recorder:
    """A torch.compile backend that records the FX graphs and runs them unchanged."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward

    def op_calls(self) -> list:
        return [n for g in self.graphs for n in g.graph.nodes if n.op == "call_function" and n.target is OP]


@pytest.fixture
def setup():
    torch._dynamo.reset()
    model = tiny_gpt2()
    bank = random_bank(model, {"short": 3, "long": 17, "other": 5})
    prefixrt.attach(model, bank, backend="reference")
    ids, mask = left_padded([7, 9, 4], 9, seed=31)
    yield model, bank, ids, mask, bank.ids(["long", None, "short"])
    torch._dynamo.reset()


def test_the_trace_time_backend_choice_uses_dynamos_constant_marker():
    """prefixrt.ops marks its backend lookup as torch.compiler.assume_constant_result does, without importing
    dynamo at import time: this fails if torch changes how the marker is spelled."""
    from prefixrt.ops import attention

    assert torch.compiler.assume_constant_result(lambda: 0)._dynamo_marked_constant is True
    assert attention._graph_backend._dynamo_marked_constant is True


@pytest.mark.parametrize(
    "case",
    [
        "no_mask_no_cache",  # transformers wraps the mask function for packed-sequence detection while tracing
        "mask_no_cache",
        "mask_dynamic_cache",
    ],
)
def test_compiled_fullgraph_gives_the_eager_logits_and_calls_the_op(setup, case):
    model, _, ids, mask, prefix_ids = setup
    kwargs = {
        "no_mask_no_cache": dict(use_cache=False),
        "mask_no_cache": dict(attention_mask=mask, use_cache=False),
        "mask_dynamic_cache": dict(attention_mask=mask, past_key_values=DynamicCache(config=model.config)),
    }[case]
    eager = model(ids, prefix_ids=prefix_ids, **kwargs).logits
    if "past_key_values" in kwargs:
        kwargs["past_key_values"] = DynamicCache(config=model.config)
    recorder = Recorder()
    compiled = torch.compile(model, backend=recorder, fullgraph=True)(
        ids, prefix_ids=prefix_ids, **kwargs
    ).logits
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    assert len(recorder.graphs) == 1
    calls = recorder.op_calls()
    assert len(calls) == model.config.n_layer  # one op call per layer, inside the one graph
    assert calls[0].args[-1] == "reference"  # the backend, resolved while tracing, is a constant of the graph


def test_compiled_bart_fullgraph_gives_the_eager_logits_and_calls_the_op_at_every_site():
    torch._dynamo.reset()
    model = tiny_bart()
    bank = random_bank(model, {"short": 3, "long": 9})
    prefixrt.attach(model, bank, backend="reference")
    ids, mask = left_padded([7, 9, 4], 9, seed=32)
    kwargs = dict(
        attention_mask=mask, decoder_input_ids=ids[:, :4], prefix_ids=bank.ids(["long", None, "short"])
    )
    eager = model(**kwargs, input_ids=ids, use_cache=False).logits
    recorder = Recorder()
    compiled = torch.compile(model, backend=recorder, fullgraph=True)(
        **kwargs, input_ids=ids, use_cache=False
    )
    torch.testing.assert_close(compiled.logits, eager, rtol=0, atol=0)
    layers = model.config.encoder_layers + 2 * model.config.decoder_layers  # encoder, decoder, cross
    assert len(recorder.graphs) == 1 and len(recorder.op_calls()) == layers
    torch._dynamo.reset()


def test_compiled_static_cache_prefill_and_decode_equal_the_eager_dynamic_cache(setup):
    """Inside torch.compile a static cache's position is a tensor: the keys are rotated (prefill) and the empty
    slots masked (decode) without reading it."""
    model, _, ids, mask, prefix_ids = setup
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    token, step_mask = torch.tensor([[5], [6], [7]]), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)

    def run(forward, cache):
        first = forward(
            ids, attention_mask=mask, position_ids=positions, prefix_ids=prefix_ids, past_key_values=cache
        )
        step = forward(
            token,
            attention_mask=step_mask,
            position_ids=positions[:, -1:] + 1,
            prefix_ids=prefix_ids,
            past_key_values=cache,
        )
        return first.logits, step.logits

    expected = run(model, DynamicCache(config=model.config))
    recorder = Recorder()
    got = run(
        torch.compile(model, backend=recorder, fullgraph=True),
        StaticCache(config=model.config, max_cache_len=16),
    )
    # decode attends over the whole capacity with the empty slots masked: the same keys, another summation order
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert len(recorder.op_calls()) == 2 * model.config.n_layer


def test_compiled_bad_ids_fail_the_graphs_assert(setup):
    model, _, ids, mask, _ = setup
    compiled = torch.compile(model, backend=Recorder(), fullgraph=True)
    compiled(ids, attention_mask=mask, prefix_ids=torch.tensor([0, 1, -1]), use_cache=False)
    with pytest.raises(RuntimeError, match="prefix_ids holds an id outside -1"):
        compiled(ids, attention_mask=mask, prefix_ids=torch.tensor([0, 7, -1]), use_cache=False)


def test_compiled_packed_sequences_fail_the_graphs_assert(setup):
    """Position ids that restart within a row (no mask, no cache): transformers' packed-sequence mask, which
    prefixrt cannot honour; eagerly a ValueError (test_masks.py), inside a graph the mask check's assert."""
    model, _, ids, _, prefix_ids = setup
    packed = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4]]).expand(3, -1)
    compiled = torch.compile(model, backend=Recorder(), fullgraph=True)
    with pytest.raises(RuntimeError, match="UnsupportedMask"):
        compiled(ids, position_ids=packed, prefix_ids=prefix_ids, use_cache=False)


@pytest.mark.slow
def test_a_bank_changed_after_compiling_is_read_again(setup):
    model, bank, ids, mask, _ = setup
    recorder = Recorder()
    compiled = torch.compile(model, backend=recorder)
    compiled(ids, attention_mask=mask, prefix_ids=bank.ids(["long", None, "short"]), use_cache=False)
    bank.add("new", random_kv(bank.spec, 6, torch.Generator().manual_seed(3)))
    prefix_ids = bank.ids(["new", "other", None])
    eager = model(ids, attention_mask=mask, prefix_ids=prefix_ids, use_cache=False).logits
    got = compiled(ids, attention_mask=mask, prefix_ids=prefix_ids, use_cache=False).logits
    torch.testing.assert_close(got, eager, rtol=0, atol=0)
    # fullgraph=True cannot read the changed bank inside the graph and says so
    bank.add("newer", random_kv(bank.spec, 2, torch.Generator().manual_seed(4)))
    with pytest.raises(Exception, match="the prefix bank changed since attach"):
        torch.compile(model, backend=Recorder(), fullgraph=True)(
            ids, attention_mask=mask, prefix_ids=prefix_ids, use_cache=False
        )
    model(ids, attention_mask=mask, prefix_ids=prefix_ids, use_cache=False)  # one eager forward reads it
    torch._dynamo.reset()
    torch.compile(model, backend=Recorder(), fullgraph=True)(
        ids, attention_mask=mask, prefix_ids=prefix_ids, use_cache=False
    )


@pytest.mark.slow
def test_inductor_compiled_model_gives_the_eager_logits(setup):
    model, bank, ids, mask, prefix_ids = setup
    prefixrt.detach(model)
    prefixrt.attach(model, bank)  # backend "auto": the C++ kernels on CPU when they build
    eager = model(ids, attention_mask=mask, prefix_ids=prefix_ids, use_cache=False).logits
    compiled = torch.compile(model, fullgraph=True)
    got = compiled(ids, attention_mask=mask, prefix_ids=prefix_ids, use_cache=False).logits
    torch.testing.assert_close(got, eager, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["greedy", "beam"])
def test_compiled_forward_in_generate_with_the_static_cache_gives_the_eager_tokens(setup, mode):
    """HF's compiled decoding: ``model.forward = torch.compile(model.forward)`` and ``generate(cache_implementation=
    "static")``. A second prompt length recompiles with symbolic sizes, which the op's checks must trace."""
    model, _, ids, mask, prefix_ids = setup
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, num_beams=1 if mode == "greedy" else 2)
    lengths = (9, 6)
    eager = [
        model.generate(ids[:, -n:], attention_mask=mask[:, -n:], prefix_ids=prefix_ids, **kwargs)
        for n in lengths
    ]
    recorder = Recorder()
    model.forward = torch.compile(model.forward, backend=recorder, fullgraph=True)
    try:
        for n, want in zip(lengths, eager, strict=True):
            got = model.generate(
                ids[:, -n:],
                attention_mask=mask[:, -n:],
                prefix_ids=prefix_ids,
                cache_implementation="static",
                **kwargs,
            )
            assert torch.equal(got, want), n
    finally:
        del model.forward  # back to the class's forward
    assert recorder.op_calls()
