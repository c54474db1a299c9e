"""The attention and mask functions prefixrt registers in transformers' registries under the name "prefixrt".

transformers calls ``prefixrt_attention(module, q, k, v, mask, ...)`` from every attention module of a model
whose ``config._attn_implementation == "prefixrt"``. ``attach`` tags each attention module with its site
(``encoder`` / ``decoder`` / ``cross``), its layer and the binding (bank, backend); ``prefix_ids`` (and the
forward's plans, :data:`PLANS_KWARG`) arrive in ``kwargs`` because transformers forwards the model's extra
keyword arguments down to attention.

Masks
-----
transformers builds a model's masks once per forward with the mask function registered for the implementation
(``create_causal_mask`` / ``create_bidirectional_mask`` call :func:`prefixrt_mask`). Ours builds no
``[B, 1, Tq, Tk]`` tensor: it returns a :class:`KeyMask`, the key padding mask ``[B, Tk]`` padded as transformers
pads it (``False`` past the 2-D mask: a static cache's empty slots) and, for causal sites, how many keys the last
query may see (taken from the cache position, not from the key length: a ``StaticCache`` hands attention its whole
capacity). The attention function then makes the op's bottom-right causal rule exact:

* ``Tq > 1``: the keys are cut to the last query's position (the keys after it are future tokens or empty
  slots, which a causal query never sees); inside ``torch.compile`` with a tensor position (a static cache) they
  are rotated instead, so that the real keys end the key tensor, and the rotated-in slots are masked;
* ``Tq == 1``: the slots past the query are masked.

A mask function other than transformers' plain causal or bidirectional one (packed sequences, sliding windows,
``or_mask_function`` / ``and_mask_function`` overlays) is honoured when it selects exactly the keys the site's
own rule selects, and refused otherwise (:class:`UnsupportedMask`): eagerly when the mask is built, and inside a
compiled graph by a runtime assert. A 4-D ``attention_mask`` (which transformers passes through unchanged) is
refused with the same error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prefixrt import ops
from prefixrt.ops import BankLayer

__all__ = [
    "ATTN_IMPLEMENTATION",
    "KeyMask",
    "PLANS_KWARG",
    "UnsupportedMask",
    "prefixrt_attention",
    "prefixrt_mask",
    "register",
]

ATTN_IMPLEMENTATION = "prefixrt"
CAUSAL_SITES = {"decoder": True, "encoder": False, "cross": False}
# The keyword argument that carries a forward's plans ({site: StepPlan}) from the model's pre-forward hook down to
# every attention call of that forward.
PLANS_KWARG = "prefixrt_plans"

# transformers' plain mask functions, looked up when the functions are registered.
_STANDARD: dict[str, object] = {}


class MissingPrefixIds(ValueError):
    pass


class UnsupportedMask(ValueError):
    """An attention mask prefixrt cannot honour (the message says which and why)."""


_RULES = ("a 2-D key padding mask [batch, keys] and, at causal sites (the decoder's self-attention), the causal rule"
          " over the own keys; the prefix is always visible")  # fmt: skip


@dataclass(frozen=True)
class KeyMask:
    """What :func:`prefixrt_mask` hands the attention function for one forward.

    Attributes
    ----------
    padding : BoolTensor ``[B, kv_length]`` or None
        True = the key may be attended to (transformers' 2-D mask, padded with False past its end).
    kv_length : int
        The number of keys the attention calls receive.
    visible : int, 0-d LongTensor or None
        Causal sites: how many keys (from the start of the key tensor) the last query may see,
        ``q_offset + q_length - kv_offset``; None when that is every key. A tensor only inside ``torch.compile``
        with a static cache (eagerly it is read once per forward).
    causal_ok, bidirectional_ok : bool or 0-d BoolTensor
        Whether transformers' mask equals the causal / the bidirectional rule over the padding mask (plain mask
        functions: known; others: compared once per forward, a tensor inside ``torch.compile``).
    """

    padding: torch.Tensor | None
    kv_length: int
    visible: int | torch.Tensor | None
    causal_ok: bool | torch.Tensor = True
    bidirectional_ok: bool | torch.Tensor = True

    @property
    def ndim(self) -> int:
        """4: transformers passes a mask with ``ndim == 4`` through unchanged as an already prepared mask (what
        ``generate()`` does with the mask it builds ahead of a static cache's forward)."""
        return 4


def prefixrt_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: KeyMask | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Prefix attention for one HF attention module.

    Parameters
    ----------
    query : Tensor ``[B, H, Tq, D]``; key, value : Tensor ``[B, H, Tk, D]`` (the cache's real tokens only; a
        static cache's whole capacity)
    attention_mask : KeyMask or None, from :func:`prefixrt_mask`
    kwargs : must hold ``prefix_ids`` LongTensor ``[B]`` (``-1`` = no prefix); hold the forward's plans under
        :data:`PLANS_KWARG` when the model's pre-forward hook ran (planned here otherwise); may hold
        ``prefix_source`` (a ``PrefixSource`` with the bound bank's ids and lengths) to read this call's K/V
        from instead of the bank

    Returns
    -------
    (Tensor ``[B, Tq, H, D]``, None) -- transformers' attention-interface convention.
    """
    site_layer = getattr(module, "_prefixrt_site", None)
    binding = getattr(module, "_prefixrt_binding", None)
    if site_layer is None or binding is None:
        raise RuntimeError(
            f"{type(module).__name__} uses attn_implementation='prefixrt' but was not prepared by prefixrt.attach()"
        )
    site, layer = site_layer
    prefix_ids = kwargs.get("prefix_ids")
    if prefix_ids is None:
        raise MissingPrefixIds(
            "this model is attached to a prefix bank: pass prefix_ids=LongTensor[batch] (one bank id per row, -1 for "
            "no prefix) to forward() or generate()"
        )
    # A per-call source (``prefix_source=`` in the model's kwargs) overrides the bound one for this forward only;
    # PrefixTuner passes its K/V this way so a gradient-checkpointing replay reads the same tensors.
    bank = kwargs.get("prefix_source")
    if bank is None:
        bank = binding.bank
    bank_k, bank_v = bank.layer_kv(site, layer)
    layer_bank = BankLayer(bank_k, bank_v, bank.offsets(site))
    if bank_k.dtype != query.dtype:
        # attach casts a bank to the model's dtype once; what is left is part of the forward's graph (a tuner's
        # float32 prefixes on a half model, autocast), so it is cast here.
        layer_bank = layer_bank.to(query.dtype)
    causal = CAUSAL_SITES[site]
    key, value, padding = own_keys(site, causal, query.shape[2], key, value, attention_mask)
    plans = kwargs.get(PLANS_KWARG)
    plan = plans[site] if plans is not None and site in plans else binding.plan(site, prefix_ids)
    out, _ = ops.prefix_attention(
        query,
        key,
        value,
        layer_bank,
        plan,
        key_padding_mask=padding,
        causal=causal,
        scale=scaling,
        dropout_p=dropout,
        backend=binding.backend,
    )
    return out.transpose(1, 2), None


def own_keys(
    site: str,
    causal: bool,
    q_len: int,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: KeyMask | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(key, value, key_padding_mask)`` for the op, so that its bottom-right causal rule selects the keys that
    transformers' mask selects (see the module docstring).

    ``key, value [B, H, Tk, D]``; returns views or copies ``[B, H, Tk', D]`` and a BoolTensor ``[B, Tk']`` or None.
    """
    if mask is None:
        return key, value, None
    if not isinstance(mask, KeyMask):
        shape = tuple(mask.shape) if hasattr(mask, "shape") else type(mask).__name__
        raise UnsupportedMask(
            f"prefixrt got an attention mask of shape {shape} for the {site} site: transformers passes a 4-D "
            f"attention_mask (or a BlockMask) through unchanged, and prefixrt attends with {_RULES}. Pass "
            "attention_mask as a 2-D [batch, keys] tensor (1 = real token)."
        )
    tk = key.shape[2]
    if tk != mask.kv_length:
        raise ValueError(
            f"the {site} site's attention got {tk} keys but its mask describes {mask.kv_length} (a cache whose "
            "capacity does not match the inputs?)"
        )
    _check_rule(site, causal, mask)
    padding = mask.padding
    visible = mask.visible
    if not causal or visible is None:
        return key, value, padding
    if not isinstance(visible, torch.Tensor):
        if visible == tk:
            return key, value, padding
        if not 0 <= visible <= tk:
            raise ValueError(f"the {site} site's last query sees {visible} keys of {tk}")
        # Keys past the last query are future tokens of this forward or empty cache slots: no query sees them.
        return key[:, :, :visible], value[:, :, :visible], None if padding is None else padding[:, :visible]
    # A tensor position (a static cache inside torch.compile): no host sync.
    positions = torch.arange(tk, device=key.device)
    batch = key.shape[0]
    if q_len == 1:
        seen = positions < visible
        padding = seen[None].expand(batch, tk) if padding is None else padding & seen
        return key, value, padding.contiguous()
    # Rotate the real keys to the end of the key tensor; the slots rotated to the front are masked.
    shift = tk - visible
    index = torch.remainder(positions - shift, tk)
    keep = positions >= shift
    padding = keep[None].expand(batch, tk) if padding is None else padding.index_select(1, index) & keep
    return key.index_select(2, index), value.index_select(2, index), padding.contiguous()


def _check_rule(site: str, causal: bool, mask: KeyMask) -> None:
    ok = mask.causal_ok if causal else mask.bidirectional_ok
    message = (
        f"the attention mask transformers built for the {site} site does not follow that site's "
        f"{'causal' if causal else 'bidirectional'} rule; prefixrt attends with {_RULES}"
    )
    if isinstance(ok, torch.Tensor):
        torch._assert_async(ok, f"UnsupportedMask: {message}")
    elif not ok:
        raise UnsupportedMask(message)


def prefixrt_mask(
    batch_size: int,
    q_length: int | None = None,
    kv_length: int | None = None,
    q_offset: int | torch.Tensor | None = None,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> KeyMask | None:
    """transformers' mask interface (``create_causal_mask`` / ``create_bidirectional_mask`` call it once per
    forward): a :class:`KeyMask`, or None when there is no padding and every key is visible.

    Parameters (as transformers passes them)
    ----------------------------------------
    batch_size, q_length, kv_length : int
    q_offset : int or 0-d LongTensor -- the first query's position (a tensor for static caches); older
        transformers pass ``cache_position`` (LongTensor ``[Tq]``) instead
    kv_offset : int -- the first key's position
    mask_function : transformers' mask function (causal, bidirectional, or a composed one)
    attention_mask : BoolTensor ``[B, >= kv_offset + kv_length]`` or shorter (padded with False) or None
    """
    if isinstance(attention_mask, KeyMask):  # prepared ahead of the forward (generate with a static cache)
        return attention_mask
    if not _STANDARD:
        _load_standard()
    if q_offset is None and kwargs.get("cache_position") is not None:  # transformers before q_offset
        q_offset = kwargs["cache_position"][0]
        q_length = kwargs["cache_position"].shape[0] if q_length is None else q_length
    padding = None
    if attention_mask is not None:
        padding = attention_mask.bool()
        if (missing := kv_length + kv_offset - padding.shape[-1]) > 0:
            padding = torch.nn.functional.pad(padding, (0, missing), value=False)
        padding = padding[:, kv_offset : kv_offset + kv_length]
    visible = None
    if q_offset is not None and q_length is not None:
        visible = q_offset + q_length - kv_offset
        if isinstance(visible, torch.Tensor) and not torch.compiler.is_compiling():
            visible = int(visible)  # a static cache: one read per forward
        if not isinstance(visible, torch.Tensor) and visible == kv_length:
            visible = None
    everything = q_length == 1 and visible is None  # one query that sees every key: causal == bidirectional
    if mask_function is _STANDARD["causal"] or mask_function is None:
        causal_ok, bidirectional_ok = True, everything
    elif mask_function is _STANDARD["bidirectional"]:
        causal_ok, bidirectional_ok = everything, True
    else:
        arguments = dict(
            batch_size=batch_size,
            q_length=q_length,
            kv_length=kv_length,
            q_offset=q_offset if q_offset is not None else 0,
            kv_offset=kv_offset,
            attention_mask=attention_mask,
            **kwargs,
        )
        causal_ok, bidirectional_ok = _compare_with_rules(mask_function, arguments)
    if padding is None and visible is None and causal_ok is True and bidirectional_ok is True:
        return None
    return KeyMask(padding, kv_length, visible, causal_ok, bidirectional_ok)


def _compare_with_rules(mask_function, arguments: dict) -> tuple:
    """Whether ``mask_function`` selects the same keys as the causal / the bidirectional rule (both with the
    padding mask), evaluated with transformers' own ``sdpa_mask``: Python bools eagerly (raising
    :class:`UnsupportedMask` when it matches neither), 0-d BoolTensors inside ``torch.compile``."""
    from transformers.masking_utils import sdpa_mask

    def dense(function):
        arguments_now = {**arguments, "mask_function": function}
        arguments_now.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
        return sdpa_mask(**arguments_now)  # [B, 1, Tq, Tk] bool

    given = dense(mask_function)
    causal, bidirectional = dense(_STANDARD["causal"]), dense(_STANDARD["bidirectional"])
    if torch.compiler.is_compiling():
        return (given == causal).all(), (given == bidirectional).all()
    causal_ok, bidirectional_ok = torch.equal(given, causal), torch.equal(given, bidirectional)
    if not (causal_ok or bidirectional_ok):
        name = getattr(mask_function, "__qualname__", type(mask_function).__name__)
        raise UnsupportedMask(
            f"prefixrt cannot honour the attention mask function transformers passed ({name}): it selects other "
            f"keys than prefixrt attends to, which is {_RULES}. Packed sequences (position_ids that restart within "
            "a row, with no attention_mask and no cache), sliding windows, chunked attention and "
            "or_mask_function / and_mask_function overlays are honoured only where they change nothing."
        )
    return causal_ok, bidirectional_ok


def _load_standard() -> None:
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function

    _STANDARD.update(causal=causal_mask_function, bidirectional=bidirectional_mask_function)


def register() -> None:
    """Register the attention and mask functions under ``"prefixrt"`` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    _load_standard()
    AttentionInterface.register(ATTN_IMPLEMENTATION, prefixrt_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, prefixrt_mask)
