"""Checkpoints: the FLUID export a user loads, and the training state ``--resume`` needs.

Both are written into a hidden temporary folder and then renamed into place, so a crash or
a failed run never leaves a half-written checkpoint: a folder either has its
``fluid_config.json`` / ``trainer_state.json`` (written last) or is not a checkpoint, and
the temporary folders a killed run leaves are cleared by the next run on the same ``--out``
(:func:`clear_stale_temps`). State dicts go through ``torch.distributed.checkpoint.state_dict``
so plain, DDP and FSDP2 models are saved the same way (full tensors, gathered on the CPU).

Nothing here is pickled: weights are safetensors, the optimizer, scheduler and RNG states
are safetensors plus JSON (:mod:`.state_files`), so ``--resume`` cannot run code a crafted
checkpoint carries. Folders written by older versions (``optimizer.pt``, ``rng-rank*.pt``)
are refused with a one-line error, never opened.

safetensors writes through an owner-only (0600) temporary file; every folder is given the
modes ``mkdir``/``open`` would (:func:`fluid_app.files.public_modes`) before it is published.
"""

from __future__ import annotations

import json
import os
import random
import re
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from fluid_app.errors import FluidError
from fluid_app.files import public_modes, remove_path, write_json_atomic
from fluid_app.fluid_config import CONFIG_FILENAME, FluidConfig

from .distributed import Dist
from .model import causal_lm
from .state_files import load_state, save_state, save_tensors, state_files

STATE_FILE = "trainer_state.json"
CHECKPOINTS = "checkpoints"
WEIGHTS_FILE = "trainable.safetensors"
OPTIMIZER_STATE = "optimizer"  # optimizer + scheduler: optimizer.safetensors, optimizer.json
PICKLED = ("optimizer.pt", "rng-rank*.pt")  # what older versions wrote; never unpickled
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
_FINAL_TEMP = re.compile(r"\.{1,2}final\.tmp-\d+")  # "..final.tmp-<pid>": the name older versions used
_STEP_TEMP = re.compile(r"\.step-\d+\.tmp")


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full (gathered) tensors of the trainable parameters, keyed by name. Collective under FSDP."""
    names = {name for name, p in module.named_parameters() if p.requires_grad}
    state = get_model_state_dict(module, options=_FULL)
    return {k: v.detach().contiguous() for k, v in state.items() if k in names}


def final_temp_dir(out: Path) -> Path:
    """An empty ``out/.final.tmp-<pid>`` to build the final checkpoint in before :func:`publish`."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".final.tmp-{os.getpid()}"
    remove_path(tmp)
    tmp.mkdir()
    return tmp


def publish(tmp: Path, target: Path, last: str) -> None:
    """Move a finished temp folder into ``target`` with ordinary modes; the ``last`` file arrives last."""
    public_modes(tmp)
    if not target.exists():
        os.replace(tmp, target)
        return
    remove_path(target / last)
    for item in sorted(tmp.iterdir(), key=lambda p: p.name == last):
        destination = target / item.name
        if destination.is_dir() and not destination.is_symlink():
            remove_path(destination)
        os.replace(item, destination)
    tmp.rmdir()


def clear_stale_temps(out: Path) -> None:
    """Remove what a killed run on ``out`` left half-written: its ``.final.tmp-<pid>`` folders,
    ``checkpoints/.step-N.tmp`` folders and step folders without ``trainer_state.json``. A run
    owns its ``--out``: call this on the main rank before training starts."""
    checkpoints = out / CHECKPOINTS
    stale = [p for p in _children(out) if _FINAL_TEMP.fullmatch(p.name)]
    stale += [p for p in _children(checkpoints) if _STEP_TEMP.fullmatch(p.name)
              or p.name.startswith("step-") and not (p / STATE_FILE).exists()]
    for path in stale:
        remove_path(path)


def _children(folder: Path) -> list[Path]:
    return list(folder.iterdir()) if folder.is_dir() else []


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
        remove_path(tmp)
        tmp.mkdir(parents=True)
        save_tensors(weights, tmp / WEIGHTS_FILE)
        if export is not None:
            export(tmp, weights)
        save_state(tmp, OPTIMIZER_STATE, {"optimizer": optim, "scheduler": scheduler.state_dict()})
    env.barrier()
    save_state(tmp, _rng_name(env.rank), _rng_state())
    env.barrier()
    if env.is_main:
        public_modes(tmp)
        write_json_atomic(tmp / STATE_FILE, state)
        remove_path(target)
        os.replace(tmp, target)
    env.barrier()


