"""MLX backend: mlx-lm causal LMs on Apple Silicon (and on Linux CPUs through ``mlx[cpu]``)."""

from .loader import MLXBackend, load

__all__ = ["MLXBackend", "load"]
