"""The plain-torch oracle for prefix attention.

Every fast path (Triton, C++) is tested against :func:`prefix_attention_reference`; it is also the CPU
fallback. It is written for clarity, not speed: it gathers each row's prefix out of the bank, concatenates it
with the row's own keys and runs ordinary softmax attention in fp32.

Conventions shared by every backend
-----------------------------------
* Row ``b`` attends over ``[bank[prefix_ids[b]] ; own keys of row b]``.
* The bank of one (site, layer) is packed: entry ``e`` owns rows ``bank_offsets[e]:bank_offsets[e+1]`` of
  ``bank_k``/``bank_v`` (so entries have their own prefix lengths and an entry of length 0 is allowed).
* ``prefix_ids[b] == -1`` means "no prefix": the row attends to its own keys only.
* The prefix part is never masked (every query sees its whole prefix); the own part is masked by
  ``key_padding_mask`` and, when ``causal``, by a bottom-right aligned causal mask: query ``i`` sees own key
  ``j`` iff ``j <= i + (Tk - Tq)`` (this covers prefill, ``Tq == Tk``, and decode with a cache, ``Tq < Tk``).
* A query that sees no key at all gets output 0 and ``lse = -inf`` (never NaN), and zero gradient.
* ``lse`` is the natural-log log-sum-exp of the scaled scores, in fp32.
* Attention dropout multiplies the normalized probabilities by the mask that :mod:`prefixrt.ops.dropout`
  defines from a Philox state ``(seed, offset)``: every backend draws the very same mask, so the oracle
  comparison is exact; ``lse`` stays that of the undropped scores.
"""

from __future__ import annotations

import inspect

import torch

from prefixrt.ops.dropout import (
    check_dropout_p,
    draw_philox_state,
    dropout_multiplier,
    key_stride,
    philox_increment,
)

__all__ = ["prefix_attention_reference", "prefix_attention_reference_backward", "gather_prefix"]


