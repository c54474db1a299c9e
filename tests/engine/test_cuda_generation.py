"""Generation on a CUDA device (skipped without one): the decode step captured as a CUDA graph gives the tokens
of eager decoding and of HF generate() on the attached model, with the Triton backend that "auto" picks there."""

import pytest
import torch
from support.tiny import left_padded, random_bank, random_ids, tiny_bart, tiny_gpt2

import prefixrt
from prefixrt.engine import Engine, SamplingParams, capture, generate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CUDA graphs)")


@pytest.fixture(params=["gpt2", "bart"])
def attached(request):
    model = (
        tiny_gpt2(seed=1, initializer_range=0.3)
        if request.param == "gpt2"
        else tiny_bart(seed=1, init_std=0.3, decoder_attention_heads=2)
    )
    model = model.cuda()
    bank = random_bank(model, {"long": 11, "short": 3, "other": 6}, seed=2)
    return prefixrt.attach(model, bank), bank


@pytest.fixture
def captures(monkeypatch):
    """Counts the decode steps captured as CUDA graphs (a failed capture warns and counts nothing)."""
    count = []
    original = capture.GraphedDecode._capture

    def counting(self, *args):
        ok = original(self, *args)
        count.append(ok)
        return ok

    monkeypatch.setattr(capture.GraphedDecode, "_capture", counting)
    return count


def test_generate_on_cuda_matches_hf_generate(attached, captures):
    model, bank = attached
    input_ids, mask = left_padded([9, 4, 7, 9], 9, seed=3)
    input_ids, mask = input_ids.cuda(), mask.cuda()
    ids = bank.ids(["long", None, "short", "other"])
    kwargs = dict(max_new_tokens=12, do_sample=False)
    ours = generate(model, input_ids, attention_mask=mask, prefix_ids=ids, **kwargs)
    theirs = model.generate(input_ids, attention_mask=mask, prefix_ids=ids, **kwargs)
    assert torch.equal(ours, theirs)
    assert captures and all(captures), "the decode step was never captured as a CUDA graph"


def test_engine_graphs_give_the_eager_tokens(attached, captures):
    model, bank = attached
    requests = [
        (random_ids(1, 3 + i, seed=10 + i)[0], [None, "long", "short", "other"][i % 4]) for i in range(7)
    ]
    tokens = {}
    for graphs in (False, True):
        engine = Engine(
            model, bank, max_batch_size=3, max_prompt_tokens=12, max_new_tokens=10, cuda_graphs=graphs
        )
        rids = [
            engine.add_request(p, prefix=x, params=SamplingParams(max_new_tokens=10)) for p, x in requests
        ]
        engine.run()
        tokens[graphs] = [engine.result(r).tokens for r in rids]
    assert tokens[True] == tokens[False]
    assert captures and all(captures), "the engine never captured its decode step"
