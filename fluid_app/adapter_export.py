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

import numpy as np

from .data import read_conversations
from .draft_store import FILENAME as DRAFT_STORE_FILENAME
from .draft_store import load_draft_store, pack_replies, save_draft_store
from .errors import FluidError, damaged
from .files import atomic_folder, write_json_atomic
from .fluid_config import CONFIG_FILENAME, FluidConfig
from .model_refs import ADAPTER_CONFIG, ADAPTER_WEIGHTS, K_HEAD_FILENAME, ModelSpec

DTYPES = ("float32", "float16")


def export_adapter(spec: ModelSpec, out: str | Path, *, dtype: str = "float32", force: bool = False,
                   overrides: dict[str, Any] | None = None, draft_store: np.ndarray | None = None) -> Path:
    """Write ``spec``'s FLUID files to ``out`` (atomically); return ``out``. ``draft_store``
    (:func:`replies_array`) replaces the checkpoint's own store, which
    is otherwise copied once it has been read whole."""
    if spec.fluid is None:
        raise FluidError(f"{spec.label} is not a FLUID checkpoint (no {CONFIG_FILENAME}); nothing to export")
    if dtype not in DTYPES:
        raise FluidError(f"dtype {dtype} is not supported for an adapter export; use {' or '.join(DTYPES)}", "dtype")
    if spec.adapter is None and spec.fluid == spec.base:
        raise FluidError(f"{spec.label} holds full (merged) weights, not a LoRA adapter; export it with merge "
                         "to write a merged folder", "merge")
    config = FluidConfig.load(spec.fluid).with_overrides(**(overrides or {}))
    config.validate()
    with atomic_folder(out, force=force) as tmp:
        if spec.adapter is not None:
            _copy_adapter_config(spec.adapter / ADAPTER_CONFIG, tmp / ADAPTER_CONFIG, config.base_model)
            _copy_tensors(spec.adapter / ADAPTER_WEIGHTS, tmp / ADAPTER_WEIGHTS, dtype)
        if spec.k_head_file is not None:
            _copy_k_head(spec.k_head_file, tmp / K_HEAD_FILENAME)
        if draft_store is not None:
            save_draft_store(draft_store, tmp / DRAFT_STORE_FILENAME)
        elif spec.draft_store_file is not None:
            load_draft_store(spec.draft_store_file)  # a damaged store is refused, not shipped
            shutil.copyfile(spec.draft_store_file, tmp / DRAFT_STORE_FILENAME)
        config.save(tmp)
    return Path(out).expanduser().resolve()


def replies_array(source: str, tokenizer: Any) -> np.ndarray:
    """The store's array for the assistant turns of a data file (what ``fluid distill`` writes:
    the base model's own replies), tokenised without special tokens as the model emits them."""
    replies = [tokenizer.encode(m["content"], add_special_tokens=False)
               for conversation in read_conversations(source) for m in conversation if m["role"] == "assistant"]
    replies = [r for r in replies if r]
    if not replies:
        raise FluidError(f"{source} has no assistant replies to build a draft store from; pass the chat JSONL "
                         "that `fluid distill` wrote", "draft_store")
    return pack_replies(replies)


def _copy_adapter_config(source: Path, target: Path, base_model: str | None) -> None:
    """peft records the base as the training machine's path; a shipped adapter names it the
    way ``fluid_config.json`` does (a package, Hub id or path the user's machine resolves)."""
    adapter_config = json.loads(source.read_text())
    adapter_config["base_model_name_or_path"] = base_model
    write_json_atomic(target, adapter_config)


def _copy_tensors(source: Path, target: Path, dtype: str) -> None:
    """Copy a safetensors file, casting floating tensors to ``dtype`` (metadata kept)."""
    import numpy as np
    from safetensors.numpy import save_file

    metadata, tensors = _read_tensors(source)
    cast = {name: t.astype(np.dtype(dtype)) if np.issubdtype(t.dtype, np.floating) else t
            for name, t in tensors.items()}
    save_file(cast, str(target), metadata=metadata)


K_HEAD_KEYS = ("proj.weight", "proj.bias", "out.weight", "out.bias")


def _copy_k_head(source: Path, target: Path) -> None:
    """Copy the K-head byte for byte, once it has been read whole: a damaged or foreign file
    is refused here instead of being shipped, to fail later wherever the export is loaded."""
    _, tensors = _read_tensors(source)
    missing = [k for k in K_HEAD_KEYS if k not in tensors]
    if missing:
        raise FluidError(f"{source} is not a FLUID K-head (no {', '.join(missing)}); re-export the checkpoint")
    shutil.copyfile(source, target)


def _read_tensors(source: Path) -> tuple[dict[str, str] | None, dict[str, Any]]:
    """A safetensors file's metadata and tensors, or a one-line error if it is damaged
    (truncated, empty or garbled: safetensors checks the header against the file size).
    bfloat16 tensors (an adapter trained in bfloat16) come back as float32, exactly."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(source), framework="numpy") as handle:
            metadata, names = handle.metadata(), list(handle.keys())
            bfloat16 = {name for name in names if handle.get_slice(name).get_dtype() == "BF16"}
            tensors = {name: handle.get_tensor(name) for name in names if name not in bfloat16}
        if bfloat16:
            tensors.update(_bfloat16_as_float32(source, bfloat16))
        return metadata, {name: tensors[name] for name in names}
    except (SafetensorError, OSError) as exc:
        raise damaged(source, exc) from None


def _bfloat16_as_float32(source: Path, names: set[str]) -> dict[str, Any]:
    """numpy has no bfloat16; its bits are the upper half of the float32 of the same value."""
    import numpy as np
    from safetensors import deserialize

    return {name: (np.frombuffer(view["data"], dtype="<u2").astype(np.uint32) << 16).view(np.float32)
            .reshape(view["shape"]) for name, view in deserialize(source.read_bytes()) if name in names}
