"""Branched windows: one forward that feeds more than one continuation of the committed text.

A window is normally a *chain*: each token follows the one before it, so a plain causal
forward computes it. A branched window also holds tokens that follow an *earlier* token of
the window instead: a second branch. ``parents[j]`` names the window token that token ``j``
follows (``-1``: the row's committed text). Token ``j`` then sees the committed text, its
ancestors and itself, nothing else, and sits at position ``committed + depth(j)``: what it
would see, and where, had its branch been fed alone. This is tree attention (SpecInfer,
Medusa, EAGLE) and, for FLUID's windows, the Strictly Causal Alignment rule itself: a
window whose second branch is a block of masks anchored at the exact token is attended
exactly as :func:`fluid_app.attention.may_attend` says (``tests/test_branches.py``).

FLUID uses one such branch (``fallback_masks`` in :class:`~fluid_app.fluid_config.FluidConfig`):
masks that follow the window's exact token and never see its drafts. When the first draft
is rejected, the masks after the drafts were conditioned on a wrong token and are useless,
but the fallback masks still draft the next window, which would otherwise be fed masks only
and commit a single token (:mod:`fluid_app.sampler`).

The rule is written once, here, in numpy: a backend turns :func:`visible` into its attention
mask and :func:`depths` into position ids. A commit still keeps a prefix of the window, so
the chain comes first and branches after it.
"""

from __future__ import annotations

import numpy as np


def chain(width: int) -> np.ndarray:
    """The parents of a plain causal window of ``width`` tokens: each follows the one before."""
    return np.arange(width) - 1


def is_chain(parents: np.ndarray) -> bool:
    """Whether every row of ``parents`` (``[B, T]``) is a chain, which a causal forward computes."""
    parents = np.asarray(parents)
    return bool((parents == chain(parents.shape[-1])).all())


def branched_rows(parents: np.ndarray | None, supported: bool) -> np.ndarray | None:
    """Which rows of a forward's ``parents`` hold a branch (``[B]`` booleans), or None when none
    does and the forward is a plain causal one. Raises ``ValueError`` for a branched window on a
    model whose forward cannot attend one (``supported`` False): both backends refuse alike."""
    if parents is None:
        return None
    parents = np.asarray(parents)
    rows = (parents != chain(parents.shape[-1])).any(axis=-1)
    if not rows.any():
        return None
    if not supported:
        raise ValueError("this model's forward cannot attend a branched window; feed a chain")
    return rows


def visible(parents: np.ndarray) -> np.ndarray:
    """``[B, T, T]`` booleans: ``[b, j, i]`` is True where window token ``j`` may attend token
    ``i`` of its row's window, i.e. ``i`` is ``j`` or one of its ancestors.

    Raises ``ValueError`` unless each parent is ``-1`` or an earlier token of the window
    (a parent after its child would make a cycle, or attend the future)."""
    parents = np.asarray(parents, dtype=np.int64)
    if parents.ndim != 2:
        raise ValueError(f"parents must be [rows, width] (got shape {parents.shape})")
    width = parents.shape[1]
    if ((parents < -1) | (parents >= np.arange(width))).any():
        raise ValueError(f"each parent must be -1 or an earlier window token (got {parents.tolist()})")
    seen = np.zeros((parents.shape[0], width, width), dtype=bool)
    rows = np.arange(parents.shape[0])
    for j in range(width):  # parents come first, so each row of ancestors is complete when read
        has_parent = parents[:, j] >= 0
        seen[has_parent, j] = seen[rows[has_parent], parents[has_parent, j]]
        seen[:, j, j] = True
    return seen


def depths(parents: np.ndarray) -> np.ndarray:
    """``[B, T]``: how many tokens of the window precede each on its branch (its position
    after the committed text)."""
    return visible(parents).sum(axis=-1) - 1


def fallback_parents(chain_width: int, fallback: int) -> np.ndarray:
    """One row's parents: a chain of ``chain_width`` tokens, then ``fallback`` tokens that
    follow the chain's first (exact) token, each after the one before."""
    parents = np.concatenate([chain(chain_width), np.arange(chain_width - 1, chain_width + fallback - 1)])
    if fallback:
        parents[chain_width] = 0
    return parents
