"""One prefix-attention call: its inputs as one object, checked once, and their order as ``torch.library`` sees them.

Every backend receives an :class:`AttentionArgs`; the op's schema (:data:`OP_FIELDS`) and the packing to and
from its flat argument list are written here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prefixrt.ops.dropout import check_dropout_p, key_stride, philox_ints
from prefixrt.ops.plan import BankLayer, StepPlan

__all__ = ["AttentionArgs", "OP_FIELDS", "check_attention_args"]

# The flat inputs of ``prefixrt::prefix_attention`` (name, schema type), in order.
OP_FIELDS = (
    ("q", "Tensor"),
    ("k", "Tensor"),
    ("v", "Tensor"),
    ("bank_k", "Tensor"),
    ("bank_v", "Tensor"),
    ("bank_offsets", "Tensor"),
    ("prefix_ids", "Tensor"),
    ("plan_table", "Tensor"),
    ("plan_dims", "SymInt[]"),
    ("key_padding_mask", "Tensor?"),
    ("causal", "bool"),
    ("scale", "float"),
    ("dropout_p", "float"),
    ("philox", "Tensor?"),
)


@dataclass(frozen=True)
class AttentionArgs:
    """Attention of each row's queries over ``[bank entry prefix_ids[b] ; its own keys]``.

    Attributes
    ----------
    q : Tensor ``[B, H, Tq, D]``; k, v : Tensor ``[B, H, Tk, D]`` (any strides)
    bank : BankLayer (``[H, S, D]`` K and V, offsets ``[N + 1]``)
    plan : StepPlan (the rows' ids and the tables built from them)
    key_padding_mask : BoolTensor ``[B, Tk]`` or None (True = attend; the prefix is never masked)
    causal : bool (bottom-right aligned on the own keys)
    scale : float
    dropout_p : float in ``[0, 1)``
        Attention dropout (:mod:`prefixrt.ops.dropout` defines the mask); 0 = none.
    philox : LongTensor ``[2]`` on the CPU, or None
        The Philox state ``(seed, offset)`` (int64 bit patterns) the mask is drawn from; required when
        ``dropout_p > 0`` (:func:`prefixrt.ops.dropout.draw_philox_state`), ignored otherwise.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    bank: BankLayer
    plan: StepPlan
    key_padding_mask: torch.Tensor | None
    causal: bool
    scale: float
    dropout_p: float = 0.0
    philox: torch.Tensor | None = None

    @property
    def prefix_ids(self) -> torch.Tensor:
        return self.plan.prefix_ids

    @property
    def dropout(self) -> bool:
        return self.dropout_p > 0.0

    @property
    def key_stride(self) -> int:
        """``L = S + Tk``: the dropout counters one query row spans (:mod:`prefixrt.ops.dropout`)."""
        return key_stride(self.bank.k.shape[1], self.k.shape[2])

    def seed_offset(self) -> tuple[int, int]:
        """``(seed, offset)`` of the dropout mask as unsigned ints (``(0, 0)`` without dropout)."""
        return philox_ints(self.philox) if self.dropout else (0, 0)

    def op_inputs(self) -> tuple:
        """The flat argument list, in :data:`OP_FIELDS` order."""
        prefix_ids, table, dims = self.plan.op_inputs()
        return (self.q, self.k, self.v, self.bank.k, self.bank.v, self.bank.offsets, prefix_ids, table, dims,
                self.key_padding_mask, bool(self.causal), float(self.scale), float(self.dropout_p),
                self.philox)  # fmt: skip

    @staticmethod
    def from_op_inputs(*inputs) -> AttentionArgs:
        """Inverse of :meth:`op_inputs`."""
        q, k, v, bank_k, bank_v, offsets, prefix_ids, table, dims, mask, causal, scale, dropout_p, philox = (
            inputs
        )
        return AttentionArgs(q, k, v, BankLayer(bank_k, bank_v, offsets),
                             StepPlan.from_op_inputs(prefix_ids, table, dims), mask, causal, scale, dropout_p,
                             philox)  # fmt: skip

    def with_tensors(self, q=None, k=None, v=None, bank: BankLayer | None = None) -> AttentionArgs:
        """The same call on other tensors (e.g. upcast copies)."""
        return AttentionArgs(
            self.q if q is None else q,
            self.k if k is None else k,
            self.v if v is None else v,
            self.bank if bank is None else bank,
            self.plan,
            self.key_padding_mask,
            self.causal,
            self.scale,
            self.dropout_p,
            self.philox,
        )


def _expect(cond: bool, message) -> None:
    """Raise ``ValueError(message)`` (``message`` a str, or a callable making it: built only on failure, so a
    passing check costs no formatting and stays traceable by ``torch.compile`` with symbolic shapes)."""
    if not cond:
        raise ValueError(message() if callable(message) else message)


def check_attention_args(args: AttentionArgs) -> None:
    """Raise ``ValueError`` naming the first argument whose shape, dtype or device is wrong.

    No device sync: the ids were validated when the plan was built; here the plan must match the call (its row
    count and the bank's entry count).
    """
    q, k, v, bank, plan, mask = args.q, args.k, args.v, args.bank, args.plan, args.key_padding_mask
    _expect(isinstance(q, torch.Tensor) and q.dim() == 4, lambda: f"q must be [B, H, Tq, D], got {_shape(q)}")
    batch, heads, _, head_dim = q.shape
    for name, t in (("k", k), ("v", v)):
        _expect(
            isinstance(t, torch.Tensor)
            and t.dim() == 4
            and t.shape[0] == batch
            and t.shape[1] == heads
            and t.shape[3] == head_dim,
            lambda name=name, t=t: (
                f"{name} must be [B={batch}, H={heads}, Tk, D={head_dim}], got shape {_shape(t)}"
            ),
        )
    _expect(
        k.shape == v.shape,
        lambda: f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}",
    )
    _expect(
        isinstance(bank, BankLayer),
        lambda: f"bank must be a prefixrt.ops.BankLayer, got {type(bank).__name__}",
    )
    _expect(
        isinstance(plan, StepPlan), lambda: f"plan must be a prefixrt.ops.StepPlan, got {type(plan).__name__}"
    )
    for name, t in (("bank.k", bank.k), ("bank.v", bank.v)):
        _expect(
            t.dim() == 3 and t.shape[0] == heads and t.shape[2] == head_dim,
            lambda name=name, t=t: f"{name} must be [H={heads}, S, D={head_dim}], got shape {tuple(t.shape)}",
        )
    _expect(bank.k.shape == bank.v.shape, "bank.k and bank.v must have the same shape")
    offsets = bank.offsets
    _expect(
        offsets.dim() == 1 and offsets.shape[0] >= 1 and offsets.dtype == torch.int64,
        lambda: f"bank.offsets must be a LongTensor [N + 1], got {offsets.dtype} {tuple(offsets.shape)}",
    )
    _expect(
        plan.n_entries == bank.n_entries,
        lambda: (
            f"plan was built for a bank of {plan.n_entries} entries, bank.offsets describes {bank.n_entries}"
        ),
    )
    _expect(
        plan.bank_rows <= bank.k.shape[1],
        lambda: f"bank.offsets reach row {plan.bank_rows} but bank.k holds {bank.k.shape[1]} rows",
    )
    _expect(
        plan.batch == batch,
        lambda: f"plan (prefix_ids) has {plan.batch} rows, q has B={batch}",
    )
    if mask is not None:
        _expect(
            isinstance(mask, torch.Tensor) and mask.shape == (batch, k.shape[2]),
            lambda: f"key_padding_mask must be [B={batch}, Tk={k.shape[2]}], got {_shape(mask)}",
        )
        _expect(mask.dtype == torch.bool, lambda: f"key_padding_mask must be a bool tensor, got {mask.dtype}")
    for name, t in (("k", k), ("v", v), ("bank.k", bank.k), ("bank.v", bank.v)):
        _expect(
            t.dtype == q.dtype, lambda name=name, t=t: f"{name} must have q's dtype {q.dtype}, got {t.dtype}"
        )
    for name, t in (
        ("k", k),
        ("v", v),
        ("bank.k", bank.k),
        ("bank.v", bank.v),
        ("bank.offsets", offsets),
        ("prefix_ids (plan)", plan.prefix_ids),
        ("key_padding_mask", mask),
    ):
        if t is not None:
            _expect(
                t.device == q.device,
                lambda name=name, t=t: f"{name} must be on q's device {q.device}, got {t.device}",
            )
    check_dropout_p(args.dropout_p)
    if args.dropout_p > 0.0:
        philox = args.philox
        _expect(
            isinstance(philox, torch.Tensor)
            and philox.shape == (2,)
            and philox.dtype == torch.int64
            and philox.device.type == "cpu",
            lambda: (
                f"philox must be a CPU LongTensor [2] (seed, offset) when dropout_p > 0, got {_shape(philox)}"
                + (f" {philox.dtype} on {philox.device}" if isinstance(philox, torch.Tensor) else "")
            ),
        )


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__
