"""What both backends read from a Hugging Face model folder, read one way.

transformers (torch backend) and mlx-lm (MLX backend) load the same ``config.json``,
``generation_config.json`` and tokenizer; the facts FLUID needs from them are derived here
once, so that the two backends cannot drift apart:

* **dtype names** users may type, and their canonical spelling;
* **context length**, **hidden size** and **EOS ids** (config, generation config, tokenizer);
* **the MASK token** (FLUID_METHOD.md section 2): the checkpoint's own, else an unused
  special token of the tokenizer (registered as special, not bos/eos/pad/unk, not written in
  the chat template; the last such id wins, since tokenizers list the tokens they use first),
  else a new ``<|fluid_mask|>`` for a backend that can add embedding rows;
* **portable configs**: transformers 5 saves ``rope_parameters: {rope_theta, ...}`` while
  mlx-lm 0.32 reads only a top-level ``rope_theta`` (else 10000) and then silently decodes
  garbage, so every config we write carries both; a model dequantized from a GGUF file drops
  the GGUF ``quantization_config`` (its saved weights are plain tensors). mlx-lm also needs
  ``rope_scaling`` for scaled rope types and GPT-2's ``n_ctx``: those go only to mlx-lm, in
  memory, since transformers would let a written ``rope_scaling`` override ``rope_parameters``.

Pure JSON and tokenizer logic: no torch, no mlx.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Iterable

from .errors import FluidError
from .files import write_json_atomic

DTYPES = ("float32", "bfloat16", "float16")
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DEFAULT_CONTEXT = 2048  # for configs that state no context length
NEW_MASK_TOKEN = "<|fluid_mask|>"


def dtype_name(name: str) -> str:
    """The canonical dtype name (``float32``, ``bfloat16``, ``float16``) or ``auto``."""
    name = _DTYPE_ALIASES.get(name, name)
    if name != "auto" and name not in DTYPES:
        raise FluidError(f"unknown dtype {name!r}; use one of auto, {', '.join(DTYPES)}", "dtype")
    return name


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's part of a config (multimodal configs nest it)."""
    nested = config.get("text_config")
    return nested if isinstance(nested, dict) else config


def context_length(config: dict[str, Any]) -> int:
    text = text_config(config)
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        if text.get(name):
            return int(text[name])
    return DEFAULT_CONTEXT


def hidden_size(config: dict[str, Any]) -> int:
    text = text_config(config)
    for name in ("hidden_size", "n_embd", "d_model"):
        if text.get(name):
            return int(text[name])
    raise FluidError("the model config names no hidden size; cannot attach the K-head")


def eos_token_ids(configs: Iterable[dict[str, Any] | None], tokenizer: Any) -> frozenset[int]:
    """EOS ids from every config that states them (config.json, generation_config.json) and
    from the tokenizer: a reply ends at any of them, as in ``generate``."""
    ids: set[int] = set()
    for config in configs:
        eos = (config or {}).get("eos_token_id")
        if eos is not None:
            ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(int(i) for i in ids)


def read_generation_config(folder: Path | None) -> dict[str, Any] | None:
    """``generation_config.json`` of a folder, or None when it has none (or an unreadable one)."""
    path = None if folder is None else Path(folder) / "generation_config.json"
    if path is None or not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def unused_special_token(tokenizer: Any) -> int | None:
    """Id of an unused special token of a Hugging Face tokenizer, or None if it has none."""
    roles = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "sep_token_id", "cls_token_id")
    reserved = {getattr(tokenizer, role, None) for role in roles}
    template = tokenizer.chat_template if isinstance(getattr(tokenizer, "chat_template", None), str) else ""
    candidates = [
        token_id
        for token_id, added in getattr(tokenizer, "added_tokens_decoder", {}).items()
        if added.special and token_id not in reserved and added.content not in template
    ]
    return max(candidates) if candidates else None


def choose_mask_token(tokenizer: Any, requested: int | None = None) -> tuple[int, bool]:
    """``(mask id, the tokenizer lacks it)``: the requested id, else an unused special token,
    else a new token at the end of the vocabulary (id ``len(tokenizer)``).

    When the second value is True the id is the tokenizer's length (a new token, or a
    checkpoint trained with one): a backend that can grow its embeddings adds
    :data:`NEW_MASK_TOKEN` there; one that cannot uses the id only if its embedding already
    has that row (a padded vocabulary), and otherwise decodes in ``ar`` mode only.
    """
    if requested is None:
        requested = unused_special_token(tokenizer)
    if requested is None:
        return len(tokenizer), True
    return int(requested), int(requested) == len(tokenizer)


def portable_config(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of an HF ``config.json`` dict that transformers and mlx-lm read alike (on disk)."""
    config = copy.deepcopy(config)
    sections = [config] + [v for k, v in config.items() if k == "text_config" and isinstance(v, dict)]
    for section in sections:
        rope = section.get("rope_parameters")
        if isinstance(rope, dict) and "rope_theta" in rope:
            section["rope_theta"] = rope["rope_theta"]
        elif section.get("rope_theta") is not None and not isinstance(rope, dict):
            section["rope_parameters"] = {"rope_type": "default", "rope_theta": section["rope_theta"]}
    quant = config.get("quantization_config")
    if isinstance(quant, dict) and (quant.get("quant_method") == "gguf" or "gguf_file" in quant):
        del config["quantization_config"]
    return config


def mlx_lm_config(config: dict[str, Any]) -> dict[str, Any]:
    """:func:`portable_config` plus what only mlx-lm reads: ``rope_scaling`` lifted from a
    scaled ``rope_parameters``, and GPT-2's ``n_ctx`` (transformers 5 no longer saves it)."""
    config = portable_config(config)
    if config.get("model_type") == "gpt2" and "n_ctx" not in config and "n_positions" in config:
        config["n_ctx"] = config["n_positions"]
    for section in (config, config.get("text_config") or {}):
        rope = section.get("rope_parameters")
        if isinstance(rope, dict) and rope.get("rope_type", "default") != "default" and not section.get("rope_scaling"):
            section["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    return config


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """``folder/config.json`` as a dict, with one-line errors."""
    path = Path(folder) / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FluidError(f"{path} not found; pass a Hugging Face model folder", "model") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise FluidError(f"{path} is not valid JSON; re-download or re-export the model", "model") from None
    if not isinstance(data, dict):
        raise FluidError(f"{path} must hold one JSON object; re-download or re-export the model", "model")
    return data


def fix_config_file(folder: str | os.PathLike) -> dict[str, Any]:
    """Rewrite ``folder/config.json`` with :func:`portable_config`; return the new dict."""
    config = portable_config(read_config(folder))
    write_json_atomic(Path(folder) / "config.json", config)
    return config
