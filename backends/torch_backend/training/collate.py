"""Per-example FLUID layouts, padded into one batch.

Every example gets its own layout (its own anchors and mask blocks), drawn from a random
generator seeded by ``(seed, epoch, example index)``: the layout of an example does not
depend on which rank or micro-batch it lands in, nor on whether the run was resumed, which
makes distributed and resumed runs reproduce single-process ones exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from fluid_app.data import Example
from fluid_app.layout import IGNORE_INDEX, Layout, build_layout

# Padding slots act like main tokens of an anchor past every real one: they may look at the
# row's main tokens (so no query row is fully masked, which would give NaN), and no real
# token ever looks at them.
PAD_ANCHOR = 1 << 30


@dataclass
class Batch:
    """Padded ``[B, L]`` tensors of a list of layouts."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    anchor_ids: torch.Tensor
    is_mask: torch.Tensor
    lengths: list[int]
    num_main: list[int]

    def to(self, device: torch.device | str) -> "Batch":
        moved = {name: getattr(self, name).to(device, non_blocking=True)
                 for name in ("input_ids", "position_ids", "labels", "anchor_ids", "is_mask")}
        return Batch(**moved, lengths=self.lengths, num_main=self.num_main)

    @property
    def num_tokens(self) -> int:
        return int(sum(self.lengths))


@dataclass(frozen=True)
class LayoutOptions:
    """What :func:`fluid_app.layout.build_layout` needs besides the example."""

    mask_token_id: int
    k_max: int
    vocab_size: int
    special_ids: tuple[int, ...] = ()
    anchor_rate: float = 0.5
    noise_rate: float = 0.1
    restore: bool = True
    fixed_k: int | None = None


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, index])


def make_layouts(examples: Sequence[Example], indices: Sequence[int], options: LayoutOptions, *,
                 seed: int, epoch: int) -> list[Layout]:
    """One layout per example, each from its own ``(seed, epoch, index)`` generator."""
    return [
        build_layout(examples[i].input_ids, examples[i].labels, mask_token_id=options.mask_token_id,
                     k_max=options.k_max, rng=example_rng(seed, epoch, int(i)),
                     anchor_rate=options.anchor_rate, fixed_k=options.fixed_k, restore=options.restore,
                     noise_rate=options.noise_rate, vocab_size=options.vocab_size,
                     special_ids=options.special_ids)
        for i in indices
    ]


def collate(layouts: Sequence[Layout], pad_token_id: int, pad_to_multiple: int = 1) -> Batch:
    """Right-pad layouts to the longest one (rounded up to ``pad_to_multiple``)."""
    lengths = [len(layout) for layout in layouts]
    width = max(lengths)
    width = -(-width // pad_to_multiple) * pad_to_multiple
    rows = len(layouts)
    input_ids = np.full((rows, width), pad_token_id, dtype=np.int64)
    position_ids = np.zeros((rows, width), dtype=np.int64)
    labels = np.full((rows, width), IGNORE_INDEX, dtype=np.int64)
    anchor_ids = np.full((rows, width), PAD_ANCHOR, dtype=np.int64)
    is_mask = np.zeros((rows, width), dtype=bool)
    for row, layout in enumerate(layouts):
        n = len(layout)
        input_ids[row, :n] = layout.input_ids
        position_ids[row, :n] = layout.position_ids
        labels[row, :n] = layout.labels
        anchor_ids[row, :n] = layout.anchor_ids
        is_mask[row, :n] = layout.is_mask
    return Batch(torch.from_numpy(input_ids), torch.from_numpy(position_ids), torch.from_numpy(labels),
                 torch.from_numpy(anchor_ids), torch.from_numpy(is_mask), lengths,
                 [layout.num_main for layout in layouts])
