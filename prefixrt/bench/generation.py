"""The end-to-end mixed-prefix generation benchmark: the workload, the ways to run it, and how each is measured.

Workload: a GPT-2-small-size model (12 layers, 768 wide, 12 heads, vocabulary 50257; seeded random weights),
``prefixes x per_prefix`` requests (row ``r`` uses prefix ``r % prefixes``), prompts of 32 random tokens, 64 new
tokens each, greedy, no EOS (every row generates exactly ``new_tokens``), prefix length ``P``.

Methods (same model weights, same bank, same prompts):

* ``peft_style`` -- what PEFT does: each prefix's requests as their own batch, HF ``generate()`` on the plain
  model with the prefix's K/V copied into a ``DynamicCache`` (expanded to the batch) and the attention mask
  extended by ``P`` ones (built by hand; same positions as PEFT: real tokens at ``P .. P+T-1``);
* ``hf_attached`` -- HF ``generate()`` on the model attached with ``prefixrt.attach``, one mixed batch;
* ``hf_compiled`` -- the same under HF's compiled decoding: ``model.forward = torch.compile(model.forward)`` and
  ``generate(cache_implementation="static")`` (compiled once per model, in an untimed first call);
* ``prefixrt_generate`` -- :func:`prefixrt.generate`, one mixed batch;
* ``prefixrt_engine`` -- :class:`prefixrt.Engine` with every request added at once;
* ``prefixrt_engine_plain`` -- the Engine with torch's own weight GEMMs (``gemm="plain"``), to show what the packed
  ones (:mod:`prefixrt.hf.models.gemm`) bring;
* ``hf_no_prefix`` -- HF ``generate()`` on the plain model *without* prefixes (what a server with no prefix support,
  such as vLLM, computes; its tokens are the vLLM arm's check).

Each is timed end to end (prefill included) and its peak memory is the growth of the process's resident set
over the run (Linux ``VmHWM`` after resetting it through ``/proc/self/clear_refs``, minus ``VmRSS`` before): it
sees torch's CPU allocations, which ``tracemalloc`` does not. Outputs are compared token for token.
"""

from __future__ import annotations

import gc
import time
from dataclasses import asdict, dataclass

import torch

__all__ = [
    "ATTACHED",
    "METHODS",
    "Workload",
    "build",
    "matmul_floor",
    "measure",
    "process_peak_rss",
    "run_method",
    "uncompile",
]

METHODS = (
    "peft_style",
    "hf_attached",
    "hf_compiled",
    "prefixrt_generate",
    "prefixrt_engine",
    "prefixrt_engine_plain",
    "hf_no_prefix",
)
ATTACHED = ("hf_attached", "hf_compiled", "prefixrt_generate", "prefixrt_engine", "prefixrt_engine_plain")


@dataclass(frozen=True)
class Workload:
    prefixes: int = 8
    per_prefix: int = 4
    prefix_len: int = 10
    prompt_len: int = 32
    new_tokens: int = 64
    layers: int = 12
    hidden: int = 768
    heads: int = 12
    vocab: int = 50257
    seed: int = 0

    @property
    def rows(self) -> int:
        return self.prefixes * self.per_prefix

    def to_dict(self) -> dict:
        return asdict(self)


