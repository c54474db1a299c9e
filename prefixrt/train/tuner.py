"""``PrefixTuner``: trainable prefixes for several named tasks at once, served to an attached model like a bank.

How training plugs into ``attach``
----------------------------------
An attached model reads each layer's prefix K/V from a *prefix source* (:class:`prefixrt.hf.PrefixSource`): a
:class:`~prefixrt.PrefixBank` at inference. The tuner is a prefix source too, laid out exactly like the bank that
:meth:`PrefixTuner.materialize` writes (task ``i`` has id ``i``, same per-site lengths), but its K/V are computed
by its parameters (the MLP of the reparameterization, or the K/V themselves) inside the forward graph, so the loss
back-propagates into them:

* ``tuner.attach(model)`` calls ``prefixrt.attach(model, tuner)`` and adds one forward pre-hook on the base model
  (``GPT2Model`` / ``BartModel``: every forward of the LM goes through it) that computes the K/V of all tasks once
  per forward (:meth:`PrefixTuner.view`: the MLPs, then prefix dropout) and passes them down as the
  ``prefix_source`` keyword argument, which the attention function prefers over the bound source. Because the K/V travel with the call, a gradient-checkpointing replay in the backward pass reads the
  very tensors (and dropout mask) of its own forward, even when several forwards precede one backward.
* Calls that bypass the base model's forward (``generate()`` runs a BART encoder directly) read the bound
  tuner itself: ``tuner.layer_kv`` serves the last computed K/V, recomputed when the parameters have changed.
* ``prefixrt.detach(model)`` (or ``tuner.detach(model)``) removes everything, the pre-hook included.

Rows train only their own prefix: row ``b`` attends to entry ``prefix_ids[b]`` alone, so each task's parameters get
gradient only from its own rows (the op layer sums the bank gradient per entry).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from prefixrt.bank import PrefixBank
from prefixrt.bank.spec import ModelSpec
from prefixrt.train.reparam import DirectPrefix, MLPPrefix

__all__ = ["PrefixTuner", "PrefixView"]

REPARAMS = ("mlp", "none")
INITS = ("random", "text")


class PrefixView:
    """The K/V of every task of a tuner for one forward, packed like a bank: a :class:`prefixrt.hf.PrefixSource`.

    ``kv[site]`` is ``[layers, 2, heads, S, head_dim]`` with task ``i`` in rows ``offsets(site)[i]:[i + 1]``.
    """

    def __init__(self, tuner: PrefixTuner, kv: dict[str, torch.Tensor]):
        self.tuner, self.kv, self.spec = tuner, kv, tuner.spec
        self._layers: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    @property
    def version(self) -> int:
        return self.tuner.version

    @property
    def device(self) -> torch.device:
        return self.tuner.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tuner.dtype

    def offsets(self, site: str) -> torch.Tensor:
        return self.tuner.offsets(site)

    def layer_kv(self, site: str, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(bank_k, bank_v)``, each ``[H, S, D]``, of one (site, layer)."""
        # One unbind per site, not two indexings per layer: each indexing's backward writes its gradient into a
        # zeroed tensor of the whole site's K/V (BART, P=200, 8 tasks: 36 fills of 177 MB a step).
        layers = self._layers.get(site)
        if layers is None:
            layers = self._layers[site] = [tuple(kv.unbind(0)) for kv in self.kv[site].unbind(0)]
        return layers[layer]

    def check_ids(self, prefix_ids: torch.Tensor, argument: str = "prefix_ids") -> None:
        self.tuner.check_ids(prefix_ids, argument)

    def check_compatible(self, spec: ModelSpec) -> None:
        self.tuner.check_compatible(spec)


