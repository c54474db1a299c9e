"""Attention dropout: the one random stream every backend draws its mask from, defined here.

Definition
----------
A call with dropout probability ``p`` carries a Philox state ``(seed, offset)`` (two unsigned 64-bit integers,
see :func:`draw_philox_state`). Element ``(b, h, i, j)`` of its attention probabilities (row ``b``, head ``h``,
query ``i``, key ``j`` over the row's ``[prefix ; own]`` keys: prefix key ``p`` is ``j = p``, own key ``t`` is
``j = P_b + t``) draws the 32-bit word

    ``word = Philox4x32-10(key = (seed mod 2^32, seed >> 32), counter = (c mod 2^32, c >> 32, 0, 0))[0]``
    ``c = (offset + ((b * H + h) * Tq + i) * L + j) mod 2^64``,   ``L = S + Tk``

(``S`` the rows of the bank layer ``bank.k.shape[1]``, ``Tk`` the own keys: every row's keys fit in ``L``), and
is kept iff ``word >= floor(p * 2^32)``, i.e. with probability ``1 - p`` up to ``2^-32``. Kept probabilities are
multiplied by ``1 / (1 - p)`` rounded to fp32. The word is exactly Triton's ``tl.randint(seed, c)`` (Philox
4x32-10 with the counter's two low words from a 64-bit offset, the high two zero; unchanged from Triton 3.6 to
3.9), so the Triton kernels call it as is; ``csrc/philox.h`` implements the same rounds, and :func:`philox4x32`
below is the plain-torch version the reference uses. The log-sum-exp stays that of the undropped scores
(as in FlashAttention): the mask applies to the normalized probabilities only.

One call consumes ``B * H * Tq * L`` counters; :func:`draw_philox_state` advances the generator by that many
(rounded up to a multiple of 4), so consecutive calls draw fresh masks and ``torch.manual_seed`` reproduces them.

>>> bits = randint(seed=0, counter=torch.tensor([0, 1, 2]))
>>> bits.tolist() == [int(w) for w in philox4x32((torch.tensor([0, 1, 2]), 0, 0, 0), (0, 0))[0]]
True
"""

from __future__ import annotations

import torch

__all__ = [
    "dropout_keep_threshold",
    "dropout_scale",
    "philox4x32",
    "randint",
    "key_stride",
    "philox_increment",
    "draw_philox_state",
    "philox_ints",
    "dropout_multiplier",
    "dropout_multiplier_at",
    "check_dropout_p",
    "advance_generator",
]

MASK32 = 0xFFFFFFFF
MASK64 = (1 << 64) - 1
PHILOX_ROUNDS = 10
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85  # Weyl increments of the key (golden ratio, sqrt(3) - 1)
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57  # round multipliers


