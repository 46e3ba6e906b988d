"""The K-head's file, checked the same way by both backends before any tensor is built.

``k_head.safetensors`` holds ``Linear(h, h/4) -> GELU -> Linear(h/4, K)`` as ``proj.*`` and
``out.*``; the torch and MLX K-heads read the same file. A damaged download, a file that is
not a K-head, or one trained for another model would otherwise end in a library traceback
long after the model has loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from fluid_app.errors import FluidError

KEYS = ("proj.weight", "proj.bias", "out.weight", "out.bias")


def check_k_head(path: str | Path, shapes: Mapping[str, Sequence[int]], hidden_size: int) -> int:
    """Check a loaded K-head state's tensor ``shapes``; return its number of horizons ``K``."""
    missing = [k for k in KEYS if k not in shapes]
    if missing:
        raise FluidError(f"{path} is not a FLUID K-head (no {', '.join(missing)}); re-export the checkpoint")
    if len(shapes["proj.weight"]) != 2 or len(shapes["out.weight"]) != 2:
        raise FluidError(f"{path} is not a FLUID K-head (its weights are not matrices); re-export the checkpoint")
    if shapes["proj.weight"][1] != hidden_size:
        raise FluidError(f"{path} was trained for hidden size {shapes['proj.weight'][1]}, but the model has "
                         f"{hidden_size}; use the K-head that came with this model")
    return int(shapes["out.weight"][0])