def gather_prefix(
    bank: torch.Tensor, prefix_ids: torch.Tensor, bank_offsets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy each row's prefix out of a packed bank (what every baseline does, and what kernels avoid).

    Parameters
    ----------
    bank : Tensor ``[H, S, D]``
        Packed K (or V) of every entry for one (site, layer).
    prefix_ids : LongTensor ``[B]``
        Entry id per row, ``-1`` for none.
    bank_offsets : LongTensor ``[N + 1]``
        Entry ``e`` owns rows ``bank_offsets[e]:bank_offsets[e + 1]``.

    Returns
    -------
    prefix : Tensor ``[B, H, Pmax, D]``
        Row ``b``'s prefix in ``[:, :, :P_b]``; the rest is filler.
    valid : BoolTensor ``[B, Pmax]``
        True where ``prefix`` holds a real prefix token.
    """
    prefix, valid, _ = _gather(bank, prefix_ids, bank_offsets)
    return prefix, valid


def _gather(bank, prefix_ids, bank_offsets):
    """:func:`gather_prefix` plus the bank row each prefix slot came from (``index [B, Pmax]``)."""
    lengths = bank_offsets[1:] - bank_offsets[:-1]
    has_prefix = prefix_ids >= 0
    safe_ids = prefix_ids.clamp(min=0)
    if lengths.numel() == 0:
        row_len = torch.zeros_like(prefix_ids)
        start = torch.zeros_like(prefix_ids)
    else:
        row_len = torch.where(has_prefix, lengths[safe_ids], 0)
        start = torch.where(has_prefix, bank_offsets[:-1][safe_ids], 0)
    p_max = int(row_len.max()) if row_len.numel() else 0
    steps = torch.arange(p_max, device=bank.device)
    valid = steps[None, :] < row_len[:, None]  # [B, Pmax]
    index = torch.where(valid, start[:, None] + steps[None, :], 0)  # [B, Pmax]
    if bank.shape[1] == 0:
        prefix = bank.new_zeros(bank.shape[0], prefix_ids.shape[0], p_max, bank.shape[2])
        return prefix.permute(1, 0, 2, 3), valid, index
    else:
        prefix = bank[:, index]  # [H, B, Pmax, D]
    return prefix.permute(1, 0, 2, 3), valid, index


def prefix_attention_reference(
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
    philox: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of every row over its bank prefix and its own keys, in fp32 (fp64 for fp64 inputs), differentiable
    by autograd.

    Parameters
    ----------
    q : Tensor ``[B, H, Tq, D]``
    k, v : Tensor ``[B, H, Tk, D]``
    bank_k, bank_v : Tensor ``[H, S, D]``
        Packed bank K/V of one (site, layer); see the module docstring.
    prefix_ids : LongTensor ``[B]``
    bank_offsets : LongTensor ``[N + 1]``
    key_padding_mask : BoolTensor ``[B, Tk]`` or None
        True where an own key may be attended to.
    causal : bool
        Bottom-right aligned causal mask on the own part.
    scale : float, optional
        Score scale; ``D ** -0.5`` when None.
    dropout_p : float in ``[0, 1)``
        Dropout on the attention probabilities, with the mask of :mod:`prefixrt.ops.dropout`.
    philox : LongTensor ``[2]`` (CPU) or None
        The Philox state ``(seed, offset)`` of the mask; None draws one from torch's default generator for the
        tensors' device (:func:`prefixrt.ops.dropout.draw_philox_state`). Ignored when ``dropout_p == 0``.

    Returns
    -------
    out : Tensor ``[B, H, Tq, D]`` in ``q.dtype``
    lse : Tensor ``[B, H, Tq]`` fp32 (fp64 for fp64 inputs), natural log; ``-inf`` for a query that sees no key.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dropout_p = check_dropout_p(dropout_p)
    if dropout_p > 0.0 and philox is None:
        stride = key_stride(bank_k.shape[1], k.shape[2])
        philox = draw_philox_state(q.device, philox_increment(*q.shape[:3], stride))
    keys, values, visible, gather = _concat_prefix(
        k, v, bank_k, bank_v, prefix_ids, bank_offsets, key_padding_mask, causal, q.shape[2]
    )
    scores = torch.matmul(q.to(keys.dtype), keys.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, H, Tq]
    probs = _probs(scores, lse)
    if dropout_p > 0.0:
        probs = probs * _dropout(q, k, bank_k, gather, dropout_p, philox).to(probs.dtype)
    out = torch.matmul(probs, values)
    return out.to(q.dtype), lse


def _dropout(q, k, bank_k, gather, dropout_p, philox) -> torch.Tensor:
    """The scaled mask ``[B, H, Tq, Pmax + Tk]`` (fp32) in the concatenated layout: slot ``c < Pmax`` is prefix
    key ``j = c`` (filler slots past ``P_b`` are masked anyway), slot ``Pmax + t`` is own key ``j = P_b + t``."""
    batch, heads, tq, _ = q.shape
    _, valid = gather  # [B, Pmax]
    p_max, tk = valid.shape[1], k.shape[2]
    plen = valid.sum(1)  # [B]
    prefix_j = torch.arange(p_max, device=q.device).expand(batch, p_max)
    own_j = plen[:, None] + torch.arange(tk, device=q.device)[None, :]
    key_index = torch.cat([prefix_j, own_j], dim=1)  # [B, Pmax + Tk]
    stride = key_stride(bank_k.shape[1], tk)
    return dropout_multiplier(philox, dropout_p, batch, heads, tq, stride, key_index)


def _concat_prefix(k, v, bank_k, bank_v, prefix_ids, bank_offsets, key_padding_mask, causal, tq):
    """Keys/values ``[B, H, P+Tk, D]`` (fp32) with each row's prefix first, the visibility mask
    ``[B, Tq, P+Tk]`` and the prefix gather ``(index [B, Pmax], valid [B, Pmax])``."""
    batch, _, tk, _ = k.shape
    prefix_k, prefix_valid, index = _gather(bank_k, prefix_ids, bank_offsets)
    prefix_v, _, _ = _gather(bank_v, prefix_ids, bank_offsets)
    acc = _acc_dtype(k.dtype)
    keys = torch.cat([prefix_k.to(k.dtype), k], dim=2).to(acc)
    values = torch.cat([prefix_v.to(v.dtype), v], dim=2).to(acc)

    own_visible = torch.ones(batch, tq, tk, dtype=torch.bool, device=k.device)
    if key_padding_mask is not None:
        own_visible = own_visible & key_padding_mask[:, None, :].bool()
    if causal:
        rows = torch.arange(tq, device=k.device)[:, None] + (tk - tq)
        cols = torch.arange(tk, device=k.device)[None, :]
        own_visible = own_visible & (cols <= rows)[None]
    visible = torch.cat([prefix_valid[:, None, :].expand(batch, tq, -1), own_visible], dim=2)
    return keys, values, visible, (index, prefix_valid)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 math for 16/32-bit inputs; fp64 inputs (oracle tests) stay fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _probs(scores: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    # exp(-inf - -inf) would be NaN for a fully masked query: give it an all-zero row instead.
    safe_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    return torch.exp(scores - safe_lse[..., None])


_FORWARD_SIGNATURE = inspect.signature(prefix_attention_reference)


def prefix_attention_reference_backward(
    dout: torch.Tensor, *args, **kwargs
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Explicit gradients of :func:`prefix_attention_reference`, in fp32.

    The textbook softmax backward: ``dP = dO V^T``, ``dS = P * (dP - rowsum(dO * O))``, ``dQ = dS K``,
    ``dK = dS^T Q``, ``dV = P^T dO``; the prefix slices of dK/dV are summed into the bank rows they came from
    (``index_add_``), so rows that share an id add up and unused entries stay zero. With dropout (scaled mask
    ``Z``, output ``O = (P * Z) V``): ``dV = (P * Z)^T dO`` and ``dS = P * (Z * dO V^T - rowsum(dO * O))``.

    Parameters are those of :func:`prefix_attention_reference`, plus ``dout [B, H, Tq, D]``; with
    ``dropout_p > 0`` the forward's ``philox`` state is required (the backward must see the forward's mask).

    Returns
    -------
    dq ``[B, H, Tq, D]``, dk ``[B, H, Tk, D]``, dv ``[B, H, Tk, D]``, dbank_k ``[H, S, D]``, dbank_v ``[H, S, D]``,
    each in its input's dtype.
    """
    # The same arguments as the forward, bound by its signature (one argument list for both).
    bound = _FORWARD_SIGNATURE.bind(*args, **kwargs)
    bound.apply_defaults()
    q, k, v, bank_k, bank_v, prefix_ids, bank_offsets, key_padding_mask, causal, scale, dropout_p, philox = (
        bound.arguments.values()
    )
    tq = q.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dropout_p = check_dropout_p(dropout_p)
    if dropout_p > 0.0 and philox is None:
        raise ValueError("philox: the backward of a dropout call needs the forward's Philox state")
    keys, values, visible, (index, valid) = _concat_prefix(
        k, v, bank_k, bank_v, prefix_ids, bank_offsets, key_padding_mask, causal, tq
    )
    qf, dof = q.to(keys.dtype), dout.to(keys.dtype)
    scores = torch.matmul(qf, keys.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    probs = _probs(scores, torch.logsumexp(scores, dim=-1))  # [B, H, Tq, P+Tk]
    d_probs = torch.matmul(dof, values.transpose(-1, -2))
    if dropout_p > 0.0:
        keep = _dropout(q, k, bank_k, (index, valid), dropout_p, philox).to(probs.dtype)
        dropped = probs * keep
        d_probs = d_probs * keep
    else:
        dropped = probs
    out = torch.matmul(dropped, values)

    d_values = torch.matmul(dropped.transpose(-1, -2), dof)  # [B, H, P+Tk, D]
    d_scores = probs * (d_probs - (dof * out).sum(-1, keepdim=True))
    dq = torch.matmul(d_scores, keys) * scale
    d_keys = torch.matmul(d_scores.transpose(-1, -2), qf) * scale

    p_max = index.shape[1]
    dbank_k = _scatter_to_bank(d_keys[:, :, :p_max], index, valid, bank_k)
    dbank_v = _scatter_to_bank(d_values[:, :, :p_max], index, valid, bank_v)
    dk, dv = d_keys[:, :, p_max:], d_values[:, :, p_max:]
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbank_k, dbank_v


def _scatter_to_bank(grad_prefix, index, valid, bank):
    """Sum ``grad_prefix [B, H, Pmax, D]`` into a zero ``[H, S, D]`` at the rows ``index [B, Pmax]`` came from."""
    heads, _, head_dim = bank.shape
    out = torch.zeros(bank.shape, dtype=grad_prefix.dtype, device=bank.device)
    rows = index[valid]  # [n]
    grads = grad_prefix.permute(0, 2, 1, 3)[valid]  # [n, H, D]
    out.index_add_(1, rows, grads.permute(1, 0, 2).reshape(heads, -1, head_dim))
    return out.to(bank.dtype)
