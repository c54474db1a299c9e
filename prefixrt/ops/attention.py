"""The public prefix-attention op: check the call once, pick a backend, run it through ``torch.library``."""

from __future__ import annotations

from dataclasses import replace

import torch

from prefixrt.ops.args import AttentionArgs, check_attention_args
from prefixrt.ops.dropout import check_dropout_p, draw_philox_state, key_stride, philox_increment
from prefixrt.ops.library import run_op
from prefixrt.ops.plan import BankLayer, StepPlan
from prefixrt.ops.registry import AttentionCall, select_backend

__all__ = ["prefix_attention"]


def prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bank: BankLayer,
    plan: StepPlan,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str | None = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each row's queries over ``[bank entry plan.prefix_ids[b] ; its own keys]``.

    Parameters
    ----------
    q : Tensor ``[B, H, Tq, D]`` (any strides)
    k, v : Tensor ``[B, H, Tk, D]`` (any strides; views of a fused QKV projection are fine)
    bank : BankLayer
        The packed bank of one (site, layer): ``k``, ``v`` ``[H, S, D]``, ``offsets`` LongTensor ``[N + 1]``.
    plan : StepPlan
        ``StepPlan.build(prefix_ids, lengths)``, once per step for all layers of a site: the ids (``-1`` = no
        prefix) are validated there.
    key_padding_mask : BoolTensor ``[B, Tk]`` or None
        True where an own key may be attended to (the prefix is never masked).
    causal : bool
        Bottom-right aligned causal mask on the own keys (query ``i`` sees key ``j <= i + Tk - Tq``).
    scale : float, optional
        Defaults to ``D ** -0.5``.
    dropout_p : float in ``[0, 1)``
        Attention dropout on the normalized probabilities (0 in eval; HF passes its ``attn_pdrop`` in training).
        Every backend draws the same mask (:mod:`prefixrt.ops.dropout`) from a Philox state taken from torch's
        default generator for ``q``'s device (advancing it), so ``torch.manual_seed`` reproduces a run and
        each call draws a fresh mask; the backward regenerates it. Not inside CUDA-graph capture.
    backend : str
        ``"auto"``, ``"reference"``, ``"triton"`` or ``"cpp"`` (``PREFIXRT_BACKEND`` overrides ``"auto"``).

    Returns
    -------
    out : Tensor ``[B, H, Tq, D]``, ``q.dtype``
    lse : Tensor ``[B, H, Tq]``, fp32 (fp64 for fp64 inputs), natural log, ``-inf`` where a query sees no key;
        not differentiable.

    Gradients flow to ``q``, ``k``, ``v``, ``bank.k`` and ``bank.v``; a bank entry's gradient is summed over
    the rows that use it and is zero for entries no row uses.

    >>> import torch
    >>> q = k = v = torch.randn(2, 1, 3, 8)
    >>> offsets = torch.tensor([0, 2, 5])                   # two entries: rows 0:2 and 2:5
    >>> bank = BankLayer(torch.randn(1, 5, 8), torch.randn(1, 5, 8), offsets)
    >>> plan = StepPlan.build(torch.tensor([1, -1]), offsets.diff())
    >>> out, lse = prefix_attention(q, k, v, bank, plan, causal=True)
    >>> out.shape, lse.shape
    (torch.Size([2, 1, 3, 8]), torch.Size([2, 1, 3]))
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    dropout_p = check_dropout_p(dropout_p)
    args = AttentionArgs(q, k, v, bank, plan, key_padding_mask, bool(causal), scale)
    check_attention_args(args)
    # Refused here, or the reference would run (or raise torch's error) what the kernels refuse as unavailable.
    if not q.is_floating_point():
        raise ValueError(f"q must be a floating-point tensor [B, H, Tq, D], got dtype {q.dtype}")
    requires_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, bank.k, bank.v))
    if torch.compiler.is_compiling():  # resolved while tracing, outside the graph: the graph holds the name
        name = _graph_backend(
            backend, q.device.type, q.dtype, q.shape[-1], bool(causal), dropout_p, requires_grad
        )
    else:
        name = select_backend(backend, AttentionCall.of(q, k, causal, dropout_p, requires_grad)).name
    if dropout_p > 0.0:
        # the generator is advanced only once the call is known to run
        increment = philox_increment(*q.shape[:3], key_stride(bank.k.shape[1], k.shape[2]))
        args = replace(args, dropout_p=dropout_p, philox=draw_philox_state(q.device, increment))
    return run_op(args, name)


def _graph_backend(backend, device_type, dtype, head_dim, causal, dropout_p, requires_grad) -> str:
    """The backend a compiled graph calls, chosen once while ``torch.compile`` traces (the lengths are symbolic
    there, so the call is described without them: -1)."""
    call = AttentionCall(device_type, dtype, head_dim, -1, -1, causal, float(dropout_p), requires_grad)
    return select_backend(backend, call).name


# What torch.compiler.assume_constant_result sets, without importing torch._dynamo with prefixrt.ops (a test
# checks that it still is): dynamo runs the function at trace time and puts its result in the graph.
_graph_backend._dynamo_marked_constant = True
