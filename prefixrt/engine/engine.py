"""``prefixrt.Engine``: continuous batching of mixed-prefix requests over a bounded, preallocated K/V pool.

Memory
------
The pool is allocated once, at construction: ``max_batch_size`` rows, each with room for a prompt (GPT-2) or a
source (BART) of up to ``max_prompt_tokens`` and for ``max_new_tokens`` generated tokens (see
:mod:`prefixrt.engine.kv`; ``engine.kv_bytes`` says how much). A request that could never fit (prompt too long,
``max_new_tokens`` above the pool's, positions beyond the model's table) is rejected by :meth:`Engine.add_request`
with the reason; one that fits waits while every row is busy (:mod:`prefixrt.engine.scheduler`). Prefix K/V are
never copied into the pool: they are read from the bank.

Steps
-----
:meth:`Engine.step` advances every running request by one token: one decode pass over all running rows
(whatever their prefixes, prompt lengths and sampling settings), then finished and aborted requests leave (the
pool is compacted) and waiting requests join, each with its own prefill, which yields its first token. Tokens are
streamed through the per-request ``on_token`` callback and :meth:`Engine.stream`. A step runs under
``torch.inference_mode()`` with the model's modules in eval mode (their training flags are restored after it):
no autograd graph is ever built, whatever the weights' ``requires_grad``.

Each request decodes with its own logits processors (transformers', built from its :class:`SamplingParams` as
``generate()`` would) and its own random generator, so its tokens are those of :func:`prefixrt.generate` on that
request alone, whatever joins or leaves around it.

Requests end and leave
----------------------
An ended request (finished, aborted, failed) leaves no state behind but its output: the last ``keep_finished``
outputs stay readable through :meth:`Engine.result` / :meth:`Engine.status` (oldest dropped first), and
:meth:`Engine.pop_result` collects one. :meth:`Engine.abort` takes effect at once: an aborted request gets no
further token, even when it is aborted from another request's ``on_token`` callback in the middle of a step.
Closing a :meth:`Engine.stream` generator aborts its request.

Threads
-------
Every public method is thread-safe (one re-entrant lock): a server may call :meth:`Engine.add_request`,
:meth:`Engine.abort`, :meth:`Engine.result` from any thread while one loop thread calls :meth:`Engine.step`
(or :meth:`Engine.run`). ``on_token`` callbacks run on the stepping thread, inside the step; they may call
``add_request``, ``abort``, ``result`` and ``status``, not ``step``. An exception raised by a callback is re-raised
when the step has finished (the engine's state stays whole).

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
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from prefixrt.bank import PrefixBank
from prefixrt.bank.spec import ModelSpec
from prefixrt.engine.bankview import BankView
from prefixrt.engine.batch import Batch
from prefixrt.engine.capture import maybe_graphed_decode
from prefixrt.engine.params import SamplingParams
from prefixrt.engine.requests import Request, RequestOutput, RequestStatus, RequestTable, TokenEvent
from prefixrt.engine.sampling import SettingsCache, base_seed, row_generators, select_for_requests
from prefixrt.engine.scheduler import Scheduler
from prefixrt.hf.attach import POSITION_OFFSETS, is_attached
from prefixrt.hf.models import runner_for
from prefixrt.ops.registry import resolve_name

__all__ = ["Engine", "RequestOutput", "RequestStatus", "TokenEvent"]


@contextmanager
def _inference(model: nn.Module):
    """``torch.inference_mode()`` with every module of ``model`` in eval mode; training flags restored after."""
    training = [m for m in model.modules() if m.training]
    for m in training:
        m.training = False
    try:
        with torch.inference_mode():
            yield
    finally:
        for m in training:
            m.training = True


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
    keep_finished : int
        Outputs of ended requests kept for :meth:`result` until popped (oldest dropped first).
    gemm : str
        How the model's weight matmuls run: ``"auto"`` (oneDNN on weights packed once, for fp32 on a CPU; else the
        modules' own), ``"packed"`` or ``"plain"`` (see :mod:`prefixrt.hf.models.gemm`).

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
        keep_finished: int = 1024,
        gemm: str = "auto",
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
        self.runner = runner_for(model, gemm)
        self.max_batch_size, self.max_prompt_tokens, self.max_new_tokens = (
            max_batch_size,
            max_prompt_tokens,
            max_new_tokens,
        )
        self.batch = Batch(
            self.runner,
            items=max_batch_size,
            rows=max_batch_size,
            context=self.runner.decoder_length(max_prompt_tokens),
            generated=max_new_tokens,
            source=max_prompt_tokens,
            backend=self.backend,
            fused=True,
        )
        self._decode = maybe_graphed_decode(self.batch, cuda_graphs)
        self.scheduler = Scheduler(
            self.runner,
            bank,
            max_prompt_tokens=max_prompt_tokens,
            max_new_tokens=max_new_tokens,
            position_offset=self.position_offset,
        )
        self.requests = RequestTable(keep_finished)
        self._settings = SettingsCache(model, self.runner.device)
        self._rows: list[Request] = []  # the request of each batch row
        self._ids = itertools.count()
        self._view: BankView | None = None
        self._lock = threading.RLock()
        self._stepping = False
        self._callback_errors: list[BaseException] = []

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
        return len(self.scheduler)

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self._rows or len(self.scheduler))

    def add_request(
        self,
        prompt_ids,
        prefix: str | None = None,
        params: SamplingParams | None = None,
        on_token: Callable[[int, int], None] | None = None,
    ) -> int:
        """Queue a request; returns its id. Thread-safe.

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
        with self._lock:
            if prefix is not None:
                self.bank.id_of(prefix)  # KeyError naming the known entries
            self.scheduler.check_fits(prompt.numel(), prefix, params)
            request = self._new_request(prompt, prefix, params, on_token)
            self.requests.add(request)
            self.scheduler.add(request)
        return request.id

    def abort(self, request_id: int) -> bool:
        """Stop a waiting or running request at once (others are not disturbed); False if it had already ended.
        Thread-safe, and safe from an ``on_token`` callback."""
        with self._lock:
            request = self.requests.live.get(request_id)
            if request is None:
                self.requests.output(request_id)  # KeyError if the id is unknown
                return False
            if request.done:  # ended in the step now running; it leaves at the step's end
                return False
            waiting = request.status == RequestStatus.WAITING
            request.end(RequestStatus.ABORTED, "aborted")
            if waiting:
                self.scheduler.remove(request)
                self.requests.retire(request)
            elif not self._stepping:  # inside a step, the step retires it once its loop is done
                with _inference(self.model):
                    self._retire_ended()
            return True

    def status(self, request_id: int) -> RequestStatus:
        with self._lock:
            return self.requests.output(request_id).status

    def result(self, request_id: int) -> RequestOutput:
        """What the request produced so far (KeyError once its output was popped or dropped)."""
        with self._lock:
            return self.requests.output(request_id)

    def pop_result(self, request_id: int) -> RequestOutput:
        """An ended request's output, removed from the engine (ValueError while it waits or runs)."""
        with self._lock:
            return self.requests.pop_output(request_id)

    def step(self) -> list[TokenEvent]:
        """Advance every running request by one token, then let waiting requests join (each yields its first
        token). Returns the tokens produced, in row order. Thread-safe (not from an ``on_token`` callback)."""
        with self._lock:
            if self._stepping:
                raise RuntimeError("Engine.step() was called from inside a step (an on_token callback)")
            self._stepping = True
            try:
                with _inference(self.model):
                    events = self._step()
            finally:
                self._stepping = False
            errors, self._callback_errors = self._callback_errors, []
        if errors:
            raise errors[0]
        return events

    def stream(self, request_id: int) -> Iterator[int]:
        """Yield the request's tokens as they are produced, stepping the engine (all requests advance).
        Closing the generator before the request ends aborts it."""
        with self._lock:
            request = self.requests.live.get(request_id)
            ended = self.requests.output(request_id) if request is None else None
        if ended is not None:
            yield from ended.tokens
            return
        sent = 0
        try:
            while True:
                while sent < len(request.tokens):
                    yield request.tokens[sent]
                    sent += 1
                if request.done:
                    return
                self.step()
        finally:
            if not request.done:
                self.abort(request_id)

    def run(self) -> dict[int, RequestOutput]:
        """Step until no request is waiting or running; returns the outputs of every request that ended during
        the run and of those the engine still keeps, by id."""
        collector = self.requests.collect()
        try:
            while self.has_unfinished():
                self.step()
        finally:
            self.requests.close(collector)
        with self._lock:
            outputs = {**self.requests.finished, **collector}
        return {rid: outputs[rid] for rid in sorted(outputs)}

    # -- one step -----------------------------------------------------------------------------------------------
    def _step(self) -> list[TokenEvent]:
        self._retire_ended()
        self._sync_bank()
        events: list[TokenEvent] = []
        if self._rows:
            last = torch.tensor(
                [r.tokens[-1] for r in self._rows], dtype=torch.long, device=self.runner.device
            )
            logits = self._decode(last)
            self._emit(self._rows, select_for_requests(logits, self._rows), events)
            self._retire_ended()
        groups, failed = self.scheduler.admit(self.batch.free_rows)
        for request in failed:
            self.requests.retire(request)
        for group in groups:
            group = [r for r in group if not r.done]  # aborted by a callback of this step
            if group:
                self._prefill(group, events)
        return events

    def _prefill(self, group: list[Request], events: list[TokenEvent]) -> None:
        """Start requests with equal input lengths in one prefill; each yields its first token."""
        view = self._view
        key = self.batch.add_view(view)
        pids = [-1 if r.prefix is None else self.bank.id_of(r.prefix) for r in group]
        shifts = [view.length("decoder", p) if self.position_offset == "prefix" else 0 for p in pids]
        ids = torch.stack([r.prompt for r in group])
        decoder_ids = torch.stack([r.decoder_prompt for r in group])
        logits = self.batch.prefill(ids, None, decoder_ids, shifts, pids, key, [1] * len(group))
        for request in group:
            request.status = RequestStatus.RUNNING
            self._rows.append(request)
        self._emit(group, select_for_requests(logits, group), events)
        self._retire_ended()

    def _emit(self, requests: list[Request], tokens: list[int], events: list[TokenEvent]) -> None:
        """Record each request's token and tell its callback; a request aborted meanwhile gets none."""
        for request, token in zip(list(requests), tokens, strict=True):
            if request.done:
                continue
            finished = request.record(token)
            events.append(TokenEvent(request.id, token, finished))
            if request.on_token is not None:
                try:
                    request.on_token(request.id, token)
                except Exception as err:  # re-raised by step() once the engine's state is whole
                    self._callback_errors.append(err)

    def _retire_ended(self) -> None:
        """Rows of ended requests leave the batch (the pool is compacted); their requests leave the table."""
        if not any(r.done for r in self._rows):
            return
        keep = [i for i, r in enumerate(self._rows) if not r.done]
        self.batch.keep(keep)
        for request in self._rows:
            if request.done:
                self.requests.retire(request)
        self._rows = [self._rows[i] for i in keep]

    def _sync_bank(self) -> None:
        """Move running requests to the bank's current version when their entry is unchanged (see module doc)."""
        if self._view is not None and self._view.version == self.bank.version:
            return
        view = BankView.of(self.bank, self.runner.dtype, self.runner.device)
        self.batch.move_to(view)
        self._view = view

    def _new_request(self, prompt, prefix, params, on_token) -> Request:
        """Generation config, processors and generator exactly as ``prefixrt.generate`` builds them for this
        request alone."""
        settings = self._settings.get(params, self.runner.decoder_length(prompt.numel()), prompt)
        generator = None
        if settings.sample:
            generator = row_generators([base_seed(params.seed, None)], self.runner.device)[0]
        config = settings.config
        eos = config._eos_token_tensor
        return Request(
            id=next(self._ids),
            prompt=prompt,
            decoder_prompt=self.runner.decoder_prompt(prompt[None], config)[0],
            prefix=prefix,
            params=params,
            on_token=on_token,
            config=config,
            processors=settings.processors,
            max_length=config.max_length,
            eos=[] if eos is None else eos.tolist(),
            generator=generator,
        )
