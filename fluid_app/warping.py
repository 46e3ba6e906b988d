"""Sampling settings, the logits warpers and per-row random generators.

Sampled decoding is only lossless if the speculative verifier (``fluid_app.acceptance``)
judges drafts against exactly the distribution plain AR sampling would draw from. So the
target distribution is defined once, here, in numpy float64, and every backend hands its
logits to this module instead of warping them in its own tensor library: torch and MLX then
agree on ``p`` bit for bit whenever they agree on the logits.

The warpers follow Hugging Face ``generate`` (``TemperatureLogitsWarper``, then
``TopKLogitsWarper``, then ``TopPLogitsWarper``, each with ``min_tokens_to_keep=1``):

* temperature: logits are divided by ``temperature``;
* top-k: every token whose logit is below the k-th largest is removed (ties with the k-th
  are kept, so more than k tokens can survive -- HF does the same);
* top-p: the smallest set of most likely tokens whose probability adds up to at least
  ``top_p`` is kept; the most likely token always survives.

One deliberate difference: where tied logits straddle the top-p cut, HF keeps whichever of
them ``torch.sort`` happens to place last (its CPU sort is not stable, so the choice depends
on the vocabulary size and even the device). Here the whole tie group is kept, as HF's top-k
does; wherever HF's result does not depend on sort order the two agree. HF also warps in
float32 while this module uses float64, so sets can differ at a cut that falls within
float32 rounding of ``top_p``.

Temperature 0 means greedy decoding and is not a warp: callers keep the argmax path (and its
bit-exact losslessness) and never call :func:`warp` with it.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .errors import FluidError

Seed = int | None


def check_sampling(temperature: float, top_k: int = 0, top_p: float = 1.0, seed: Seed = None) -> None:
    """Raise a one-line :class:`FluidError` naming the fix for settings that cannot work.

    ``top_k`` and ``top_p`` are accepted but unused when ``temperature`` is 0 (greedy).
    """
    if (isinstance(temperature, bool) or not isinstance(temperature, numbers.Real)
            or not math.isfinite(temperature) or temperature < 0):
        raise FluidError(f"temperature must be 0 (greedy) or a positive finite number (got {temperature})",
                         "temperature")
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0:
        raise FluidError(f"top_k must be a whole number, 0 (off) or more (got {top_k})", "top_k")
    if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1:
        raise FluidError(f"top_p must be a number above 0 and at most 1, where 1 turns it off (got {top_p})", "top_p")
    check_seed(seed)


def check_seed(seed: Seed) -> None:
    """A seed is a whole number >= 0, or None for fresh randomness on every run."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0):
        raise FluidError(f"seed must be a whole number, 0 or more, or unset for a random seed (got {seed})", "seed")


