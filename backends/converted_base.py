"""The base folder both backends load: a GGUF base is converted once into a cached HF folder.

transformers reads a ``.gguf`` file by parsing its metadata in Python and dequantizing every
tensor, three times per load (tokenizer, config, weights): seconds on every start, and mlx-lm
cannot read it at all. So the first load writes what transformers made of it, once, as a
plain Hugging Face folder (``model.safetensors`` in float32, ``config.json`` portable to
both backends, ``generation_config.json``, ``tokenizer.json`` and its config) through
:func:`fluid_app.conversion_cache.converted_copy`, which owns where it goes, its key
(sha256 + converter version), atomicity and damage checks. Both backends then read that
folder: the weights are the exact float32 tensors transformers dequantizes from the file,
so outputs are identical to loading the GGUF directly (``tests/test_conversion_cache.py``).
"""

from __future__ import annotations

from pathlib import Path

from fluid_app.conversion_cache import converted_copy
from fluid_app.errors import FluidError, first_line
from fluid_app.files import write_json_atomic
from fluid_app.hf_config import portable_config, read_config
from fluid_app.model_refs import ModelSpec

from .transformers_io import quiet


def base_folder(spec: ModelSpec) -> Path:
    """The Hugging Face folder holding ``spec``'s base (a GGUF file: its cached conversion)."""
    if spec.gguf_file is None:
        return spec.base
    return converted_copy(spec.base, lambda folder: write_converted(spec.base, folder),
                          what="to safetensors (PyTorch and MLX read it)")


def write_converted(gguf: Path, folder: Path) -> None:
    """Write the HF folder transformers makes of the ``gguf`` file into ``folder``."""
    try:
        import torch
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise FluidError(f"{gguf.name} is a GGUF file; converting it needs PyTorch once (pip install torch), "
                         "or pass a Hugging Face or MLX model folder instead") from None
    try:
        with quiet(progress=True):
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
            tokenizer.save_pretrained(str(folder))
            model.generation_config.save_pretrained(str(folder))
            model.config.save_pretrained(str(folder))
        # transformers refuses save_pretrained on a GGUF-loaded ("quantized") model, but its
        # weights are plain dequantized tensors: write them directly (tied ones once).
        state = model.state_dict()
        if model.config.get_text_config().tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file({k: v.detach().contiguous() for k, v in state.items()}, str(folder / "model.safetensors"),
                  metadata={"format": "pt"})
        write_json_atomic(folder / "config.json", portable_config(read_config(folder)))  # both rope keys on disk
    except (OSError, ValueError, KeyError, RuntimeError, EOFError) as exc:
        raise FluidError(f"cannot convert {gguf}: {first_line(exc)}; check the file (re-download it)",
                         "model") from None
