"""The K-head of Elastic Horizons: ``Linear(h, h/4) -> GELU -> Linear(h/4, K)``.

It reads the final (post-norm) hidden state of a committed token and scores horizons
``1..K``; class ``i`` means "draft ``i + 1`` tokens next".
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fluid_app.errors import FluidError, damaged, first_line
from fluid_app.files import atomic_file

from ..k_head_file import check_k_head


class KHead(nn.Module):
    def __init__(self, hidden_size: int, k_max: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, hidden_size // 4)
        self.act = nn.GELU()
        self.out = nn.Linear(hidden_size // 4, k_max)

    @property
    def k_max(self) -> int:
        return self.out.out_features

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.proj(hidden)))


def save_k_head(head: KHead, path: str | Path) -> None:
    """Save atomically (:func:`fluid_app.files.atomic_file`) so a crash never leaves half a head."""
    state = {k: v.detach().float().contiguous().cpu() for k, v in head.state_dict().items()}
    with atomic_file(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "k_max": str(head.k_max)})


def load_k_head(path: str | Path, hidden_size: int) -> KHead:
    """Load a K-head, checking it is one and was trained for this hidden size.

    Why the checks: a damaged download or a file that is not a K-head would otherwise end
    in a safetensors or ``load_state_dict`` traceback, long after the model has loaded.
    """
    from safetensors import SafetensorError

    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise damaged(path, exc) from None
    k_max = check_k_head(path, {k: tuple(v.shape) for k, v in state.items()}, hidden_size)
    head = KHead(hidden_size, k_max)
    try:
        head.load_state_dict(state)
    except RuntimeError as exc:  # extra tensors, or shapes that do not chain
        raise FluidError(f"{path} is not a FLUID K-head ({first_line(exc)}); re-export the checkpoint") from None
    return head
