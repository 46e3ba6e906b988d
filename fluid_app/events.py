"""Events the sampler emits while it decodes, for streaming UIs and analysis.

All events carry the batch ``row`` they belong to and ``forwards``: the decoding forwards
that row has spent so far (as counted in :attr:`fluid_app.sampler.RowResult.forwards`), so a
consumer never re-derives costs from event types. A consumer that only wants text can
watch :class:`Commit`; the demo draws every :class:`Draft` as a row of slots.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BlockStart:
    row: int
    k: int  # horizon of the block (chosen by the K-head, or k_max without one)
    position: int  # number of new tokens committed before this block
    forwards: int


@dataclass(frozen=True)
class Draft:
    """One denoising forward: the block's slots after it (``None`` = still a mask)."""

    row: int
    iteration: int
    slots: list[int | None]
    confidences: list[float]
    decided: list[bool]
    forwards: int
    branch: int = 0  # fallback masks fed beside the slots, after the exact token (fluid_app/branches.py)


@dataclass(frozen=True)
class Verify:
    """Verification of a drafted block against the causal (greedy AR) predictions."""

    row: int
    accepted: int  # drafted slots that matched the causal argmax
    correction: int | None  # causal token that replaced the first mismatch, if any
    forwards: int


TOKEN_SOURCES = ("exact", "mask", "lookup", "bonus")


@dataclass(frozen=True)
class Commit:
    """Newly committed tokens and how each came: ``exact`` (the causal output after the last
    committed token: the prefill's token, a correction, or the token after a masked slot),
    ``mask`` / ``lookup`` (an accepted draft of that source) or ``bonus`` (the exact token
    after a run whose every draft was accepted)."""

    row: int
    tokens: list[int]  # newly committed token ids (exactly greedy AR tokens)
    total: int  # new tokens committed so far in this row
    forwards: int
    sources: tuple[str, ...] = ()  # one of TOKEN_SOURCES per token


@dataclass(frozen=True)
class Finished:
    row: int
    reason: str  # "eos" or "length"
    forwards: int


Event = BlockStart | Draft | Verify | Commit | Finished
