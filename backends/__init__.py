"""Tensor-library backends behind :mod:`fluid_app.protocol`.

``auto`` picks MLX on Apple Silicon, PyTorch on CUDA, else PyTorch on the CPU, and says so.
Backends are imported lazily so that the core and the CLI start without torch or mlx.
"""

from __future__ import annotations

import platform
from typing import Any

from fluid_app.errors import FluidError
from fluid_app.sources import ModelSpec

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
            return "torch", "Apple Silicon without mlx-lm: PyTorch (pip install mlx-lm to use MLX)"
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
        raise FluidError("the MLX backend is not available here; pip install mlx-lm, or use --backend torch") from None
    return load_mlx(spec, **options)


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
