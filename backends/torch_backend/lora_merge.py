"""Fuse a plain peft LoRA adapter into float32 ``nn.Linear`` weights without peft.

Why: ``PeftModel.from_pretrained(...).merge_and_unload()`` first wraps every target layer
in a LoRA module (initialising matrices it then overwrites), loads the adapter into them,
and only then merges and unwraps: on a 2-core CPU that was seconds of every start of the
embedded default, for what is one small matmul per layer. Here the merge is done directly
with peft's own arithmetic, in its order (``W += (B @ A) * scaling`` in float32, ``scaling =
lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA), so the fused weights are bitwise the ones
peft gives (``tests/test_conversion_cache.py`` checks it on the embedded default).

Only the plain case is taken: LoRA on ``nn.Linear`` layers of a float32 model, no per-module
rank or alpha patterns, no DoRA or other variants, no LoRA bias, no extra trained modules or
tokens. Anything else returns ``False`` and the caller merges through peft as before.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from fluid_app.errors import FluidError, damaged
from fluid_app.model_refs import ADAPTER_CONFIG, ADAPTER_WEIGHTS

PREFIX = "base_model.model."
# adapter_config.json fields the plain merge understands; any other field that is set (DoRA,
# LoRA bias, modules_to_save, rank or alpha patterns, newer variants) sends the merge to peft
PLAIN_FIELDS = frozenset({
    "peft_type", "task_type", "r", "lora_alpha", "use_rslora", "lora_dropout", "target_modules", "exclude_modules",
    "layers_to_transform", "layers_pattern", "base_model_name_or_path", "revision", "inference_mode",
    "init_lora_weights", "auto_mapping", "peft_version", "bias", "loftq_config", "eva_config", "corda_config",
    "lora_ga_config", "megatron_config", "megatron_core", "qalora_group_size",
})


def is_plain_lora(adapter_dir: Path) -> bool:
    """Whether :func:`merge_plain_lora` can merge the adapter in ``adapter_dir`` (judged from its
    config and tensor names, before any model is loaded; an unreadable file says False)."""
    try:
        return _plain(adapter_dir) is not None
    except FluidError:
        return False


def _plain(adapter_dir: Path) -> tuple[int, float, dict[str, tuple[str, str]]] | None:
    """``(rank, scaling, {module: (A's tensor name, B's)})`` of a plain LoRA adapter, else None:
    read from its config and the weights file's header, no tensor loaded."""
    try:
        config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # peft reports it in its own words
    if not isinstance(config, dict) or any(value for name, value in config.items() if name not in PLAIN_FIELDS):
        return None
    if config.get("peft_type", "LORA") != "LORA" or config.get("bias", "none") != "none" \
            or not isinstance(config.get("r"), int) or config["r"] <= 0:
        return None
    rank, alpha = config["r"], config.get("lora_alpha", 8)
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    names = _tensor_names(adapter_dir / ADAPTER_WEIGHTS)
    if names is None:
        return None
    pairs: dict[str, tuple[str, str]] = {}
    for key in names:
        module, sep, kind = key.removeprefix(PREFIX).rpartition(".lora_")
        if not key.startswith(PREFIX) or not sep or kind not in ("A.weight", "B.weight"):
            return None  # something besides LoRA matrices: leave it to peft
        pairs[module] = (f"{PREFIX}{module}.lora_A.weight", f"{PREFIX}{module}.lora_B.weight")
    if any(a not in names or b not in names for a, b in pairs.values()):
        return None
    return (rank, scaling, pairs) if pairs else None


def read_plain_lora(adapter_dir: Path) -> tuple[int, float, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """``(rank, scaling, {module: (A, B)})`` of the plain LoRA adapter in ``adapter_dir``, the
    module names in the base model's key space; a one-line :class:`FluidError` for any other kind
    of adapter. Training reads a finished adapter through here to start from it."""
    plain = _plain(adapter_dir)
    if plain is None:
        raise FluidError(f"{adapter_dir} holds no plain LoRA adapter (LoRA matrices only, no DoRA, bias, "
                         "patterns or extra trained modules); start from a FLUID LoRA checkpoint")
    return _with_tensors(adapter_dir, plain)


def _with_tensors(adapter_dir: Path, plain: tuple[int, float, dict[str, tuple[str, str]]]
                  ) -> tuple[int, float, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """:func:`_plain`'s answer with each module's tensor names replaced by the tensors."""
    rank, scaling, names = plain
    lora = _read(adapter_dir / ADAPTER_WEIGHTS)
    return rank, scaling, {module: (lora[a], lora[b]) for module, (a, b) in names.items()}


def merge_plain_lora(model: nn.Module, adapter_dir: Path) -> bool:
    """Fuse the adapter in ``adapter_dir`` into ``model`` in place; False if it is not plain.

    Raises :class:`FluidError` for an unreadable adapter file or one shaped for another base.
    """
    plain = _plain(adapter_dir)
    if plain is None:
        return False
    rank, scaling, pairs = _with_tensors(adapter_dir, plain)
    layers = dict(model.named_modules())
    targets = [layers.get(module) for module in pairs]
    if any(type(layer) is not nn.Linear or layer.weight.dtype != torch.float32 for layer in targets):
        return False
    for (module, (a, b)), layer in zip(pairs.items(), targets):  # every shape first: no half-merged model
        if a.shape[0] != rank or b.shape[1] != rank or (b.shape[0], a.shape[1]) != tuple(layer.weight.shape):
            raise FluidError(f"the adapter in {adapter_dir} does not fit this base model ({module}: "
                             f"{tuple(b.shape)} x {tuple(a.shape)} for a {tuple(layer.weight.shape)} weight); "
                             "load it with the base model it was trained on")
    with torch.no_grad():
        for (a, b), layer in zip(pairs.values(), targets):
            device = layer.weight.device
            layer.weight.data += (b.to(device, torch.float32) @ a.to(device, torch.float32)) * scaling
    return True


def _tensor_names(path: Path) -> set[str] | None:
    """The tensor names in a safetensors file's header; None when there is no file."""
    from safetensors import SafetensorError, safe_open

    if not path.exists():
        return None  # peft names what is missing
    try:
        with safe_open(str(path), framework="pt") as weights:
            return set(weights.keys())
    except (SafetensorError, OSError) as exc:
        raise damaged(path, exc) from None


def _read(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise damaged(path, exc) from None
