"""The C++ CPU backend: fused prefix attention from ``csrc/`` that reads the packed bank in place.

Registered as ``"cpp"`` with priority 50 on CPU, so ``"auto"`` prefers it over the reference for CPU
tensors whenever it accepts the call (see ``benchmarks/bench_cpp_attention.py`` and
``benchmarks/results/cpu_attention.md`` for the measured speedups that justify the rank). It refuses:

* tensors not on the CPU;
* dtypes other than float32, bfloat16 and float16 (the reference keeps float64 for oracle tests);
* every call, when the kernels cannot be built here (no compiler, no ninja, no sources): the reason is
  given once as a warning (``"auto"`` then falls back to the reference) and in the
  :class:`~prefixrt.ops.registry.BackendUnavailable` that ``backend="cpp"`` raises.

Attention dropout runs inside the kernels, forward and backward, with the mask of :mod:`prefixrt.ops.dropout`
(``csrc/philox.h``), regenerated in the backward from the call's Philox state.

The kernels are compiled on first use (``prefixrt.ops.cpp.build``), not at import: importing prefixrt stays
fast and never needs a compiler.
"""

from __future__ import annotations

import warnings

import torch

from prefixrt.ops.args import AttentionArgs
from prefixrt.ops.cpp import build as cpp_build
from prefixrt.ops.dropout import dropout_keep_threshold, dropout_scale
from prefixrt.ops.registry import AttentionCall, Backend, register_backend

__all__ = ["cpp_forward", "cpp_backward", "cpp_dropout_mask", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_warned = False


def cpp_forward(args: AttentionArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefix attention forward in C++.

    ``args.q [B, H, Tq, D]``, ``args.k``/``args.v [B, H, Tk, D]``: any strides; views whose last dim is
    contiguous (HF's transposed views) are read in place, and so is the bank (``[H, S, D]``).

    Returns
    -------
    out : Tensor ``[B, H, Tq, D]`` in ``q.dtype``; lse : Tensor ``[B, H, Tq]`` fp32, natural log.
    """
    kernels = cpp_build.load_kernels()
    with torch.no_grad():
        return kernels.forward(*_kernel_inputs(args))


def cpp_backward(
    args: AttentionArgs,
    dout: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    needs: tuple[bool, bool, bool, bool, bool] = (True, True, True, True, True),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prefix attention backward in C++ (probabilities recomputed from ``lse``, the bank read in place).

    ``dout [B, H, Tq, D]`` and the forward's ``out`` and ``lse`` next to the call's ``args``; ``needs`` says
    which of ``(dq, dk, dv, dbank_k, dbank_v)`` to compute (dk/dv and the two bank gradients go in pairs).

    Returns
    -------
    dq ``[B, H, Tq, D]``, dk, dv ``[B, H, Tk, D]``, dbank_k, dbank_v ``[H, S, D]``, in the inputs' dtype;
    the bank gradients summed over the rows that share an entry (deterministically), zero for unused entries;
    an empty tensor ``[0]`` for a gradient that was not computed.
    """
    kernels = cpp_build.load_kernels()
    with torch.no_grad():
        return kernels.backward(dout, *_kernel_inputs(args), out, lse, [bool(n) for n in needs])


def cpp_dropout_mask(
    philox: torch.Tensor, dropout_p: float, heads: int, q_len: int, key_stride: int, coords: torch.Tensor
) -> torch.Tensor:
    """The C++ kernels' dropout multiplier (0 or ``1 / (1 - p)``, fp32 ``[N]``) of elements ``coords``
    (LongTensor ``[N, 4]`` of ``(b, h, i, j)``): for tests against :mod:`prefixrt.ops.dropout`."""
    seed, offset = philox.tolist()
    return cpp_build.load_kernels().dropout_mask(
        coords.long().cpu(), heads, q_len, key_stride, seed, offset,
        dropout_keep_threshold(dropout_p), dropout_scale(dropout_p),
    )  # fmt: skip


def _kernel_inputs(args: AttentionArgs) -> tuple:
    """The C++ entry points' leading arguments (csrc/bindings.cpp); the kernels plan rows by id themselves.
    Dropout: its flag, the Philox seed and offset (int64 bit patterns), the keep threshold and the scale."""
    if args.dropout:
        seed, offset = args.philox.tolist()
        p = args.dropout_p
        drop = (True, seed, offset, dropout_keep_threshold(p), dropout_scale(p))
    else:
        drop = (False, 0, 0, 0, 1.0)
    return (args.q, args.k, args.v, args.bank.k, args.bank.v, args.prefix_ids, args.bank.offsets,
            args.key_padding_mask, bool(args.causal), float(args.scale), *drop)  # fmt: skip


def _refuse(call: AttentionCall) -> str | None:
    global _warned
    if call.device_type != "cpu":
        return f"the C++ kernels run on CPU tensors only, got {call.device_type}"
    if call.dtype not in SUPPORTED_DTYPES:
        return f"dtype {call.dtype} is not supported (float32, bfloat16, float16)"
    module, reason = cpp_build.kernels_or_reason()
    if module is None:
        if not _warned:
            _warned = True
            warnings.warn(
                f"prefixrt: the C++ CPU kernels are unavailable ({reason}); "
                "CPU attention falls back to the reference backend",
                RuntimeWarning,
                stacklevel=2,
            )
        return f"the C++ kernels are unavailable: {reason}"
    return None


register_backend(
    Backend(name="cpp", forward=cpp_forward, backward=cpp_backward, refuse=_refuse, priority={"cpu": 50})
)
