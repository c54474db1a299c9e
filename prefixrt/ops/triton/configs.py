"""Block configurations of the Triton kernels: the small fixed lists a launcher may choose from.

There is no autotuner: each launcher picks a configuration from its list with a simple rule (on the shapes
only, so the choice is deterministic and needs no device sync), and accepts an explicit ``config=`` so that
tests can force, and therefore exercise, every entry. Every entry obeys the GPU's rules by construction:
power-of-two blocks, every ``tl.dot`` dimension >= 16, and an estimate of shared memory under
:data:`SMEM_BUDGET` for every supported head dim (checked by ``tests/ops/test_triton_configs.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "KernelConfig",
    "SUPPORTED_HEAD_DIMS",
    "SUPPORTED_DTYPES",
    "FWD_CONFIGS",
    "BWD_CONFIGS",
    "DECODE_CONFIGS",
    "SMEM_BUDGET",
    "pick_fwd_config",
    "pick_bwd_config",
    "pick_decode_config",
    "smem_bytes",
]

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Ampere/Hopper allow ~164-227 KiB of shared memory per block; stay well under the smaller.
SMEM_BUDGET = 160 * 1024


@dataclass(frozen=True)
class KernelConfig:
    """One launch configuration.

    ``block_m`` tiles queries (for decode: the rows of a prefix group), ``block_n`` tiles keys;
    ``num_warps`` and ``num_stages`` go to the Triton launch.
    """

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2


# Forward (prefill / training). The first entry is the default for long sequences: on an H200 (bf16, head dim
# 64, T=512, P=200) it ran 1.26x faster than (128, 64, 8 warps, 3 stages), the fastest of 24 candidates within
# 4% (benchmarks/tune_triton_configs.py; benchmarks/results/triton_h200_tuning.json).
FWD_CONFIGS = (
    KernelConfig(64, 64, num_warps=4, num_stages=3),
    KernelConfig(32, 32, num_warps=4, num_stages=2),
    KernelConfig(16, 32, num_warps=4, num_stages=2),
    KernelConfig(16, 16, num_warps=4, num_stages=2),
)
# Backward: dQ tiles (block_m queries x block_n keys); dK/dV and the bank gradient tile block_n keys and
# loop over block_m queries.
BWD_CONFIGS = (
    KernelConfig(64, 64, num_warps=4, num_stages=2),
    KernelConfig(32, 32, num_warps=4, num_stages=2),
    KernelConfig(16, 16, num_warps=4, num_stages=1),
)
# Decode: block_m = rows per prefix group (the grouped kernel's tl.dot M), block_n = keys per step.
# Two warps per program: a decode program streams one row's keys with no tl.dot to feed; on an H200 that ran
# 1.35x faster than four (benchmarks/results/triton_h200_tuning.json).
DECODE_CONFIGS = (
    KernelConfig(64, 64, num_warps=2, num_stages=2),
    KernelConfig(32, 64, num_warps=2, num_stages=2),
    KernelConfig(16, 64, num_warps=2, num_stages=2),
    KernelConfig(16, 16, num_warps=2, num_stages=1),
)


def smem_bytes(config: KernelConfig, head_dim: int, itemsize: int = 2, kind: str = "fwd") -> int:
    """Rough shared-memory need: pipelined K and V tiles plus the resident query-side tiles.

    ``kind`` is ``"fwd"`` (Q resident; K, V streamed), ``"bwd"`` (K, V resident; Q, dO streamed) or
    ``"decode"`` (as forward). fp32 inputs take ``itemsize=4``.
    """
    stages = max(config.num_stages, 1)
    if kind == "bwd":
        resident = 2 * config.block_n * head_dim
        streamed = 2 * config.block_m * head_dim
    else:
        resident = config.block_m * head_dim
        streamed = 2 * config.block_n * head_dim
    return (resident + stages * streamed) * itemsize


def _fits(config: KernelConfig, head_dim: int, itemsize: int, kind: str) -> bool:
    return smem_bytes(config, head_dim, itemsize, kind) <= SMEM_BUDGET


def _clamp_block(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, 1 << max(n - 1, 0).bit_length()))


def pick_fwd_config(q_len: int, head_dim: int, dtype: torch.dtype, on_gpu: bool) -> KernelConfig:
    """Largest query block (at most 64, on the GPU too: see ``FWD_CONFIGS``) not much bigger than ``q_len``
    that fits shared memory. ``on_gpu`` is kept for a device-specific rule; both devices share one today."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    want_m = _clamp_block(q_len, 16, 64)
    for config in FWD_CONFIGS:
        if config.block_m <= want_m and _fits(config, head_dim, itemsize, "fwd"):
            return config
    return FWD_CONFIGS[-1]


def pick_bwd_config(q_len: int, head_dim: int, dtype: torch.dtype, on_gpu: bool) -> KernelConfig:
    """Largest block not much bigger than ``q_len`` that fits shared memory."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    want = _clamp_block(q_len, 16, 64)
    for config in BWD_CONFIGS:
        if config.block_m <= want and _fits(config, head_dim, itemsize, "bwd"):
            return config
    return BWD_CONFIGS[-1]


def pick_decode_config(rows_per_group: int, head_dim: int, dtype: torch.dtype) -> KernelConfig:
    """Group size (``block_m``) near the mean number of rows per prefix, at least 16 (the tl.dot minimum)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    want_m = _clamp_block(rows_per_group, 16, 64)
    for config in DECODE_CONFIGS:
        if config.block_m <= want_m and _fits(config, head_dim, itemsize, "decode"):
            return config
    return DECODE_CONFIGS[-1]
