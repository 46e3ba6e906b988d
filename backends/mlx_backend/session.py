"""Trimmable KV-cache decoding on an mlx-lm model, one cache per row.

Each row of the batch owns an mlx-lm prompt cache (``make_prompt_cache``). A forward runs
the rows one after another over their own caches; :meth:`MLXSession.commit` trims each
row's cache back by the slots it did not keep (``KVCache.trim`` only moves the offset, so
nothing is copied). Rows never share a tensor, so there are no holes, masks or position
ids to manage: every row sees exactly its own committed tokens at consecutive positions,
which is what makes FLUID lossless. A branched window (fallback masks) is one forward of
the row's model with the branch rule's mask and positions (:mod:`.tree`); a commit keeps its
chain, which comes first, as for any window. Rows join (:meth:`MLXSession.add`, prefilled on new
caches) and leave (:meth:`MLXSession.drop`, their caches released) between forwards; a
prompt cache rewinds a row (:meth:`MLXSession.truncate`, a trim) and prefills more tokens on
top (:meth:`MLXSession.extend`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import trim_prompt_cache

from fluid_app import branches
from fluid_app.protocol import StepOutput

from .tree import branched_hidden

if TYPE_CHECKING:
    from .loader import MLXBackend


class MLXSession:
    def __init__(self, backend: MLXBackend, prompts: Sequence[Sequence[int]], logits: bool = False):
        self.backend = backend
        self.logits = logits
        self.caches = [backend.new_cache() for _ in prompts]
        self.lengths = [len(p) for p in prompts]  # committed tokens per row
        self._last_width = 0
        outs = [backend.step(mx.array([list(p)], dtype=mx.int32), cache, last_only=True, logits=logits)
                for p, cache in zip(prompts, self.caches)]
        self.first = _stack(outs)

    def add(self, prompts: Sequence[Sequence[int]]) -> StepOutput:
        """Prefill ``prompts`` on caches of their own and append them to the batch."""
        assert self._last_width == 0, "add rows between a commit and the next forward"
        self.backend.forward_calls += 1
        caches = [self.backend.new_cache() for _ in prompts]
        outs = [self.backend.step(mx.array([list(p)], dtype=mx.int32), cache, last_only=True, logits=self.logits)
                for p, cache in zip(prompts, caches)]
        self.caches += caches
        self.lengths += [len(p) for p in prompts]
        return _stack(outs)

    def drop(self, rows: Sequence[int]) -> None:
        """Remove ``rows``; their caches are released."""
        assert self._last_width == 0, "drop rows between a commit and the next forward"
        gone = set(int(r) for r in rows)
        self.caches = [cache for b, cache in enumerate(self.caches) if b not in gone]
        self.lengths = [n for b, n in enumerate(self.lengths) if b not in gone]

    def forward(self, tokens: np.ndarray, parents: np.ndarray | None = None) -> StepOutput:
        tokens = np.asarray(tokens, dtype=np.int64)
        self._last_width = tokens.shape[1]
        self.backend.forward_calls += 1
        branched = branches.branched_rows(parents, self.backend.branched_windows)
        outs = []
        for b, (row, cache) in enumerate(zip(tokens, self.caches)):
            ids = mx.array(row[None, :].astype(np.int32))
            if branched is None or not branched[b]:
                outs.append(self.backend.step(ids, cache, logits=self.logits))
            else:  # each token sees its own branch (tree.py)
                outs.append(self.backend.step_output(branched_hidden(self.backend.inner, ids, parents[b], cache),
                                                     self.logits))
        return _stack(outs)

    def commit(self, keep: Sequence[int]) -> None:
        for cache, kept in zip(self.caches, keep):
            drop = self._last_width - int(kept)
            if drop > 0:
                trim_prompt_cache(cache, drop)
        self.lengths = [n + int(kept) for n, kept in zip(self.lengths, keep)]
        self._last_width = 0

    def truncate(self, lengths: Sequence[int]) -> None:
        """Rewind each row to its first ``lengths[b]`` committed tokens (a prompt cache's reuse)."""
        if self._last_width:
            self.commit([0] * len(self.caches))
        if len(lengths) != len(self.lengths) or any(not 0 <= int(n) <= have for n, have in zip(lengths, self.lengths)):
            raise ValueError(f"cannot truncate rows of lengths {self.lengths} to {list(lengths)}")
        for cache, have, n in zip(self.caches, self.lengths, lengths):
            if have > int(n):
                trim_prompt_cache(cache, have - int(n))
        self.lengths = [int(n) for n in lengths]

    def extend(self, tokens: Sequence[Sequence[int]]) -> StepOutput:
        """Prefill ``tokens[b]`` on top of row ``b``; the outputs at each row's last new token."""
        assert self._last_width == 0, "extend rows between a commit and the next forward"
        self.backend.forward_calls += 1
        outs = [self.backend.step(mx.array([list(row)], dtype=mx.int32), cache, last_only=True, logits=self.logits)
                for row, cache in zip(tokens, self.caches)]
        self.lengths = [n + len(row) for n, row in zip(self.lengths, tokens)]
        return _stack(outs)


def _stack(outs: list[StepOutput]) -> StepOutput:
    return StepOutput(
        tokens=np.concatenate([o.tokens for o in outs], axis=0),
        confidence=np.concatenate([o.confidence for o in outs], axis=0),
        horizon=None if outs[0].horizon is None else np.concatenate([o.horizon for o in outs], axis=0),
        logits=None if outs[0].logits is None else np.concatenate([o.logits for o in outs], axis=0),
    )
