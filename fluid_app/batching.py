"""Continuous batching of the fused loop: rows join at the next forward and leave at once.

A :class:`FusedBatch` owns one :class:`~fluid_app.protocol.DecodeSession` and a list of
*lanes*, one per decoding row, each belonging to a :class:`~fluid_app.sampler.Decoder` (its
prompt, settings, random generator and result). Every :meth:`FusedBatch.step` feeds each
lane's window in one forward and lets the lane's own decoder verify and re-draft from its
row of the outputs, so the rule that makes decoding lossless exists once, in the sampler.
Requests with different settings (mode, horizons, sampling) share forwards: a lane reads
only its own window, never the batch's padding, so its tokens are what it would decode alone.

Rows join between forwards (:meth:`join`: prefilled on their own, then appended to the
session) and leave as soon as they finish or are cancelled (:meth:`leave`), freeing their
cache before the next forward instead of riding along until the whole batch ends.

A batch may have a *token budget*: how many token positions one forward may compute. The
backends pad every row to the widest window, so a forward computes ``rows x widest`` positions,
and on a CPU its cost grows with them. When that exceeds the budget (and more than one row
decodes), :func:`allocate` cuts the windows: each row keeps its exact token and then, round
by round, one more slot of its window (every row's 1st slot, then every row's 2nd, ...) while
a whole round still fits; a row keeps a prefix of its window, trimmed by its own decoder
(``window.trim``), so what it commits is still exactly what it would decode alone.

Each decoder's :attr:`~fluid_app.sampler.Decoder.kv_tokens` follows exactly what its rows'
KV cache holds (the prompt, then every forward's kept tokens). A decoder with a prompt cache
runs a batch of its own, started on the cached session (``join(..., started=...)``), and
hands that session and those tokens back to the cache when the decode ends or is stopped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generator, Iterator, Sequence

import numpy as np

from .branches import chain, fallback_parents
from .events import Event
from .protocol import Backend, DecodeSession, StepOutput

if TYPE_CHECKING:
    from .sampler import Decoder


@dataclass
class Lane:
    """One decoding row of the batch: which decoder and row it is, and its next window."""

    decoder: Decoder
    row: int
    window: Any  # the decoder's window state (fluid_app.sampler._Window)
    started: float


Tagged = tuple["Decoder", Event]


def _tagged(decoder: Decoder, events: Generator[Event, None, Any]) -> Generator[Tagged, None, Any]:
    """Re-yield a decoder's events as ``(decoder, event)`` and pass its return value on."""
    while True:
        try:
            event = next(events)
        except StopIteration as stop:
            return stop.value
        yield decoder, event


