"""Fuse a peft LoRA adapter into an mlx-lm model at load: ``W += scale * B @ A``.

peft stores ``base_model.model.<module>.lora_A.weight`` ``[r, in]`` and ``...lora_B.weight``
``[out, r]`` in the Hugging Face key space of the base model; ``scale = lora_alpha / r``
(``lora_alpha / sqrt(r)`` with rsLoRA). The fused tensors are computed in that key space
from the base's own safetensors, then passed through the mlx-lm family's ``sanitize`` (which
renames and transposes, e.g. GPT-2's Conv1D weights) and loaded over the base parameters, so
inference pays nothing for the adapter.
"""

from __future__ import annotations

import glob
import json
import math
import re
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from fluid_app.errors import FluidError, damaged
from fluid_app.model_refs import ADAPTER_WEIGHTS

from .weights import hf_weight_names

PREFIX = "base_model.model."


def fuse_adapter(model: nn.Module, base_dir: Path, adapter_dir: Path, model_type: str | None = None) -> int:
    """Fuse the adapter in ``adapter_dir`` into ``model``; return the number of fused matrices."""
    config = _adapter_config(adapter_dir)
    weights_file = adapter_dir / ADAPTER_WEIGHTS
    if not weights_file.exists():
        raise FluidError(f"{weights_file} not found; save the adapter with PeftModel.save_pretrained")
    lora = _load(weights_file, "re-download or re-export the checkpoint")
    base: dict[str, mx.array] = {}
    for path in glob.glob(str(base_dir / "model*.safetensors")):
        base.update(_load(Path(path), "re-download the base model"))

    modules = sorted({k[len(PREFIX):].rsplit(".lora_A", 1)[0] for k in lora if ".lora_A" in k})
    fused: dict[str, mx.array] = {}
    for module in modules:
        a = lora[f"{PREFIX}{module}.lora_A.weight"].astype(mx.float32)
        b = lora.get(f"{PREFIX}{module}.lora_B.weight")
        name = f"{module}.weight"
        if b is None or name not in base:
            raise FluidError(f"the adapter in {adapter_dir} does not fit the base model ({module}); "
                             "load it with the base model it was trained on")
        delta = (b.astype(mx.float32) @ a) * _scale(config, module, int(a.shape[0]))
        weight = base[name]
        if config.get("fan_in_fan_out"):
            delta = delta.T
        if delta.shape != weight.shape:
            raise FluidError(f"the adapter's {module} has shape {delta.shape}, the base {weight.shape}; "
                             "load it with the base model it was trained on")
        fused[name] = (weight.astype(mx.float32) + delta).astype(weight.dtype)
    # Whole modules trained alongside (peft ``modules_to_save``) replace the base tensors.
    for key, value in lora.items():
        if ".lora_" in key or not key.startswith(PREFIX):
            continue
        name = key[len(PREFIX):].replace(".modules_to_save.default", "")
        if name not in base or base[name].shape != value.shape:
            raise FluidError(f"the adapter replaces {name} with a tensor the MLX backend cannot place "
                             "(resized embeddings?); export a merged checkpoint and load that")
        fused[name] = value.astype(base[name].dtype)
    if not fused:
        raise FluidError(f"{weights_file} holds no LoRA weights; re-save the adapter")
    fused = hf_weight_names(model_type, fused)
    sanitized = model.sanitize(dict(fused)) if hasattr(model, "sanitize") else fused
    params = dict(tree_flatten(model.parameters()))
    unknown = [k for k in sanitized if k not in params]
    if unknown:
        raise FluidError(f"cannot place adapter weights {unknown[:3]} in the MLX model; "
                         "export a merged checkpoint and load that")
    model.load_weights(list(sanitized.items()), strict=False)
    mx.eval(model.parameters())
    return len(modules)


def _load(path: Path, fix: str) -> dict[str, mx.array]:
    """A safetensors file's tensors, or a one-line error for a damaged one (mlx says
    ``RuntimeError`` for a truncated, empty or garbled file)."""
    try:
        return mx.load(str(path))
    except (OSError, ValueError, RuntimeError) as exc:
        raise damaged(path, exc, fix) from None


def _adapter_config(adapter_dir: Path) -> dict[str, Any]:
    path = adapter_dir / "adapter_config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        raise FluidError(f"{path} is missing or not valid JSON; re-save the adapter") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise FluidError(f"{path} is a {config['peft_type']} adapter; only LoRA adapters can be fused")
    return config


def _scale(config: dict[str, Any], module: str, rank: int) -> float:
    """peft's scaling for one module, honouring ``alpha_pattern`` and rsLoRA."""
    alpha = config.get("lora_alpha", 8)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.search(rf"(^|\.){pattern}$", module):
            alpha = value
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
