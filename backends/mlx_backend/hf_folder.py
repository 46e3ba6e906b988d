"""Give mlx-lm what it reads: a Hugging Face folder (a GGUF base is converted into one).

* ``.gguf`` bases (the embedded SmolLM2) are converted once into an HF folder under the
  user cache (``$FLUID_CACHE``, else ``$XDG_CACHE_HOME/fluid``, else ``~/.cache/fluid``).
  The conversion goes through transformers' own GGUF reader, which dequantizes with
  PyTorch, so it needs torch once; afterwards the cached folder loads without it. The
  folder is written beside its place and renamed (:func:`fluid_app.files.atomic_folder`),
  so a crash never leaves half of one, and it gets the modes the umask gives.
  The weights are the exact fp32 tensors the PyTorch backend loads from the same file.
* Its ``config.json`` is written portable (:func:`fluid_app.hf_config.portable_config`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from fluid_app.errors import FluidError
from fluid_app.files import atomic_folder, write_json_atomic
from fluid_app.hf_config import portable_config, read_config
from fluid_app.model_refs import ModelSpec


def cache_root() -> Path:
    if os.environ.get("FLUID_CACHE"):
        return Path(os.environ["FLUID_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fluid"


def base_folder(spec: ModelSpec) -> Path:
    """The HF folder holding ``spec``'s base weights (a GGUF is converted and cached once)."""
    if spec.gguf_file is None:
        return spec.base
    stat = spec.base.stat()
    key = hashlib.sha1(f"{spec.base.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_root() / "hf" / f"{spec.base.stem}-{key}"
    if (target / "config.json").exists():
        return target
    _convert_gguf(spec, target)
    return target


def _convert_gguf(spec: ModelSpec, target: Path) -> None:
    try:
        import torch
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise FluidError(
            f"{spec.base.name} is a GGUF file; converting it for MLX needs PyTorch once "
            "(pip install torch), or pass an MLX/HF model folder instead"
        ) from None
    from backends.transformers_io import quiet  # same silencing as the torch loader

    print(f"converting {spec.base.name} for MLX (once) into {target}", flush=True)
    # a folder without config.json there is a broken copy: replace it; otherwise a copy that
    # another process renames into place first wins and ours is dropped
    replace_broken = target.exists() or target.is_symlink()
    try:
        with atomic_folder(target, force=replace_broken) as tmp:
            with quiet():
                tokenizer = AutoTokenizer.from_pretrained(str(spec.base_dir), gguf_file=spec.gguf_file)
                model = AutoModelForCausalLM.from_pretrained(str(spec.base_dir), gguf_file=spec.gguf_file,
                                                             dtype=torch.float32)
                tokenizer.save_pretrained(tmp)
                model.generation_config.save_pretrained(tmp)
                model.config.save_pretrained(tmp)
            # transformers refuses save_pretrained on a GGUF-loaded ("quantized") model, but its
            # weights are plain dequantized tensors: write them directly (tied ones once).
            state = model.state_dict()
            if model.config.get_text_config().tie_word_embeddings:
                state.pop("lm_head.weight", None)
            save_file({k: v.detach().contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"),
                      metadata={"format": "pt"})
            write_json_atomic(tmp / "config.json", portable_config(read_config(tmp)))  # both rope keys on disk
    except FluidError:
        if not (target / "config.json").exists():  # else another process finished first: keep its copy
            raise
    except (OSError, ValueError, KeyError) as exc:
        raise FluidError(f"cannot convert {spec.base} for MLX: {exc}; check the file or use the torch backend",
                         "backend") from None