def build(workload: Workload, model=None, device: torch.device | str = "cpu"):
    """``(model, bank, input_ids [rows, T], prefix_ids [rows])`` on ``device``; the model is built unless given
    (then only checked to have the workload's shape). The model is returned detached."""
    from transformers import GPT2Config, GPT2LMHeadModel

    import prefixrt

    if model is None:
        torch.manual_seed(workload.seed)
        config = GPT2Config(
            n_layer=workload.layers,
            n_embd=workload.hidden,
            n_head=workload.heads,
            vocab_size=workload.vocab,
            n_positions=1024,
            eos_token_id=None,
            bos_token_id=None,
            pad_token_id=0,
        )
        model = GPT2LMHeadModel(config).eval().requires_grad_(False).to(device)
    # The prompts do not depend on the prefix length: one vLLM run (no prefixes) serves every P.
    prompts = torch.Generator().manual_seed(workload.seed + 2)
    # Token 0 is the pad id: keep it out of the prompts (HF would infer padding from it).
    input_ids = torch.randint(1, workload.vocab, (workload.rows, workload.prompt_len), generator=prompts)
    g = torch.Generator().manual_seed(workload.seed + 1)
    bank = prefixrt.PrefixBank.for_model(model)
    head_dim = workload.hidden // workload.heads
    for p in range(workload.prefixes):
        kv = torch.randn(workload.layers, 2, workload.heads, workload.prefix_len, head_dim, generator=g)
        bank.add(f"prefix{p}", kv)
    prefix_ids = torch.arange(workload.rows) % workload.prefixes
    return model, bank, input_ids.to(device), prefix_ids.to(device)


def _generate_kwargs(workload: Workload) -> dict:
    return dict(max_new_tokens=workload.new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)


def peft_style_generate(model, bank, input_ids, prefix_ids, workload: Workload) -> torch.Tensor:
    """PEFT's way: one batch per prefix, the prefix copied into the cache and the mask extended."""
    from transformers import DynamicCache

    from prefixrt.hf.kv_cache import cache_keyword

    out = torch.empty(
        input_ids.shape[0],
        workload.prompt_len + workload.new_tokens,
        dtype=torch.long,
        device=input_ids.device,
    )
    for pid in prefix_ids.unique().tolist():
        rows = (prefix_ids == pid).nonzero()[:, 0]
        kv = bank.entry(bank.name_of(pid))["decoder"]  # [L, 2, H, P, D]
        cache = DynamicCache(config=model.config)
        for layer in range(kv.shape[0]):
            k = kv[layer, 0][None].expand(rows.numel(), -1, -1, -1).contiguous()
            v = kv[layer, 1][None].expand(rows.numel(), -1, -1, -1).contiguous()
            cache.update(k, v, layer)
        mask = torch.ones(rows.numel(), kv.shape[3] + input_ids.shape[1], dtype=torch.long, device=kv.device)
        out[rows] = model.generate(
            input_ids[rows],
            attention_mask=mask,
            **{cache_keyword(model): cache},
            **_generate_kwargs(workload),
        )
    return out


_COMPILED: dict[int, object] = {}  # id(model) -> its compiled forward (compiled once, reinstalled per run)


def compile_forward(model) -> None:
    """HF's compiled decoding set-up: the model's forward replaced by ``torch.compile`` of it."""
    if id(model) not in _COMPILED:
        _COMPILED[id(model)] = torch.compile(model.forward, fullgraph=True)
    model.forward = _COMPILED[id(model)]


def uncompile(model) -> None:
    """Back to the class's own forward (the compiled one stays cached for the next ``hf_compiled`` run)."""
    model.__dict__.pop("forward", None)


