"""The K-head in MLX, read from the same ``k_head.safetensors`` the PyTorch backend writes.

Same layers as :class:`backends.torch_backend.k_head.KHead`:
``Linear(h, h/4) -> GELU (exact, erf) -> Linear(h/4, K)``; class ``i`` means horizon ``i + 1``.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from fluid_app.errors import FluidError, damaged, first_line

from ..k_head_file import KEYS, check_k_head


class KHead(nn.Module):
    def __init__(self, hidden_size: int, k_max: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, hidden_size // 4)
        self.out = nn.Linear(hidden_size // 4, k_max)

    @property
    def k_max(self) -> int:
        return int(self.out.weight.shape[0])

    def __call__(self, hidden: mx.array) -> mx.array:
        return self.out(nn.gelu(self.proj(hidden.astype(self.proj.weight.dtype))))


def load_k_head(path: str | Path, hidden_size: int) -> KHead:
    """Load a K-head, checking it was trained for this hidden size."""
    try:
        state = mx.load(str(path))
    except (OSError, ValueError, RuntimeError) as exc:
        raise damaged(path, exc) from None
    k_max = check_k_head(path, {k: tuple(v.shape) for k, v in state.items()}, hidden_size)
    head = KHead(hidden_size, k_max)
    try:
        head.load_weights([(k, state[k].astype(mx.float32)) for k in KEYS])
    except ValueError as exc:  # shapes that do not chain
        raise FluidError(f"{path} is not a FLUID K-head ({first_line(exc)}); re-export the checkpoint") from None
    mx.eval(head.parameters())
    return head
