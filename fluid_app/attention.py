"""The Strictly Causal Alignment attention rule (FLUID_METHOD.md section 3.4).

Query ``q`` may attend key ``k`` iff
  * ``k`` is a main token and ``anchor(k) <= anchor(q)``, or
  * ``k`` and ``q`` are masks of the same anchor and ``pos(k) <= pos(q)``.

:func:`may_attend` is written with elementwise operators only, so the very same expression
serves numpy (the materialiser below and the tests), torch boolean masks, and the
``mask_mod`` of flex_attention in the training backend: one rule, no copies to drift apart.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np

from .layout import Layout

Array = TypeVar("Array")


def may_attend(q_anchor: Array, q_is_mask: Array, q_pos: Array,
               k_anchor: Array, k_is_mask: Array, k_pos: Array) -> Array:
    """Elementwise FLUID rule on broadcastable arrays/tensors (booleans for the masks)."""
    main_key = ~k_is_mask & (k_anchor <= q_anchor)
    same_block = k_is_mask & q_is_mask & (k_anchor == q_anchor) & (k_pos <= q_pos)
    return main_key | same_block


def attention_mask(layout: Layout) -> np.ndarray:
    """Dense ``[L, L]`` boolean matrix, ``True`` where query row may attend key column."""
    a, m, p = layout.anchor_ids, layout.is_mask, layout.position_ids
    return may_attend(a[:, None], m[:, None], p[:, None], a[None, :], m[None, :], p[None, :])
