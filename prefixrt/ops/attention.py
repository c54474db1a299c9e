"""The public prefix-attention op: validates inputs, picks a backend, runs it through ``torch.library``."""

from __future__ import annotations

import torch

from prefixrt.ops.library import prefix_attention_op
from prefixrt.ops.reference import prefix_attention_reference
from prefixrt.ops.registry import AttentionCall, select_backend

__all__ = ["prefix_attention", "check_attention_inputs"]


def _expect(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def check_attention_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bank_k: torch.Tensor,
    bank_v: torch.Tensor,
    prefix_ids: torch.Tensor,
    bank_offsets: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
) -> None:
    """Raise ``ValueError`` naming the first argument whose shape, dtype or device is wrong (no device sync)."""
    _expect(q.dim() == 4, f"q must be [B, H, Tq, D], got shape {tuple(q.shape)}")
    batch, heads, _, head_dim = q.shape
    for name, t in (("k", k), ("v", v)):
        _expect(
            t.dim() == 4 and t.shape[0] == batch and t.shape[1] == heads and t.shape[3] == head_dim,
            f"{name} must be [B={batch}, H={heads}, Tk, D={head_dim}], got shape {tuple(t.shape)}",
        )
    _expect(
        k.shape == v.shape, f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"
    )
    for name, t in (("bank_k", bank_k), ("bank_v", bank_v)):
        _expect(
            t.dim() == 3 and t.shape[0] == heads and t.shape[2] == head_dim,
            f"{name} must be [H={heads}, S, D={head_dim}], got shape {tuple(t.shape)}",
        )
    _expect(bank_k.shape == bank_v.shape, "bank_k and bank_v must have the same shape")
    _expect(
        prefix_ids.dim() == 1 and prefix_ids.shape[0] == batch and not prefix_ids.is_floating_point(),
        f"prefix_ids must be an integer tensor [B={batch}], got {prefix_ids.dtype} {tuple(prefix_ids.shape)}",
    )
    _expect(
        bank_offsets.dim() == 1 and bank_offsets.shape[0] >= 1 and not bank_offsets.is_floating_point(),
        f"bank_offsets must be an integer tensor [N + 1], got {bank_offsets.dtype} {tuple(bank_offsets.shape)}",
    )
    if key_padding_mask is not None:
        _expect(
            key_padding_mask.shape == (batch, k.shape[2]),
            f"key_padding_mask must be [B={batch}, Tk={k.shape[2]}], got {tuple(key_padding_mask.shape)}",
        )
    for name, t in (("k", k), ("v", v), ("bank_k", bank_k), ("bank_v", bank_v)):
        _expect(t.dtype == q.dtype, f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
    for name, t in (
        ("k", k),
        ("v", v),
        ("bank_k", bank_k),
        ("bank_v", bank_v),
        ("prefix_ids", prefix_ids),
        ("bank_offsets", bank_offsets),
    ):
        _expect(t.device == q.device, f"{name} must be on q's device {q.device}, got {t.device}")


def prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bank_k: torch.Tensor,
    bank_v: torch.Tensor,
    prefix_ids: torch.Tensor,
    bank_offsets: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str | None = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each row's queries over ``[bank[prefix_ids[b]] ; its own keys]``.

    Parameters
    ----------
    q : Tensor ``[B, H, Tq, D]`` (any strides)
    k, v : Tensor ``[B, H, Tk, D]`` (any strides; views of a fused QKV projection are fine)
    bank_k, bank_v : Tensor ``[H, S, D]``
        The packed bank of one (site, layer): entry ``e`` owns rows ``bank_offsets[e]:bank_offsets[e+1]``.
    prefix_ids : LongTensor ``[B]``
        Entry id per row; ``-1`` = no prefix. Ids are not range-checked here (that needs a device sync); the
        bank and the model integration check them once per forward.
    bank_offsets : LongTensor ``[N + 1]``
    key_padding_mask : BoolTensor ``[B, Tk]`` or None
        True where an own key may be attended to (the prefix is never masked).
    causal : bool
        Bottom-right aligned causal mask on the own keys (query ``i`` sees key ``j <= i + Tk - Tq``).
    scale : float, optional
        Defaults to ``D ** -0.5``.
    dropout_p : float
        Attention dropout; only the reference implements it, so ``"auto"`` uses the reference when > 0.
    backend : str
        ``"auto"``, ``"reference"``, ``"triton"`` or ``"cpp"`` (``PREFIXRT_BACKEND`` overrides ``"auto"``).

    Returns
    -------
    out : Tensor ``[B, H, Tq, D]``, ``q.dtype``
    lse : Tensor ``[B, H, Tq]``, fp32, natural log, ``-inf`` where a query sees no key; not differentiable.

    Gradients flow to ``q``, ``k``, ``v``, ``bank_k`` and ``bank_v``; a bank entry's gradient is summed over the
    rows that use it and is zero for entries no row uses.

    >>> import torch
    >>> q = k = v = torch.randn(2, 1, 3, 8)
    >>> bank = torch.randn(1, 5, 8)                  # two entries: rows 0:2 and 2:5
    >>> out, lse = prefix_attention(q, k, v, bank, bank, torch.tensor([1, -1]), torch.tensor([0, 2, 5]),
    ...                             causal=True)
    >>> out.shape, lse.shape
    (torch.Size([2, 1, 3, 8]), torch.Size([2, 1, 3]))
    """
    check_attention_inputs(q, k, v, bank_k, bank_v, prefix_ids, bank_offsets, key_padding_mask)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    prefix_ids = prefix_ids.long()
    bank_offsets = bank_offsets.long()
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.bool()
    requires_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, bank_k, bank_v))
    call = AttentionCall.of(q, k, causal, dropout_p, requires_grad)
    chosen = select_backend(backend, call)
    if dropout_p > 0.0:
        # Only the reference does dropout (select_backend refused every other backend for this call).
        return prefix_attention_reference(
            q, k, v, bank_k, bank_v, prefix_ids, bank_offsets, key_padding_mask, causal, scale, dropout_p
        )
    return prefix_attention_op(
        q, k, v, bank_k, bank_v, prefix_ids, bank_offsets, key_padding_mask, causal, scale, chosen.name
    )
