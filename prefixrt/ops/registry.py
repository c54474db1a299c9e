"""Backend registry for prefix attention: who can run an input, and why the others refused.

A backend is a pair of plain functions (forward, backward) on tensors plus a ``refuse`` check that returns
``None`` when it can run a call or a short reason when it cannot (xformers' dispatcher style). Backends
register themselves when their module is imported (``prefixrt.ops`` imports them all); nothing here imports a
kernel library, so a machine without Triton or a compiler still imports prefixrt.

Selection
---------
* An explicit name (``"reference"``, ``"triton"``, ``"cpp"``) must be able to run the call, else
  :class:`BackendUnavailable` says why.
* ``"auto"`` takes, among the backends that accept the call, the one with the highest priority for the
  tensors' device (Triton on CUDA, C++ on CPU when built and faster), falling back to the reference.
* The environment variable ``PREFIXRT_BACKEND`` replaces ``"auto"`` when set.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

__all__ = [
    "AttentionCall",
    "Backend",
    "BackendUnavailable",
    "register_backend",
    "get_backend",
    "available_backends",
    "select_backend",
    "explain_backends",
]

BACKEND_NAMES = ("auto", "reference", "triton", "cpp")


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run this call (the message says why)."""


@dataclass(frozen=True)
class AttentionCall:
    """What a backend needs to know to accept or refuse a call (no tensor data, no device sync)."""

    device_type: str
    dtype: torch.dtype
    head_dim: int
    q_len: int
    k_len: int
    causal: bool
    dropout_p: float
    requires_grad: bool

    @staticmethod
    def of(
        q: torch.Tensor, k: torch.Tensor, causal: bool, dropout_p: float, requires_grad: bool
    ) -> AttentionCall:
        return AttentionCall(
            device_type=q.device.type,
            dtype=q.dtype,
            head_dim=q.shape[-1],
            q_len=q.shape[2],
            k_len=k.shape[2],
            causal=causal,
            dropout_p=dropout_p,
            requires_grad=requires_grad,
        )


@dataclass
class Backend:
    """One implementation of prefix attention.

    ``forward(args: AttentionArgs)`` returns ``(out [B, H, Tq, D], lse [B, H, Tq] fp32)``.
    ``backward(args, dout, out, lse, needs)`` returns ``(dq, dk, dv, dbank_k, dbank_v)``, the bank gradients summed
    over rows that share an id, zero for entries no row uses; ``needs`` (five bools, in that order) says which
    of them autograd wants: a backend may skip the others and return anything (e.g. None) in their place.
    Dropout (``args.dropout_p > 0``) uses the mask of :mod:`prefixrt.ops.dropout` drawn from ``args.philox``. Inputs were checked once by the op layer
    (:func:`prefixrt.ops.args.check_attention_args` and :meth:`prefixrt.ops.StepPlan.build`): a backend sees
    only valid calls.
    ``refuse(call)`` returns None when the backend accepts the call, else a short reason.
    ``priority`` maps a device type to a rank for "auto" (higher wins; absent means never auto-picked).
    """

    name: str
    forward: Callable
    backward: Callable
    refuse: Callable[[AttentionCall], str | None]
    priority: dict[str, int] = field(default_factory=dict)


_REGISTRY: dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    """Add (or replace) a backend under ``backend.name``."""
    if backend.name not in BACKEND_NAMES[1:]:
        raise ValueError(f"backend name must be one of {BACKEND_NAMES[1:]}, got {backend.name!r}")
    _REGISTRY[backend.name] = backend


def get_backend(name: str) -> Backend:
    """The registered backend called ``name``; raises :class:`BackendUnavailable` when it is not registered."""
    if name not in _REGISTRY:
        raise BackendUnavailable(f"backend {name!r} is not available on this machine: {_why_missing(name)}")
    return _REGISTRY[name]


def _why_missing(name: str) -> str:
    from prefixrt.ops import _import_errors  # local import: filled in when prefixrt.ops imports the backends

    if name not in BACKEND_NAMES[1:]:
        return f"unknown backend; expected one of {BACKEND_NAMES}"
    return _import_errors.get(name, "it did not register")


def available_backends() -> list[str]:
    """Names of the backends registered on this machine (importable; they may still refuse some inputs)."""
    return sorted(_REGISTRY)


def resolve_name(backend: str | None) -> str:
    """Apply the ``PREFIXRT_BACKEND`` environment override to ``"auto"`` / None and validate the name."""
    name = backend or "auto"
    if name == "auto":
        name = os.environ.get("PREFIXRT_BACKEND", "auto") or "auto"
    if name not in BACKEND_NAMES:
        raise ValueError(
            f"backend must be one of {BACKEND_NAMES} (or PREFIXRT_BACKEND set to one), got {name!r}"
        )
    return name


def select_backend(backend: str | None, call: AttentionCall) -> Backend:
    """Pick the backend that runs ``call``; see the module docstring for the rules."""
    name = resolve_name(backend)
    if name != "auto":
        chosen = get_backend(name)
        reason = chosen.refuse(call)
        if reason is not None:
            raise BackendUnavailable(f"backend {name!r} cannot run this call: {reason}")
        return chosen
    ranked = sorted(
        (b for b in _REGISTRY.values() if call.device_type in b.priority),
        key=lambda b: -b.priority[call.device_type],
    )
    for candidate in ranked:
        if candidate.refuse(call) is None:
            return candidate
    return _REGISTRY["reference"]


def explain_backends(call: AttentionCall) -> dict[str, str]:
    """For each known backend name: ``"ok"`` or the reason it would refuse ``call`` (for logs and errors)."""
    out = {}
    for name in BACKEND_NAMES[1:]:
        if name not in _REGISTRY:
            out[name] = f"unavailable: {_why_missing(name)}"
        else:
            out[name] = _REGISTRY[name].refuse(call) or "ok"
    return out
