"""MLX backend: mlx-lm causal LMs on Apple Silicon (and on Linux CPUs through ``mlx[cpu]``).

Usage::

    fluid generate --backend mlx --model default --chat --prompt "Hi"   # or --backend auto on a Mac
    fluid convert CHECKPOINT OUT --to mlx --quantize 4                   # mlx-lm folder + FLUID files
    fluid generate --backend mlx --model OUT --prompt "Hi"

    fluid_app.load("default", backend="mlx").generate("Hi", chat=True)

What it loads: an HF or mlx-lm folder (quantized ones too), a merged FLUID export
(``fluid_config.json`` + ``k_head.safetensors`` beside the weights), an adapter checkpoint
(the peft LoRA is fused into the weights at load), and GGUF bases such as the embedded
SmolLM2, which are converted once to an HF folder in the user cache, shared with the torch
backend (:mod:`backends.converted_base`; that one step needs PyTorch, and ``fluid convert``
on a machine with torch gives a folder that does not).
Families: Llama/SmolLM2, Qwen2, Qwen3, Mistral, GPT-2 are tested against PyTorch; other
mlx-lm families load if their logits are ``lm_head``/tied embedding of the inner model's
output (checked by a probe at load).
"""

from .loader import MLXBackend, load

__all__ = ["MLXBackend", "load"]
