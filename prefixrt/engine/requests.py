"""Engine requests: their lifecycle (statuses), what they produce (tokens, outputs), and the table that keeps them
only as long as needed.

Lifecycle::

    WAITING --admitted--> RUNNING --EOS / max_new_tokens--> FINISHED
       |                     |
       +---- abort ----------+--> ABORTED          WAITING --prefix gone / no longer fits--> FAILED

A request is *live* while it waits or runs: the :class:`RequestTable` holds it with its prompt, processors and
generator. When it ends it leaves the table and only its :class:`RequestOutput` stays, in a bounded history
(oldest dropped first) until collected with :meth:`RequestTable.pop_output`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import Enum

import torch

from prefixrt.engine.params import SamplingParams

__all__ = ["Request", "RequestOutput", "RequestStatus", "RequestTable", "TokenEvent"]


class RequestStatus(str, Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    ABORTED = "aborted"
    FAILED = "failed"


ENDED = frozenset({RequestStatus.FINISHED, RequestStatus.ABORTED, RequestStatus.FAILED})


@dataclass(frozen=True)
class TokenEvent:
    """A token produced by ``Engine.step`` (``finished``: it was the request's last)."""

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


@dataclass(eq=False)  # compared by identity
class Request:
    """A live request.

    Attributes
    ----------
    prompt : LongTensor ``[n]`` on the model's device: the prompt (decoder-only) or the source (encoder-decoder)
    decoder_prompt : LongTensor ``[n']``: what the decoder starts from (the prompt itself, or the start token)
    config, processors, sample : the request's GenerationConfig, logits processors, and whether it samples
    max_length : ``n' + max_new_tokens``; eos : the token ids that end it
    generator : its own ``torch.Generator`` when it samples
    """

    id: int
    prompt: torch.Tensor
    decoder_prompt: torch.Tensor
    prefix: str | None
    params: SamplingParams
    on_token: Callable | None
    config: object
    processors: object
    max_length: int
    eos: list[int]
    generator: torch.Generator | None
    status: RequestStatus = RequestStatus.WAITING
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.status in ENDED

    def record(self, token: int) -> bool:
        """Append a generated token; returns whether it ended the request (EOS or ``max_length``)."""
        self.tokens.append(token)
        if token in self.eos:
            self.end(RequestStatus.FINISHED, "eos")
        elif self.decoder_prompt.numel() + len(self.tokens) >= self.max_length:
            self.end(RequestStatus.FINISHED, "length")
        return self.done

    def end(self, status: RequestStatus, reason: str, error: str | None = None) -> None:
        self.status, self.finish_reason, self.error = status, reason, error

    def output(self) -> RequestOutput:
        return RequestOutput(self.id, self.status, list(self.tokens), self.finish_reason, self.error)


class RequestTable:
    """Live requests by id, and the outputs of the last ``keep_finished`` ended ones (until popped).

    ``collect()`` opens a collector that also receives every output that ends while it is open, whatever the
    history keeps (``Engine.run`` returns those).
    """

    def __init__(self, keep_finished: int):
        if not isinstance(keep_finished, int) or keep_finished < 0:
            raise ValueError(f"keep_finished must be a non-negative int, got {keep_finished!r}")
        self.keep_finished = keep_finished
        self.live: dict[int, Request] = {}
        self.finished: OrderedDict[int, RequestOutput] = OrderedDict()
        self._collectors: list[dict[int, RequestOutput]] = []

    def add(self, request: Request) -> None:
        self.live[request.id] = request

    def retire(self, request: Request) -> None:
        """Move an ended request out of the table, keeping its output (no-op if already retired)."""
        if self.live.pop(request.id, None) is None:
            return
        output = request.output()
        for collector in self._collectors:
            collector[request.id] = output
        if self.keep_finished:
            self.finished[request.id] = output
            while len(self.finished) > self.keep_finished:
                self.finished.popitem(last=False)

    def output(self, request_id: int) -> RequestOutput:
        if request_id in self.live:
            return self.live[request_id].output()
        if request_id in self.finished:
            return replace(self.finished[request_id], tokens=list(self.finished[request_id].tokens))
        raise self._unknown(request_id)

    def pop_output(self, request_id: int) -> RequestOutput:
        """An ended request's output, dropped from the history."""
        if request_id in self.live:
            raise ValueError(f"request {request_id} has not ended ({self.live[request_id].status.value})")
        if request_id in self.finished:
            return self.finished.pop(request_id)
        raise self._unknown(request_id)

    def collect(self) -> dict[int, RequestOutput]:
        collector: dict[int, RequestOutput] = {}
        self._collectors.append(collector)
        return collector

    def close(self, collector: dict) -> None:
        self._collectors = [c for c in self._collectors if c is not collector]

    def _unknown(self, request_id: int) -> KeyError:
        return KeyError(
            f"unknown request {request_id!r}: never added, or it ended and its output was collected (pop_result) "
            f"or dropped (the engine keeps the last {self.keep_finished} outputs; keep_finished=)"
        )
