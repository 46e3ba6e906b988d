"""A branched window (:mod:`fluid_app.branches`) through an mlx-lm model, in one forward.

Why: mlx-lm's models place every fed token after the cache (RoPE from ``cache.offset``, a
causal mask), so a window could only be a chain, and the MLX backend fed no fallback masks.
A sampled decode must try the same drafts on both backends to draw the same tokens from one
seed, so sampling could not feed them on torch either. Here the window runs through the
model's own blocks with two things changed for the one call: the attention mask is the
branch rule's (:func:`fluid_app.branches.visible`, every cached column visible), and each
layer's rotary embedding places each run of consecutive depths at ``offset + depth``
(:func:`fluid_app.branches.depths`). The blocks, weights and cache are mlx-lm's; nothing is
copied. Only the plain decoder stacks of :mod:`backends.llama_shape` qualify, the configs the
torch backend feeds branches for, so both backends try the same drafts.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from fluid_app import branches

from ..llama_shape import shape_of


def feeds_branches(inner: nn.Module, config: dict[str, Any]) -> bool:
    """Whether :func:`branched_hidden` can run this model: a config the torch backend feeds
    branches for, built by mlx-lm as embedding, blocks with a rotary attention, final norm."""
    if shape_of(config) is None:
        return False
    layers = getattr(inner, "layers", None)
    return (hasattr(inner, "embed_tokens") and hasattr(inner, "norm") and bool(layers)
            and all(hasattr(getattr(layer, "self_attn", None), "rope") and not getattr(layer, "use_sliding", False)
                    for layer in layers))


class _RunsRope(nn.Module):
    """A layer's rotary embedding applied run by run: tokens ``start:stop`` of the window sit at
    ``offset + depth`` with consecutive depths, which the wrapped embedding gives them as its own
    offset (so its frequencies, scaling and layout are used as they are)."""

    def __init__(self, rope: Any, runs: list[tuple[int, int, int]]):
        super().__init__()
        self.rope, self.runs = rope, runs

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        return mx.concatenate([self.rope(x[..., start:stop, :], offset=offset + depth)
                               for start, stop, depth in self.runs], axis=-2)


def runs_of(depths: np.ndarray) -> list[tuple[int, int, int]]:
    """``(start, stop, first depth)`` of each maximal run of window tokens whose depths go up by one."""
    runs, start = [], 0
    for j in range(1, len(depths) + 1):
        if j == len(depths) or depths[j] != depths[j - 1] + 1:
            runs.append((start, j, int(depths[start])))
            start = j
    return runs


def branched_hidden(inner: nn.Module, ids: mx.array, parents: np.ndarray, cache: list[Any]) -> mx.array:
    """Final hidden states ``[1, T, h]`` of one row's branched window over its ``cache``."""
    parents = np.asarray(parents)[None]
    seen = branches.visible(parents)[0]
    offset = int(cache[0].offset)
    mask = mx.array(np.concatenate([np.ones((seen.shape[0], offset), dtype=bool), seen], axis=1)[None, None])
    runs = runs_of(branches.depths(parents)[0])
    ropes = [layer.self_attn.rope for layer in inner.layers]
    try:
        for layer, rope in zip(inner.layers, ropes):
            layer.self_attn.rope = _RunsRope(rope, runs)
        h = inner.embed_tokens(ids)
        for layer, layer_cache in zip(inner.layers, cache):
            h = layer(h, mask, cache=layer_cache)
        return inner.norm(h)
    finally:
        for layer, rope in zip(inner.layers, ropes):
            layer.self_attn.rope = rope
