"""``fluid convert SRC OUT --to mlx``: write an mlx-lm model folder plus the FLUID files.

SRC is anything ``--model`` accepts (a merged FLUID export, an adapter checkpoint whose
LoRA gets fused, ``default``, a GGUF file, an HF folder). OUT is a plain mlx-lm folder
(``config.json``, ``model.safetensors``, tokenizer) that ``mlx_lm.load`` reads, optionally
quantized with mlx-lm's own ``quantize_model``, next to ``fluid_config.json`` (MASK token
resolved) and ``k_head.safetensors``, so ``fluid generate --backend mlx --model OUT`` works.
Everything is written in a temp folder beside OUT and renamed at the end
(:func:`fluid_app.files.atomic_folder`): a failed run leaves no half-written checkpoint, and
OUT gets the modes the umask gives, like any folder the user makes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from mlx_lm.utils import quantize_model, save_config, save_model

from fluid_app.errors import FluidError
from fluid_app.files import atomic_folder
from fluid_app.hf_config import portable_config
from fluid_app.model_refs import K_HEAD_FILENAME, resolve_model

from .loader import load

QUANT_BITS = (4, 8)


def convert_to_mlx(source: str, out: str | Path, *, quantize: int | None = None, group_size: int = 32,
                   dtype: str = "auto") -> Path:
    """Convert ``source`` into the MLX folder ``out``; return ``out``."""
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):  # checked before the slow load
        raise FluidError(f"{out} already exists and is not empty; pass a new output folder")
    if quantize is not None and quantize not in QUANT_BITS:
        raise FluidError(f"quantize takes 4 or 8 bits (got {quantize})", "quantize")
    spec = resolve_model(source)
    backend = load(spec, dtype=dtype, k_head=False, lean_tokenizer=False)  # its tokenizer is saved
    config = dict(backend.config)
    if "quantization" in config and quantize is not None:
        raise FluidError(f"{source} is already quantized; convert an unquantized model")
    config = portable_config(config)
    model = backend.model
    if quantize is not None:
        print(f"quantizing to {quantize} bits (group size {group_size})", flush=True)
        model, config = quantize_model(model, config, group_size=group_size, bits=quantize)

    print(f"writing {out}", flush=True)
    with atomic_folder(out) as tmp:
        save_model(tmp, model)
        save_config(config, tmp / "config.json")
        backend.tokenizer.save_pretrained(str(tmp))
        if backend.folder is not None and (backend.folder / "generation_config.json").exists():
            shutil.copy(backend.folder / "generation_config.json", tmp)
        fluid = backend.fluid_config
        extra = dict(fluid.extra, converted_from=str(source), mlx_quantization=quantize)
        fluid.with_overrides(base_model=fluid.base_model or str(source), extra=extra).save(tmp)
        if spec.k_head_file is not None:
            shutil.copy(spec.k_head_file, tmp / K_HEAD_FILENAME)
    return out
