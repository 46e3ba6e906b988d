"""The FLUID attention rule as a kernel input: SDPA boolean mask or flex_attention BlockMask.

Both are built from :func:`fluid_app.attention.may_attend`, the one predicate of the rule,
so they cannot drift apart. The BlockMask is the fast path on CUDA: with masks laid out
after the main tokens most key tiles are empty and flex_attention skips them, and no dense
``L x L`` float mask is ever materialised. The boolean mask (one byte per pair) serves the
CPU, where flex_attention has no backward pass.
"""

from __future__ import annotations

import torch

from fluid_app.attention import may_attend

from .collate import Batch


def sdpa_mask(batch: Batch) -> torch.Tensor:
    """``[B, 1, L, L]`` boolean mask, True where a query may attend a key."""
    a, m, p = batch.anchor_ids, batch.is_mask, batch.position_ids
    allowed = may_attend(a[:, :, None], m[:, :, None], p[:, :, None], a[:, None, :], m[:, None, :], p[:, None, :])
    return allowed[:, None]


def mask_mod_for(batch: Batch):
    """flex_attention ``mask_mod(b, h, q, k)`` evaluating the rule on the batch's tensors."""
    a, m, p = batch.anchor_ids, batch.is_mask, batch.position_ids

    def mask_mod(b, h, q_idx, kv_idx):
        return may_attend(a[b, q_idx], m[b, q_idx], p[b, q_idx], a[b, kv_idx], m[b, kv_idx], p[b, kv_idx])

    return mask_mod


def flex_block_mask(batch: Batch, block_size: int = 128):
    """BlockMask of the rule for flex_attention (per row, shared by all heads)."""
    from torch.nn.attention.flex_attention import create_block_mask

    rows, width = batch.input_ids.shape
    return create_block_mask(mask_mod_for(batch), rows, None, width, width,
                             device=batch.input_ids.device, BLOCK_SIZE=block_size)


def build_attention_mask(batch: Batch, kind: str):
    """``kind`` is ``"flex"`` (BlockMask) or ``"sdpa"`` (boolean mask)."""
    return flex_block_mask(batch) if kind == "flex" else sdpa_mask(batch)
