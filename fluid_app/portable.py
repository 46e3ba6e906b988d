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
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .config import ordinary_mode, write_text_atomic
from .errors import FluidError


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
    write_text_atomic(path, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config


@contextmanager
def atomic_folder(out: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success rename it to ``out``.

    On any error the temporary folder is removed and ``out`` is left as it was.
    """
    out = Path(out).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise FluidError(f"{out} already exists and is not empty; pick another OUT or pass --force")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial"))
    try:
        yield tmp
        _public_modes(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _public_modes(folder: Path) -> None:
    """Give the finished folder the modes a plain ``mkdir``/``open`` would have (``mkdtemp``'s
    are owner-only), so a shared cache stays readable."""
    file_mode, directory_mode = ordinary_mode(), ordinary_mode(directory=True)
    folder.chmod(directory_mode)
    for path in folder.rglob("*"):
        path.chmod(directory_mode if path.is_dir() else file_mode)
