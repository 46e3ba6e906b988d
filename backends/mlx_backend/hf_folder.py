"""Give mlx-lm what it reads: a Hugging Face folder with a config it interprets correctly.

Two jobs:

* ``.gguf`` bases (the embedded SmolLM2) are converted once into an HF folder under the
  user cache (``$FLUID_CACHE``, else ``$XDG_CACHE_HOME/fluid``, else ``~/.cache/fluid``).
  The conversion goes through transformers' own GGUF reader, which dequantizes with
  PyTorch, so it needs torch once; afterwards the cached folder loads without it. The
  folder is written in a temp directory and renamed, so a crash never leaves half of one.
  The weights are the exact fp32 tensors the PyTorch backend loads from the same file.
* Config fixes: transformers 5 saves ``rope_parameters: {rope_theta, rope_type, ...}``
  while several mlx-lm families read only a top-level ``rope_theta`` (else 10000) and then
  silently decode garbage. :func:`patched_config` lifts those keys to the top level.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from fluid_app.errors import FluidError
from fluid_app.sources import ModelSpec


def cache_root() -> Path:
    if os.environ.get("FLUID_CACHE"):
        return Path(os.environ["FLUID_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fluid"


def patched_config(config: dict[str, Any]) -> dict[str, Any]:
    """Copy of an HF config with ``rope_theta`` / ``rope_scaling`` also at the top level
    (and GPT-2's ``n_ctx``), so mlx-lm builds the model the config describes."""
    config = dict(config)
    if config.get("model_type") == "gpt2" and "n_ctx" not in config and "n_positions" in config:
        config["n_ctx"] = config["n_positions"]  # transformers 5 no longer saves it; mlx-lm needs it
    for holder in (config, config.get("text_config") or {}):
        rope = holder.get("rope_parameters")
        if not isinstance(rope, dict):
            continue
        if "rope_theta" in rope and holder.get("rope_theta") is None:
            holder["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default" and not holder.get("rope_scaling"):
            holder["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    return config


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FluidError(f"{path} not found; pass a Hugging Face model folder") from None
    except json.JSONDecodeError as exc:
        raise FluidError(f"{path} is not valid JSON ({exc.msg}); re-download or re-export the model") from None


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


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
    from backends.torch_backend.loader import _quiet  # same silencing as the torch loader

    print(f"converting {spec.base.name} for MLX (once) into {target}", flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        with _quiet():
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
        config = patched_config(read_config(tmp))  # both rope keys on disk
        config.pop("quantization_config", None)
        write_json(tmp / "config.json", config)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first; keep its copy
            if not (target / "config.json").exists():
                raise
    except (OSError, ValueError, KeyError) as exc:
        raise FluidError(f"cannot convert {spec.base} for MLX: {exc}; check the file or use --backend torch") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
