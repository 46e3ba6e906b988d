"""Batched, trimmable KV-cache decoding on a Hugging Face causal LM.

Each row of the batch has its own committed length. A forward appends the same number of
slots to every row; :meth:`TorchSession.commit` keeps a per-row prefix of them. Rows that keep
fewer slots than the longest leave *holes* in the shared cache tensor, which a 2-D attention
mask hides and explicit position ids skip, so each row still sees exactly its own committed
tokens at consecutive positions. With one row there are never holes and no mask is built.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from transformers import DynamicCache

from fluid_app.protocol import StepOutput


class TorchSession:
    def __init__(self, backend: "TorchBackend", prompts: Sequence[Sequence[int]]):  # noqa: F821
        self.backend = backend
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
        out = self._run(ids, positions, self.valid)
        last = (self.lengths - 1).to(self.device)
        rows = torch.arange(len(prompts), device=self.device)
        self.first = StepOutput(
            tokens=out.tokens[rows.cpu().numpy(), last.cpu().numpy()][:, None],
            confidence=out.confidence[rows.cpu().numpy(), last.cpu().numpy()][:, None],
            horizon=None if out.horizon is None else out.horizon[rows.cpu().numpy(), last.cpu().numpy()][:, None],
        )

    @torch.inference_mode()
    def _run(self, ids: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> StepOutput:
        model = self.backend.model
        attention_mask = None if bool(valid.all()) else valid.to(self.device, torch.long)
        hidden = model.base_model(
            input_ids=ids.to(self.device),
            position_ids=positions.to(self.device),
            attention_mask=attention_mask,
            use_cache=True,
            **{self.backend.cache_kwarg: self.cache},
        ).last_hidden_state
        logits = model.get_output_embeddings()(hidden).float()
        probs = torch.softmax(logits, dim=-1)
        confidence, tokens = probs.max(dim=-1)
        horizon = None
        if self.backend.k_head is not None:
            horizon = self.backend.k_head(hidden.to(self.backend.k_head.out.weight.dtype)).argmax(-1) + 1
            horizon = horizon.cpu().numpy()
        return StepOutput(tokens.cpu().numpy(), confidence.cpu().numpy(), horizon)

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