def warp(logits: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """Probabilities (float64, same shape) after temperature, top-k and top-p, in HF's order.

    Works on the last axis, so ``[V]``, ``[T, V]`` and ``[B, T, V]`` all work. Logits of
    ``-inf`` (tokens a backend has banned) stay at probability 0. Settings are checked with
    :func:`check_sampling`; temperature 0 is refused because greedy decoding is not a warp.
    """
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        raise ValueError("temperature 0 is greedy decoding: take the argmax instead of warping")
    x = np.array(logits, dtype=np.float64)  # a copy: the caller's logits are left alone
    if x.ndim == 0 or x.shape[-1] == 0:
        raise ValueError(f"logits need a non-empty vocabulary axis (got shape {x.shape})")
    if not np.all(np.isfinite(np.max(x, axis=-1))):
        raise ValueError("every row of logits needs a finite maximum (got NaN, +inf or an all -inf row)")
    x /= float(temperature)
    vocab = x.shape[-1]
    if top_k and top_k < vocab:  # top_k >= 1 here, so min_tokens_to_keep=1 holds already
        kth = np.partition(x, vocab - top_k, axis=-1)[..., vocab - top_k, None]
        x[x < kth] = -np.inf
    x -= np.max(x, axis=-1, keepdims=True)
    probs = np.exp(x)  # computed once: the nucleus below reads it too
    if top_p < 1:
        probs[x < _smallest_kept(x, probs, float(top_p))] = 0.0
    probs /= probs.sum(axis=-1, keepdims=True)
    return probs


NUCLEUS_CANDIDATES = 1024  # the nucleus is first sought among this many largest logits


def _smallest_kept(x: np.ndarray, shifted: np.ndarray, top_p: float) -> np.ndarray:
    """Per row, the smallest logit inside the nucleus of scaled, top-k filtered logits ``x``
    (shifted so each row's maximum is 0; ``shifted`` is ``exp(x)``).

    As HF: sort ascending, accumulate probabilities, drop the prefix whose cumulative mass
    is at most ``1 - top_p`` but never the last (largest) token. The sorted *values* do not
    depend on how ties are ordered, so the smallest kept logit is well defined; keeping
    every token at or above it keeps whole tie groups.

    Why two paths: a full sort of a 49k vocabulary costs most of a warp, and sampled FLUID
    warps every verified and drafted slot. When the mass outside the largest
    ``NUCLEUS_CANDIDATES`` logits is already at most ``1 - top_p``, every one of those
    smaller tokens is dropped, so only the candidates need sorting; otherwise (a flat
    distribution) the whole row is sorted. Both paths give the same cut up to float64
    rounding of the cumulative sums.
    """
    vocab = x.shape[-1]
    rows_x, rows_e = x.reshape(-1, vocab), shifted.reshape(-1, vocab)
    floor = np.empty(rows_x.shape[0])
    for r, (row, row_e) in enumerate(zip(rows_x, rows_e)):
        floor[r] = _row_smallest_kept(row, row_e, top_p)
    return floor.reshape(x.shape[:-1] + (1,))


def _row_smallest_kept(row: np.ndarray, row_e: np.ndarray, top_p: float) -> float:
    vocab = row.shape[0]
    total = row_e.sum()
    if vocab > 2 * NUCLEUS_CANDIDATES:
        top = np.sort(np.partition(row, vocab - NUCLEUS_CANDIDATES)[vocab - NUCLEUS_CANDIDATES:])
        top_e = np.exp(top)
        outside = total - top_e.sum()
        if outside <= (1 - top_p) * total:
            cumulative = (outside + np.cumsum(top_e)) / total
            dropped = min(int(np.count_nonzero(cumulative <= 1 - top_p)), NUCLEUS_CANDIDATES - 1)
            return float(top[dropped])
    ascending = np.sort(row)
    cumulative = np.cumsum(np.exp(ascending) / total)
    dropped = min(int(np.count_nonzero(cumulative <= 1 - top_p)), vocab - 1)  # min_tokens_to_keep=1
    return float(ascending[dropped])


def row_generators(seed: Seed | Sequence[Seed], rows: int) -> list[np.random.Generator]:
    """One independent generator per batch row, derived from that row's seed alone.

    A seed belongs to a *request*, not to a batch: ``seed`` is either one seed used by every
    row or a sequence with one seed per row. Row ``i`` gets ``np.random.default_rng(seed_i)``
    (PCG64 seeded through ``SeedSequence(seed_i)``), so what it draws never depends on which
    other rows share the batch, on their lengths or on the batch order: row ``i`` of a batch
    decodes exactly what a batch of one with seed ``seed_i`` decodes. The price is that rows
    given the same seed and the same prompt produce the same text; pass distinct seeds (for
    example ``[s, s + 1, ...]``) to get distinct samples of one prompt. A ``None`` seed draws
    fresh entropy from the OS, independently for each row.
    """
    if isinstance(seed, (str, bytes)) or not isinstance(seed, Sequence):
        seeds: list[Seed] = [seed] * rows  # type: ignore[list-item]
    else:
        seeds = list(seed)
        if len(seeds) != rows:
            raise FluidError(f"got {len(seeds)} seeds for {rows} prompts; give one seed per prompt or a single seed",
                             "seed")
    for s in seeds:
        check_seed(s)
    return [np.random.default_rng(None if s is None else int(s)) for s in seeds]


@dataclass(frozen=True)
class SamplingSettings:
    """How to pick each token (HF ``generate`` names). ``temperature=0`` is greedy decoding.

    Unlike HF there is no implicit ``top_k=50``: 0 means off, so ``temperature`` alone gives
    plain ancestral sampling from the (tempered) model distribution.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: Seed | tuple[Seed, ...] = None  # one seed for every row, or one per row

    def validate(self) -> SamplingSettings:
        check_sampling(self.temperature, self.top_k, self.top_p)
        for seed in self.seed if isinstance(self.seed, tuple) else (self.seed,):
            check_seed(seed)
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def warp(self, logits: np.ndarray) -> np.ndarray:
        """The distribution sampled from (and that drafts are verified against)."""
        return warp(logits, self.temperature, self.top_k, self.top_p)

    def warp_rows(self, logits: np.ndarray) -> WarpedRows:
        """:meth:`warp` of each row of ``logits`` (``[T, V]``), each computed when first read."""
        return WarpedRows(logits, self)

    def generators(self, rows: int) -> list[np.random.Generator]:
        """One generator per row, all from :attr:`seed` (see :func:`row_generators`)."""
        return row_generators(self.seed, rows)


class WarpedRows(Sequence[np.ndarray]):
    """The rows of ``settings.warp(logits)`` for ``logits[T, V]``, each warped when first read.

    Why: a sampled verification reads its target rows in order and stops at the first
    rejected draft, so the rows after it are never read; a lookup draft feeds up to seven
    slots and is mostly rejected early, and each row's warp over a 49k vocabulary costs about
    a millisecond on a small CPU. A row read here equals that row of the whole block's warp
    bit for bit, since :func:`warp` works row by row.
    """

    def __init__(self, logits: np.ndarray, settings: SamplingSettings):
        self._logits, self._settings = logits, settings
        self._rows: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._logits)

    def __getitem__(self, index: int) -> np.ndarray:  # type: ignore[override]
        index = range(len(self))[index]  # negative indices as a list's; IndexError past the end
        if index not in self._rows:
            self._rows[index] = self._settings.warp(self._logits[index])
        return self._rows[index]

    @property
    def warped(self) -> int:
        """How many rows were warped so far."""
        return len(self._rows)
