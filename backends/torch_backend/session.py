"""Batched, trimmable KV-cache decoding on a Hugging Face causal LM.

Each row of the batch has its own committed length. A forward appends the same number of
slots to every row; :meth:`TorchSession.commit` keeps a per-row prefix of them. Rows that keep
fewer slots than the longest leave *holes* in the shared cache tensor, which a 2-D attention
mask hides and explicit position ids skip, so each row still sees exactly its own committed
tokens at consecutive positions. With one row there are never holes and no mask is built.

The batch is continuous. :meth:`TorchSession.add` prefills new rows in a session of their
own and concatenates its cache along the batch dimension (the narrower cache padded with
masked holes). :meth:`TorchSession.drop` index-selects the remaining rows and then removes
every cache column none of them uses, so a finished row's memory goes at once.

A prompt cache reuses a session: :meth:`TorchSession.truncate` hides each row's columns past
the prefix it keeps (and cuts the columns no row uses, as ``drop`` does) and
:meth:`TorchSession.extend` prefills more tokens on top, as committed ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from fluid_app import branches
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
        self.cache = backend.new_cache()
        self._last_width = 0
        positions = torch.arange(width)[None, :].expand(len(prompts), -1)
        self.first = self._run(ids, positions, self.valid, last=self.lengths - 1)

    @torch.inference_mode()
    def _run(self, ids: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor,
             last: torch.Tensor | None = None) -> StepOutput:
        """One forward; outputs at every fed position, or (prefill) only at each row's ``last``
        position, so the output layer never runs over a whole prompt. ``valid``: the keys each
        row may attend (``[B, columns]``), or for a branched window each query's (``[B, 1, T, columns]``)."""
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

    def forward(self, tokens: np.ndarray, parents: np.ndarray | None = None) -> StepOutput:
        ids = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
        width = ids.shape[1]
        self._last_width = width
        self.backend.forward_calls += 1
        if branches.branched_rows(parents, self.backend.branched_windows) is not None:  # each token sees its branch
            seen = torch.as_tensor(branches.visible(parents))  # [B, T, T]
            positions = self.lengths[:, None] + seen.sum(-1) - 1
            mask = torch.cat([self.valid[:, None, :].expand(-1, width, -1), seen], dim=2)
            return self._run(ids, positions, mask[:, None])
        positions = self.lengths[:, None] + torch.arange(width)[None, :]
        valid = torch.cat([self.valid, torch.ones((ids.shape[0], width), dtype=torch.bool)], dim=1)
        return self._run(ids, positions, valid)

    def add(self, prompts: Sequence[Sequence[int]]) -> StepOutput:
        """Prefill ``prompts`` on their own and append them to the batch (between forwards)."""
        assert self._last_width == 0, "add rows between a commit and the next forward"
        self.backend.forward_calls += 1
        new = TorchSession(self.backend, prompts, self.logits)
        width = max(self.valid.shape[1], new.valid.shape[1])
        for mine, theirs in zip(self.cache.layers, new.cache.layers):
            mine.keys = torch.cat([_pad(mine.keys, width), _pad(theirs.keys, width)], dim=0)
            mine.values = torch.cat([_pad(mine.values, width), _pad(theirs.values, width)], dim=0)
        _released(self.cache)
        self.valid = torch.cat([_pad(self.valid, width, dim=1), _pad(new.valid, width, dim=1)], dim=0)
        self.lengths = torch.cat([self.lengths, new.lengths])
        return new.first

    def drop(self, rows: Sequence[int]) -> None:
        """Remove ``rows``; then cut the cache columns that no remaining row uses."""
        assert self._last_width == 0, "drop rows between a commit and the next forward"
        gone = set(int(r) for r in rows)
        kept = torch.tensor([b for b in range(len(self.lengths)) if b not in gone], dtype=torch.long)
        valid = self.valid[kept]
        columns = valid.any(dim=0).nonzero().flatten()
        self.valid, self.lengths = valid[:, columns], self.lengths[kept]
        rows_d, columns_d = kept.to(self.device), columns.to(self.device)
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, rows_d).index_select(2, columns_d)
            layer.values = layer.values.index_select(0, rows_d).index_select(2, columns_d)
        _released(self.cache)

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
        its ``lengths[b]``-th one are hidden, and every column no row uses any more is cut, as
        :meth:`drop` does (cropped from the end, without a copy, when they are all there)."""
        if self._last_width:
            self.commit([0] * len(self.lengths))
        target = torch.as_tensor(list(lengths), dtype=torch.long)
        if target.shape != self.lengths.shape or bool((target > self.lengths).any()) or bool((target < 0).any()):
            raise ValueError(f"cannot truncate rows of lengths {self.lengths.tolist()} to {target.tolist()}")
        kept = self.valid & (self.valid.cumsum(1) <= target[:, None])
        used = kept.any(0)
        columns = used.nonzero().flatten()
        width = int(columns.max()) + 1 if len(columns) else 0
        if len(columns) == width:  # the unused columns are all at the end
            if self.valid.shape[1] > width:  # transformers crops by a count from the end
                self.cache.crop(-(self.valid.shape[1] - width))
            self.valid = kept[:, :width]
        else:
            columns_d = columns.to(self.device)
            for layer in self.cache.layers:
                layer.keys = layer.keys.index_select(2, columns_d)
                layer.values = layer.values.index_select(2, columns_d)
            _released(self.cache)
            self.valid = kept[:, columns]
        self.lengths = target

    def extend(self, tokens: Sequence[Sequence[int]]) -> StepOutput:
        """Prefill ``tokens[b]`` on top of row ``b``; the outputs at each row's last new token."""
        assert self._last_width == 0, "extend rows between a commit and the next forward"
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


def _released(cache) -> None:
    """The session has put tensors of its own in ``cache``'s layers: the own forward's cache
    lets go of the buffers it grew them in (:meth:`.llama_family.KVCache.release`)."""
    if hasattr(cache, "release"):
        cache.release()


def _pad(tensor: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    """``tensor`` widened to ``width`` along ``dim`` with zeros (False for a mask): holes."""
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor, tensor.new_zeros(shape)], dim=dim)
