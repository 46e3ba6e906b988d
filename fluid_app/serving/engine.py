"""The decode thread of ``fluid serve``: one thread owns the model and one running batch.

Requests arrive from the web server's event loop as :class:`~fluid_app.sampler.Decoder`
objects (already validated, prompt already tokenised). :meth:`Engine.submit` queues them,
bounded by ``max_queue``; the thread admits queued requests into its
:class:`~fluid_app.batching.FusedBatch` before every forward while fewer than ``max_batch``
rows decode, runs one forward, and hands each request's events to that request's ``sink``
(a thread-safe callable, for the server a put into an asyncio queue). A cancelled request
(client gone, stop string seen) leaves the batch before the next forward and frees its cache.
Nothing else touches the model, so the backends need no locks.
"""

from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable

from ..batching import FusedBatch
from ..events import Commit, Finished
from ..fluid_config import FORWARD_TOKEN_BUDGET
from ..protocol import Backend
from ..sampler import Decoder

log = logging.getLogger("fluid.serve")

Sink = Callable[[tuple[str, Any]], None]  # ("tokens", [ids]) / ("done", reason) / ("error", exception)


class QueueFull(Exception):
    """Every decode slot is taken and the waiting line is full: try again later."""


@dataclass(eq=False)
class Ticket:
    """One request inside the engine."""

    decoder: Decoder
    sink: Sink
    cancelled: bool = False
    admitted: bool = False
    done: bool = False


@dataclass
class Stats:
    """What the engine has done, for ``/health`` and the log."""

    requests: int = 0
    finished: int = 0
    cancelled: int = 0
    failed: int = 0
    max_rows: int = 0  # the most rows that ever shared one forward


class Engine:
    def __init__(self, backend: Backend, max_batch: int, max_queue: int,
                 token_budget: int | None = FORWARD_TOKEN_BUDGET):
        self.backend = backend
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.token_budget = token_budget  # token positions one shared forward may compute
        self.batch = FusedBatch(backend, token_budget)
        self.stats = Stats()
        self._waiting: collections.deque[Ticket] = collections.deque()
        self._tickets: dict[int, Ticket] = {}  # id(decoder) -> ticket, for admitted requests
        self._cancel: list[Ticket] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="fluid-decode", daemon=True)

    def start(self) -> Engine:
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=30)

    def submit(self, decoder: Decoder, sink: Sink) -> Ticket:
        """Queue a request; raises :class:`QueueFull` when ``max_queue`` requests already wait."""
        ticket = Ticket(decoder, sink)
        with self._wake:
            free = max(0, self.max_batch - len(self.batch))  # rows that join at the next forward
            if len(self._waiting) - free >= self.max_queue:
                raise QueueFull()
            self._waiting.append(ticket)
            self.stats.requests += 1
            self._wake.notify()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Stop a request; its row leaves the batch before the next forward (no-op once done)."""
        with self._wake:
            if ticket.done or ticket.cancelled:
                return
            ticket.cancelled = True
            self._cancel.append(ticket)
            self._wake.notify()

    def snapshot(self) -> dict[str, Any]:
        """Counters for ``/health``: rows decoding and waiting, and how forwards were shared."""
        with self._wake:
            return {"active_rows": len(self.batch), "queued": len(self._waiting),
                    "max_batch": self.max_batch, "max_queue": self.max_queue,
                    "forwards": self.batch.forwards, "rows_per_forward": round(self.batch.rows_per_forward, 4),
                    "max_rows_per_forward": self.stats.max_rows, "forward_token_budget": self.token_budget,
                    "tokens_fed": self.batch.tokens_fed,
                    "tokens_per_forward_fed": round(self.batch.tokens_per_forward, 4),
                    "max_tokens_per_forward_fed": self.batch.max_tokens_fed, "windows_trimmed": self.batch.trimmed,
                    "requests": self.stats.requests,
                    "finished": self.stats.finished, "cancelled": self.stats.cancelled, "failed": self.stats.failed}

    # -- the decode thread -------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._stopping or self._waiting or self._cancel or len(self.batch)):
                    self._wake.wait()
                if self._stopping:
                    return
                cancels, self._cancel = self._cancel, []
                admits = []
                while self._waiting and len(self.batch) + len(admits) < self.max_batch:
                    admits.append(self._waiting.popleft())
            for ticket in cancels:
                self._end(ticket, "cancelled")
            for ticket in admits:
                if not ticket.cancelled:
                    self._admit(ticket)
            if len(self.batch):
                self._step()

    def _admit(self, ticket: Ticket) -> None:
        ticket.admitted = True
        self._tickets[id(ticket.decoder)] = ticket
        try:
            self._route(self.batch.join(ticket.decoder))
        except Exception as exc:  # a request the backend cannot run fails alone
            log.exception("request failed at prefill")
            self.batch.leave(ticket.decoder)
            self._fail(ticket, exc)

    def _step(self) -> None:
        rows = len(self.batch)
        try:
            self._route(self.batch.step())
        except Exception as exc:  # the forward itself failed: every row in it fails
            log.exception("forward failed")
            for ticket in list(self._tickets.values()):
                self._fail(ticket, exc)
            self.batch = FusedBatch(self.backend, self.token_budget)
            return
        with self._wake:
            self.stats.max_rows = max(self.stats.max_rows, rows)

    def _route(self, events) -> None:
        for decoder, event in events:
            ticket = self._tickets.get(id(decoder))
            if ticket is None or ticket.cancelled:
                continue
            if isinstance(event, Commit) and event.tokens:
                ticket.sink(("tokens", list(event.tokens)))
            elif isinstance(event, Finished):
                self._finish(ticket, event.reason)

    def _finish(self, ticket: Ticket, reason: str) -> None:
        ticket.done = True
        self._tickets.pop(id(ticket.decoder), None)
        with self._wake:
            self.stats.finished += 1
        result = ticket.decoder.results[0]
        log.info("request done: %s, %d tokens, %d forwards (%.2f tokens/forward); batch rows/forward %.2f",
                 reason, len(result.token_ids), result.forwards, result.tokens_per_forward,
                 self.batch.rows_per_forward)
        ticket.sink(("done", reason))

    def _end(self, ticket: Ticket, reason: str) -> None:
        """A cancelled request: out of the batch (its cache freed) or out of the waiting line."""
        if ticket.done:
            return
        ticket.done = True
        if ticket.admitted:
            self.batch.leave(ticket.decoder)
            self._tickets.pop(id(ticket.decoder), None)
        else:
            with self._wake:
                if ticket in self._waiting:
                    self._waiting.remove(ticket)
        with self._wake:
            self.stats.cancelled += 1
        ticket.sink(("done", reason))

    def _fail(self, ticket: Ticket, exc: Exception) -> None:
        ticket.done = True
        self._tickets.pop(id(ticket.decoder), None)
        with self._wake:
            self.stats.failed += 1
        ticket.sink(("error", exc))
