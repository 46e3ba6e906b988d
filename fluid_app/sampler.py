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
from dataclasses import dataclass, field, fields, replace
from typing import Any, Generator, Iterator, Sequence

import numpy as np

from .acceptance import sample, verify_chain
from .batching import FusedBatch, Tagged
from .draft_store import DRAFT_TOKENS, DraftStore
from .errors import FluidError
from .events import BlockStart, Commit, Draft, Event, Finished, Verify
from .fluid_config import FluidConfig, check_decoding, is_confident
from .lookup import lookup_continuation
from .prompt_cache import PromptCache
from .protocol import Backend, StepOutput
from .warping import SamplingSettings, check_sampling, check_seed

MODES = ("ar", "reference", "fluid")


@dataclass(frozen=True)
class DecodeSettings:
    """User-facing decoding options (HF ``generate`` naming where one exists).

    The FLUID knobs default to :class:`~fluid_app.fluid_config.FluidConfig`'s; a loaded checkpoint's
    own values come in through :meth:`from_config`.
    """

    mode: str = "fluid"
    max_new_tokens: int = 128
    k_min: int = FluidConfig.k_min
    k_max: int = FluidConfig.k_max
    threshold: float = FluidConfig.threshold
    prompt_lookup_num_tokens: int = FluidConfig.prompt_lookup_num_tokens
    fallback_masks: int = FluidConfig.fallback_masks
    # Sampling (HF ``generate`` names): temperature 0 is greedy decoding, today's path bit for bit.
    do_sample: bool | None = None  # False: greedy whatever the temperature; True with temperature 0: 1.0
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int | tuple[int, ...] | None = None  # one seed, one per prompt, or None: fresh randomness
    sample_drafts: bool = True  # mask drafts drawn from their own distribution (else their argmax)
    draft_store: bool = True  # look up unsure drafts in the checkpoint's draft store, when it has one

    @classmethod
    def from_config(cls, config: FluidConfig | None = None, **overrides: Any) -> DecodeSettings:
        """Validated settings: ``config``'s decoding values, then every override that is not None.

        A sampled decode that names no ``k_min`` takes the config's ``sampling_k_min`` when it
        has one: the checkpoint's smallest block for sampling, chosen apart from the greedy one."""
        config = config or FluidConfig()
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise FluidError(f"unknown decoding option(s) {sorted(unknown)}; known: "
                             f"{sorted(f.name for f in fields(cls))}", *sorted(unknown))
        values = {"k_min": config.k_min, "k_max": config.k_max, "threshold": config.threshold,
                  "prompt_lookup_num_tokens": config.prompt_lookup_num_tokens, "fallback_masks": config.fallback_masks}
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        check_sampling(settings.temperature, settings.top_k, settings.top_p)  # before reading .sampling
        if settings.sampling is not None:
            if overrides.get("k_min") is None and config.sampling_k_min is not None:
                settings = replace(settings, k_min=config.sampling_k_min)
        return settings.validate()

    def validate(self) -> DecodeSettings:
        if self.mode not in MODES:
            raise FluidError(f"unknown mode {self.mode!r}; use one of {', '.join(MODES)}", "mode")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 1:
            raise FluidError(f"max_new_tokens must be a whole number, at least 1 (got {self.max_new_tokens})",
                             "max_new_tokens")
        check_decoding(self.k_min, self.k_max, self.threshold, self.prompt_lookup_num_tokens, self.fallback_masks)
        for name in ("sample_drafts", "draft_store"):
            if not isinstance(getattr(self, name), bool):
                raise FluidError(f"{name} must be true or false (got {getattr(self, name)!r})", name)
        check_sampling(self.temperature, self.top_k, self.top_p)
        for seed in self.seed if isinstance(self.seed, (tuple, list)) else [self.seed]:
            check_seed(seed)
        if self.sampling is not None and self.mode == "reference":
            raise FluidError("reference mode (the authors' sampler) is greedy only; use temperature 0 "
                             "or mode 'fluid'", "temperature", "mode")
        return self

    @property
    def sampling(self) -> SamplingSettings | None:
        """How tokens are drawn, or None for greedy decoding."""
        if self.do_sample is False:
            return None
        temperature = 1.0 if self.do_sample and self.temperature == 0 else self.temperature
        if temperature == 0:
            return None
        seed = tuple(self.seed) if isinstance(self.seed, (tuple, list)) else self.seed
        return SamplingSettings(float(temperature), int(self.top_k), float(self.top_p), seed)


