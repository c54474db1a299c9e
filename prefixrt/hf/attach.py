"""``attach`` / ``detach``: plug a prefix bank into a frozen Hugging Face GPT-2 or BART.

``attach`` changes exactly these things, and ``detach`` undoes each of them:

1. the model gets its own copy of its config (every module that held the config object holds the copy), whose
   ``_attn_implementation`` is ``"prefixrt"`` (attention and mask functions registered in transformers' own
   registries, :mod:`prefixrt.hf.attention`): another model built from the same config object is not touched;
2. each attention module gets two plain attributes: its ``(site, layer)`` and the binding (bank + backend);
3. forward hooks that validate ``prefix_ids`` and the KV cache, plan the forward's attention and shift
   positions (:mod:`prefixrt.hf.positions`; each model family installs its own, see :mod:`prefixrt.hf.models`);
4. an instance-level ``prepare_inputs_for_generation`` that passes ``prefix_ids`` to every step, and an
   instance-level ``init_continuous_batching`` that refuses transformers' continuous batching
   (:mod:`prefixrt.hf.generation.prepare`).

The model's weights are not touched and the KV cache holds only real tokens: prefixes are read from the bank
by id at every step. (A ``PrefixBank`` in another dtype than the model is cast to the model's dtype, in place and
with a warning, like it is moved to the model's device; that is not undone.)
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from prefixrt.bank import PrefixBank
from prefixrt.bank.spec import ModelSpec
from prefixrt.hf import attention
from prefixrt.hf.generation import prepare as generation
from prefixrt.hf.models import family_for
from prefixrt.ops import StepPlan
from prefixrt.ops.registry import resolve_name

__all__ = ["attach", "detach", "is_attached", "PrefixBinding", "PrefixSource", "attention_sites"]

POSITION_OFFSETS = ("prefix", "zero")


@runtime_checkable
class PrefixSource(Protocol):
    """What an attached model reads its prefixes from: :class:`~prefixrt.PrefixBank`, or anything with the same
    read interface (``prefixrt.PrefixTuner`` computes its K/V in the forward graph and serves them this way).

    ``layer_kv(site, layer)`` returns ``(bank_k, bank_v)``, each ``[H, S, D]``, packed as ``offsets(site)``
    (LongTensor ``[N + 1]``) describes; ``version`` changes whenever ids or lengths change.
    """

    spec: ModelSpec

    @property
    def version(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def offsets(self, site: str) -> torch.Tensor: ...

    def layer_kv(self, site: str, layer: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def check_ids(self, prefix_ids: torch.Tensor, argument: str = "prefix_ids") -> None: ...

    def check_compatible(self, spec: ModelSpec) -> None: ...


@dataclass
class PrefixBinding:
    """What an attached model knows about its bank. Not an ``nn.Module``: the bank is not part of the model's
    ``state_dict`` and is not moved or cast with the model."""

    bank: PrefixSource
    backend: str
    position_offset: str
    hooks: list[Any] = field(default_factory=list)
    tagged_modules: list[nn.Module] = field(default_factory=list)
    # (module, attribute, the config it held) for every attribute attach re-pointed to the model's own config copy
    config_owners: list[tuple[nn.Module, str, Any]] = field(default_factory=list)
    # (bank.version, {site: entry lengths}): read on the host once per bank version, outside compiled graphs
    _lengths: tuple[int, dict[str, tuple[int, ...]]] | None = None
    _read_outside_graph: Any = None  # read_entry_lengths behind torch.compiler.disable, made at attach

    def plan_step(
        self, prefix_ids: torch.Tensor, batch_size: int, sites: Sequence[str] | None = None
    ) -> dict[str, StepPlan]:
        """Validate ``prefix_ids`` against the bank and the batch and plan ``sites`` (default: every site of the
        bank) for one forward: ``{site: StepPlan}``.

        Called once per forward by the model's pre-forward hooks, which pass the plans down to every attention
        call of that forward (:data:`prefixrt.hf.attention.PLANS_KWARG`). Eagerly: one host read of the ids,
        which validates them (``ValueError`` naming the valid ids) and sizes the tables exactly. Inside
        ``torch.compile``: planned on the device (tables at their upper bounds, no graph break), and an id outside
        ``-1 .. N-1`` fails a runtime assert in the graph (``RuntimeError`` on CPU; on CUDA a device-side assert,
        as for an out-of-range embedding index); a freed id reads no prefix there.
        """
        self.check_ids(prefix_ids, batch_size, read=False)
        lengths = self.entry_lengths()
        sites = list(self.bank.spec.sites) if sites is None else sites
        device = self.bank.device
        if torch.compiler.is_compiling():
            ids = prefix_ids.to(device)
            n_entries = len(next(iter(lengths.values()), ()))
            torch._assert_async(
                ((ids >= -1) & (ids < n_entries)).all(),
                f"prefix_ids holds an id outside -1 (no prefix) .. {n_entries - 1}: not in the bank",
            )
            return {site: StepPlan.build(ids, lengths[site], read_ids=False) for site in sites}
        host = prefix_ids.cpu()  # the forward's one host read of the ids
        self.bank.check_ids(host)
        return {site: StepPlan.build(host, lengths[site], device=device) for site in sites}

    def check_ids(self, prefix_ids: torch.Tensor, batch_size: int, read: bool = True) -> None:
        """Raise ``ValueError`` unless ``prefix_ids`` is a ``[batch_size]`` integer tensor of live bank ids or
        ``-1`` (``read=True``: reads the ids, one host sync; ``False``: shape and dtype only)."""
        if not isinstance(prefix_ids, torch.Tensor):
            raise ValueError(f"prefix_ids must be a LongTensor [batch], got {type(prefix_ids).__name__}")
        if prefix_ids.dim() != 1 or prefix_ids.shape[0] != batch_size:
            raise ValueError(
                f"prefix_ids must be a LongTensor [batch={batch_size}], got shape {tuple(prefix_ids.shape)}"
            )
        if prefix_ids.is_floating_point() or prefix_ids.is_complex() or prefix_ids.dtype == torch.bool:
            raise ValueError(
                f"prefix_ids must be a 1-D integer tensor [batch], got {prefix_ids.dtype} {tuple(prefix_ids.shape)}"
            )
        if read:
            self.bank.check_ids(prefix_ids)

    def entry_lengths(self) -> dict[str, tuple[int, ...]]:
        """``{site: entry lengths}`` as Python ints, read from the bank once per ``bank.version`` (``attach`` and
        every eager forward after a change read them; inside ``torch.compile``, a bank changed since then is read
        through one graph break, which ``fullgraph=True`` refuses)."""
        version = self.bank.version
        if self._lengths is None or self._lengths[0] != version:
            if torch.compiler.is_compiling() and self._read_outside_graph is not None:
                lengths = self._read_outside_graph(self.bank)
            else:
                lengths = read_entry_lengths(self.bank)
            self._lengths = (version, lengths)
        return self._lengths[1]

    def plan(self, site: str, prefix_ids: torch.Tensor) -> StepPlan:
        """The plan of ``site`` for a call whose forward was not planned by the hooks (an attention module called
        directly): planned now."""
        batch = prefix_ids.shape[0] if isinstance(prefix_ids, torch.Tensor) else -1
        return self.plan_step(prefix_ids, batch, sites=[site])[site]

    def position_shift(self, prefix_ids: torch.Tensor, site: str, device: torch.device) -> torch.Tensor:
        """LongTensor ``[B]``: how far each row's positions move (its prefix length at ``site``, 0 for -1)."""
        if self.position_offset == "zero":
            return torch.zeros(prefix_ids.shape[0], dtype=torch.long, device=device)
        lengths = self.bank.offsets(site).diff().to(device)
        ids = prefix_ids.to(device)
        if lengths.numel() == 0:
            return torch.zeros_like(ids)
        return torch.where(ids >= 0, lengths[ids.clamp(min=0)], 0)