class PrefixTuner(nn.Module):
    """Trainable prefixes for several named tasks of one frozen GPT-2 or BART.

    Parameters
    ----------
    spec_or_model : ModelSpec or model
        The architecture. A model (GPT-2 / BART) is frozen (``requires_grad_(False)``) and gives the defaults for
        ``embed_dim``, device and, with ``init="text"``, the words' activations; it is not stored.
    tasks : mapping name -> int or None
        Prefix length per task (e.g. ``{"e2e": 10, "xsum": 200}``); task ``i`` (in this order) gets id ``i``.
        ``None`` takes the length of the task's ``init_text``.
    reparam : ``"mlp"`` or ``"none"``
        ``"mlp"``: the paper's ``P' -> Linear -> tanh -> Linear`` per (task, site); ``"none"``: the K/V directly.
    mid_dim : int
        MLP hidden width (paper: 512).
    embed_dim : int, optional
        Width ``k`` of ``P'``; defaults to the model's hidden size (``n_embd`` / ``d_model``), as in the paper.
    prefix_dropout : float
        Dropout on the prefix K/V in training mode (the original code's ``prefix_dropout``).
    sites : iterable of str, optional
        Sites that get prefixes (default: all; GPT-2 ``decoder``, BART ``encoder``, ``decoder``, ``cross``). The
        others get length 0.
    init : ``"random"`` or ``"text"``
        ``"text"`` starts each task's prefix from the activations of real words (``init_text``) run through the
        frozen model (:func:`prefixrt.hf.text_prefix.text_prefix_kv`); with ``reparam="mlp"`` the MLP is set to
        output them (:meth:`MLPPrefix.fit`). Needs a model.
    init_text : str, token ids, or mapping task -> str / ids
        The words (one for every task, or one per task).
    tokenizer : optional
        Tokenizer for ``init_text`` strings.
    seed : int, optional
        Seed of the random start (the global RNG is left as it was); None draws from the global RNG.
    dtype : torch.dtype, optional
        Parameter dtype: float32, or float64 for a float64 model (the K/V are cast to the model's dtype in
        attention, so half-precision models train float32 prefixes).

    Examples
    --------
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=50))
    >>> tuner = PrefixTuner(model, {"e2e": 5, "dart": 3}, mid_dim=32, seed=0)
    >>> tuner.attach(model)                                   # doctest: +ELLIPSIS
    GPT2LMHeadModel(...)
    >>> ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    >>> out = model(ids, prefix_ids=tuner.ids(["e2e", "dart"]), labels=ids)
    >>> out.loss.backward()                                   # gradients reach the prefixes only
    >>> bank = tuner.materialize()                            # the MLPs dropped: plain K/V entries
    >>> bank.names, bank.lengths("decoder").tolist()
    (['e2e', 'dart'], [5, 3])
    """

    def __init__(
        self,
        spec_or_model: ModelSpec | nn.Module,
        tasks: Mapping[str, int | None],
        *,
        reparam: str = "mlp",
        mid_dim: int = 512,
        embed_dim: int | None = None,
        prefix_dropout: float = 0.0,
        sites: Iterable[str] | None = None,
        init: str = "random",
        init_text: Any = None,
        tokenizer: Any = None,
        seed: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        model = None
        if isinstance(spec_or_model, ModelSpec):
            spec = spec_or_model
        elif isinstance(spec_or_model, nn.Module) and hasattr(spec_or_model, "config"):
            model = spec_or_model
            model.requires_grad_(False)
            spec = ModelSpec.from_config(model.config)
            param = next(model.parameters())
            if device is None:
                device = param.device
            if dtype is None and param.dtype == torch.float64:
                dtype = torch.float64
        else:
            raise TypeError(
                f"spec_or_model must be a prefixrt.ModelSpec or a GPT-2/BART model, got {type(spec_or_model).__name__}"
            )
        if reparam not in REPARAMS:
            raise ValueError(f"reparam must be one of {REPARAMS}, got {reparam!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if not 0.0 <= prefix_dropout < 1.0:
            raise ValueError(f"prefix_dropout must be in [0, 1), got {prefix_dropout}")
        if not isinstance(tasks, Mapping) or not tasks:
            raise ValueError("tasks must be a non-empty mapping task name -> prefix length")
        sites = list(spec.sites) if sites is None else list(sites)
        for site in sites:
            if site not in spec.sites:
                raise ValueError(f"unknown site {site!r} for {spec.model_type}; sites are {list(spec.sites)}")
        if not sites:
            raise ValueError("sites must name at least one site")
        if embed_dim is None:
            embed_dim = _hidden_size(spec)

        texts: dict[str, dict[str, torch.Tensor]] = {}
        if init == "text":
            if model is None:
                raise ValueError("init='text' needs the model (pass it as spec_or_model), not a ModelSpec")
            if init_text is None:
                raise ValueError("init='text' needs init_text: the words (one text, or one per task)")
            for name in tasks:
                words = init_text.get(name) if isinstance(init_text, Mapping) else init_text
                if words is None:
                    raise ValueError(f"init_text has no words for task {name!r}")
                texts[name] = _text_kv(model, words, tokenizer)

        lengths = {}
        for name, length in tasks.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"task names must be non-empty strings, got {name!r}")
            if length is None and name in texts:
                length = next(iter(texts[name].values())).shape[3]
            if not isinstance(length, int) or isinstance(length, bool) or length < 1:
                raise ValueError(f"prefix length of task {name!r} must be a positive int, got {length!r}")
            lengths[name] = length

        self.spec = spec
        self.reparam, self.mid_dim, self.embed_dim = reparam, int(mid_dim), int(embed_dim)
        self.prefix_dropout, self.sites = float(prefix_dropout), sites
        self.task_lengths: dict[str, int] = lengths
        self._last_view: tuple[tuple, PrefixView] | None = None

        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            # task i -> {site: module}; a ModuleList keeps any task name usable (ModuleDict keys may not hold ".").
            self.prefixes = nn.ModuleList(
                nn.ModuleDict({site: self._make(spec.sites[site], length) for site in sites})
                for length in lengths.values()
            )
        for site in spec.sites:
            per_task = [length if site in sites else 0 for length in lengths.values()]
            offsets = torch.tensor([0, *per_task], dtype=torch.long).cumsum(0)
            self.register_buffer(f"_offsets_{site}", offsets, persistent=False)
        self.to(device=device, dtype=dtype or torch.float32)
        for name, kv in texts.items():
            self.init_from_kv(name, {site: t for site, t in kv.items() if site in sites})

    def _make(self, site, length: int) -> nn.Module:
        if self.reparam == "mlp":
            return MLPPrefix(site, length, self.embed_dim, self.mid_dim)
        return DirectPrefix(site, length)

    # -- the prefix source interface (what prefixrt.attach reads) ---------------------------------------------
    @property
    def names(self) -> list[str]:
        """Task names in id order."""
        return list(self.task_lengths)

    def __len__(self) -> int:
        return len(self.task_lengths)

    @property
    def version(self) -> int:
        """Ids and lengths never change after construction."""
        return 0

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def id_of(self, name: str) -> int:
        if name not in self.task_lengths:
            raise KeyError(f"unknown task {name!r}; the tuner trains {self.names}")
        return self.names.index(name)

    def ids(self, names: Iterable[str | None], device: torch.device | str | None = None) -> torch.Tensor:
        """LongTensor ``[len(names)]`` of task ids (the ids :meth:`materialize` gives a fresh bank); None -> -1."""
        ids = [-1 if n is None else self.id_of(n) for n in names]
        return torch.tensor(ids, dtype=torch.long, device=device if device is not None else self.device)

    def offsets(self, site: str) -> torch.Tensor:
        """LongTensor ``[num_tasks + 1]``: task ``i`` owns rows ``[o[i], o[i+1])`` of the packed K/V at ``site``."""
        if site not in self.spec.sites:
            raise ValueError(f"unknown site {site!r}; {self.spec.model_type} has {list(self.spec.sites)}")
        return getattr(self, f"_offsets_{site}")

    def lengths(self, site: str) -> torch.Tensor:
        return self.offsets(site).diff().cpu()

    def check_ids(self, prefix_ids: torch.Tensor, argument: str = "prefix_ids") -> None:
        """Raise ``ValueError`` unless every id is ``-1`` or a task id (one host sync)."""
        if prefix_ids.dim() != 1 or prefix_ids.is_floating_point():
            raise ValueError(
                f"{argument} must be a 1-D integer tensor [batch], got {prefix_ids.dtype} {tuple(prefix_ids.shape)}"
            )
        bad = sorted({i for i in prefix_ids.tolist() if not -1 <= i < len(self)})
        if bad:
            raise ValueError(
                f"{argument} holds ids {bad} that are no task of this tuner: valid ids are -1 (no prefix) and "
                f"0..{len(self) - 1} ({self.names})"
            )

    def check_compatible(self, spec: ModelSpec) -> None:
        if spec != self.spec:
            raise ValueError(
                f"this tuner was built for {self.spec.describe()}, but the model is {spec.describe()}"
            )

    def layer_kv(self, site: str, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(bank_k, bank_v)``, each ``[H, S, D]``: read by calls that did not get a per-forward view."""
        return self._current_view().layer_kv(site, layer)

    # -- computing the K/V ------------------------------------------------------------------------------------
    def task_kv(self, name: str) -> dict[str, torch.Tensor]:
        """One task's K/V per trained site, ``{site: [L, 2, H, P, D]}``, without dropout (differentiable)."""
        modules = self.prefixes[self.id_of(name)]
        return {site: modules[site]() for site in self.sites}

    def forward(self) -> dict[str, torch.Tensor]:
        """All tasks' K/V packed per site, ``{site: [L, 2, H, S, D]}``; prefix dropout in training mode."""
        out = {}
        for site, s in self.spec.sites.items():
            if site in self.sites:
                kv = torch.cat([modules[site]() for modules in self.prefixes], dim=3)
                kv = nn.functional.dropout(kv, self.prefix_dropout, training=self.training)
            else:
                kv = torch.zeros(
                    s.num_layers, 2, s.num_heads, 0, s.head_dim, device=self.device, dtype=self.dtype
                )
            out[site] = kv.contiguous()
        return out

    def view(self) -> PrefixView:
        """Compute the K/V once (a fresh graph; a fresh dropout mask in training mode) as a prefix source."""
        view = PrefixView(self, self.forward())
        self._last_view = (self._stamp(), view)
        return view

    def _stamp(self) -> tuple:
        return (self.training, torch.is_grad_enabled(), tuple(p._version for p in self.parameters()))

    def _current_view(self) -> PrefixView:
        if self._last_view is not None and self._last_view[0] == self._stamp():
            return self._last_view[1]
        return self.view()

    def _view_for_forward(self) -> PrefixView:
        # Training: a new graph (and dropout mask) per forward. Otherwise reuse while the parameters are unchanged
        # (generate() calls the model once per token).
        if self.training and torch.is_grad_enabled():
            return self.view()
        return self._current_view()

    # -- model integration ------------------------------------------------------------------------------------
    def attach(self, model: nn.Module, backend: str = "auto", position_offset: str = "prefix") -> nn.Module:
        """Freeze ``model`` and attach it to this tuner (see the module docstring); returns the model.

        Afterwards ``model(input_ids, attention_mask=..., prefix_ids=tuner.ids([...]), labels=...)`` trains the
        prefixes of the tasks in the batch, and ``model.generate(..., prefix_ids=...)`` generates with them.
        """
        from prefixrt.hf import attach, binding_of

        model.requires_grad_(False)
        attach(model, self, backend=backend, position_offset=position_offset)

        def pass_prefix_source(module, args, kwargs):
            if kwargs.get("prefix_source") is None:
                kwargs = {**kwargs, "prefix_source": self._view_for_forward()}
            return args, kwargs

        # On the base model (GPT2Model / BartModel), so a call of the base alone (the loss computes the LM head
        # at target positions only) gets its view too.
        base = getattr(model, "base_model", model)
        handle = base.register_forward_pre_hook(pass_prefix_source, with_kwargs=True)
        binding_of(model).hooks.append(handle)  # prefixrt.detach(model) removes it with the rest
        return model

    def detach(self, model: nn.Module) -> nn.Module:
        """``prefixrt.detach(model)``."""
        from prefixrt.hf import detach

        self._last_view = None
        return detach(model)

    # -- initialization and export ----------------------------------------------------------------------------
    def task_parameters(self, name: str) -> list[nn.Parameter]:
        """The parameters of one task (all its sites)."""
        return list(self.prefixes[self.id_of(name)].parameters())

    def init_from_kv(self, name: str, kv: torch.Tensor | Mapping[str, torch.Tensor]) -> float:
        """Start task ``name`` from given K/V (``{site: [L, 2, H, P, D]}``, a bare tensor for GPT-2); sites the
        mapping leaves out keep their start. Returns the largest absolute error of the fit (0 for ``"none"``)."""
        if isinstance(kv, torch.Tensor):
            kv = {site: kv for site in self.sites} if len(self.spec.sites) == 1 else None
        if not isinstance(kv, Mapping):
            raise ValueError(
                f"{self.spec.model_type} has sites {list(self.spec.sites)}: pass kv as a mapping"
            )
        modules, length, error = self.prefixes[self.id_of(name)], self.task_lengths[name], 0.0
        for site, tensor in kv.items():
            if site not in self.sites:
                raise ValueError(f"site {site!r} is not trained by this tuner (sites {self.sites})")
            s = self.spec.sites[site]
            expected = (s.num_layers, 2, s.num_heads, length, s.head_dim)
            if tuple(tensor.shape) != expected:
                got = tuple(tensor.shape)
                hint = (
                    f"; the words have {got[3]} tokens but task {name!r} has prefix length {length}"
                    if len(got) == 5 and got[3] != length
                    else ""
                )
                raise ValueError(f"kv[{site!r}] must be {list(expected)}, got {list(got)}{hint}")
            error = max(error, modules[site].fit(tensor.to(self.device, self.dtype)))
        self._last_view = None
        return error

    def init_from_text(self, name: str, text_or_ids: Any, model: nn.Module, tokenizer: Any = None) -> float:
        """Start task ``name`` from the activations of real words run through the frozen ``model``."""
        return self.init_from_kv(name, _text_kv(model, text_or_ids, tokenizer))

    @torch.no_grad()
    def materialize(
        self,
        bank: PrefixBank | None = None,
        names: Iterable[str] | None = None,
        replace: bool = False,
        dtype: torch.dtype | None = None,
    ) -> PrefixBank:
        """Write each task's K/V (no dropout; the MLP dropped, as in the paper) into a bank and return it.

        Parameters
        ----------
        bank : PrefixBank, optional
            Add to this bank; by default a new one (then task ``i`` gets id ``i``, as in :meth:`ids`).
        names : iterable of str, optional
            Tasks to write (default all).
        replace : bool
            Overwrite entries of the same name.
        dtype : torch.dtype, optional
            Dtype of a new bank (default the tuner's).
        """
        if bank is None:
            bank = PrefixBank(self.spec, dtype=dtype or self.dtype, device=self.device)
        else:
            bank.check_compatible(self.spec)
        for name in self.names if names is None else list(names):
            bank.add(name, self.task_kv(name), replace=replace)
        return bank

    def config(self) -> dict[str, Any]:
        """The constructor arguments (JSON-able) that rebuild this tuner's structure (:meth:`from_config`)."""
        return {
            "tasks": [[name, length] for name, length in self.task_lengths.items()],
            "reparam": self.reparam,
            "mid_dim": self.mid_dim,
            "embed_dim": self.embed_dim,
            "prefix_dropout": self.prefix_dropout,
            "sites": list(self.sites),
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    @classmethod
    def from_config(
        cls, spec: ModelSpec, config: Mapping[str, Any], device: torch.device | str | None = None
    ) -> PrefixTuner:
        """A tuner with the structure :meth:`config` described (random start; load a state dict into it)."""
        return cls(
            spec,
            dict((name, int(length)) for name, length in config["tasks"]),
            reparam=config["reparam"],
            mid_dim=config["mid_dim"],
            embed_dim=config["embed_dim"],
            prefix_dropout=config["prefix_dropout"],
            sites=config["sites"],
            seed=0,
            dtype=getattr(torch, config.get("dtype", "float32")),
            device=device,
        )

    def extra_repr(self) -> str:
        tasks = ", ".join(f"{n}={p}" for n, p in self.task_lengths.items())
        return f"{self.spec.model_type}, tasks=({tasks}), reparam={self.reparam!r}, sites={self.sites}"


def _hidden_size(spec: ModelSpec) -> int:
    site = spec.sites["decoder"]
    return site.num_heads * site.head_dim


def _text_kv(model: nn.Module, text_or_ids: Any, tokenizer: Any) -> dict[str, torch.Tensor]:
    """The K/V of real words through the frozen model, ``{site: [L, 2, H, T, D]}``."""
    from prefixrt.hf.text_prefix import text_prefix_kv

    kv = text_prefix_kv(model, text_or_ids, tokenizer)
    if isinstance(kv, torch.Tensor):
        kv = {"decoder": kv}
    return {site: t.detach() for site, t in kv.items()}