def run_method(name: str, model, bank, input_ids, prefix_ids, workload: Workload) -> torch.Tensor:
    """Run one method; ``model`` must be attached to ``bank`` for the :data:`ATTACHED` methods, detached for
    the others."""
    from prefixrt.engine import Engine, SamplingParams, generate

    with torch.no_grad():
        if name == "peft_style":
            return peft_style_generate(model, bank, input_ids, prefix_ids, workload)
        mask = torch.ones_like(input_ids)
        if name == "hf_no_prefix":
            return model.generate(input_ids, attention_mask=mask, **_generate_kwargs(workload))
        if name == "hf_attached":
            return model.generate(
                input_ids, attention_mask=mask, prefix_ids=prefix_ids, **_generate_kwargs(workload)
            )
        if name == "hf_compiled":
            compile_forward(model)
            try:
                return model.generate(
                    input_ids,
                    attention_mask=mask,
                    prefix_ids=prefix_ids,
                    cache_implementation="static",
                    **_generate_kwargs(workload),
                )
            finally:
                uncompile(model)
        if name == "prefixrt_generate":
            return generate(
                model, input_ids, attention_mask=mask, prefix_ids=prefix_ids, **_generate_kwargs(workload)
            )
        if name in ("prefixrt_engine", "prefixrt_engine_plain"):
            engine = Engine(
                model,
                bank,
                max_batch_size=input_ids.shape[0],
                max_prompt_tokens=input_ids.shape[1],
                max_new_tokens=workload.new_tokens,
                gemm="plain" if name == "prefixrt_engine_plain" else "auto",
            )
            params = SamplingParams(max_new_tokens=workload.new_tokens, eos_token_id=None, pad_token_id=0)
            ids = [
                engine.add_request(row, prefix=bank.name_of(int(p)), params=params)
                for row, p in zip(input_ids, prefix_ids, strict=True)
            ]
            results = engine.run()
            new = torch.tensor([results[i].tokens for i in ids], device=input_ids.device)
            return torch.cat([input_ids, new], dim=1)
    raise ValueError(f"unknown method {name!r}; methods are {METHODS}")


def _status_kb(field: str) -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def process_peak_rss(device: torch.device | str = "cpu") -> int | None:
    """On a CPU, the whole process's peak resident memory (bytes) since :func:`measure` last reset it (Linux
    ``VmHWM``); None on CUDA or where /proc is unavailable."""
    if torch.device(device).type != "cpu":
        return None
    try:
        return _status_kb("VmHWM") * 1024
    except OSError:
        return None


def measure(fn, device: torch.device | str = "cpu") -> tuple[object, float, int | None]:
    """``(result, seconds, peak memory growth in bytes)``: on CUDA the allocator's peak over what was allocated
    before; on CPU the peak RSS growth (None where /proc is unavailable)."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = fn()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        return result, seconds, torch.cuda.max_memory_allocated() - before
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
            f.write("5")  # reset VmHWM (peak RSS) to the current RSS
        before = _status_kb("VmRSS")
    except OSError:
        before = None
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    peak = None if before is None else (_status_kb("VmHWM") - before) * 1024
    return result, seconds, peak


def matmul_floor(model, workload: Workload, gemm: str = "plain") -> float:
    """Seconds that the model's weight matmuls alone take for the workload, on this machine now, computed the
    ``gemm`` way (``"plain"``: torch's ``F.linear``; ``"packed"``: oneDNN on packed weights, as the runners do):
    a lower bound for any method that runs the model's layers through those GEMMs (attention, caches, sampling
    and Python excluded).

    Prefill: every layer's four projections on ``rows * prompt_len`` tokens and the LM head on the last one;
    then ``new_tokens - 1`` decode steps of ``rows`` tokens through the projections and the LM head.
    """
    from prefixrt.hf.models import runner_for
    from prefixrt.hf.models.gemm import weight_out_in

    runner = runner_for(model, gemm)
    modules = runner.linears()  # the blocks' GEMMs, the LM head last
    head, blocks = modules[-1], modules[:-1]
    rows, device, dtype = workload.rows, runner.device, runner.dtype

    def step(tokens: int):
        inputs = [torch.randn(tokens, weight_out_in(m).shape[1], dtype=dtype, device=device) for m in blocks]
        head_in = torch.randn(rows, weight_out_in(head).shape[1], dtype=dtype, device=device)  # last tokens
        return lambda: (
            [runner.gemm(m, x) for m, x in zip(blocks, inputs, strict=True)] + [runner.gemm(head, head_in)]
        )

    repeats = 4
    with torch.no_grad():
        prefill_step, decode_step = step(rows * workload.prompt_len), step(rows)
        decode_step()  # warm-up
        _, prefill, _ = measure(prefill_step, device)
        _, decode, _ = measure(lambda: [decode_step() for _ in range(repeats)], device)
    return prefill + (workload.new_tokens - 1) * decode / repeats
