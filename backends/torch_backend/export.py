"""``fluid export --merge``: a FLUID checkpoint -> one self-contained Hugging Face folder.

The LoRA adapter (if any) is merged into the base weights (peft ``merge_and_unload``, done by
the loader), and the folder gets everything needed to decode without the base model:
``model.safetensors`` + ``config.json`` (portable, see :mod:`fluid_app.hf_config`), the
tokenizer (including an added MASK token), ``fluid_config.json`` with ``base_model`` unset,
and ``k_head.safetensors``. The result loads in plain transformers and in mlx-lm.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

from fluid_app.errors import FluidError
from fluid_app.files import atomic_folder
from fluid_app.hf_config import fix_config_file
from fluid_app.model_refs import K_HEAD_FILENAME, ModelSpec

from .loader import load


def save_merged(backend, folder: Path, *, source_label: str, k_head_file: Path | None = None) -> None:
    """Write a loaded :class:`TorchBackend` (weights already merged) into ``folder``."""
    _forget_gguf_origin(backend.model)
    backend.model.save_pretrained(str(folder))
    backend.tokenizer.save_pretrained(str(folder))
    fix_config_file(folder)
    config = backend.fluid_config
    extra = dict(config.extra)
    extra.setdefault("exported_from", source_label)
    extra.setdefault("original_base_model", config.base_model)
    # self-contained: the weights are in this folder, so no base model is needed any more
    replace(config, base_model=None, extra=extra).save(folder)
    if k_head_file is not None:
        shutil.copyfile(k_head_file, folder / K_HEAD_FILENAME)
    elif backend.k_head is not None:
        from .k_head import save_k_head

        save_k_head(backend.k_head, folder / K_HEAD_FILENAME)


def _forget_gguf_origin(model) -> None:
    """A model read from a GGUF file is already dequantized to plain tensors, but transformers
    keeps a GGUF "quantizer" that refuses to save; drop it and its quantization_config."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is not None and str(getattr(method, "value", method)).lower() == "gguf":
        model.hf_quantizer = None
        if hasattr(model, "is_quantized"):
            model.is_quantized = False
        for config in (model.config, model.config.get_text_config()):
            if hasattr(config, "quantization_config"):
                delattr(config, "quantization_config")


def export_merged(spec: ModelSpec, out: str | Path, *, dtype: str = "float32", force: bool = False) -> Path:
    """Export ``spec`` as a merged, self-contained folder at ``out`` (atomic); return ``out``."""
    if spec.fluid is None and spec.adapter is None:
        raise FluidError(
            f"{spec.label} is not a FLUID checkpoint (no fluid_config.json); there is nothing to merge"
        )
    with atomic_folder(out, force=force) as tmp:
        backend = load(spec, device="cpu", dtype=dtype, k_head=True, pack=False)
        save_merged(backend, tmp, source_label=spec.label, k_head_file=spec.k_head_file)
    return Path(out).expanduser().resolve()
