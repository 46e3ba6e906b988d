"""Tensor-library backends behind :mod:`fluid_app.protocol`, and their entry points.

``auto`` picks MLX on Apple Silicon, PyTorch on CUDA, else PyTorch on the CPU, and says so.
This module is the only door from the core and the CLI into the backends: each function
below imports its backend lazily (so ``fluid --help`` and the core start without torch or
mlx) and turns a missing library into a one-line error. Nothing outside ``backends/``
imports a backend's own modules.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

from fluid_app.errors import FluidError
from fluid_app.model_refs import ModelSpec

BACKENDS = ("auto", "torch", "mlx")


def pick_backend(name: str = "auto") -> tuple[str, str]:
    """Return ``(backend, reason)`` for a requested backend name."""
    if name not in BACKENDS:
        raise FluidError(f"unknown backend {name!r}; use one of {', '.join(BACKENDS)}")
    if name != "auto":
        return name, "requested"
    if platform.system() == "Darwin" and platform.machine() == "arm64" and _installed("mlx_lm"):
        return "mlx", "Apple Silicon with mlx-lm installed"
    if _installed("torch"):
        import torch

        if torch.cuda.is_available():
            return "torch", f"CUDA GPU {torch.cuda.get_device_name(0)}"
        if platform.system() == "Darwin" and platform.machine() == "arm64":
            return "torch", "Apple Silicon without mlx-lm: PyTorch (for MLX, pip install 'fluid-app[mlx]')"
        return "torch", "no CUDA GPU and no Apple Silicon: PyTorch on the CPU"
    if _installed("mlx_lm"):
        return "mlx", "PyTorch not installed"
    raise FluidError("neither torch nor mlx-lm is installed; pip install torch (or mlx-lm on a Mac)")


def load_backend(spec: ModelSpec, name: str = "auto", **options: Any):
    """Load ``spec`` with the chosen backend; ``options`` go to that backend's loader."""
    chosen, _ = pick_backend(name)
    if chosen == "torch":
        from .torch_backend import load

        return load(spec, **options)
    try:
        from .mlx_backend import load as load_mlx
    except ImportError:
        raise FluidError("the MLX backend is not available here; pip install mlx-lm, or use the torch backend",
                         "backend") from None
    return load_mlx(spec, **options)


def load_tokenizer(spec: ModelSpec) -> Any:
    """The tokenizer of ``spec``'s base model without its weights (tokenising data, e.g. the
    replies of ``fluid export --draft-store``, needs no model)."""
    from .transformers_io import load_tokenizer as load

    return load(spec.base_dir, str(spec.base), spec.gguf_file)


def export_merged(spec: ModelSpec, out: str | Path, *, dtype: str = "float32", force: bool = False) -> Path:
    """``fluid export --merge``: the adapter fused into full weights (PyTorch)."""
    from .torch_backend.export import export_merged as export

    return export(spec, out, dtype=dtype, force=force)


def convert_to_mlx(source: str, out: str | Path, **options: Any) -> Path:
    """``fluid convert --to mlx``: an mlx-lm folder plus the FLUID files."""
    try:
        from .mlx_backend.convert import convert_to_mlx as convert
    except ImportError:
        raise FluidError("converting to MLX needs mlx-lm; pip install mlx-lm (mlx[cpu] on Linux)") from None
    return convert(source, out, **options)


def import_reference(src: Path, out: Path, **options: Any) -> Path:
    """``fluid import-reference``: the authors' checkpoint as a FLUID folder (PyTorch)."""
    from .torch_backend.reference import import_reference as run

    return run(src, out, **options)


def train(stage: str, options: dict[str, Any]) -> dict[str, Any]:
    """``fluid train stage1|stage2`` with the given options (PyTorch; runs under torchrun too)."""
    from dataclasses import fields

    if stage == "stage1":
        from .torch_backend.training.stage1 import Stage1Options as Options
        from .torch_backend.training.stage1 import run_stage1 as run
    else:
        from .torch_backend.training.stage2 import Stage2Options as Options
        from .torch_backend.training.stage2 import run_stage2 as run
    names = {f.name for f in fields(Options)}
    return run(Options(**{k: v for k, v in options.items() if k in names}))


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
