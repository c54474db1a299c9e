"""``prefixrt.Engine``: continuous batching of mixed-prefix requests over a bounded, preallocated K/V pool.

Memory
------
The pool is allocated once, at construction: ``max_batch_size`` rows, each with room for a prompt (GPT-2) or a
source (BART) of up to ``max_prompt_tokens`` and for ``max_new_tokens`` generated tokens (see
:mod:`prefixrt.engine.kv`; ``engine.kv_bytes`` says how much). A request that could never fit (prompt too long,
``max_new_tokens`` above the pool's, positions beyond the model's table) is rejected by :meth:`Engine.add_request`
with the reason; one that fits waits while every row is busy. Prefix K/V are never copied into the pool: they are
read from the bank.

Steps
-----
:meth:`Engine.step` advances every running request by one token: one decode pass over all running rows
(whatever their prefixes, prompt lengths and sampling settings), then finished and aborted requests leave (the
pool is compacted) and waiting requests join, each with its own prefill, which yields its first token. Tokens are
streamed through the per-request ``on_token`` callback and :meth:`Engine.stream`.

Each request decodes with its own logits processors (transformers', built from its :class:`SamplingParams` as
``generate()`` would) and its own random generator, so its tokens are those of :func:`prefixrt.generate` on that
request alone, whatever joins or leaves around it.

Bank changes while running
--------------------------
The bank never writes its storage in place (``add``/``remove`` build new tensors), so the engine holds *views*:
references to the storage of the bank version each running request started with (:mod:`prefixrt.engine.bankview`).
At each step, if the bank changed, running requests whose entry is unchanged move to the new version; a request
whose prefix was removed (or replaced) keeps reading the old version until it finishes, and that version is
released when no request uses it. A waiting request resolves its prefix name when it starts: if the name is gone,
it fails with status ``FAILED`` and a clear error, and never disturbs the others.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum

import torch
from torch import nn

from prefixrt.bank import PrefixBank
from prefixrt.bank.spec import ModelSpec
from prefixrt.engine.bankview import BankView
from prefixrt.engine.batch import Batch
from prefixrt.engine.capture import maybe_graphed_decode
from prefixrt.engine.params import SamplingParams
from prefixrt.engine.sampling import base_seed, row_generators, select
from prefixrt.hf.attach import POSITION_OFFSETS, is_attached
from prefixrt.hf.generation import config as cfg
from prefixrt.hf.generation.processors import build_processors
from prefixrt.hf.models import runner_for
from prefixrt.ops.registry import resolve_name

__all__ = ["Engine", "RequestOutput", "RequestStatus", "TokenEvent"]


class RequestStatus(str, Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    ABORTED = "aborted"
    FAILED = "failed"


@dataclass(frozen=True)
class TokenEvent:
    """A token produced by :meth:`Engine.step` (``finished``: it was the request's last)."""

    request_id: int
    token: int
    finished: bool


@dataclass
class RequestOutput:
    """What a request has produced so far and how it ended (``finish_reason``: ``"eos"``, ``"length"``,
    ``"aborted"`` or ``"failed"``; ``error`` says why a request failed)."""

    request_id: int
    status: RequestStatus
    tokens: list[int]
    finish_reason: str | None
    error: str | None


@dataclass
class _Request:
    id: int
    prompt: torch.Tensor  # LongTensor [n] on the model's device
    prefix: str | None
    params: SamplingParams
    on_token: Callable | None
    config: object
    processors: object
    max_length: int  # prompt (GPT-2) or start token (BART) + max_new_tokens
    eos: list[int]
    generator: torch.Generator | None
    status: RequestStatus = RequestStatus.WAITING
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.status in (RequestStatus.FINISHED, RequestStatus.ABORTED, RequestStatus.FAILED)


class Engine:
    """Continuous-batching generation over a prefix bank (see the module docstring).

    Parameters
    ----------
    model : GPT2LMHeadModel or BartForConditionalGeneration (attached or not: the engine runs its own forward)
    bank : PrefixBank
        The prefixes requests name (need not be the bank the model is attached to).
    max_batch_size : int
        Rows in the K/V pool (requests running at once).
    max_prompt_tokens : int
        Longest prompt (GPT-2) or source (BART) a request may have.
    max_new_tokens : int
        Most tokens a request may generate.
    backend, position_offset : default to the model's binding when attached, else ``"auto"`` and ``"prefix"``
        (see :func:`prefixrt.attach`).
    cuda_graphs : bool, optional
        Capture the decode step on CUDA (default: on CUDA).

    >>> engine = prefixrt.Engine(model, bank, max_batch_size=8)              # doctest: +SKIP
    >>> rid = engine.add_request(ids, prefix="e2e", params=SamplingParams(max_new_tokens=32))  # doctest: +SKIP
    >>> for token in engine.stream(rid): ...                                   # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        bank: PrefixBank,
        *,
        max_batch_size: int = 16,
        max_prompt_tokens: int = 256,
        max_new_tokens: int = 128,
        backend: str | None = None,
        position_offset: str | None = None,
        cuda_graphs: bool | None = None,
    ):
        if not isinstance(bank, PrefixBank):
            raise TypeError(f"bank must be a prefixrt.PrefixBank, got {type(bank).__name__}")
        bank.check_compatible(ModelSpec.from_config(model.config))
        if is_attached(model):
            from prefixrt.hf import binding_of

            binding = binding_of(model)
            backend = backend or binding.backend
            position_offset = position_offset or binding.position_offset
        self.backend = resolve_name(backend or "auto")
        self.position_offset = position_offset or "prefix"
        if self.position_offset not in POSITION_OFFSETS:
            raise ValueError(
                f"position_offset must be one of {POSITION_OFFSETS}, got {self.position_offset!r}"
            )
        for name, value in (
            ("max_batch_size", max_batch_size),
            ("max_prompt_tokens", max_prompt_tokens),
            ("max_new_tokens", max_new_tokens),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.model, self.bank = model, bank
        self.runner = runner_for(model)
        self.max_batch_size, self.max_prompt_tokens, self.max_new_tokens = (
            max_batch_size,
            max_prompt_tokens,
            max_new_tokens,
        )
        gpt2 = self.runner.model_type == "gpt2"
        self.batch = Batch(
            self.runner,
            items=max_batch_size,
            rows=max_batch_size,
            context=max_prompt_tokens if gpt2 else 1,
            generated=max_new_tokens,
            source=0 if gpt2 else max_prompt_tokens,
            backend=self.backend,
            fused=True,
        )
        self._decode = maybe_graphed_decode(self.batch, cuda_graphs)
        self._rows: list[_Request] = []  # the request of each batch row
        self._waiting: deque[_Request] = deque()
        self._requests: dict[int, _Request] = {}
        self._ids = itertools.count()
        self._view: BankView | None = None
        self._prepared: dict = {}  # (params, input length) -> (config, processors, sampling?)

    # -- public API ---------------------------------------------------------------------------------------------
    @property
    def kv_bytes(self) -> int:
        """Bytes of the preallocated K/V pool."""
        return self.batch.kv_bytes

    @property
    def num_running(self) -> int:
        return len(self._rows)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def has_unfinished(self) -> bool:
        return bool(self._rows or self._waiting)

    def add_request(
        self,
        prompt_ids,
        prefix: str | None = None,
        params: SamplingParams | None = None,
        on_token: Callable[[int, int], None] | None = None,
    ) -> int:
        """Queue a request; returns its id.

        Parameters
        ----------
        prompt_ids : LongTensor ``[n]`` (or ``[1, n]``, or a list of ints): the prompt (GPT-2) or source (BART)
        prefix : name of a bank entry, or None for no prefix
        params : SamplingParams (default: greedy, 16 new tokens)
        on_token : called as ``on_token(request_id, token)`` for every token, as it is produced

        Raises
        ------
        KeyError : unknown prefix name.
        ValueError : the request can never fit in this engine (the message says which limit), or bad params.
        """
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        prompt = torch.as_tensor(prompt_ids, dtype=torch.long, device=self.runner.device)
        if prompt.dim() == 2 and prompt.shape[0] == 1:
            prompt = prompt[0]
        if prompt.dim() != 1 or prompt.numel() == 0:
            raise ValueError(
                f"prompt_ids must be a non-empty 1-D sequence of token ids, got shape {tuple(prompt.shape)}"
            )
        if prefix is not None:
            self.bank.id_of(prefix)  # KeyError naming the known entries
        self._check_fits(prompt.numel(), prefix, params)
        request = self._prepare(prompt, prefix, params, on_token)
        self._requests[request.id] = request
        self._waiting.append(request)
        return request.id

    def abort(self, request_id: int) -> bool:
        """Stop a waiting or running request (others are not disturbed); False if it had already ended."""
        request = self._requests[request_id]
        if request.done:
            return False
        if request.status == RequestStatus.WAITING:
            self._waiting.remove(request)
        else:
            row = self._rows.index(request)
            self._retire([row])
        request.status, request.finish_reason = RequestStatus.ABORTED, "aborted"
        return True

    def status(self, request_id: int) -> RequestStatus:
        return self._requests[request_id].status

    def result(self, request_id: int) -> RequestOutput:
        r = self._requests[request_id]
        return RequestOutput(r.id, r.status, list(r.tokens), r.finish_reason, r.error)

    def step(self) -> list[TokenEvent]:
        """Advance every running request by one token, then let waiting requests join (each yields its first
        token). Returns the tokens produced, in row order."""
        self._sync_bank()
        events: list[TokenEvent] = []
        if self._rows:
            last = torch.tensor(
                [r.tokens[-1] for r in self._rows], dtype=torch.long, device=self.runner.device
            )
            logits = self._decode(last)
            finished = []
            for row, (request, token) in enumerate(
                zip(self._rows, self._select(logits, self._rows), strict=True)
            ):
                if self._emit(request, token, events):
                    finished.append(row)
            if finished:
                self._retire(finished)
        self._admit_waiting(events)
        return events

    def stream(self, request_id: int) -> Iterator[int]:
        """Yield the request's tokens as they are produced, stepping the engine (all requests advance)."""
        request = self._requests[request_id]
        sent = 0
        while True:
            while sent < len(request.tokens):
                yield request.tokens[sent]
                sent += 1
            if request.done:
                return
            self.step()

    def run(self) -> dict[int, RequestOutput]:
        """Step until no request is waiting or running; returns every request's output."""
        while self.has_unfinished():
            self.step()
        return {rid: self.result(rid) for rid in self._requests}

    # -- internals ----------------------------------------------------------------------------------------------
    def _prefix_length(self, prefix: str | None, site: str) -> int:
        return 0 if prefix is None else int(self.bank.lengths(site)[self.bank.id_of(prefix)])

    def _check_fits(self, n: int, prefix: str | None, params: SamplingParams) -> None:
        if n > self.max_prompt_tokens:
            what = "source" if self.runner.model_type == "bart" else "prompt"
            raise ValueError(
                f"request can never fit: its {what} has {n} tokens, the engine's pool holds {self.max_prompt_tokens} "
                "(max_prompt_tokens)"
            )
        if params.max_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"request can never fit: max_new_tokens={params.max_new_tokens} exceeds the engine's pool "
                f"(max_new_tokens={self.max_new_tokens})"
            )
        shift = self._prefix_length(prefix, "decoder") if self.position_offset == "prefix" else 0
        decoder_tokens = (
            n + params.max_new_tokens if self.runner.model_type == "gpt2" else 1 + params.max_new_tokens
        )
        if shift + decoder_tokens - 1 > self.runner.max_positions or n > self.runner.max_positions:
            raise ValueError(
                f"request can never fit: it needs positions up to {shift + decoder_tokens - 1} (prefix shift {shift}), "
                f"the model has {self.runner.max_positions}"
            )

    def _prepare(self, prompt, prefix, params, on_token) -> _Request:
        """Generation config, processors and generator exactly as ``prefixrt.generate`` builds them for this
        request alone."""
        input_length = prompt.numel() if self.runner.model_type == "gpt2" else 1
        cache_key = (repr(params.generate_kwargs()), input_length)
        if cache_key not in self._prepared:
            self._prepared[cache_key] = self._prepare_settings(params, input_length, prompt)
        config, processors, sample = self._prepared[cache_key]
        generator = None
        if sample:
            generator = row_generators([base_seed(params.seed, None)], self.runner.device)[0]
        eos = config._eos_token_tensor
        return _Request(
            id=next(self._ids),
            prompt=prompt,
            prefix=prefix,
            params=params,
            on_token=on_token,
            config=config,
            processors=processors,
            max_length=config.max_length,
            eos=[] if eos is None else eos.tolist(),
            generator=generator,
        )

    def _prepare_settings(self, params, input_length, prompt):
        """``(config, processors, sampling?)`` for these params and input length (shared by requests: the
        processors keep no per-row state without a padding mask)."""
        model = self.model
        resolved = cfg.resolve(model, None, params.generate_kwargs())
        if resolved.mode not in ("greedy", "sample"):
            raise cfg.UnsupportedGenerationArgument(
                f"the Engine runs greedy search and sampling, not {resolved.mode}"
            )
        config = resolved.config
        device = self.runner.device
        cfg.special_tokens(model, config, False, device, 1)
        cfg.prepare_lengths(model, resolved, input_length)
        processors = build_processors(model, config, input_length, prompt[None], None, device)
        return config, processors, resolved.mode == "sample"

    def _sequence(self, request: _Request) -> torch.Tensor:
        """What HF's processors see for this request: ``[1, L]``."""
        device = self.runner.device
        if self.runner.model_type == "gpt2":
            head = request.prompt
        else:
            head = torch.tensor([int(request.config._decoder_start_token_tensor)], device=device)
        return torch.cat([head, torch.tensor(request.tokens, dtype=torch.long, device=device)])[None]

    def _select(self, logits: torch.Tensor, requests: list[_Request]) -> list[int]:
        scores = logits.float()
        plain = [i for i, r in enumerate(requests) if not r.processors and r.generator is None]
        out = [0] * len(requests)
        if plain:
            idx = torch.tensor(plain, device=scores.device)
            for i, t in zip(plain, torch.argmax(scores[idx], dim=-1).tolist(), strict=True):
                out[i] = t
        for i, r in enumerate(requests):
            if i in plain:
                continue
            s = scores[i : i + 1]
            if r.processors:
                s = r.processors(self._sequence(r), s)
            out[i] = int(select(s, r.generator is not None, [r.generator] if r.generator else None)[0])
        return out

    def _emit(self, request: _Request, token: int, events: list) -> bool:
        """Record a token; returns whether the request just finished."""
        request.tokens.append(token)
        length = (request.prompt.numel() if self.runner.model_type == "gpt2" else 1) + len(request.tokens)
        finished = token in request.eos or length >= request.max_length
        if finished:
            request.status = RequestStatus.FINISHED
            request.finish_reason = "eos" if token in request.eos else "length"
        events.append(TokenEvent(request.id, token, finished))
        if request.on_token is not None:
            request.on_token(request.id, token)
        return finished

    def _retire(self, rows: list[int]) -> None:
        gone = set(rows)
        keep = [i for i in range(len(self._rows)) if i not in gone]
        self.batch.keep(keep)
        self._rows = [self._rows[i] for i in keep]

    def _sync_bank(self) -> None:
        """Move running requests to the bank's current version when their entry is unchanged (see module doc)."""
        if self._view is not None and self._view.version == self.bank.version:
            return
        view = BankView.of(self.bank, self.runner.dtype, self.runner.device)
        key = self.batch.add_view(view)
        for item in range(self.batch.n_items):
            old = self.batch.views[self.batch.item_view[item]]
            if old is not view and view.same_entry(old, self.batch.item_prefix[item]):
                self.batch.set_item_view(item, key)
        self.batch.drop_unused_views()
        self._view = view
        self._view_key = key

    def _admit_waiting(self, events: list) -> None:
        """Start waiting requests while rows are free; requests with equal prompt lengths share one prefill
        (no padding, so each row computes exactly what it would alone)."""
        starting = []
        while self._waiting and len(self._rows) + len(starting) < self.max_batch_size:
            request = self._waiting.popleft()
            if self._can_start(request):
                starting.append(request)
        groups: dict[tuple, list[_Request]] = {}
        for request in starting:
            groups.setdefault((request.prompt.numel(), self._start_token(request)), []).append(request)
        for (length, start), group in groups.items():
            self._prefill(group, length, start, events)

    def _can_start(self, request: _Request) -> bool:
        if request.prefix is not None and request.prefix not in self.bank:
            request.status, request.finish_reason = RequestStatus.FAILED, "failed"
            request.error = f"prefix {request.prefix!r} was removed from the bank before the request started"
            return False
        try:
            self._check_fits(request.prompt.numel(), request.prefix, request.params)
        except ValueError as err:  # the prefix was replaced by a longer one while the request waited
            request.status, request.finish_reason, request.error = RequestStatus.FAILED, "failed", str(err)
            return False
        return True

    def _start_token(self, request: _Request) -> int | None:
        if self.runner.model_type == "gpt2":
            return None
        return int(request.config._decoder_start_token_tensor)

    def _prefill(self, group: list[_Request], length: int, start: int | None, events: list) -> None:
        view = self._view
        key = self.batch.add_view(view)
        pids = [-1 if r.prefix is None else self.bank.id_of(r.prefix) for r in group]
        shifts = [view.length("decoder", p) if self.position_offset == "prefix" else 0 for p in pids]
        ids = torch.stack([r.prompt for r in group])
        device = ids.device
        if start is None:
            positions = (
                torch.arange(length, device=device)[None] + torch.tensor(shifts, device=device)[:, None]
            )
            logits = self.runner.prefill(self.batch, ids, None, positions, pids, key, [1] * len(group))
        else:
            logits = self.runner.prefill(self.batch, ids, None, start, shifts, pids, key, [1] * len(group))
        first = len(self._rows)
        for request in group:
            request.status = RequestStatus.RUNNING
            self._rows.append(request)
        finished = [
            first + i
            for i, (request, token) in enumerate(zip(group, self._select(logits, group), strict=True))
            if self._emit(request, token, events)
        ]
        if finished:
            self._retire(finished)
