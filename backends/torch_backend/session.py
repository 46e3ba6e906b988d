"""Batched, trimmable KV-cache decoding on a Hugging Face causal LM.

Each row of the batch has its own committed length. A forward appends the same number of
slots to every row; :meth:`TorchSession.commit` keeps a per-row prefix of them. Rows that keep
fewer slots than the longest leave *holes* in the shared cache tensor, which a 2-D attention
mask hides and explicit position ids skip, so each row still sees exactly its own committed
tokens at consecutive positions. With one row there are never holes and no mask is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from transformers import DynamicCache

from fluid_app.protocol import StepOutput

if TYPE_CHECKING:
    from .loader import TorchBackend


class TorchSession:
    def __init__(self, backend: TorchBackend, prompts: Sequence[Sequence[int]], logits: bool = False):
        self.backend = backend
        self.logits = logits
        self.device = backend.torch_device
        lengths = [len(p) for p in prompts]
        width = max(lengths)
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        for b, prompt in enumerate(prompts):
            ids[b, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        self.valid = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
        self.lengths = torch.tensor(lengths, dtype=torch.long)
        self.cache = DynamicCache(config=backend.model.config)
        self._last_width = 0
        positions = torch.arange(width)[None, :].expand(len(prompts), -1)
        self.first = self._run(ids, positions, self.valid, last=self.lengths - 1)

    @torch.inference_mode()
    def _run(self, ids: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor,
             last: torch.Tensor | None = None) -> StepOutput:
        """One forward; outputs at every fed position, or (prefill) only at each row's ``last``
        position, so the output layer never runs over a whole prompt."""
        backend = self.backend
        attention_mask = None if bool(valid.all()) else valid.to(self.device, torch.long)
        hidden = backend.model.base_model(
            input_ids=ids.to(self.device),
            position_ids=positions.to(self.device),
            attention_mask=attention_mask,
            use_cache=True,
            **{backend.cache_kwarg: self.cache},
        ).last_hidden_state
        if last is not None:
            hidden = hidden[torch.arange(hidden.shape[0], device=self.device), last.to(self.device)][:, None]
        return backend.step_output(hidden, self.logits)

    def forward(self, tokens: np.ndarray) -> StepOutput:
        ids = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
        width = ids.shape[1]
        positions = self.lengths[:, None] + torch.arange(width)[None, :]
        valid = torch.cat([self.valid, torch.ones((ids.shape[0], width), dtype=torch.bool)], dim=1)
        self._last_width = width
        self.backend.forward_calls += 1
        return self._run(ids, positions, valid)

    def commit(self, keep: Sequence[int]) -> None:
        keep_t = torch.as_tensor(list(keep), dtype=torch.long)
        width = self._last_width
        longest = int(keep_t.max()) if len(keep_t) else 0
        if width > longest:
            self.cache.crop(-(width - longest))
        self.valid = torch.cat([self.valid, torch.arange(longest)[None, :] < keep_t[:, None]], dim=1)
        self.lengths = self.lengths + keep_t
        self._last_width = 0

    def truncate(self, lengths: Sequence[int]) -> None:
        """Rewind each row to its first ``lengths[b]`` committed tokens (a prompt cache's reuse).

        A row's committed tokens are the valid columns of the shared cache; the columns after
        its ``lengths[b]``-th one are hidden, and the cache is cropped to the widest row."""
        if self._last_width:
            self.commit([0] * len(self.lengths))
        target = torch.as_tensor(list(lengths), dtype=torch.long)
        if bool((target > self.lengths).any()) or bool((target < 0).any()):
            raise ValueError(f"cannot truncate rows of lengths {self.lengths.tolist()} to {target.tolist()}")
        kept = self.valid & (self.valid.cumsum(1) <= target[:, None])
        columns = torch.nonzero(kept.any(0))
        width = int(columns.max()) + 1 if len(columns) else 0
        if self.valid.shape[1] > width:  # transformers crops by a count from the end
            self.cache.crop(-(self.valid.shape[1] - width))
        self.valid = kept[:, :width]
        self.lengths = target

    def extend(self, tokens: Sequence[Sequence[int]]) -> StepOutput:
        """Prefill ``tokens[b]`` on top of row ``b``; the outputs at each row's last new token."""
        counts = [len(t) for t in tokens]
        ids = torch.zeros((len(tokens), max(counts)), dtype=torch.long)
        for b, row in enumerate(tokens):
            ids[b, : len(row)] = torch.tensor(list(row), dtype=torch.long)
        width = ids.shape[1]
        positions = self.lengths[:, None] + torch.arange(width)[None, :]
        valid = torch.cat([self.valid, torch.ones((ids.shape[0], width), dtype=torch.bool)], dim=1)
        self._last_width = width
        self.backend.forward_calls += 1
        out = self._run(ids, positions, valid, last=torch.tensor(counts) - 1)
        self.commit(counts)
        return out
