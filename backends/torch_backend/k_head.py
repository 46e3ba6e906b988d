"""The K-head of Elastic Horizons: ``Linear(h, h/4) -> GELU -> Linear(h/4, K)``.

It reads the final (post-norm) hidden state of a committed token and scores horizons
``1..K``; class ``i`` means "draft ``i + 1`` tokens next".
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fluid_app.errors import FluidError


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
    """Save atomically (temp file, then rename) so a crash never leaves half a head."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    state = {k: v.detach().float().contiguous().cpu() for k, v in head.state_dict().items()}
    save_file(state, str(tmp), metadata={"format": "pt", "k_max": str(head.k_max)})
    tmp.replace(path)


def load_k_head(path: str | Path, hidden_size: int) -> KHead:
    state = load_file(str(path))
    k_max = state["out.weight"].shape[0]
    if state["proj.weight"].shape[1] != hidden_size:
        raise FluidError(
            f"{path} was trained for hidden size {state['proj.weight'].shape[1]}, but the model has "
            f"{hidden_size}; use the K-head that came with this model"
        )
    head = KHead(hidden_size, k_max)
    head.load_state_dict(state)
    return head