@dataclass
class RowResult:
    """Outcome of one prompt: new token ids and what they cost."""

    token_ids: list[int] = field(default_factory=list)
    forwards: int = 0
    blocks: list[dict[str, int]] = field(default_factory=list)
    finish_reason: str = ""
    seconds: float = 0.0
    proposed: dict[str, int] = field(default_factory=lambda: {"mask": 0, "lookup": 0})  # drafts fed, by source
    accepted: dict[str, int] = field(default_factory=lambda: {"mask": 0, "lookup": 0})  # of those, accepted
    fallback_windows: int = 0  # rejections after which a fallback branch drafted the next window (or lookup did)

    @property
    def tokens_per_forward(self) -> float:
        return len(self.token_ids) / self.forwards if self.forwards else float(len(self.token_ids))


@dataclass
class _Window:
    """One row's next window in the fused loop: the last exact token, then ``k - 1`` slots
    (a drafted token, or ``None`` for a MASK), possibly followed by masks for the next block."""

    pending: int
    k: int = 1
    slots: list[int | None] = field(default_factory=list)
    confidences: list[float] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)  # per drafted slot: "mask" or "lookup"
    proposals: list[np.ndarray | None] = field(default_factory=list)  # per drafted slot, when sampling
    active: bool = True
    fallback: int = 0  # masks fed after the chain, in a branch that follows the exact token alone

    @property
    def width(self) -> int:
        """Tokens the window feeds: the exact token, the slots, then the fallback branch."""
        return 1 + len(self.slots) + self.fallback

    def trim(self, width: int) -> None:
        """Feed only the first ``width`` tokens (the exact token, then a prefix of the slots,
        then of the fallback branch): a forward's token budget
        (:func:`~fluid_app.batching.allocate`). The drafts still fed are the leading run cut to
        that prefix, so ``sources`` and ``proposals`` are cut with the slots; verification then
        sees exactly the window that was fed."""
        self.fallback = max(0, min(self.fallback, int(width) - 1 - len(self.slots)))
        kept = max(0, int(width) - 1)
        self.slots, self.confidences = self.slots[:kept], self.confidences[:kept]
        self.sources, self.proposals = self.sources[:kept], self.proposals[:kept]

    def as_draft(self, row: int, forwards: int) -> Draft:
        """The window as a :class:`Draft` event: what the next forward feeds."""
        return Draft(row, 0, [self.pending] + self.slots, [1.0] + self.confidences,
                     [True] + [t is not None for t in self.slots], forwards, self.fallback)


