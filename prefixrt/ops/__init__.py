"""The functional op layer: prefix attention, its plain-torch oracle, and the backend registry.

Plan once per step, run once per layer: ``StepPlan.build(prefix_ids, lengths)`` validates the rows' ids and
builds the sort-by-id tables; ``prefix_attention(q, k, v, BankLayer(k, v, offsets), plan, ...)`` is what the
model integration calls once per (site, layer). Backends register themselves
on import; an optional backend that cannot be imported on this machine (no Triton, no compiler) leaves its
reason in ``_import_errors`` so that asking for it explicitly says why. This layer never imports transformers.
"""

from __future__ import annotations

import importlib

from prefixrt.ops import reference_backend as _reference_backend  # noqa: F401  (registers "reference")
from prefixrt.ops.args import AttentionArgs, check_attention_args
from prefixrt.ops.attention import prefix_attention
from prefixrt.ops.plan import BankLayer, StepPlan
from prefixrt.ops.reference import gather_prefix, prefix_attention_reference
from prefixrt.ops.registry import (
    AttentionCall,
    Backend,
    BackendUnavailable,
    available_backends,
    explain_backends,
    register_backend,
    resolve_name,
    select_backend,
)

_import_errors: dict[str, str] = {}

# Optional backends: each module registers itself when its toolchain is present.
for _name, _module in (("triton", "prefixrt.ops.triton.backend"), ("cpp", "prefixrt.ops.cpp.backend")):
    try:
        importlib.import_module(_module)
    except ModuleNotFoundError as _err:
        if _err.name == _module:
            _import_errors[_name] = f"{_module} is not part of this build"
        else:
            _import_errors[_name] = f"missing dependency: {_err}"
    except Exception as _err:  # a broken toolchain must not break `import prefixrt`
        _import_errors[_name] = f"{type(_err).__name__}: {_err}"

__all__ = [
    "AttentionArgs",
    "AttentionCall",
    "Backend",
    "BackendUnavailable",
    "BankLayer",
    "StepPlan",
    "available_backends",
    "check_attention_args",
    "explain_backends",
    "gather_prefix",
    "prefix_attention",
    "prefix_attention_reference",
    "register_backend",
    "resolve_name",
    "select_backend",
]
