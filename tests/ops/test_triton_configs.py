"""Every block configuration a Triton launcher may choose obeys the GPU's rules (the interpreter would not
complain): power-of-two blocks, every tl.dot dimension >= 16, bounded shared memory; and the pickers only
ever return entries of those lists (which the kernel tests force one by one)."""

import pytest
import torch

from prefixrt.ops.triton.configs import (
    BWD_CONFIGS,
    DECODE_CONFIGS,
    FWD_CONFIGS,
    SMEM_BUDGET,
    SUPPORTED_DTYPES,
    SUPPORTED_HEAD_DIMS,
    pick_bwd_config,
    pick_decode_config,
    pick_fwd_config,
    smem_bytes,
)

ALL = (
    [("fwd", c) for c in FWD_CONFIGS]
    + [("bwd", c) for c in BWD_CONFIGS]
    + [("decode", c) for c in DECODE_CONFIGS]
)


def power_of_two(n):
    return n > 0 and n & (n - 1) == 0


@pytest.mark.parametrize(("kind", "config"), ALL, ids=[f"{k}-m{c.block_m}n{c.block_n}" for k, c in ALL])
def test_blocks_are_powers_of_two_and_dot_sized(kind, config):
    assert power_of_two(config.block_m) and config.block_m >= 16
    assert power_of_two(config.block_n) and config.block_n >= 16
    assert power_of_two(config.num_warps) and config.num_stages >= 1


def test_head_dims_are_dot_sized():
    assert all(power_of_two(d) and d >= 16 for d in SUPPORTED_HEAD_DIMS)


@pytest.mark.parametrize("dtype", SUPPORTED_DTYPES)
@pytest.mark.parametrize("head_dim", SUPPORTED_HEAD_DIMS)
@pytest.mark.parametrize("length", [1, 2, 17, 64, 128, 512, 4096])
def test_pickers_choose_listed_configs_that_fit(length, head_dim, dtype):
    itemsize = torch.empty((), dtype=dtype).element_size()
    for on_gpu in (True, False):
        fwd = pick_fwd_config(length, head_dim, dtype, on_gpu)
        bwd = pick_bwd_config(length, head_dim, dtype, on_gpu)
        assert fwd in FWD_CONFIGS and bwd in BWD_CONFIGS
        assert smem_bytes(fwd, head_dim, itemsize, "fwd") <= SMEM_BUDGET
        assert smem_bytes(bwd, head_dim, itemsize, "bwd") <= SMEM_BUDGET
    decode = pick_decode_config(length, head_dim, dtype)
    assert decode in DECODE_CONFIGS
    assert smem_bytes(decode, head_dim, itemsize, "decode") <= SMEM_BUDGET


def test_long_sequences_get_the_largest_query_block():
    assert pick_fwd_config(512, 64, torch.bfloat16, on_gpu=True).block_m == 64  # fastest on an H200
    assert pick_fwd_config(512, 64, torch.bfloat16, on_gpu=False).block_m <= 64
    assert pick_fwd_config(3, 64, torch.float16, on_gpu=True).block_m == 16