def check_dropout_p(dropout_p: float) -> float:
    """``dropout_p`` as a float in ``[0, 1)``; ``ValueError`` otherwise."""
    p = float(dropout_p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return p


def dropout_keep_threshold(dropout_p: float) -> int:
    """``floor(p * 2^32)``: a word is kept iff it is at least this (exact: ``p * 2^32`` is exact in fp64)."""
    return int(check_dropout_p(dropout_p) * 2.0**32)


def dropout_scale(dropout_p: float) -> float:
    """``1 / (1 - p)`` rounded to fp32 (the kernels' value), returned as a Python float."""
    return float(torch.tensor(1.0 / (1.0 - check_dropout_p(dropout_p)), dtype=torch.float32))


def key_stride(bank_rows: int, k_len: int) -> int:
    """``L = S + Tk``: the counters of one query row (every row's ``[prefix ; own]`` keys fit)."""
    return int(bank_rows) + int(k_len)


def philox_increment(batch: int, heads: int, q_len: int, stride: int) -> int:
    """Counters one call consumes, ``B * H * Tq * L``, rounded up to a multiple of 4 (torch's CUDA rule)."""
    n = int(batch) * int(heads) * int(q_len) * int(stride)
    return -(-n // 4) * 4


# -- Philox 4x32-10 on int64 tensors holding 32-bit words ------------------------------------------------------
def _mulhilo(multiplier: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hi, lo)`` 32-bit halves of ``multiplier * x`` for a 32-bit constant and int64 words ``x < 2^32``,
    without overflowing int64: ``x * (a_hi 2^16 + a_lo)`` in 16-bit limbs."""
    a_hi, a_lo = multiplier >> 16, multiplier & 0xFFFF
    low = x * a_lo  # < 2^48
    t = x * a_hi + (low >> 16)  # < 2^49
    return t >> 16, ((t & 0xFFFF) << 16) | (low & 0xFFFF)


def philox4x32(
    counter: tuple[torch.Tensor | int, torch.Tensor | int, torch.Tensor | int, torch.Tensor | int],
    key: tuple[int, int],
    rounds: int = PHILOX_ROUNDS,
) -> tuple[torch.Tensor, ...]:
    """Philox 4x32 (Salmon et al. 2011, Random123's ``philox4x32``) on broadcastable int64 tensors of 32-bit
    words; returns the four output words as int64 tensors in ``[0, 2^32)``.

    Each round: ``(c0, c1, c2, c3) <- (hi(B c2) ^ c1 ^ k0, lo(B c2), hi(A c0) ^ c3 ^ k1, lo(A c0))`` with
    ``A = 0xD2511F53``, ``B = 0xCD9E8D57``, then the key is raised by ``(0x9E3779B9, 0xBB67AE85)``.
    """
    words = [c if isinstance(c, torch.Tensor) else torch.tensor(c, dtype=torch.long) for c in counter]
    shape = torch.broadcast_shapes(*(w.shape for w in words))
    device = next((w.device for w in words if w.dim() > 0), words[0].device)
    c0, c1, c2, c3 = (w.to(device, torch.long).expand(shape) & MASK32 for w in words)
    k0, k1 = int(key[0]) & MASK32, int(key[1]) & MASK32
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & MASK32, (k1 + _KEY_B) & MASK32
    return c0, c1, c2, c3


def randint(seed: int, counter: torch.Tensor) -> torch.Tensor:
    """Triton's ``tl.randint(seed, counter)`` for int64 counters: word 0 of Philox 4x32-10 with key
    ``(seed_lo, seed_hi)`` and counter ``(counter_lo, counter_hi, 0, 0)``; int64 values in ``[0, 2^32)``.

    ``counter`` holds the counters' 64-bit patterns (a counter ``>= 2^63`` as its negative int64 twin)."""
    counter = counter.long()
    lo = counter & MASK32
    hi = (counter >> 32) & MASK32  # arithmetic shift, then the low 32 bits: the pattern's high word
    seed = int(seed) & MASK64
    return philox4x32((lo, hi, 0, 0), (seed & MASK32, seed >> 32))[0]


def _signed64(x: int) -> int:
    """The int64 whose bit pattern is the unsigned 64-bit ``x``."""
    x &= MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


def philox_ints(philox: torch.Tensor) -> tuple[int, int]:
    """``(seed, offset)`` as unsigned Python ints from the packed state (a CPU int64 tensor ``[2]``)."""
    seed, offset = philox.tolist()
    return seed & MASK64, offset & MASK64


def draw_philox_state(device: torch.device | str, increment: int) -> torch.Tensor:
    """Take a Philox state for one call from torch's default generator of ``device``; returns a CPU int64
    tensor ``[2]`` holding the bit patterns of ``(seed, offset)``.

    * CUDA: ``seed`` is the generator's seed and ``offset`` its Philox offset, which is advanced by
      ``increment`` (a multiple of 4), as torch's fused kernels (SDPA's flash attention) do; under CUDA-graph
      capture the host-side offset would be frozen into the graph, so that is refused.
    * CPU (also Triton's interpreter): the CPU generator (mt19937) keeps no offset; one 63-bit seed is drawn
      from it (advancing it as ``torch.rand`` would) and the offset is 0.

    Either way ``torch.manual_seed`` makes the masks reproducible, consecutive calls draw fresh ones, and the
    generator's saved state (``torch.get_rng_state`` / ``torch.cuda.get_rng_state``) covers them.
    """
    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "attention dropout cannot be captured in a CUDA graph (its Philox offset is read on the host)"
            )
        index = device.index if device.index is not None else torch.cuda.current_device()
        return advance_generator(torch.cuda.default_generators[index], increment)
    seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.long))
    return torch.tensor([seed, 0], dtype=torch.long)


def advance_generator(generator, increment: int) -> torch.Tensor:
    """``(seed, offset)`` of a Philox-offset generator (``initial_seed``, ``get_offset``, ``set_offset``) as a
    CPU int64 tensor ``[2]``, advancing its offset by ``increment`` rounded up to a multiple of 4."""
    seed, offset = int(generator.initial_seed()), int(generator.get_offset())
    generator.set_offset(offset + -(-int(increment) // 4) * 4)
    return torch.tensor([_signed64(seed), _signed64(offset)], dtype=torch.long)


def dropout_multiplier_at(
    philox: torch.Tensor, dropout_p: float, heads: int, q_len: int, stride: int, coords: torch.Tensor
) -> torch.Tensor:
    """The scaled mask of single elements: fp32 ``[N]`` for ``coords`` LongTensor ``[N, 4]`` of ``(b, h, i, j)``
    (the definition elementwise; tests hold the kernels' helpers against it)."""
    seed, offset = philox_ints(philox)
    b, h, i, j = coords.long().unbind(1)
    counter = _signed64(offset) + ((b * int(heads) + h) * int(q_len) + i) * int(stride) + j
    keep = randint(seed, counter) >= dropout_keep_threshold(dropout_p)
    return keep.to(torch.float32) * dropout_scale(dropout_p)


def dropout_multiplier(
    philox: torch.Tensor,
    dropout_p: float,
    batch: int,
    heads: int,
    q_len: int,
    stride: int,
    key_index: torch.Tensor,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The mask scaled by ``1 / (1 - p)``: fp32 ``[B, H, Tq, K]``, ``0`` or :func:`dropout_scale` per element.

    ``key_index`` is LongTensor ``[B, K]``: the key coordinate ``j`` of each slot of a row's key list (the
    reference's ``[prefix padded to Pmax ; own]`` layout; padding slots may hold anything, the caller masks them).
    """
    seed, offset = philox_ints(philox)
    device = key_index.device if device is None else device
    rows = torch.arange(batch * heads * q_len, device=device, dtype=torch.long).view(batch, heads, q_len, 1)
    counter = _signed64(offset) + rows * int(stride) + key_index.to(device).view(batch, 1, 1, -1)
    # int64 arithmetic wraps like the kernels' (two's complement): the counter is taken mod 2^64
    keep = randint(seed, counter) >= dropout_keep_threshold(dropout_p)
    return keep.to(torch.float32) * dropout_scale(dropout_p)