def allocate(widths: Sequence[int], budget: int | None) -> list[int]:
    """How many tokens of each row's window (``widths``: its exact token plus its slots) one
    forward feeds, so that ``rows x widest`` stays within ``budget`` where it can.

    Every row keeps at least its exact token. Slots are handed out round-robin by position
    (every row's 1st slot, then every row's 2nd, ...) in whole rounds only: the backends pad
    each row to the widest, so a round that only some rows fill costs as much as a full one.
    A lone row, or ``budget`` None, keeps everything."""
    widths = [int(w) for w in widths]
    if budget is None or len(widths) <= 1:
        return widths
    cap = max(1, budget // len(widths))
    return [min(w, cap) for w in widths]


class FusedBatch:
    """A running batch of lanes on one backend; see the module docstring.

    ``token_budget``: the most token positions (rows x widest window) one forward computes
    when several rows decode (:func:`allocate`); None: no limit."""

    def __init__(self, backend: Backend, token_budget: int | None = None):
        if token_budget is not None and token_budget < 1:
            raise ValueError(f"the token budget must be at least 1 (got {token_budget})")
        self.backend = backend
        self.token_budget = token_budget
        self.session: DecodeSession | None = None
        self.lanes: list[Lane] = []
        self.forwards = 0  # batch forwards run (prefills not counted)
        self.rows_fed = 0  # rows summed over those forwards: rows_fed / forwards is rows per forward
        self.tokens_fed = 0  # token positions those forwards computed (rows x widest, padding included)
        self.max_tokens_fed = 0  # the most one forward computed
        self.trimmed = 0  # windows cut to the budget
        self.fed: list[tuple[Decoder, int, int]] = []  # (decoder, row, tokens fed) of the last forward

    def __len__(self) -> int:
        return len(self.lanes)

    @property
    def rows_per_forward(self) -> float:
        return self.rows_fed / self.forwards if self.forwards else 0.0

    @property
    def tokens_per_forward(self) -> float:
        """Token positions computed per forward (padding included), what a forward costs."""
        return self.tokens_fed / self.forwards if self.forwards else 0.0

    def join(self, decoder: Decoder, rows: Sequence[int] | None = None,
             started: tuple[DecodeSession, StepOutput] | None = None) -> Iterator[Tagged]:
        """Prefill ``decoder``'s rows (all by default) and add them to the batch; yields each
        row's first committed token (and its end, if that token already ends it).

        ``started``: a session already holding exactly these rows' prompts, and the outputs at
        their last tokens, to run the batch on instead of a prefill (a prompt cache's session);
        only an empty batch takes one."""
        rows = list(range(len(decoder.prompts))) if rows is None else list(rows)
        prompts = [decoder.prompts[r] for r in rows]
        logits = decoder.sampling is not None or any(lane.decoder.sampling is not None for lane in self.lanes)
        began = time.perf_counter()
        if started is not None:
            assert self.session is None, "only an empty batch starts on a given session"
            self.session, first = started
        elif self.session is None:
            self.session, first = self.backend.start(prompts, logits=logits)
        else:
            self.session.logits = logits
            first = self.session.add(prompts)
        for row, prompt in zip(rows, prompts):
            decoder.kv_tokens[row] = list(prompt)
        lanes = []
        for i, row in enumerate(rows):
            window = yield from _tagged(decoder, decoder._open(row, first, i))
            lanes.append(Lane(decoder, row, window, began))
        self.lanes += lanes
        self._retire([lane for lane in lanes if not lane.window.active])

    def step(self) -> Iterator[Tagged]:
        """One forward over every lane: verify, commit and re-draft each; finished lanes leave."""
        if not self.lanes:
            return
        mask = self.backend.mask_token_id if self.backend.mask_token_id is not None else 0
        wanted = [lane.window.width for lane in self.lanes]
        widths = allocate(wanted, self.token_budget)
        for lane, want, width in zip(self.lanes, wanted, widths):
            if width < want:
                lane.window.trim(width)  # the lane's own decoder keeps its window consistent
                self.trimmed += 1
                if lane.window.k > 1:  # the view shows what is fed, not the cut drafts
                    yield lane.decoder, lane.window.as_draft(lane.row, lane.decoder.results[lane.row].forwards)
        self.fed = [(lane.decoder, lane.row, width) for lane, width in zip(self.lanes, widths)]
        feed = np.full((len(self.lanes), max(widths)), mask, dtype=np.int64)
        # only a forward where some row feeds a fallback branch is a branched one (padding follows
        # the row's last token); every other forward stays the plain causal call
        branched = any(lane.window.fallback for lane in self.lanes)
        parents = np.tile(chain(max(widths)), (len(self.lanes), 1)) if branched else None
        for i, (lane, width) in enumerate(zip(self.lanes, widths)):
            window = lane.window
            feed[i, : width - window.fallback] = [window.pending] + [mask if t is None else t for t in window.slots]
            if parents is not None:
                parents[i, :width] = fallback_parents(width - window.fallback, window.fallback)
        out = self.session.forward(feed) if parents is None else self.session.forward(feed, parents)
        self.forwards += 1
        self.rows_fed += len(self.lanes)
        self.tokens_fed += feed.size
        self.max_tokens_fed = max(self.max_tokens_fed, feed.size)
        keep = []
        for i, (lane, width) in enumerate(zip(self.lanes, widths)):
            kept = yield from _tagged(lane.decoder, lane.decoder._verify(lane.row, lane.window, feed[i, :width],
                                                                         out, i, mask))
            keep.append(kept)
        self.session.commit(keep)
        for i, (lane, kept) in enumerate(zip(self.lanes, keep)):
            lane.decoder.kv_tokens[lane.row].extend(int(t) for t in feed[i, :kept])
        self._retire([lane for lane in self.lanes if not lane.window.active])

    def leave(self, decoder: Decoder) -> None:
        """Cancel every lane of ``decoder``: its rows leave the batch before the next forward."""
        self._retire([lane for lane in self.lanes if lane.decoder is decoder])

    def _retire(self, lanes: list[Lane]) -> None:
        if not lanes:
            return
        now = time.perf_counter()
        for lane in lanes:
            lane.decoder.results[lane.row].seconds = now - lane.started
        gone = {id(lane) for lane in lanes}
        indices = [i for i, lane in enumerate(self.lanes) if id(lane) in gone]
        self.lanes = [lane for lane in self.lanes if id(lane) not in gone]
        if not self.lanes:
            self.session = None  # nothing left: the whole cache goes
            return
        self.session.drop(indices)
        self.session.logits = any(lane.decoder.sampling is not None for lane in self.lanes)
