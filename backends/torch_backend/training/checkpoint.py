"""Checkpoints: the FLUID export a user loads, and the training state ``--resume`` needs.

Both are written into a hidden temporary folder and then renamed into place, so a crash or
a failed run never leaves a half-written checkpoint: a folder either has its
``fluid_config.json`` / ``trainer_state.json`` (written last) or is not a checkpoint.
State dicts go through ``torch.distributed.checkpoint.state_dict`` so plain, DDP and FSDP2
models are saved the same way (full tensors, gathered on the CPU).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from fluid_app.config import CONFIG_FILENAME, FluidConfig
from fluid_app.errors import FluidError
from fluid_app.files import write_text_atomic

from .distributed import Dist
from .model import causal_lm

STATE_FILE = "trainer_state.json"
CHECKPOINTS = "checkpoints"
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full (gathered) tensors of the trainable parameters, keyed by name. Collective under FSDP."""
    names = {name for name, p in module.named_parameters() if p.requires_grad}
    state = get_model_state_dict(module, options=_FULL)
    return {k: v.detach().contiguous() for k, v in state.items() if k in names}


def new_temp_dir(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def publish(tmp: Path, target: Path, last: str) -> None:
    """Move a finished temp folder into ``target``; the ``last`` file arrives last."""
    if not target.exists():
        os.replace(tmp, target)
        return
    marker = target / last
    if marker.exists():
        marker.unlink()
    for item in sorted(tmp.iterdir(), key=lambda p: p.name == last):
        destination = target / item.name
        if destination.is_dir() and not destination.is_symlink():
            shutil.rmtree(destination)
        os.replace(item, destination)
    tmp.rmdir()


def export_fluid(folder: Path, model: Any, tokenizer: Any, state: dict[str, torch.Tensor],
                 config: FluidConfig, *, full: bool) -> None:
    """Write a loadable FLUID checkpoint (adapter or full weights, then fluid_config.json)."""
    state = {k.removeprefix("model."): v for k, v in state.items()}
    if full:
        causal_lm(model).save_pretrained(folder, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(folder)
    else:
        model.save_pretrained(folder, state_dict=state, safe_serialization=True)
    config.save(folder)


def save_training_state(target: Path, env: Dist, module: torch.nn.Module, optimizer, scheduler,
                        state: dict[str, Any], export=None) -> None:
    """Everything an exact resume needs: trainable weights, optimizer, scheduler, RNG per rank.
    ``export(folder, weights)`` may add a loadable FLUID checkpoint to the same folder."""
    weights = trainable_state(module)
    optim = get_optimizer_state_dict(module, optimizer, options=_FULL)
    tmp = target.parent / f".{target.name}.tmp"
    if env.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        save_file(weights, str(tmp / "trainable.safetensors"))
        if export is not None:
            export(tmp, weights)
        torch.save({"optimizer": optim, "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
    env.barrier()
    torch.save(_rng_state(), tmp / f"rng-rank{env.rank}.pt")
    env.barrier()
    if env.is_main:
        write_text_atomic(tmp / STATE_FILE, json.dumps(state, indent=2, sort_keys=True) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    env.barrier()


def find_resume_dir(resume: str, out: Path) -> Path:
    """``--resume`` (no value: the latest step in ``--out``), a step folder, or a run folder."""
    folder = out if resume == "auto" else Path(resume).expanduser()
    if (folder / STATE_FILE).exists():
        return folder
    steps = sorted((folder / CHECKPOINTS).glob("step-*")) if (folder / CHECKPOINTS).is_dir() else []
    steps = [s for s in steps if (s / STATE_FILE).exists()]
    if not steps:
        raise FluidError(f"no training checkpoint to resume in {folder}; run without --resume or pass a "
                         "folder written with --save-every")
    return steps[-1]


def read_training_state(folder: Path) -> dict[str, Any]:
    return json.loads((folder / STATE_FILE).read_text())


def load_training_state(folder: Path, env: Dist, module: torch.nn.Module, optimizer, scheduler) -> None:
    weights = load_file(str(folder / "trainable.safetensors"))
    set_model_state_dict(module, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    saved = torch.load(folder / "optimizer.pt", weights_only=False)
    set_optimizer_state_dict(module, optimizer, saved["optimizer"], options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(saved["scheduler"])
    rng_file = folder / f"rng-rank{env.rank}.pt"
    if rng_file.exists():
        _set_rng_state(torch.load(rng_file, weights_only=False))


def prune(checkpoints: Path, keep: int) -> None:
    """Keep the newest ``keep`` step folders (0 keeps all)."""
    if keep <= 0 or not checkpoints.is_dir():
        return
    steps = sorted(p for p in checkpoints.glob("step-*") if (p / STATE_FILE).exists())
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def is_checkpoint(folder: Path) -> bool:
    return (folder / CONFIG_FILENAME).exists()
