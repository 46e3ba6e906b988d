"""Stage I / Stage II training layouts (FLUID_METHOD.md section 3, steps 1-5).

An example of ``N`` tokens becomes an *expanded* sequence: the ``N`` main tokens plus, for
every anchor, a block of mask slots that stand in for the next tokens. Each slot keeps the
position id of the token it replaces, so a standard causal model sees ordinary RoPE/absolute
positions; who may attend to whom is decided by :mod:`fluid_app.attention`, not by order.

By default the mask blocks are laid out *after* all main tokens ("masks last"). The rule
does not depend on sequence order, the loss is a mean over labels, and block-sparse kernels
skip far more tiles this way (FLUID_METHOD.md section 6: 85% vs 49% sparsity).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Layout:
    """One expanded example. All arrays have the expanded length ``L``."""

    input_ids: np.ndarray  # token fed at each slot (MASK, restored token, or main token)
    position_ids: np.ndarray  # main token i -> i; mask j of anchor i -> i + j
    labels: np.ndarray  # next-token target of the position, IGNORE_INDEX where none
    anchor_ids: np.ndarray  # main token -> its own index; mask -> index of its anchor
    is_mask: np.ndarray  # True for every slot of a mask block (restored ones included)
    restored: np.ndarray  # True where a mask slot was filled with a (possibly noisy) token
    num_main: int

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def mask_blocks(self) -> dict[int, np.ndarray]:
        """Anchor index -> expanded indices of its mask slots, in position order."""
        blocks: dict[int, list[int]] = {}
        for index in np.flatnonzero(self.is_mask):
            blocks.setdefault(int(self.anchor_ids[index]), []).append(int(index))
        return {a: np.array(sorted(ix, key=lambda i: self.position_ids[i])) for a, ix in blocks.items()}


def shifted_targets(labels: Sequence[int]) -> np.ndarray:
    """``s_i = y_{i+1}``: the token position ``i`` must predict (ignored at the end)."""
    labels = np.asarray(labels, dtype=np.int64)
    shifted = np.full_like(labels, IGNORE_INDEX)
    shifted[:-1] = labels[1:]
    return shifted


def build_layout(
    input_ids: Sequence[int],
    labels: Sequence[int],
    *,
    mask_token_id: int,
    k_max: int,
    rng: np.random.Generator,
    anchor_rate: float = 0.5,
    fixed_k: int | None = None,
    restore: bool = True,
    noise_rate: float = 0.1,
    vocab_size: int | None = None,
    special_ids: Iterable[int] = (),
    masks_last: bool = True,
) -> Layout:
    """Expand one example (``labels`` unshifted, IGNORE_INDEX on prompt tokens).

    Stage I: ``k_i ~ U{1..k_max}`` masks per anchor with partial restoration.
    Stage II: ``fixed_k=k_max, restore=False``. Deterministic for a given ``rng`` state.
    """
    tokens = np.asarray(input_ids, dtype=np.int64)
    n = int(tokens.shape[0])
    targets = shifted_targets(labels)
    if targets.shape[0] != n:
        raise ValueError("input_ids and labels must have the same length")
    specials = set(int(s) for s in special_ids) | {int(mask_token_id)}
    if restore and noise_rate > 0 and vocab_size is None:
        raise ValueError("vocab_size is needed to draw noisy restorations")

    main_slots = [(int(tokens[i]), i, int(targets[i]), i, False, False) for i in range(n)]
    blocks: list[list[tuple[int, int, int, int, bool, bool]]] = []
    for anchor in range(n):
        if targets[anchor] == IGNORE_INDEX or rng.random() >= anchor_rate:
            blocks.append([])
            continue
        k = fixed_k if fixed_k is not None else int(rng.integers(1, k_max + 1))
        restore_prob = float(rng.random()) if restore else 0.0
        block = []
        for j in range(1, k + 1):
            pos = anchor + j
            label = int(targets[pos]) if pos < n else IGNORE_INDEX
            token, was_restored = int(mask_token_id), False
            if restore and pos < n and rng.random() < restore_prob:
                was_restored = True
                token = int(tokens[pos])
                if rng.random() < noise_rate:
                    token = _random_regular_token(rng, vocab_size, specials)
            block.append((token, pos, label, anchor, True, was_restored))
        blocks.append(block)

    if masks_last:
        slots = main_slots + [slot for block in blocks for slot in block]
    else:
        slots = [slot for i in range(n) for slot in [main_slots[i], *blocks[i]]]
    columns = list(zip(*slots)) if slots else [[]] * 6
    return Layout(
        input_ids=np.array(columns[0], dtype=np.int64),
        position_ids=np.array(columns[1], dtype=np.int64),
        labels=np.array(columns[2], dtype=np.int64),
        anchor_ids=np.array(columns[3], dtype=np.int64),
        is_mask=np.array(columns[4], dtype=bool),
        restored=np.array(columns[5], dtype=bool),
        num_main=n,
    )


def _random_regular_token(rng: np.random.Generator, vocab_size: int, specials: set[int]) -> int:
    """A uniformly random token id that is not special (the 10% noise of step 5)."""
    while True:
        token = int(rng.integers(0, vocab_size))
        if token not in specials:
            return token