class Decoder:
    """Decode a batch of tokenised prompts; iterate :meth:`events` to run it.

    After the iterator is exhausted, :attr:`results` holds one :class:`RowResult` per prompt.
    """

    def __init__(self, backend: Backend, prompts: Sequence[Sequence[int]], settings: DecodeSettings,
                 prompt_cache: PromptCache | None = None, draft_store: DraftStore | None = None):
        self.backend = backend
        self.settings = settings.validate()
        self.draft_store = draft_store if self.settings.draft_store else None
        self.prompts = [list(p) for p in prompts]
        if not self.prompts:
            raise FluidError("no prompts given; pass at least one non-empty prompt", "prompt")
        for prompt in self.prompts:
            if not prompt:
                raise FluidError("a prompt has no tokens; pass at least one token id", "prompt")
            if len(prompt) >= backend.max_context:
                raise FluidError(
                    f"the prompt has {len(prompt)} tokens but the model's context is "
                    f"{backend.max_context}; shorten the prompt", "prompt")
        if settings.mode != "ar" and backend.mask_token_id is None:
            raise FluidError("this model has no MASK token; decode in mode 'ar' or load a FLUID checkpoint", "mode")
        self.results = [RowResult() for _ in self.prompts]
        # A single-prompt ar/fluid decode can start from (and leave its KV cache in) a prompt cache.
        self.prompt_cache = prompt_cache if len(self.prompts) == 1 and settings.mode != "reference" else None
        # per row: exactly the tokens its KV cache row holds in the fused loop (the prompt once
        # prefilled, then each forward's kept tokens; FusedBatch keeps it), what a prompt cache stores
        self.kv_tokens: list[list[int]] = [[] for _ in self.prompts]
        self._window_limit: int | None = None
        self.sampling = self.settings.sampling
        # one generator per row, seeded by the request alone: a row draws the same alone or in a batch
        self.rngs = self.sampling.generators(len(self.prompts)) if self.sampling else []

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

    def _commit(self, row: int, tokens: list[int], block_k: int | None = None,
                sources: Sequence[str] = ()) -> Generator[Event, None, bool]:
        """Append exact tokens to a row and announce them (and the row's end); True when it ended.
        ``block_k``: the horizon of the block these tokens close (none for the prefill's token);
        ``sources``: how each token came (:class:`~fluid_app.events.Commit`), "exact" if not given."""
        result = self.results[row]
        taken, done = self._append(row, tokens)
        if block_k is not None:
            result.blocks.append({"k": block_k, "accepted": len(taken)})
        sources = tuple(sources or ("exact",) * len(tokens))[: len(taken)]
        yield Commit(row, taken, len(result.token_ids), result.forwards, sources)
        if done:
            yield Finished(row, result.finish_reason, result.forwards)
        return done

    @staticmethod
    def _horizon_at(out: StepOutput, row: int, index: int) -> int | None:
        return None if out.horizon is None else int(out.horizon[row, index])

    # -- driver ------------------------------------------------------------------------------
    def events(self) -> Iterator[Event]:
        mode = self.settings.mode
        if mode == "reference":
            for row in range(len(self.prompts)):
                row_start = time.perf_counter()
                yield from self._reference_row(row)
                self.results[row].seconds = time.perf_counter() - row_start
        else:  # each row's seconds are its own, from its prefill to its last token (FusedBatch)
            yield from self._fused(window_limit=1 if mode == "ar" else None)

    def run(self) -> list[RowResult]:
        for _ in self.events():
            pass
        return self.results

    # -- ar and fluid: one batched loop ----------------------------------------------------------
    def _fused(self, window_limit: int | None) -> Iterator[Event]:
        """Lossless verify-and-draft loop; with ``window_limit=1`` it is plain greedy AR.

        Each forward feeds every active row's window; :meth:`_verify` then commits what the
        outputs prove exact and :meth:`_draft` builds the row's next window from the same
        outputs, so nothing is ever forwarded twice. The loop itself is a
        :class:`~fluid_app.batching.FusedBatch` holding this decoder's rows; a finished row
        leaves it (and frees its cache) at once, and a server adds other decoders' rows to it.

        With a :attr:`prompt_cache` (one prompt, this decoder's own single-row batch) the batch
        starts from the cached session that shares the longest prefix with the prompt, and when
        the decode ends or is stopped that session goes back to the cache holding exactly
        :attr:`kv_tokens`.
        """
        self._window_limit = window_limit
        batch = FusedBatch(self.backend)
        if self.prompt_cache is None:
            yield from self._drain(batch, batch.join(self))
            return
        session, first = self.prompt_cache.start(self.prompts[0], logits=self.sampling is not None)
        try:
            yield from self._drain(batch, batch.join(self, started=(session, first)))
        except GeneratorExit:  # stopped at an event; a forward not yet committed is dropped by store
            self.prompt_cache.store(session, self.kv_tokens[0])
            raise
        self.prompt_cache.store(session, self.kv_tokens[0])

    @staticmethod
    def _drain(batch: FusedBatch, joined: Iterator[Tagged]) -> Iterator[Event]:
        """This decoder's events while its rows join ``batch`` and then until every row has left."""
        for _, event in joined:
            yield event
        while batch:
            for _, event in batch.step():
                yield event

    def _open(self, b: int, first: StepOutput, i: int) -> Generator[Event, None, _Window]:
        """Start row ``b`` from the prefill's outputs (row ``i`` of ``first``): commit its first
        token and size its first window."""
        if self._window_limit is None and self.settings.mode == "ar":
            self._window_limit = 1
        if self.sampling is None:
            window = _Window(pending=int(first.tokens[i, 0]))
        else:
            window = _Window(pending=sample(self.sampling.warp(first.logits[i, 0]), self.rngs[b]))
        window.active = not (yield from self._commit(b, [window.pending]))
        if window.active:
            window.k = self._window_size(first, b, i, 0)
            window.slots, window.confidences = [None] * (window.k - 1), [0.0] * (window.k - 1)
            yield BlockStart(b, window.k, len(self.results[b].token_ids), 0)
        return window

    def _window_size(self, out: StepOutput, row: int, i: int, index: int) -> int:
        k = self._horizon(self._horizon_at(out, i, index), row, len(self.results[row].token_ids))
        return min(k, self._window_limit or k)

    def _verify(self, b: int, window: _Window, fed: np.ndarray, out: StepOutput, i: int,
                mask: int) -> Generator[Event, None, int]:
        """Commit the longest run of fed drafts that equals the causal argmax, plus the one exact
        token after it; then draft the next window. Returns how many fed tokens the row keeps.
        ``b`` is this decoder's row, ``i`` its row in the batch's outputs ``out``.

        Under causal attention the output at the window's exact token and at every matching
        draft is the exact greedy prediction, so the run and the token after it are AR's own.
        ``fed`` may end with the window's fallback branch (:attr:`_Window.fallback` masks that
        saw only the exact token); only the chain before it is verified and kept.
        """
        result = self.results[b]
        result.forwards += 1
        fallback, window.fallback = window.fallback, 0
        width = len(fed) - fallback  # the chain: the exact token, then the slots
        fed = fed[:width]
        if self.sampling is None:
            accepted = 0
            while accepted + 1 < width and fed[accepted + 1] == out.tokens[i, accepted]:
                accepted += 1
            exact = int(out.tokens[i, accepted])
        else:  # speculative sampling over the drafted run (fluid_app/acceptance.py)
            run = len(window.sources)
            p_rows = self.sampling.warp_rows(out.logits[i, : run + 1])  # read up to the first rejection
            accepted, exact = verify_chain(p_rows, [int(t) for t in fed[1 : run + 1]], window.proposals,
                                           self.rngs[b])
        for source in window.sources[: accepted + 1]:
            result.proposed[source] += 1
        for source in window.sources[:accepted]:
            result.accepted[source] += 1
        fed_guess = fed[accepted + 1] if accepted + 1 < width else None
        correction = exact if fed_guess is not None and fed_guess != mask else None
        if window.k > 1:
            yield Verify(b, accepted, correction, result.forwards)
        if correction is not None or accepted == 0:
            how = "exact"  # the causal token after the run: a correction, or the next slot was a mask
        else:
            how = "bonus"  # every draft fed was accepted: one more exact token for free
        sources = list(window.sources[:accepted]) + [how]
        if (yield from self._commit(b, [int(t) for t in fed[1 : accepted + 1]] + [exact], window.k, sources)):
            window.active = False
            return accepted + 1
        window.pending = exact
        window.k = self._window_size(out, b, i, accepted)
        # Outputs past the first exact token are drafts only if that slot was fed as a MASK;
        # after a wrong token they are conditioned on it. The fallback branch never saw any
        # draft: its output ``accepted`` drafts the slot after the correction (and those after).
        if correction is None:
            start, stop = accepted + 1, width
        elif accepted < fallback:
            start, stop = width + accepted, width + fallback
            result.fallback_windows += 1
        else:
            start, stop = width, width  # nothing drafts the next window: it feeds masks
        yield from self._draft(b, window, out, i, start, stop)
        return accepted + 1

    def _draft(self, b: int, window: _Window, out: StepOutput, at: int, start: int, stop: int) -> Iterator[Event]:
        """Fill the next window's ``k - 1`` slots from the mask outputs at ``start:stop``: the first
        draft always, later ones when confident; prompt lookup when the first is unsure; masks
        for the block after a full one. Sampling draws each kept mask draft from its own warped
        distribution (its proposal ``q``); which slots are kept is decided first, from the
        logits alone, so the proposal is exactly what the draft was drawn from."""
        s, result = self.settings, self.results[b]
        confidences = [float(c) for c in out.confidence[at, start:stop]]
        kept: list[bool] = [i < len(confidences) and (i == 0 or is_confident(confidences[i], s.threshold))
                            for i in range(window.k - 1)]
        slot_conf = [confidences[i] if i < len(confidences) else 0.0 for i in range(window.k - 1)]
        slots: list[int | None] = [None] * (window.k - 1)
        sources: list[str] = []
        proposals: list[np.ndarray | None] = []
        lookup: list[int] = []
        if s.prompt_lookup_num_tokens and slots and not (kept[0] and is_confident(slot_conf[0], s.threshold)):
            # the mask draft is unsure: the text to come may be on the page already, or be
            # what the model's replies to other prompts went on with (fluid_app/draft_store.py)
            context, wanted = self.prompts[b] + result.token_ids, min(s.prompt_lookup_num_tokens, len(slots))
            lookup = lookup_continuation(context, wanted)
            if not lookup and self.draft_store is not None:
                lookup = self.draft_store.continuation(context, min(wanted, DRAFT_TOKENS))
        if lookup:
            slots[: len(lookup)] = lookup
            slot_conf = [1.0] * len(lookup) + [0.0] * (len(slots) - len(lookup))
            sources, proposals = ["lookup"] * len(lookup), [None] * len(lookup)
        else:
            for i in range(len(slots)):
                if not kept[i]:
                    continue
                if self.sampling is None:
                    slots[i] = int(out.tokens[at, start + i])
                else:
                    slots[i], q = self._mask_draft(b, out.logits[at, start + i], out.tokens[at, start + i])
                    proposals.append(q)
                sources.append("mask")
        run = next((i for i, t in enumerate(slots) if t is None), len(slots))
        sources, proposals = sources[:run], proposals[:run]  # only the leading run is ever verified
        if slots and run == len(slots):
            # Every slot is a draft token: append masks so that, if all of them are accepted,
            # the same forward also drafts the block after them.
            slots += [None] * (window.k - 1)
            slot_conf += [0.0] * (window.k - 1)
        window.slots, window.confidences = slots, slot_conf
        window.sources, window.proposals = sources, proposals
        # A window with drafts may lose them all; then a branch of masks that never saw them
        # drafts the next window (fluid_app/branches.py), where the backend can attend one.
        window.fallback = min(s.fallback_masks, window.k - 1) if sources and self.backend.branched_windows else 0
        if window.k > 1:
            yield BlockStart(b, window.k, len(result.token_ids), result.forwards)
            yield window.as_draft(b, result.forwards)

    def _mask_draft(self, b: int, logits: np.ndarray, argmax: int) -> tuple[int, np.ndarray | None]:
        """One sampled-decoding mask draft and the proposal it was drawn from: a draw from the
        slot's own warped distribution, or its argmax as a point mass (``None``)."""
        if self.settings.sample_drafts:
            q = self.sampling.warp(logits)
            return sample(q, self.rngs[b]), q
        return int(argmax), None

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
            yield BlockStart(row, k, len(result.token_ids), result.forwards)
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
                    if slots[t] is None and (t == leftmost or is_confident(pconf[t], s.threshold)):
                        slots[t], conf[t] = preds[t], pconf[t]
                yield Draft(row, iteration, list(slots), list(conf), [t is not None for t in slots], result.forwards)
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
            yield Verify(row, mismatch, correction, result.forwards)
            drafted = len(new) - 1 - (correction is not None)  # slot 0 is the exact prefix token
            sources = (["exact"] + ["mask"] * drafted + ["exact"] * (correction is not None))[: len(new)]
            if (yield from self._commit(row, new, k, sources)):
                return
            if correction is not None:  # the authors' extra re-commit forward
                out = session.forward(np.array([[correction]], dtype=np.int64))
                session.commit([1])
                result.forwards += 1
                prefix_token = int(out.tokens[0, 0])
                prefix_conf = float(out.confidence[0, 0])
                preferred = self._horizon_at(out, 0, 0)
