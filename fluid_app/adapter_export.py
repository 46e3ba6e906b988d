"""``fluid export DIR OUT`` (no ``--merge``): the small, shippable form of a FLUID checkpoint.

Copies what decoding needs besides the base model (``fluid_config.json``, the LoRA adapter,
the K-head), drops what only training needs (optimizer state, logs), can store the adapter
in half precision, and sets the decoding defaults the checkpoint should open with. This is
how the embedded default in ``fluid_app/default_model`` is made from a training run, and
the folder ``fluid push`` uploads.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from .config import CONFIG_FILENAME, FluidConfig
from .errors import FluidError
from .files import atomic_folder
from .sources import ADAPTER_CONFIG, K_HEAD_FILENAME, ModelSpec

ADAPTER_WEIGHTS = "adapter_model.safetensors"
DTYPES = ("float32", "float16")


def export_adapter(spec: ModelSpec, out: str | Path, *, dtype: str = "float32", force: bool = False,
                   overrides: dict[str, Any] | None = None) -> Path:
    """Write ``spec``'s FLUID files to ``out`` (atomically); return ``out``."""
    if spec.fluid is None:
        raise FluidError(f"{spec.label} is not a FLUID checkpoint (no {CONFIG_FILENAME}); nothing to export")
    if dtype not in DTYPES:
        raise FluidError(f"--dtype {dtype} is not supported for an adapter export; use {' or '.join(DTYPES)}")
    config = FluidConfig.load(spec.fluid).with_overrides(**(overrides or {}))
    config.validate()
    with atomic_folder(out, force=force) as tmp:
        if spec.adapter is not None:
            _copy_adapter_config(spec.adapter / ADAPTER_CONFIG, tmp / ADAPTER_CONFIG, config.base_model)
            _copy_tensors(spec.adapter / ADAPTER_WEIGHTS, tmp / ADAPTER_WEIGHTS, dtype)
        if spec.k_head_file is not None:
            shutil.copyfile(spec.k_head_file, tmp / K_HEAD_FILENAME)
        config.save(tmp)
    return Path(out).expanduser().resolve()


def _copy_adapter_config(source: Path, target: Path, base_model: str | None) -> None:
    """peft records the base as the training machine's path; a shipped adapter names it the
    way ``fluid_config.json`` does (a package, Hub id or path the user's machine resolves)."""
    adapter_config = json.loads(source.read_text())
    adapter_config["base_model_name_or_path"] = base_model
    target.write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")


def _copy_tensors(source: Path, target: Path, dtype: str) -> None:
    """Copy a safetensors file, casting floating tensors to ``dtype`` (metadata kept)."""
    import numpy as np
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(str(source), framework="numpy") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    cast = {name: t.astype(np.dtype(dtype)) if np.issubdtype(t.dtype, np.floating) else t
            for name, t in tensors.items()}
    save_file(cast, str(target), metadata=metadata)