def attention_sites(model: nn.Module) -> list[tuple[nn.Module, str, int]]:
    """``(attention module, site, layer)`` for every attention module of the model (asks its family)."""
    return family_for(model).attention_sites(model)


def attach(
    model: nn.Module,
    bank: PrefixBank | PrefixSource,
    backend: str = "auto",
    position_offset: str = "prefix",
) -> nn.Module:
    """Plug ``bank`` into ``model`` (GPT-2 or BART) in place and return the model.

    After ``attach``, ``model(input_ids, attention_mask=..., prefix_ids=..., labels=...)`` and
    ``model.generate(input_ids, attention_mask=..., prefix_ids=..., ...)`` take ``prefix_ids``: LongTensor
    ``[batch]``, one bank id per row (``bank.ids([...])``), ``-1`` for a row without prefix (it then behaves
    exactly like the base model).

    Parameters
    ----------
    model : GPT2LMHeadModel / GPT2Model / BartForConditionalGeneration / BartModel
    bank : PrefixBank or PrefixSource
        Must be built for this architecture (``PrefixBank.for_model(model)``); it is moved to the model's device
        (when it is an ``nn.Module``), and a ``PrefixBank`` is cast to the model's dtype (with a warning), once.
        Any :class:`PrefixSource` works in place of a bank (a ``PrefixTuner``, whose K/V are cast in the forward).
    backend : str
        ``"auto"`` (fastest available for the tensors' device; ``PREFIXRT_BACKEND`` overrides), ``"reference"``,
        ``"triton"`` or ``"cpp"``.
    position_offset : str
        ``"prefix"`` (default): real tokens get positions ``P .. P+T-1`` as in PEFT and the original code (PEFT
        adapters then give PEFT's outputs; for BART only the decoder is shifted, by the decoder prefix length).
        ``"zero"``: positions start at 0 whatever the prefix.
    """
    if not isinstance(bank, (PrefixBank, PrefixSource)):
        raise TypeError(
            f"bank must be a prefixrt.PrefixBank (or implement prefixrt.hf.PrefixSource), got {type(bank).__name__}"
        )
    if is_attached(model):
        raise RuntimeError(
            "this model is already attached to a prefix bank; call prefixrt.detach(model) first"
        )
    if position_offset not in POSITION_OFFSETS:
        raise ValueError(f"position_offset must be one of {POSITION_OFFSETS}, got {position_offset!r}")
    family = family_for(model)
    family.check_model(model)  # a model the family cannot serve (GPT-2 with cross-attention) is refused here
    bank.check_compatible(ModelSpec.from_config(model.config))
    backend = resolve_name(backend)
    if backend != "auto":
        from prefixrt.ops.registry import get_backend

        get_backend(backend)  # fail now, with the reason, if it is not available on this machine
    param = next(model.parameters())
    if bank.device != param.device:
        if not isinstance(bank, nn.Module):
            raise ValueError(f"the prefix source is on {bank.device} but the model is on {param.device}")
        bank.to(param.device)
    if isinstance(bank, PrefixBank) and bank.dtype != param.dtype:
        # Cast once here rather than a bank slice at every layer of every forward.
        warnings.warn(
            f"prefixrt.attach: the bank holds {bank.dtype} prefixes but the model is {param.dtype}; the bank was "
            f"cast to {param.dtype} in place (build it with PrefixBank.for_model(model) to avoid the cast)",
            stacklevel=2,
        )
        bank.to(dtype=param.dtype)

    attention.register()
    binding = PrefixBinding(bank, backend, position_offset)
    binding.entry_lengths()  # read on the host now, so a compiled forward finds them
    binding._read_outside_graph = torch.compiler.disable(
        read_entry_lengths,
        reason="prefixrt: the prefix bank changed since attach or the last eager forward, so its entry lengths are "
        "read on the host; run one eager forward after changing the bank to keep fullgraph=True",
    )
    _use_own_config(model, binding)
    for module, site, layer in family.attention_sites(model):
        module._prefixrt_site = (site, layer)
        module._prefixrt_binding = binding
        binding.tagged_modules.append(module)
    binding.hooks.extend(family.install_position_hooks(model, binding))
    generation.install(model)
    model._prefixrt_binding = binding
    model.set_attn_implementation(attention.ATTN_IMPLEMENTATION)  # on the model's own config copy
    return model


