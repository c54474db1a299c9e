"""The frozen model's weight GEMMs for the runners: torch's ``F.linear``, or oneDNN on weights packed once.

On a CPU, torch's default fp32 matmul (``F.linear``) repacks the weight into the BLAS kernel's blocked layout at
every call. vLLM's CPU backend instead reorders each weight once into oneDNN's layout and calls oneDNN's inner
product on it; torch exposes the same two steps (``torch.ops.mkldnn._reorder_linear_weight`` and
``torch.ops.mkldnn._linear_pointwise``), which is what ``"packed"`` uses. ``prefixrt bench generate`` measures
both, as weight-GEMM floors and as the Engine with each (``benchmarks/results/generate_cpu.md``).

Kinds:

* ``"plain"`` -- the module's own forward (``nn.Linear`` / GPT-2's ``Conv1D``), exactly as Hugging Face runs it;
* ``"packed"`` -- oneDNN on a packed copy of the weight for calls of up to 64 rows (decode steps; same fp32
  math, a different summation order: logits agree to ~1e-6, and greedy and beam tokens equal the plain ones on
  the benchmark workloads), the module's own forward for larger calls (prefill);
* ``"auto"`` -- ``"packed"`` for fp32 weights on a CPU where torch was built with oneDNN, else ``"plain"``.

Packing GPT-2-small takes about a second, so :func:`gemms_for` packs once per model (runners, the Engine's and
each ``prefixrt.generate`` call's, share it) and packs again if a weight is replaced or changed in place. The
packed copies cost one more copy of the weights they pack; they are freed with the model, or at once by
:func:`release_gemms`.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["GEMM_KINDS", "Gemms", "gemms_for", "release_gemms", "resolve_gemm", "weight_out_in"]

GEMM_KINDS = ("auto", "packed", "plain")

# oneDNN picks its blocked weight layout for an expected number of rows; decode steps run tens of rows.
ROWS_HINT = 32
# oneDNN builds (and caches, up to 1024 of them) one primitive of ~0.6 MB per input row count: a server seeing
# every row count would grow by hundreds of MB. So the packed GEMM takes row counts rounded up to a multiple of
# ROW_BUCKET (the padding rows are zeros, their outputs dropped) up to PACKED_MAX_ROWS: at most 8 primitives a
# weight shape, all built at the first call of each (weight, post-op). Above that (prefill), torch's F.linear,
# which measured as fast as the packed GEMM there.
ROW_BUCKET = 8
PACKED_MAX_ROWS = 64


def packed_available() -> bool:
    """Whether torch has oneDNN's packed linear ops (CPU builds with MKLDNN)."""
    return (
        torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def resolve_gemm(kind: str, device: torch.device, dtype: torch.dtype) -> str:
    """``"packed"`` or ``"plain"`` for ``kind`` (one of :data:`GEMM_KINDS`) on weights of ``device``/``dtype``."""
    if kind not in GEMM_KINDS:
        raise ValueError(f"gemm must be one of {GEMM_KINDS}, got {kind!r}")
    usable = torch.device(device).type == "cpu" and dtype == torch.float32 and packed_available()
    if kind == "packed" and not usable:
        raise ValueError(
            f"gemm='packed' needs fp32 weights on a CPU with oneDNN (torch.backends.mkldnn); got {dtype} on "
            f"{device}"
        )
    if kind == "auto":
        return "packed" if usable else "plain"
    return kind


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The module's weight as ``[out, in]``: ``nn.Linear`` stores it so, GPT-2's ``Conv1D`` as ``[in, out]``."""
    if isinstance(module, nn.Linear):
        return module.weight
    if hasattr(module, "nf") and module.weight.dim() == 2 and module.weight.shape[1] == module.nf:
        return module.weight.t()
    raise TypeError(f"cannot pack the weight of a {type(module).__name__}: expected nn.Linear or Conv1D")


# Activations oneDNN applies inside the GEMM (its "post-ops"), by transformers' class name: (attr, algorithm).
FUSED_ACTIVATIONS = {
    "NewGELUActivation": ("gelu", "tanh"),  # GPT-2's gelu_new
    "GELUTanh": ("gelu", "tanh"),
    "PytorchGELUTanh": ("gelu", "tanh"),
    "GELUActivation": ("gelu", "none"),  # BART's gelu (erf)
    "ReLU": ("relu", ""),
}


def _fused(activation) -> tuple[str, str] | None:
    """oneDNN's (attr, algorithm) for ``activation``, or None when it has no fused form (then it runs after)."""
    if activation is None:
        return ("none", "")
    name = type(activation).__name__
    if name == "GELUActivation" and getattr(activation, "act", None) is not nn.functional.gelu:
        return None  # transformers' GELUActivation(use_gelu_python=True) computes erf in Python: not fused
    return FUSED_ACTIVATIONS.get(name)


class _PackedLinear:
    """``x [..., in] -> act(x @ W^T + b) [..., out]`` through oneDNN on ``W`` reordered once, for calls of
    1 .. PACKED_MAX_ROWS rows."""

    def __init__(self, module: nn.Module):
        weight = weight_out_in(module).detach()
        self.out_features = weight.shape[0]
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), ROWS_HINT)
        bias = getattr(module, "bias", None)
        self.bias = None if bias is None else bias.detach().contiguous()
        self._primed: set[tuple[str, str]] = set()

    def _prime(self, attr: str, algorithm: str, width: int, like: torch.Tensor) -> None:
        """Build oneDNN's primitive for every row bucket of this (weight, post-op) at its first use, so that a
        long-running server's memory does not creep up as rarer row counts appear later."""
        for bucket in range(ROW_BUCKET, PACKED_MAX_ROWS + 1, ROW_BUCKET):
            zeros = like.new_zeros(bucket, width)
            torch.ops.mkldnn._linear_pointwise(zeros, self.weight, self.bias, attr, [], algorithm)
        self._primed.add((attr, algorithm))

    def __call__(self, x: torch.Tensor, activation=None) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        rows = flat.shape[0]
        bucket = -(-rows // ROW_BUCKET) * ROW_BUCKET
        if bucket != rows:
            flat = torch.cat([flat, flat.new_zeros(bucket - rows, flat.shape[1])])
        elif not flat.is_contiguous():
            flat = flat.contiguous()
        fused = _fused(activation)
        attr, algorithm = fused or ("none", "")
        if (attr, algorithm) not in self._primed:
            self._prime(attr, algorithm, flat.shape[1], flat)
        out = torch.ops.mkldnn._linear_pointwise(flat, self.weight, self.bias, attr, [], algorithm)
        out = out[:rows].view(*x.shape[:-1], self.out_features)
        return out if fused is not None else activation(out)


class Gemms:
    """The weight GEMMs of a set of modules: ``gemms(module, x)`` is ``module(x)``, computed the chosen way.

    Parameters
    ----------
    modules : the ``nn.Linear`` / ``Conv1D`` modules to run (others, and every module under ``"plain"``, run
        their own forward)
    kind : ``"packed"`` or ``"plain"`` (see :func:`resolve_gemm`)
    """

    def __init__(self, modules: Iterable[nn.Module], kind: str):
        if kind not in ("packed", "plain"):
            raise ValueError(f"kind must be 'packed' or 'plain' (resolve 'auto' first), got {kind!r}")
        self.kind = kind
        self._packed: dict[nn.Module, _PackedLinear] = {}
        self._stamp: tuple = ()
        if kind == "packed":
            with torch.no_grad():
                self._packed = {module: _PackedLinear(module) for module in modules}
            self._stamp = _stamp(self._packed)

    def __call__(
        self, module: nn.Module, x: torch.Tensor, activation: nn.Module | None = None
    ) -> torch.Tensor:
        """``activation(module(x))`` (``activation`` None: ``module(x)``); packed, the activation runs inside the
        GEMM when oneDNN has it (GELU, tanh-approximated or erf, and ReLU)."""
        packed = self._packed.get(module)
        if packed is not None and 0 < x.numel() // x.shape[-1] <= PACKED_MAX_ROWS:
            return packed(x, activation)
        out = module(x.contiguous())  # GPT-2's Conv1D views its input
        return out if activation is None else activation(out)

    def fresh(self) -> bool:
        """Whether every packed weight still matches its module's (same storage, not modified in place)."""
        return _stamp(self._packed) == self._stamp


def _stamp(packed: dict[nn.Module, _PackedLinear]) -> tuple:
    return tuple((m.weight.data_ptr(), m.weight._version) for m in packed)


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its packed Gemms


def gemms_for(model: nn.Module, modules: Iterable[nn.Module], kind: str) -> Gemms:
    """The :class:`Gemms` of ``model``'s ``modules`` for ``kind`` ("packed"/"plain"), packed once per model while
    the model lives and its weights stay as they are."""
    if kind == "plain":
        return Gemms((), "plain")
    gemms = _CACHE.get(model)
    if gemms is None or not gemms.fresh():
        gemms = _CACHE[model] = Gemms(modules, kind)
    return gemms


def release_gemms(model: nn.Module) -> None:
    """Free ``model``'s packed weights now (runners built later pack again)."""
    _CACHE.pop(model, None)
