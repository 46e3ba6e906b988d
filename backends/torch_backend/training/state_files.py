"""Training state (optimizer, scheduler, RNG) on disk without pickle.

``torch.save`` / ``torch.load(weights_only=False)`` would let a crafted checkpoint run any
code on ``--resume``. Here a state (nested dicts, lists, tuples, numbers, strings, tensors,
numpy arrays) becomes two files: ``NAME.safetensors`` with its tensors and ``NAME.json``
with everything else, each tensor replaced by a reference into the safetensors file.
Reading them back parses JSON and safetensors only, and gives back the same structure,
tuples and key order included, and bit-identical tensors, which an exact resume needs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fluid_app.errors import FluidError
from fluid_app.files import atomic_file, write_text_atomic

FORMAT = 1
_TENSOR, _ARRAY, _TUPLE, _PAIRS = "__tensor__", "__ndarray__", "__tuple__", "__pairs__"
_TAGS = {_TENSOR, _ARRAY, _TUPLE, _PAIRS}


def state_files(name: str) -> tuple[str, str]:
    """The two file names of state ``name``."""
    return f"{name}.safetensors", f"{name}.json"


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A safetensors file, written atomically with an ordinary mode (see fluid_app.files)."""
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp))


def save_state(folder: Path, name: str, state: Any) -> None:
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(state, tensors)
    tensor_file, json_file = state_files(name)
    save_tensors(tensors, folder / tensor_file)
    # not write_json_atomic: its sorted keys would reorder the state's dicts
    write_text_atomic(folder / json_file, json.dumps({"format": FORMAT, "state": structure}) + "\n")


def load_state(folder: Path, name: str) -> Any:
    """Read state ``name``; a missing or damaged file is a one-line :class:`FluidError`."""
    tensor_file, json_file = state_files(name)
    try:
        data = json.loads((folder / json_file).read_text())
        tensors = load_file(str(folder / tensor_file))
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError("unknown format")
        return _decode(data["state"], tensors)
    except (OSError, ValueError, KeyError, TypeError, IndexError, RecursionError, SafetensorError) as exc:
        raise FluidError(f"{folder / json_file} or {tensor_file} is missing or damaged ({type(exc).__name__}); "
                         "resume from another checkpoint folder") from None


def _encode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = value.detach().contiguous()
        return {_TENSOR: key}
    if isinstance(value, np.ndarray) and not value.dtype.hasobject:
        key = str(len(tensors))  # raw bytes: safetensors has no uint32, numpy's RNG state is one
        tensors[key] = torch.from_numpy(np.frombuffer(np.ascontiguousarray(value).tobytes(), dtype=np.uint8).copy())
        return {_ARRAY: key, "dtype": value.dtype.str, "shape": list(value.shape)}
    if isinstance(value, np.generic):
        return _encode(value.item(), tensors)
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and not _TAGS & set(value):
            return {k: _encode(v, tensors) for k, v in value.items()}
        return {_PAIRS: [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"a training state cannot hold a {type(value).__name__}")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if _TENSOR in value:
        return tensors[value[_TENSOR]]
    if _ARRAY in value:
        raw = tensors[value[_ARRAY]].numpy().tobytes()
        return np.frombuffer(raw, dtype=np.dtype(value["dtype"])).reshape(value["shape"]).copy()
    if _TUPLE in value:
        return tuple(_decode(v, tensors) for v in value[_TUPLE])
    if _PAIRS in value:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value[_PAIRS]}
    return {k: _decode(v, tensors) for k, v in value.items()}
