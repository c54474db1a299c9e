"""The engine's waiting queue and its admission against the K/V pool.

The pool (:class:`~prefixrt.engine.batch.Batch`) has a fixed number of rows, each with room for an input of up to
``max_prompt_tokens`` and ``max_new_tokens`` generated tokens. So a request either can never fit -- refused at
once by :meth:`Scheduler.check_fits`, with the limit it breaks -- or it fits in any free row: it waits, in order
of arrival, until one is free. A waiting request is checked again when it starts (its prefix may have been
removed or replaced by a longer one meanwhile); if it no longer fits it fails, never disturbing the others.

Requests admitted together with equal input lengths share one prefill (no padding, so each row computes exactly
what it would alone).
"""

from __future__ import annotations

from collections import deque

from prefixrt.bank import PrefixBank
from prefixrt.engine.params import SamplingParams
from prefixrt.engine.requests import Request, RequestStatus
from prefixrt.hf.models.base import Runner

__all__ = ["Scheduler"]


class Scheduler:
    """First-come, first-served admission of waiting requests into free rows of the pool.

    Parameters
    ----------
    runner : the model's runner (its position table and how long its decoder input is)
    bank : the bank the requests name prefixes of
    max_prompt_tokens, max_new_tokens : what one row of the pool holds
    position_offset : ``"prefix"`` (positions shifted by the decoder-prefix length) or ``"zero"``
    """

    def __init__(
        self,
        runner: Runner,
        bank: PrefixBank,
        *,
        max_prompt_tokens: int,
        max_new_tokens: int,
        position_offset: str,
    ):
        self.runner, self.bank = runner, bank
        self.max_prompt_tokens, self.max_new_tokens = max_prompt_tokens, max_new_tokens
        self.position_offset = position_offset
        self.waiting: deque[Request] = deque()

    def __len__(self) -> int:
        return len(self.waiting)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def remove(self, request: Request) -> None:
        """Take a request out of the queue (an abort); nothing if it is not there."""
        if request in self.waiting:
            self.waiting.remove(request)

    def check_fits(self, n: int, prefix: str | None, params: SamplingParams) -> None:
        """Raise ``ValueError`` (naming the limit) if a request with an input of ``n`` tokens can never run."""
        if n > self.max_prompt_tokens:
            what = "source" if self.runner.has_encoder else "prompt"
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
        decoder_tokens = self.runner.decoder_length(n) + params.max_new_tokens
        limit = self.runner.max_positions
        if shift + decoder_tokens - 1 > limit or n > limit:
            raise ValueError(
                f"request can never fit: it needs positions up to {shift + decoder_tokens - 1} (prefix shift {shift}), "
                f"the model has {limit}"
            )

    def admit(self, free_rows: int) -> tuple[list[list[Request]], list[Request]]:
        """Pop waiting requests into at most ``free_rows`` rows.

        Returns ``(groups, failed)``: the requests to start, grouped by input length (one prefill each), and
        those that can no longer run (status ``FAILED``, ``error`` set).
        """
        starting: list[Request] = []
        failed: list[Request] = []
        while self.waiting and len(starting) < free_rows:
            request = self.waiting.popleft()
            if request.done:
                continue
            error = self._start_error(request)
            if error is None:
                starting.append(request)
            else:
                request.end(RequestStatus.FAILED, "failed", error)
                failed.append(request)
        groups: dict[int, list[Request]] = {}
        for request in starting:
            groups.setdefault(request.prompt.numel(), []).append(request)
        return list(groups.values()), failed

    def _start_error(self, request: Request) -> str | None:
        if request.prefix is not None and request.prefix not in self.bank:
            return f"prefix {request.prefix!r} was removed from the bank before the request started"
        try:
            self.check_fits(request.prompt.numel(), request.prefix, request.params)
        except ValueError as err:  # the prefix was replaced by a longer one while the request waited
            return str(err)
        return None

    def _prefix_length(self, prefix: str | None, site: str) -> int:
        return 0 if prefix is None else int(self.bank.lengths(site)[self.bank.id_of(prefix)])
