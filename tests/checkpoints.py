"""FLUID checkpoints made the way training writes them, for export and Hub tests.

An adapter checkpoint is a peft LoRA (non-zero: ``init_lora_weights=False``) saved with
``save_pretrained``, a ``fluid_config.json`` naming the base folder and the MASK id, and a
random K-head, so that merging, pushing and pulling all have something real to carry.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from backends.torch_backend.k_head import KHead, save_k_head
from fluid_app.fluid_config import FluidConfig


def make_adapter_checkpoint(base: Path, ckpt: Path, seed: int = 1, k_max: int = 8) -> Path:
    """Save a LoRA adapter checkpoint for the model in ``base`` into ``ckpt``."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    peft_model = get_peft_model(model, lora)
    ckpt.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(ckpt))
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    mask = tokenizer.convert_tokens_to_ids("<|unused|>")
    FluidConfig(base_model=str(base), mask_token_id=int(mask), k_min=2, k_max=k_max,
                extra={"recipe": {"stage": "stage1", "lora_r": 4, "steps": 0}}).save(ckpt)
    save_k_head(KHead(model.config.hidden_size, k_max), ckpt / "k_head.safetensors")
    return ckpt


def with_rope_theta(base: Path, out: Path, theta: float) -> Path:
    """Copy a tiny model folder, giving it a non-default rope theta (only in rope_parameters,
    as transformers 5 saves it)."""
    shutil.copytree(base, out)
    config = json.loads((out / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    config.pop("rope_theta", None)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
