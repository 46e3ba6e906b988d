"""Lossless speculative sampling: accept or correct drafts so output follows the target.

Greedy FLUID keeps a draft when it equals the target's argmax. With sampling, the rule of
speculative sampling (Leviathan et al. 2023; Chen et al. 2023) does the same job: a draft
``x`` drawn from a proposal ``q`` is accepted with probability ``min(1, p(x) / q(x))``;
the first rejected one is replaced by a draw from ``normalize(max(p - q, 0))`` and the
drafts after it are dropped; if every draft is accepted, one bonus token is drawn from ``p``
at the position after the last. Each emitted token then has exactly the distribution plain
AR sampling from ``p`` would give, whatever the drafts were. A deterministic draft (prompt
lookup, or the drafter's argmax) is a point mass, for which the rule reads: accept with
probability ``p(x)``, otherwise draw from ``p`` with ``x`` removed.

Two conditions make it exact, and they are the caller's to keep:

* ``p`` is the *warped* target distribution that AR sampling would use at that position
  (``fluid_app.warping.warp`` of the target logits, given the prefix and the drafts before);
* ``q`` is the distribution the draft was *actually drawn from*, conditional on everything
  that decided to keep it. If a sampled mask draft is only kept when it is confident, its
  ``q`` is the proposal restricted to the kept tokens, not the raw mask distribution; and an
  argmax draft must be passed as a point mass (``None``), never with the softmax it came from.
  ``None`` is always safe: the point-mass rule conditions on the token actually drafted, so
  it is exact for drafts of any origin; for a sampled draft it merely accepts less often
  (``sum(q * p)`` instead of ``sum(min(p, q))``).

Random numbers are consumed in a fixed, documented order so that every backend, given the
same logits and the same seed, emits the same tokens (the core is numpy, so the draws are
the row's ``numpy.random.Generator`` stream):

* a categorical draw (:func:`sample`) uses one ``rng.random()`` ``u`` and returns the first
  index whose cumulative weight exceeds ``u * total`` (inverse CDF, float64 ``cumsum``);
* an accept/reject test uses one ``rng.random()`` ``u`` and accepts iff ``u * q(x) < p(x)``
  (``u < p(x)`` for a point mass), so a token with ``p(x) = 0`` is never accepted;
* per verification: one test per draft tried, in order; then one categorical draw for the
  correction or the bonus. A chain of ``n`` drafts thus uses ``n + 1`` numbers when all are
  accepted, and ``a + 2`` when draft ``a`` (0-based) is rejected.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def sample(weights: np.ndarray, rng: np.random.Generator) -> int:
    """One token from ``weights`` (non-negative, need not sum to 1) with one ``rng.random()``.

    AR sampling, corrections and bonus tokens all come from here, so they share one draw rule.
    A token of weight 0 is never returned, even when ``u * total`` rounds up to ``total``.
    """
    cdf = np.cumsum(weights, dtype=np.float64)
    total = float(cdf[-1])
    if not (total > 0 and math.isfinite(total)):
        raise ValueError(f"cannot sample from weights that sum to {total}")
    index = int(cdf.searchsorted(rng.random() * total, side="right"))
    if index >= len(cdf):  # u * total rounded to total: take the last token of positive weight
        index = int(np.flatnonzero(np.diff(cdf, prepend=0.0) > 0)[-1])
    return index


def _accepts(p_x: float, q_x: float, rng: np.random.Generator) -> bool:
    """``True`` with probability ``min(1, p_x / q_x)``, using one ``rng.random()``."""
    return bool(rng.random() * q_x < p_x)


def _proposal_mass(q: np.ndarray | None, token: int) -> float:
    """``q(token)``; a ``None`` proposal is a point mass on the token."""
    if q is None:
        return 1.0
    mass = float(q[token])
    if not mass > 0:
        raise ValueError(f"draft {token} has probability {mass} under its proposal; pass the distribution it was "
                         "drawn from (None for a deterministic draft)")
    return mass


def _residual(p: np.ndarray, token: int, q: np.ndarray | None) -> np.ndarray:
    """Unnormalised ``max(p - q, 0)``: what ``p`` still owes after the proposal's share.

    Mathematically a rejection is impossible when this is all zero (then ``p <= q`` everywhere,
    so ``p == q`` and every test accepts); a float round-off can still get here, and then ``p``
    itself is the right fallback.
    """
    if q is None:
        residual = np.array(p, dtype=np.float64)
        residual[token] = 0.0
    else:
        residual = np.maximum(np.asarray(p, dtype=np.float64) - q, 0.0)
    return residual if residual.sum() > 0 else np.asarray(p, dtype=np.float64)


def verify_chain(p_rows: np.ndarray | Sequence[np.ndarray], drafts: Sequence[int],
                 proposals: Sequence[np.ndarray | None], rng: np.random.Generator) -> tuple[int, int]:
    """Verify one row's chain of drafts; return ``(accepted, next_token)``.

    ``p_rows[i]`` (``[n + 1, V]``, or a list of rows) is the warped target distribution for slot ``i`` given the
    prefix and ``drafts[:i]``; its last row is the one after all drafts. ``proposals[i]`` is
    the distribution ``drafts[i]`` was drawn from, or ``None`` for a deterministic draft.
    The row commits ``drafts[:accepted] + [next_token]``: ``next_token`` is the correction of
    draft ``accepted`` or, when ``accepted == n``, the bonus drawn from ``p_rows[n]``.
    """
    n = len(drafts)
    if len(proposals) != n or len(p_rows) != n + 1:
        raise ValueError(f"need one proposal per draft and n + 1 target rows (drafts={n}, "
                         f"proposals={len(proposals)}, rows={len(p_rows)})")
    for i, (token, q) in enumerate(zip(drafts, proposals)):
        token = int(token)
        p = p_rows[i]
        if not _accepts(float(p[token]), _proposal_mass(q, token), rng):
            return i, sample(_residual(p, token, q), rng)
    return n, sample(p_rows[n], rng)


def verify_candidates(p: np.ndarray, candidates: Sequence[int], q: np.ndarray | None, rng: np.random.Generator,
                      *, without_replacement: bool = True) -> tuple[int | None, int]:
    """Try several sibling drafts of one slot in turn; return ``(index or None, token)``.

    This is one level of tree verification (SpecInfer's multi-step rule, with the
    without-replacement update of EAGLE / recursive rejection sampling). With ``p_1 = p`` and
    ``q_1 = q``, candidate ``k`` is accepted with probability ``min(1, p_k(x_k) / q_k(x_k))``;
    after a rejection ``p_{k+1} = normalize(max(p_k - q_k, 0))``, and the proposal of the next
    sibling is

    * ``q_{k+1} = q_k`` when siblings were drawn independently from ``q``
      (``without_replacement=False``);
    * ``q_{k+1} = normalize(q_k with x_k set to 0)`` when they were drawn without replacement
      (the default), i.e. each sibling's own conditional proposal;
    * a point mass on each candidate when ``q`` is ``None`` (deterministic siblings such as
      the drafter's top few tokens): accept with ``p_k(x_k)``, else ``p_{k+1}`` is ``p_k`` with
      ``x_k`` removed, renormalised.

    Why it is exact: if, given the history, ``x_k ~ q_k`` and the rest of the procedure emits a
    token distributed as ``p_{k+1}`` (which depends on the history but not on ``x_k``), then
    step ``k`` emits ``min(p_k, q_k) + max(p_k - q_k, 0) = p_k``; induction from the last
    sibling (whose rejection draws from ``p_{K+1}``) gives ``p``. Any history-dependent choice
    of ``q_k`` works as long as it is the one the sibling was really drawn from.

    When a candidate is accepted, ``token`` is that candidate and the caller moves on to its
    children (or draws the bonus from the target at a leaf with :func:`sample`); otherwise
    ``token`` is the correction drawn from ``p_{K+1}`` and the row's block ends there.
    """
    p_k = np.asarray(p, dtype=np.float64)
    q_k = None if q is None else np.asarray(q, dtype=np.float64)
    for index, token in enumerate(candidates):
        token = int(token)
        if _accepts(float(p_k[token]), _proposal_mass(q_k, token), rng):
            return index, token
        residual = _residual(p_k, token, q_k)
        if index + 1 == len(candidates):  # the same draw as a rejection in verify_chain
            return None, sample(residual, rng)
        p_k = residual / residual.sum()
        if q_k is not None and without_replacement:
            q_k = q_k.copy()
            q_k[token] = 0.0
            if not q_k.sum() > 0:
                raise ValueError("more sibling drafts than tokens their proposal can draw without replacement")
            q_k /= q_k.sum()
    return None, sample(p_k, rng)
