"""PyTorch backend: Hugging Face causal LMs on CPU, CUDA or MPS."""

from .loader import TorchBackend, load

__all__ = ["TorchBackend", "load"]