def is_training_state(name: str) -> bool:
    """Whether a file of a step folder is resumable state (not part of the FLUID export in it)."""
    stems = (Path(STATE_FILE).stem, Path(WEIGHTS_FILE).stem, OPTIMIZER_STATE)
    return Path(name).stem in stems or name.startswith("rng-rank") or any(fnmatch(name, p) for p in PICKLED)


def finished_steps(checkpoints: Path) -> list[Path]:
    """Step folders whose ``trainer_state.json`` was written (complete ones), oldest first."""
    return sorted(p for p in checkpoints.glob("step-*") if (p / STATE_FILE).exists()) \
        if checkpoints.is_dir() else []


def holds_run(out: Path) -> bool:
    """Whether ``out`` has a finished export or a resumable checkpoint (half-written ones do not count)."""
    return (out / CONFIG_FILENAME).exists() or bool(finished_steps(out / CHECKPOINTS))


def find_resume_dir(resume: str, out: Path) -> Path | None:
    """``--resume`` (no value: the latest step in ``--out``), a step folder, or a run folder.

    ``None`` when resuming ``--out`` that holds nothing finished (a run killed before its
    first checkpoint): the run then starts from step 0.
    """
    folder = out if resume == "auto" else Path(resume).expanduser()
    if (folder / STATE_FILE).exists():
        return _checked(folder)
    steps = finished_steps(folder / CHECKPOINTS)
    if steps:
        return _checked(steps[-1])
    if folder.resolve() == out.resolve() and not holds_run(out):
        return None
    raise FluidError(f"no training checkpoint to resume in {folder}; start afresh (no resume) or resume a "
                     "folder written with save_every", "resume", "save_every")


def _checked(folder: Path) -> Path:
    """Refuse a checkpoint holding pickles (older versions' format, or a planted file) before
    anything in it is read."""
    pickled = sorted(p.name for pattern in PICKLED for p in folder.glob(pattern))
    if pickled:
        raise FluidError(f"{folder} holds pickled training state ({', '.join(pickled)}), which resuming does not "
                         "load because unpickling can run code; resume from a checkpoint written by this version "
                         "or start again in another output folder", "resume", "out")
    return folder


def read_training_state(folder: Path) -> dict[str, Any]:
    try:
        state = json.loads((folder / STATE_FILE).read_text())
        if isinstance(state, dict) and isinstance(state.get("step"), int) and isinstance(state.get("options"), dict):
            return state
    except (OSError, ValueError):
        pass
    raise FluidError(f"{folder / STATE_FILE} is damaged; resume from another checkpoint folder")


def load_training_state(folder: Path, env: Dist, module: torch.nn.Module, optimizer, scheduler) -> None:
    try:
        weights = load_file(str(folder / WEIGHTS_FILE))
    except (OSError, SafetensorError) as exc:
        raise FluidError(f"{folder / WEIGHTS_FILE} is missing or damaged ({type(exc).__name__}); "
                         "resume from another checkpoint folder") from None
    saved = load_state(folder, OPTIMIZER_STATE)
    if not isinstance(saved, dict) or not {"optimizer", "scheduler"} <= set(saved):
        raise FluidError(f"{folder} has no optimizer and scheduler state; resume from another checkpoint folder")
    set_model_state_dict(module, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    set_optimizer_state_dict(module, optimizer, saved["optimizer"], options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(saved["scheduler"])
    if (folder / state_files(_rng_name(env.rank))[1]).exists():
        _set_rng_state(load_state(folder, _rng_name(env.rank)))


def prune(checkpoints: Path, keep: int) -> None:
    """Keep the newest ``keep`` step folders (0 keeps all)."""
    if keep <= 0:
        return
    for old in finished_steps(checkpoints)[:-keep]:
        remove_path(old)


def _rng_name(rank: int) -> str:
    return f"rng-rank{rank}"


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
