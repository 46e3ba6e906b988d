"""The elastic sampler: greedy AR, the authors' FLUID sampler, and our fused FLUID sampler.

All three modes drive a :class:`~fluid_app.protocol.Backend` through plain causal forwards
and commit only tokens that equal the greedy AR choice given the committed prefix, so their
outputs are identical; they differ in how many forwards they spend.

``reference`` follows FLUID_METHOD.md section 5 literally: per block, denoising forwards
until every slot is decided, one verification forward, and one re-commit forward after a
rejection.

``fluid`` fuses verification into every denoising forward. The window fed to the model is
``[last exact token, drafted slots..., masks...]``. Under causal attention the outputs at
the exact token and at every draft that matched are *exact* greedy predictions, so one
forward both verifies the longest correct run of drafts, yields one more exact token (the
correction, or a bonus when everything matched), and re-drafts the following slots. Nothing
is ever forwarded twice: the exact token that ends one window is the first input of the
next, which is the re-commit the reference spends a forward on. Each forward commits at
least one token, so ``fluid`` is never slower than AR in forwards.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from .config import check_horizons_and_threshold
from .errors import FluidError
from .events import BlockStart, Commit, Draft, Event, Finished, Verify
from .lookup import lookup_continuation
from .protocol import Backend, StepOutput

MODES = ("ar", "reference", "fluid")


@dataclass(frozen=True)
class DecodeSettings:
    """User-facing decoding options (HF ``generate`` naming where one exists)."""

    mode: str = "fluid"
    max_new_tokens: int = 128
    k_min: int = 4
    k_max: int = 16
    threshold: float = 0.9
    prompt_lookup_num_tokens: int = 0

    def validate(self) -> "DecodeSettings":
        if self.mode not in MODES:
            raise FluidError(f"unknown mode {self.mode!r}; use one of {', '.join(MODES)}")
        if self.max_new_tokens < 1:
            raise FluidError(f"max_new_tokens must be at least 1 (got {self.max_new_tokens})")
        check_horizons_and_threshold(self.k_min, self.k_max, self.threshold)
        if self.prompt_lookup_num_tokens < 0:
            raise FluidError(f"prompt_lookup_num_tokens must be 0 (off) or more (got {self.prompt_lookup_num_tokens})")
        return self


@dataclass
class RowResult:
    """Outcome of one prompt: new token ids and what they cost."""

    token_ids: list[int] = field(default_factory=list)
    forwards: int = 0
    blocks: list[dict[str, int]] = field(default_factory=list)
    finish_reason: str = ""
    seconds: float = 0.0

    @property
    def tokens_per_forward(self) -> float:
        return len(self.token_ids) / self.forwards if self.forwards else float(len(self.token_ids))


class Decoder:
    """Decode a batch of tokenised prompts; iterate :meth:`events` to run it.

    After the iterator is exhausted, :attr:`results` holds one :class:`RowResult` per prompt.
    """

    def __init__(self, backend: Backend, prompts: Sequence[Sequence[int]], settings: DecodeSettings):
        self.backend = backend
        self.settings = settings.validate()
        self.prompts = [list(p) for p in prompts]
        if not self.prompts:
            raise FluidError("no prompts given; pass at least one non-empty prompt")
        for prompt in self.prompts:
            if not prompt:
                raise FluidError("the prompt is empty; pass some text with --prompt")
            if len(prompt) >= backend.max_context:
                raise FluidError(
                    f"the prompt has {len(prompt)} tokens but the model's context is "
                    f"{backend.max_context}; shorten the prompt"
                )
        if settings.mode != "ar" and backend.mask_token_id is None:
            raise FluidError("this model has no MASK token; use --mode ar or load a FLUID checkpoint")
        self.results = [RowResult() for _ in self.prompts]

    # -- helpers shared by the modes -------------------------------------------------------
    def _horizon(self, preferred: int | None, row: int, committed: int) -> int:
        """Block size: the K-head's choice (k_max without one), clamped, capped by what is left."""
        s = self.settings
        k = s.k_max if preferred is None else int(preferred)
        k = min(max(k, s.k_min), s.k_max)
        remaining = s.max_new_tokens - committed
        room = self.backend.max_context - len(self.prompts[row]) - committed
        return max(1, min(k, remaining, room))

    def _append(self, row: int, tokens: list[int]) -> tuple[list[int], bool]:
        """Add exact tokens to a row, trimming at EOS / max_new_tokens / context."""
        result, s = self.results[row], self.settings
        taken: list[int] = []
        reason = ""
        for token in tokens:
            taken.append(int(token))
            if int(token) in self.backend.eos_token_ids:
                reason = "eos"
                break
            if len(result.token_ids) + len(taken) >= s.max_new_tokens:
                reason = "length"
                break
        result.token_ids.extend(taken)
        if not reason and len(self.prompts[row]) + len(result.token_ids) + 1 >= self.backend.max_context:
            reason = "length"
        result.finish_reason = reason
        return taken, bool(reason)

    @staticmethod
    def _horizon_at(out: StepOutput, row: int, index: int) -> int | None:
        return None if out.horizon is None else int(out.horizon[row, index])

    # -- driver ------------------------------------------------------------------------------
    def events(self) -> Iterator[Event]:
        start = time.perf_counter()
        mode = self.settings.mode
        if mode == "reference":
            for row in range(len(self.prompts)):
                row_start = time.perf_counter()
                yield from self._reference_row(row)
                self.results[row].seconds = time.perf_counter() - row_start
        else:
            yield from self._fused(window_limit=1 if mode == "ar" else None)
            elapsed = time.perf_counter() - start
            for result in self.results:
                result.seconds = elapsed

    def run(self) -> list[RowResult]:
        for _ in self.events():
            pass
        return self.results

    # -- ar and fluid: one batched loop ----------------------------------------------------------
    def _fused(self, window_limit: int | None) -> Iterator[Event]:
        """Lossless verify-and-draft loop; with ``window_limit=1`` it is plain greedy AR."""
        backend, s = self.backend, self.settings
        mask = backend.mask_token_id if backend.mask_token_id is not None else 0
        session, first = backend.start(self.prompts)
        rows = range(len(self.prompts))
        pending = [int(first.tokens[b, 0]) for b in rows]
        guesses: list[list[int | None]] = [[] for _ in rows]
        guess_conf: list[list[float]] = [[] for _ in rows]
        window_k = [1] * len(self.prompts)
        active = [True] * len(self.prompts)
        for b in rows:
            taken, done = self._append(b, [pending[b]])
            yield Commit(b, taken, len(self.results[b].token_ids))
            if done:
                active[b] = False
                yield Finished(b, self.results[b].finish_reason)
            else:
                k = self._horizon(self._horizon_at(first, b, 0), b, len(taken))
                window_k[b] = min(k, window_limit or k)
                guesses[b] = [None] * (window_k[b] - 1)
                guess_conf[b] = [0.0] * (window_k[b] - 1)
                yield BlockStart(b, window_k[b], len(self.results[b].token_ids))

        while any(active):
            width = max(1 + len(guesses[b]) for b in rows if active[b])
            feed = np.full((len(self.prompts), width), mask, dtype=np.int64)
            for b in rows:
                if active[b]:
                    window = [pending[b]] + [mask if g is None else g for g in guesses[b]]
                    feed[b, : len(window)] = window
            out = session.forward(feed)
            keep = [0] * len(self.prompts)
            for b in rows:
                if not active[b]:
                    continue
                result = self.results[b]
                result.forwards += 1
                accepted = 0
                while accepted + 1 < width and feed[b, accepted + 1] == out.tokens[b, accepted]:
                    accepted += 1
                exact = int(out.tokens[b, accepted])
                keep[b] = accepted + 1
                fed_guess = feed[b, accepted + 1] if accepted + 1 < width else None
                correction = exact if fed_guess is not None and fed_guess != mask else None
                if window_k[b] > 1:
                    yield Verify(b, accepted, correction)
                new = [int(t) for t in feed[b, 1 : accepted + 1]] + [exact]
                taken, done = self._append(b, new)
                result.blocks.append({"k": window_k[b], "accepted": len(taken)})
                yield Commit(b, taken, len(result.token_ids))
                if done:
                    active[b] = False
                    yield Finished(b, result.finish_reason)
                    continue
                pending[b] = exact
                k = self._horizon(self._horizon_at(out, b, accepted), b, len(result.token_ids))
                window_k[b] = min(k, window_limit or k)
                # Outputs past the first exact token are drafts only if that slot was fed as a
                # MASK; after a wrong token they are conditioned on it, so start afresh.
                rejected = correction is not None
                drafts = [] if rejected else [int(t) for t in out.tokens[b, accepted + 1 :]]
                confs = [] if rejected else [float(c) for c in out.confidence[b, accepted + 1 :]]
                slots: list[int | None] = []
                slot_conf: list[float] = []
                for i in range(window_k[b] - 1):
                    if i < len(drafts) and (i == 0 or confs[i] >= s.threshold):
                        slots.append(drafts[i])
                        slot_conf.append(confs[i])
                    else:
                        slots.append(None)
                        slot_conf.append(confs[i] if i < len(confs) else 0.0)
                if s.prompt_lookup_num_tokens and slots and not (slots[0] is not None and slot_conf[0] >= s.threshold):
                    found = lookup_continuation(self.prompts[b] + result.token_ids,
                                                min(s.prompt_lookup_num_tokens, len(slots)))
                    if found:  # the mask draft is unsure and the text to come is on the page
                        slots = found + [None] * (len(slots) - len(found))
                        slot_conf = [1.0] * len(found) + [0.0] * (len(slots) - len(found))
                if slots and all(g is not None for g in slots):
                    # Every slot is a draft token: append masks so that, if all of them are
                    # accepted, this same forward also drafts the block after them.
                    slots += [None] * (window_k[b] - 1)
                    slot_conf += [0.0] * (window_k[b] - 1)
                guesses[b], guess_conf[b] = slots, slot_conf
                if window_k[b] > 1:
                    yield BlockStart(b, window_k[b], len(result.token_ids))
                    yield Draft(b, 0, [exact] + slots, [1.0] + slot_conf,
                                [True] + [g is not None for g in slots])
            session.commit(keep)

    # -- reference: the authors' sampler, one row at a time ----------------------------------------
    def _reference_row(self, row: int) -> Iterator[Event]:
        backend, s = self.backend, self.settings
        mask = int(backend.mask_token_id)
        result = self.results[row]
        session, first = backend.start([self.prompts[row]])
        prefix_token = int(first.tokens[0, 0])
        prefix_conf = float(first.confidence[0, 0])
        preferred = self._horizon_at(first, 0, 0)
        while True:
            k = self._horizon(preferred, row, len(result.token_ids))
            yield BlockStart(row, k, len(result.token_ids))
            slots: list[int | None] = [None] * k
            conf = [0.0] * k
            iteration = 0
            while any(slot is None for slot in slots):
                feed = np.array([[mask if t is None else t for t in slots]], dtype=np.int64)
                out = session.forward(feed)
                session.commit([0])
                result.forwards += 1
                preds = [prefix_token] + [int(t) for t in out.tokens[0, : k - 1]]
                pconf = [prefix_conf] + [float(c) for c in out.confidence[0, : k - 1]]
                leftmost = slots.index(None)
                for t in range(k):
                    if slots[t] is None and (t == leftmost or pconf[t] > s.threshold):
                        slots[t], conf[t] = preds[t], pconf[t]
                yield Draft(row, iteration, list(slots), list(conf), [t is not None for t in slots])
                iteration += 1
            block = [int(t) for t in slots]  # type: ignore[arg-type]
            out = session.forward(np.array([block], dtype=np.int64))
            result.forwards += 1
            causal = [prefix_token] + [int(t) for t in out.tokens[0, : k - 1]]
            mismatch = next((t for t in range(k) if block[t] != causal[t]), k)
            if mismatch == k:
                session.commit([k])
                new, correction = block, None
                prefix_token = int(out.tokens[0, k - 1])
                prefix_conf = float(out.confidence[0, k - 1])
                preferred = self._horizon_at(out, 0, k - 1)
            else:
                session.commit([mismatch])
                correction = causal[mismatch]
                new = block[:mismatch] + [correction]
            yield Verify(row, mismatch, correction)
            taken, done = self._append(row, new)
            result.blocks.append({"k": k, "accepted": len(taken)})
            yield Commit(row, taken, len(result.token_ids))
            if done:
                yield Finished(row, result.finish_reason)
                return
            if correction is not None:  # the authors' extra re-commit forward
                out = session.forward(np.array([[correction]], dtype=np.int64))
                session.commit([1])
                result.forwards += 1
                prefix_token = int(out.tokens[0, 0])
                prefix_conf = float(out.confidence[0, 0])
                preferred = self._horizon_at(out, 0, 0)
