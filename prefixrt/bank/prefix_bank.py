"""The prefix bank: the K/V of many named prefixes for one model architecture, each stored once.

Storage
-------
One packed parameter per attention site, ``kv[site]`` of shape ``[layers, 2, heads, S, head_dim]`` (K then V),
where the entries are laid end to end along ``S``. Entry ``e`` owns rows ``offsets(site)[e]:offsets(site)[e+1]``,
so entries have their own prefix lengths (a table-to-text prefix of 10 and a summarization prefix of 200 share
one bank) and the op layer reads ``kv[site][layer, 0]`` (``[H, S, D]``) in place, without copying.

Ids are stable slots: removing an entry frees its slot (length 0, unusable) without renumbering the others, so
ids held by a running engine stay valid; a later ``add`` may reuse a free slot.

Training: the bank is an ``nn.Module``; ``bank.requires_grad_(True)`` trains the stored K/V directly, each
entry's gradient summed over the rows that use it. ``add``/``remove`` re-create the storage parameters, so build
an optimizer after the entries are in place.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from prefixrt.bank.spec import ModelSpec
from prefixrt.fileio import TaggedSafetensors

__all__ = ["PrefixBank", "BankFileError"]

FORMAT_NAME = "prefixrt.bank"
FORMAT_VERSION = "1"


class BankFileError(ValueError):
    """A bank file is missing, corrupt, or was written by something else."""


_BANK_FILE = TaggedSafetensors(
    FORMAT_NAME, FORMAT_VERSION, BankFileError, missing="bank file", kind="bank", version_kind="bank"
)


class PrefixBank(nn.Module):
    """Named prefixes' K/V for one architecture, looked up per row by id.

    Parameters
    ----------
    spec : ModelSpec
        Sites and their shapes (``PrefixBank.for_model`` reads it from a model's config).
    dtype : torch.dtype
        Storage dtype (floating point).
    device : torch.device or str, optional

    Examples
    --------
    >>> from transformers import GPT2Config
    >>> bank = PrefixBank(ModelSpec.from_config(GPT2Config(n_layer=2, n_head=2, n_embd=16)))
    >>> bank.add("e2e", torch.randn(2, 2, 2, 10, 8))        # [layers, 2, heads, P, head_dim]
    0
    >>> bank.add("dart", torch.randn(2, 2, 2, 4, 8))
    1
    >>> bank.ids(["dart", "e2e", None]).tolist()
    [1, 0, -1]
    >>> bank.lengths("decoder").tolist()
    [10, 4]
    """

    def __init__(
        self, spec: ModelSpec, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ):
        super().__init__()
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
        self.spec = spec
        self._slots: list[str | None] = []  # slot id -> name (None = free)
        self._lengths: dict[str, list[int]] = {site: [] for site in spec.sites}  # site -> length per slot
        self.kv = nn.ParameterDict(
            {
                site: nn.Parameter(
                    torch.zeros(s.num_layers, 2, s.num_heads, 0, s.head_dim, dtype=dtype, device=device),
                    requires_grad=False,
                )
                for site, s in spec.sites.items()
            }
        )
        for site in spec.sites:
            self.register_buffer(
                f"_offsets_{site}", torch.zeros(1, dtype=torch.long, device=device), persistent=False
            )
        self._version = 0

    # -- construction -------------------------------------------------------------------------------------------
    @classmethod
    def for_model(cls, model: nn.Module, dtype: torch.dtype | None = None) -> PrefixBank:
        """An empty bank shaped for ``model`` (GPT-2 or BART), on its device, in its dtype unless given."""
        param = next(model.parameters())
        return cls(ModelSpec.from_config(model.config), dtype=dtype or param.dtype, device=param.device)

    # -- lookup -------------------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Names of the live entries, in id order."""
        return [n for n in self._slots if n is not None]

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self._slots

    @property
    def num_slots(self) -> int:
        """Number of ids in use or freed (valid ids are ``0 .. num_slots - 1`` that hold a live entry)."""
        return len(self._slots)

    @property
    def version(self) -> int:
        """Increments on every change of entries (lets callers cache per-bank plans)."""
        return self._version

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.kv.values())).dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self.kv.values())).device

    def id_of(self, name: str) -> int:
        """The id of entry ``name``; raises ``KeyError`` listing the known names when it is not in the bank."""
        if not isinstance(name, str) or name not in self._slots:
            raise KeyError(f"unknown prefix name {name!r}; the bank holds {self.names}")
        return self._slots.index(name)

    def ids(self, names: Iterable[str | None], device: torch.device | str | None = None) -> torch.Tensor:
        """LongTensor ``[len(names)]`` of ids; ``None`` maps to ``-1`` (no prefix)."""
        ids = [-1 if n is None else self.id_of(n) for n in names]
        return torch.tensor(ids, dtype=torch.long, device=device if device is not None else self.device)

    def name_of(self, entry_id: int) -> str:
        if not 0 <= entry_id < len(self._slots) or self._slots[entry_id] is None:
            raise KeyError(f"no live entry with id {entry_id}; live ids are {self.live_ids()}")
        return self._slots[entry_id]

    def live_ids(self) -> list[int]:
        return [i for i, n in enumerate(self._slots) if n is not None]

    def lengths(self, site: str) -> torch.Tensor:
        """LongTensor ``[num_slots]``: each entry's prefix length at ``site`` (0 for free slots)."""
        self._check_site(site)
        return torch.tensor(self._lengths[site], dtype=torch.long)

    def offsets(self, site: str) -> torch.Tensor:
        """LongTensor ``[num_slots + 1]`` on the bank's device: entry ``e`` owns rows ``[o[e], o[e+1])``."""
        self._check_site(site)
        return getattr(self, f"_offsets_{site}")

    def layer_kv(self, site: str, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views ``(bank_k, bank_v)``, each ``[H, S, D]``, of one (site, layer): what the op layer reads."""
        kv = self.kv[site]
        return kv[layer, 0], kv[layer, 1]

    def entry(self, name: str) -> dict[str, torch.Tensor]:
        """Copies of one entry's K/V per site, ``{site: [layers, 2, heads, P, head_dim]}`` (P may be 0)."""
        slot = self.id_of(name)
        out = {}
        for site in self.spec.sites:
            start = sum(self._lengths[site][:slot])
            out[site] = self.kv[site].detach()[:, :, :, start : start + self._lengths[site][slot]].clone()
        return out

    def check_ids(self, prefix_ids: torch.Tensor, argument: str = "prefix_ids") -> None:
        """Raise ``ValueError`` unless every id is ``-1`` or a live entry (one host sync)."""
        if prefix_ids.dim() != 1 or prefix_ids.is_floating_point():
            raise ValueError(
                f"{argument} must be a 1-D integer tensor [batch], got {prefix_ids.dtype} "
                f"{tuple(prefix_ids.shape)}"
            )
        live = set(self.live_ids())
        bad = sorted({i for i in prefix_ids.tolist() if i != -1 and i not in live})
        if bad:
            raise ValueError(
                f"{argument} holds ids {bad} that are not in the bank: valid ids are -1 (no prefix) and "
                f"{sorted(live)} ({self.names})"
            )

    def check_compatible(self, spec: ModelSpec) -> None:
        """Raise ``ValueError`` when the bank was built for another architecture than ``spec``."""
        if spec != self.spec:
            raise ValueError(
                f"this bank was built for {self.spec.describe()}, but the model is {spec.describe()}"
            )

    # -- mutation -----------------------------------------------------------------------------------------------
    def add(self, name: str, kv: torch.Tensor | Mapping[str, torch.Tensor], replace: bool = False) -> int:
        """Store a prefix and return its id.

        Parameters
        ----------
        name : str
            A new name (or an existing one with ``replace=True``).
        kv : Tensor or mapping site -> Tensor
            Each ``[layers, 2, heads, P, head_dim]`` (K then V). A bare tensor is allowed for single-site models
            (GPT-2). Sites left out get length 0 (e.g. a BART prefix on the decoder only).
        replace : bool
            Overwrite an existing entry of that name, keeping its id.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        if name in self._slots and not replace:
            raise ValueError(
                f"a prefix named {name!r} is already in the bank; remove it first or pass replace=True"
            )
        per_site = self._validate_kv(name, kv)
        if name in self._slots:
            slot = self._slots.index(name)
        elif None in self._slots:
            slot = self._slots.index(None)
        else:
            slot = len(self._slots)
        self._write_slot(slot, name, per_site)
        return slot

    def remove(self, name: str) -> None:
        """Delete an entry; its id becomes free (other ids do not change)."""
        slot = self.id_of(name)
        self._write_slot(slot, None, {})

    def clear(self) -> None:
        for name in self.names:
            self.remove(name)

    def _validate_kv(
        self, name: str, kv: torch.Tensor | Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        if isinstance(kv, torch.Tensor):
            if len(self.spec.sites) != 1:
                raise ValueError(
                    f"{self.spec.model_type} has sites {list(self.spec.sites)}: pass kv as a mapping "
                    "site -> [layers, 2, heads, P, head_dim]"
                )
            kv = {next(iter(self.spec.sites)): kv}
        if not isinstance(kv, Mapping) or not kv:
            raise ValueError(
                f"kv must be a tensor or a non-empty mapping site -> tensor, got {type(kv).__name__}"
            )
        out = {}
        for site, tensor in kv.items():
            if site not in self.spec.sites:
                raise ValueError(
                    f"unknown site {site!r} for {self.spec.model_type}; sites are {list(self.spec.sites)}"
                )
            s = self.spec.sites[site]
            if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
                raise ValueError(f"kv[{site!r}] must be a floating-point tensor")
            expected = (s.num_layers, 2, s.num_heads, "P", s.head_dim)
            shape = tuple(tensor.shape)
            if len(shape) != 5 or shape[:3] != expected[:3] or shape[4] != expected[4]:
                raise ValueError(
                    f"kv[{site!r}] for prefix {name!r} must be [layers, 2, heads, P, head_dim] = "
                    f"{list(expected)} for {self.spec.describe()}, got {list(shape)}"
                )
            if not torch.isfinite(tensor).all():
                raise ValueError(f"kv[{site!r}] for prefix {name!r} contains NaN or inf")
            out[site] = tensor.detach().to(device=self.device, dtype=self.dtype)
        if all(t.shape[3] == 0 for t in out.values()):
            raise ValueError(f"prefix {name!r} has no tokens (P = 0 at every site it gives)")
        return out

    def _write_slot(self, slot: int, name: str | None, per_site: dict[str, torch.Tensor]) -> None:
        """Rebuild each site's packed storage with ``slot`` holding ``per_site`` (all or nothing)."""
        new_storage, new_lengths = {}, {}
        for site, s in self.spec.sites.items():
            lengths = list(self._lengths[site]) + [0] * (slot + 1 - len(self._lengths[site]))
            old = self.kv[site].detach()
            start = sum(lengths[:slot])
            piece = per_site.get(site, old.new_zeros(s.num_layers, 2, s.num_heads, 0, s.head_dim))
            new_storage[site] = torch.cat(
                [old[:, :, :, :start], piece, old[:, :, :, start + lengths[slot] :]], dim=3
            )
            lengths[slot] = piece.shape[3]
            new_lengths[site] = lengths
        # Nothing above can fail halfway through a mutation; commit.
        slots = list(self._slots) + [None] * (slot + 1 - len(self._slots))
        slots[slot] = name
        while slots and slots[-1] is None:  # trailing free slots are forgotten
            slots.pop()
        for site in self.spec.sites:
            requires_grad = self.kv[site].requires_grad
            self.kv[site] = nn.Parameter(new_storage[site].contiguous(), requires_grad=requires_grad)
            self._lengths[site] = new_lengths[site][: len(slots)]
            lengths = torch.tensor([0] + self._lengths[site], dtype=torch.long)
            setattr(self, f"_offsets_{site}", lengths.cumsum(0).to(self.device))
        self._slots = slots
        self._version += 1

    def _check_site(self, site: str) -> None:
        if site not in self.spec.sites:
            raise ValueError(f"unknown site {site!r}; {self.spec.model_type} has {list(self.spec.sites)}")

    # -- files --------------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the bank to one safetensors file (atomically: a temp file renamed over ``path``)."""
        tensors, entries = {}, []
        for slot, name in enumerate(self._slots):
            if name is None:
                continue
            lengths = {}
            for site, tensor in self.entry(name).items():
                lengths[site] = tensor.shape[3]
                tensors[f"{slot}.{site}"] = tensor.contiguous().cpu()
            entries.append({"id": slot, "name": name, "lengths": lengths})
        metadata = {
            "spec": self.spec.to_json(),
            "dtype": str(self.dtype).removeprefix("torch."),
            "entries": json.dumps(entries),
        }
        _BANK_FILE.write(path, tensors, metadata)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> PrefixBank:
        """Read a bank written by :meth:`save`; raises :class:`BankFileError` for a missing or corrupt file."""
        path = Path(path)
        metadata, tensors = _BANK_FILE.read(path)
        try:
            spec = ModelSpec.from_json(metadata["spec"])
            entries = json.loads(metadata["entries"])
            stored_dtype = getattr(torch, metadata["dtype"])
        except Exception as err:
            raise BankFileError(f"{str(path)!r} has a corrupt bank header ({err})") from err
        bank = cls(spec, dtype=dtype or stored_dtype, device=device)
        seen_ids, seen_names = set(), set()
        for entry in entries:
            entry_id, name = entry.get("id"), entry.get("name")
            if not isinstance(entry_id, int) or entry_id < 0 or entry_id in seen_ids or name in seen_names:
                raise BankFileError(
                    f"{str(path)!r} is corrupt: bad or repeated entry id/name {entry_id!r}/{name!r}"
                )
            seen_ids.add(entry_id)
            seen_names.add(name)
            kv = {}
            for site in entry.get("lengths", {}):
                key = f"{entry_id}.{site}"
                if key not in tensors:
                    raise BankFileError(f"{str(path)!r} is corrupt: entry {name!r} lacks tensor {key!r}")
                kv[site] = tensors[key]
            try:
                bank._write_slot(entry_id, name, bank._validate_kv(name, kv))  # ids stay as saved
            except ValueError as err:
                raise BankFileError(f"{str(path)!r} is corrupt: {err}") from err
        return bank

    # -- convenience (the loaders live in higher layers; imported lazily) ----------------------------------------
    def add_peft(self, name: str, adapter_dir: str | os.PathLike, replace: bool = False) -> int:
        """Add a PEFT ``PrefixTuningConfig`` adapter saved by PEFT (see :mod:`prefixrt.bank.peft_io`)."""
        from prefixrt.bank.peft_io import read_peft_prefix

        return self.add(name, read_peft_prefix(adapter_dir, self.spec), replace=replace)

    def export_peft(
        self, name: str, adapter_dir: str | os.PathLike, base_model_name_or_path: str | None = None
    ) -> None:
        """Write entry ``name`` as a PEFT prefix-tuning adapter that PEFT loads (GPT-2)."""
        from prefixrt.bank.peft_io import write_peft_prefix

        write_peft_prefix(self.entry(name), self.spec, adapter_dir, base_model_name_or_path)

    def extra_repr(self) -> str:
        return f"{self.spec.describe()}, entries={self.names}, dtype={self.dtype}"
