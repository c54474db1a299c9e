"""End-to-end mixed-prefix generation speed, prefixrt vs the usual ways, in one session.

Workload (:mod:`prefixrt.bench.generation`): GPT-2-small size (12 layers, 768 wide, 12 heads; seeded random
weights), 8 prefixes x 4 requests, 32-token prompts, 64 new tokens, greedy, P = 10 and 200. Cases, per P:
``peft_style`` (one batch per prefix, prefix copied into a DynamicCache, mask extended: what PEFT does),
``hf_attached`` (HF generate() on the attached model, one mixed batch), ``prefixrt_generate``,
``prefixrt_engine``. Each case runs once (rounds=1: a run is tens of seconds on a 2-core CPU); the extra info
holds the token count, so tokens/s = tokens / mean time. The prefixrt cases check they produce the baselines'
tokens.

    python -m pytest benchmarks/bench_generate.py --benchmark-only        # PREFIXRT_BENCH_SMALL=1: 2-layer smoke

``prefixrt bench generate`` runs the same workload and writes a table, JSON and a plot.
"""

import os

import pytest
import torch

import prefixrt
from prefixrt.bench.generation import METHODS, Workload, build, run_method

SMALL = dict(layers=2, hidden=64, heads=4, vocab=1000) if os.environ.get("PREFIXRT_BENCH_SMALL") else {}
_outputs: dict = {}


@pytest.fixture(scope="module", params=[10, 200], ids=lambda p: f"P{p}")
def workload(request):
    w = Workload(prefix_len=request.param, **SMALL)
    model, bank, input_ids, prefix_ids = build(w)
    yield w, model, bank, input_ids, prefix_ids
    if prefixrt.is_attached(model):
        prefixrt.detach(model)


@pytest.mark.parametrize("method", METHODS)
def test_generate(record_device, workload, method):
    w, model, bank, input_ids, prefix_ids = workload
    if method == "peft_style" and prefixrt.is_attached(model):
        prefixrt.detach(model)
    elif method != "peft_style" and not prefixrt.is_attached(model):
        prefixrt.attach(model, bank)
    record_device.group = f"generate P={w.prefix_len} ({w.prefixes}x{w.per_prefix} requests)"
    record_device.extra_info.update(tokens=w.rows * w.new_tokens, workload=w.to_dict(), method=method)
    out = record_device.pedantic(
        run_method, args=(method, model, bank, input_ids, prefix_ids, w), rounds=1, iterations=1
    )
    assert out.shape == (w.rows, w.prompt_len + w.new_tokens)
    _outputs[(w.prefix_len, method)] = out
    if method.startswith("prefixrt") and (w.prefix_len, "hf_attached") in _outputs:
        assert torch.equal(out, _outputs[(w.prefix_len, "hf_attached")])