def detach(model: nn.Module) -> nn.Module:
    """Undo :func:`attach`: the model is again exactly the unpatched model (its modules hold the very config
    object they held before, unchanged; changes made to ``model.config`` while attached went to the copy)."""
    binding = getattr(model, "_prefixrt_binding", None)
    if binding is None:
        raise RuntimeError("this model is not attached to a prefix bank")
    for hook in binding.hooks:
        hook.remove()
    for module in binding.tagged_modules:
        del module._prefixrt_site
        del module._prefixrt_binding
    for module, name, original in reversed(binding.config_owners):
        setattr(module, name, original)
    generation.uninstall(model)
    del model._prefixrt_binding
    return model


def _use_own_config(model: nn.Module, binding: PrefixBinding) -> None:
    """Give ``model`` its own copy of its config (and of its sub-configs): every module attribute that held one
    of them is re-pointed to the copy, so that setting the attention implementation never reaches another model
    built from the same config object. ``detach`` re-points them back."""
    original = model.config
    copied = copy.deepcopy(original)
    pairs: dict[int, tuple[Any, Any]] = {}
    stack = [(original, copied)]
    while stack:
        old, new = stack.pop()
        pairs[id(old)] = (old, new)
        for key in getattr(old, "sub_configs", {}) or {}:
            if (sub := getattr(old, key, None)) is not None and id(sub) not in pairs:
                stack.append((sub, getattr(new, key)))
    for module in model.modules():
        for name, value in list(vars(module).items()):
            pair = pairs.get(id(value))
            if pair is not None and pair[0] is value:
                setattr(module, name, pair[1])
                binding.config_owners.append((module, name, value))


def is_attached(model: nn.Module) -> bool:
    return getattr(model, "_prefixrt_binding", None) is not None


def binding_of(model: nn.Module) -> PrefixBinding:
    binding = getattr(model, "_prefixrt_binding", None)
    if binding is None:
        raise RuntimeError(
            "this model is not attached to a prefix bank; call prefixrt.attach(model, bank) first"
        )
    return binding


def read_entry_lengths(source: PrefixSource) -> dict[str, tuple[int, ...]]:
    """``{site: entry lengths}`` of ``source`` as Python ints (a host read when the source keeps them on the
    device)."""
    out = {}
    for site in source.spec.sites:
        lengths = getattr(source, "lengths", None)
        lengths = lengths(site) if lengths is not None else source.offsets(site).diff()
        out[site] = tuple(int(n) for n in lengths.tolist())
    return out
