"""Trimmable KV-cache decoding on an mlx-lm model, one cache per row.

Each row of the batch owns an mlx-lm prompt cache (``make_prompt_cache``). A forward runs
the rows one after another over their own caches; :meth:`MLXSession.commit` trims each
row's cache back by the slots it did not keep (``KVCache.trim`` only moves the offset, so
nothing is copied). Rows never share a tensor, so there are no holes, masks or position
ids to manage: every row sees exactly its own committed tokens at consecutive positions,
which is what makes FLUID lossless. Rows join (:meth:`MLXSession.add`, prefilled on new
caches) and leave (:meth:`MLXSession.drop`, their caches released) between forwards.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import trim_prompt_cache

from fluid_app.protocol import StepOutput

if TYPE_CHECKING:
    from .loader import MLXBackend


class MLXSession:
    def __init__(self, backend: MLXBackend, prompts: Sequence[Sequence[int]], logits: bool = False):
        self.backend = backend
        self.logits = logits
        self.caches = [backend.new_cache() for _ in prompts]
        self._last_width = 0
        outs = [backend.step(mx.array([list(p)], dtype=mx.int32), cache, last_only=True, logits=logits)
                for p, cache in zip(prompts, self.caches)]
        self.first = _stack(outs)

    def add(self, prompts: Sequence[Sequence[int]]) -> StepOutput:
        """Prefill ``prompts`` on caches of their own and append them to the batch."""
        self.backend.forward_calls += 1
        caches = [self.backend.new_cache() for _ in prompts]
        outs = [self.backend.step(mx.array([list(p)], dtype=mx.int32), cache, last_only=True, logits=self.logits)
                for p, cache in zip(prompts, caches)]
        self.caches += caches
        return _stack(outs)

    def drop(self, rows: Sequence[int]) -> None:
        gone = set(int(r) for r in rows)
        self.caches = [cache for b, cache in enumerate(self.caches) if b not in gone]

    def forward(self, tokens: np.ndarray) -> StepOutput:
        tokens = np.asarray(tokens, dtype=np.int64)
        self._last_width = tokens.shape[1]
        self.backend.forward_calls += 1
        outs = [self.backend.step(mx.array(row[None, :].astype(np.int32)), cache, logits=self.logits)
                for row, cache in zip(tokens, self.caches)]
        return _stack(outs)

    def commit(self, keep: Sequence[int]) -> None:
        for cache, kept in zip(self.caches, keep):
            drop = self._last_width - int(kept)
            if drop > 0:
                trim_prompt_cache(cache, drop)
        self._last_width = 0


def _stack(outs: list[StepOutput]) -> StepOutput:
    return StepOutput(
        tokens=np.concatenate([o.tokens for o in outs], axis=0),
        confidence=np.concatenate([o.confidence for o in outs], axis=0),
        horizon=None if outs[0].horizon is None else np.concatenate([o.horizon for o in outs], axis=0),
        logits=None if outs[0].logits is None else np.concatenate([o.logits for o in outs], axis=0),
    )
