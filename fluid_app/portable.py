"""Write self-contained FLUID folders atomically and make their ``config.json`` portable.

Shared by ``fluid export`` and ``fluid import-reference``: both build a folder next to the
destination, then rename it into place, so a failed or interrupted run never leaves a
half-written checkpoint where a user (or ``--model``) would pick it up.

Portability fixes for ``config.json`` (pure JSON, no torch):

- mlx-lm 0.32 reads only a top-level ``rope_theta`` (else 10000) while transformers 5
  saves ``rope_parameters: {rope_theta: ...}``; a config without the top-level key loads
  in mlx-lm and silently decodes garbage. We write both.
- A model dequantized from a GGUF file carries a GGUF ``quantization_config``; the saved
  weights are plain tensors, so the entry would make loaders look for GGUF files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .files import write_json_atomic


def portable_config(config: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of an HF ``config.json`` dict that transformers and mlx-lm read alike."""
    config = dict(config)
    sections = [config] + [v for k, v in config.items() if k == "text_config" and isinstance(v, dict)]
    for section in sections:
        rope = section.get("rope_parameters")
        if isinstance(rope, dict) and "rope_theta" in rope:
            section["rope_theta"] = rope["rope_theta"]
        elif "rope_theta" in section and not isinstance(rope, dict):
            section["rope_parameters"] = {"rope_type": "default", "rope_theta": section["rope_theta"]}
    quant = config.get("quantization_config")
    if isinstance(quant, dict) and (quant.get("quant_method") == "gguf" or "gguf_file" in quant):
        del config["quantization_config"]
    return config


def fix_config_file(folder: str | os.PathLike) -> dict[str, Any]:
    """Rewrite ``folder/config.json`` with :func:`portable_config`; return the new dict."""
    path = Path(folder) / "config.json"
    config = portable_config(json.loads(path.read_text()))
    write_json_atomic(path, config)
    return config
