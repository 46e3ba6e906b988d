"""Held-out draft quality during Stage I: how many drafts of a block verification would keep.

Why: the training losses say little about what decoding gains. What counts is how many
leading mask drafts of a block equal the tokens that follow (FLUID_METHOD.md section 6:
tokens per forward is about 1 + the mean run of correct drafts). So every ``--eval-every``
steps the masks are scored on held-out replies, teacher-forced, under the training
layout's strictly causal rule, but with every anchor (every position whose next token is a
reply token) given a full block of K masks, no restoration and no noise: the figure then
depends on the weights alone and is comparable from step to step and run to run.

Offset ``i`` is mask slot ``i`` of a block: it stands at position ``anchor + i`` and
predicts the token after it, so it drafts the token ``i`` positions past the one the anchor
itself predicts (that one is the AR token, which verification always keeps).

* ``accuracy[i-1]``: the share of anchors whose slot ``i`` has a label that predict it
  (top-1), ``None`` where no anchor has a slot ``i``.
* ``mean_accepted_run``: the sum over ``i`` of P(slots 1..i all correct), each estimated
  per anchor (over the anchors whose slots 1..i all have labels). Where every block is
  complete this is exactly the mean, over anchors, of the number of leading correct drafts.
  It is not a product of the per-offset accuracies: errors cluster, so that would mislead.

A block is cut at its first unlabelled slot (the reply ended), as Stage II cuts it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from fluid_app.data import Example, build_examples, read_conversations
from fluid_app.layout import IGNORE_INDEX, Layout, build_layout

from .collate import collate
from .masks import build_attention_mask
from .model import FluidLossModule


@dataclass(frozen=True)
class DraftQuality:
    """What one evaluation reports (see the module docstring)."""

    accuracy: list[float | None]
    mean_accepted_run: float
    anchors: int

    def record(self) -> dict[str, Any]:
        """The ``"eval"`` object of the train log line."""
        return {"accuracy": [None if a is None else round(a, 6) for a in self.accuracy],
                "mean_accepted_run": round(self.mean_accepted_run, 6), "anchors": self.anchors}


def held_out_examples(data: str, tokenizer: Any, *, holdout: float, count: int, max_len: int) -> list[Example]:
    """What ``--eval-every`` scores: the first ``count`` conversations of ``data``'s held-out
    split (the last ``holdout`` of its records), rendered as training renders them; empty when
    that split is. One definition for a run and for scoring a finished checkpoint
    (``benchmarks/draft_quality.py``), so both see the same conversations."""
    conversations = read_conversations(data, holdout=holdout, split="heldout", limit=count)
    return build_examples(conversations, tokenizer, max_len=max_len, source=f"{data} (held out)") \
        if conversations else []


def eval_layout(example: Example, mask_token_id: int, k: int) -> Layout:
    """The training layout with a full block of ``k`` plain masks after every anchor.

    ``anchor_rate=1`` never draws from ``rng`` below the rate, and with ``restore=False``
    nothing else is drawn: the layout is a function of the example alone."""
    return build_layout(example.input_ids, example.labels, mask_token_id=mask_token_id, k_max=k,
                        rng=np.random.default_rng(0), anchor_rate=1.0, fixed_k=k, restore=False)


def block_outcomes(layout: Layout, predicted: np.ndarray) -> list[list[bool]]:
    """Per anchor with at least one labelled slot: whether each slot's prediction equals its
    label, in offset order, up to the block's first unlabelled slot. ``predicted`` holds a
    token id per slot of the layout (anything at main tokens)."""
    outcomes = []
    for _, slots in sorted(layout.mask_blocks().items()):
        run = []
        for slot in slots:
            label = int(layout.labels[slot])
            if label == IGNORE_INDEX:
                break
            run.append(bool(int(predicted[slot]) == label))
        if run:
            outcomes.append(run)
    return outcomes


def summarize(outcomes: Iterable[Sequence[bool]], k: int) -> DraftQuality:
    """Per-offset accuracy and the mean accepted run of per-anchor outcomes (lists of at most ``k``)."""
    present = np.zeros(k, dtype=np.int64)  # anchors with a labelled slot i
    correct = np.zeros(k, dtype=np.int64)  # ... whose slot i is right
    leading = np.zeros(k, dtype=np.int64)  # ... whose slots 1..i are all right
    anchors = 0
    for run in outcomes:
        flags = np.asarray(run, dtype=bool)[:k]
        if flags.size == 0:
            continue
        anchors += 1
        present[:flags.size] += 1
        correct[:flags.size] += flags
        leading[:flags.size] += np.cumprod(flags).astype(bool)
    accuracy = [float(c / p) if p else None for c, p in zip(correct, present)]
    run_length = float(sum(lead / p for lead, p in zip(leading, present) if p))
    return DraftQuality(accuracy, run_length, anchors)


class DraftEvaluator:
    """Scores the masks of a model on fixed held-out examples (built once, reused each time).

    Every rank runs every example (FSDP's forwards are collective, and the set is small),
    so all ranks get the same figures without any reduction.
    """

    def __init__(self, examples: Sequence[Example], *, mask_token_id: int, k: int, batch_size: int,
                 pad_token_id: int, attn_kind: str, device: torch.device, bf16: bool):
        self.k = k
        self.layouts = [eval_layout(example, mask_token_id, k) for example in examples]
        self.batch_size = batch_size
        self.pad_token_id = pad_token_id
        self.attn_kind = attn_kind
        self.device = device
        self.bf16 = bf16

    def __call__(self, module: FluidLossModule) -> DraftQuality:
        """The draft quality of ``module`` on the held-out examples."""
        outcomes = [run for layout, predicted in zip(self.layouts, self.drafts(module))
                    for run in block_outcomes(layout, predicted)]
        return summarize(outcomes, self.k)

    def drafts(self, module: FluidLossModule) -> list[np.ndarray]:
        """Per layout, the top-1 token of every labelled mask slot (-1 elsewhere), computed
        in eval mode without gradients, leaving the random number generators and the
        module's train/eval mode as they were (training must go on exactly as without it)."""
        was_training = module.training
        module.eval()
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        drafts: list[np.ndarray] = []
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=devices), autocast:
                for start in range(0, len(self.layouts), self.batch_size):
                    chunk = self.layouts[start:start + self.batch_size]
                    predicted = self._predict(module, chunk)
                    drafts += [predicted[row, :len(layout)] for row, layout in enumerate(chunk)]
        finally:
            module.train(was_training)
        return drafts

    def _predict(self, module: FluidLossModule, layouts: Sequence[Layout]) -> np.ndarray:
        """``[B, L]`` argmax token of every labelled mask slot (-1 elsewhere)."""
        batch = collate(layouts, self.pad_token_id, 128 if self.attn_kind == "flex" else 1).to(self.device)
        best = module(batch.input_ids, batch.position_ids, build_attention_mask(batch, self.attn_kind), batch.labels,
                      batch.is_mask, top1=True)
        predicted = torch.full(batch.labels.shape, -1, dtype=torch.long, device=batch.labels.device)
        predicted[batch.is_mask & (batch.labels != IGNORE_INDEX)] = best
        return predicted.cpu().numpy()
