"""FLUID app: parallel (diffusion-style) decoding for pretrained GPT-style models.

Backend-agnostic core: layouts and the attention rule for training, horizon targets, the
elastic sampler and its events. Nothing here imports torch or mlx; see ``backends``.
"""

from .api import FluidModel, Generation, load
from .errors import FluidError
from .fluid_config import FluidConfig

__all__ = ["FluidConfig", "FluidError", "FluidModel", "Generation", "load"]
__version__ = "0.1.0"
