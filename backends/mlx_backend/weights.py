"""transformers-saved safetensors, read into mlx-lm models.

mlx-lm families expect their own key names (GPT-2: the original OpenAI ones, and a tied
head); a folder written by transformers may differ. The loader (base weights) and the LoRA
fuser (adapted weights) both rename through :func:`hf_weight_names`, so they agree.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from fluid_app.errors import damaged


def hf_weight_names(model_type: str | None, weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Rename transformers-saved keys to what the mlx-lm family's ``sanitize`` expects."""
    if model_type == "gpt2":
        return {k.removeprefix("transformer."): v for k, v in weights.items()}
    return weights


def weight_keys(folder: Path) -> set[str]:
    """Every tensor name in a folder's ``model*.safetensors`` (headers only, no data read)."""
    from safetensors import SafetensorError, safe_open

    keys: set[str] = set()
    for path in folder.glob("model*.safetensors"):
        try:
            with safe_open(str(path), framework="numpy") as handle:
                keys.update(handle.keys())
        except (SafetensorError, OSError) as exc:
            raise damaged(path, exc, "re-download the model or re-export the checkpoint") from None
    return keys


def load_gpt2_weights(model: nn.Module, folder: Path, tied: bool) -> None:
    """Load a transformers GPT-2 folder: keys renamed, an untied head attached as ``lm_head``."""
    weights: dict[str, mx.array] = {}
    for path in sorted(folder.glob("model*.safetensors")):
        weights.update(mx.load(str(path)))
    head = weights.pop("lm_head.weight", None)
    weights = model.sanitize(hf_weight_names("gpt2", weights))
    model.load_weights(list(weights.items()), strict=True)
    if head is not None and not tied:
        model.lm_head = nn.Linear(head.shape[1], head.shape[0], bias=False)
        model.lm_head.weight = head
        model.fluid_own_head = True  # mlx-lm's __call__ would use the tied embedding instead
    mx.eval(model.parameters())
