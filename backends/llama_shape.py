"""Which configs the Llama-family decoders compute exactly as transformers does, and their shape.

Why a module of its own: the torch backend builds its own forward for these configs
(:mod:`.torch_backend.llama_family`), which is also the forward that can attend a branched
window (:mod:`fluid_app.branches`); the MLX backend feeds branches for exactly the same
configs, so that a sampled decode tries the same drafts, and draws the same tokens, on both.
The rule is read here once, from ``config.json`` alone, without torch or mlx.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fluid_app import hf_config

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class Shape:
    """What the network needs from ``config.json``."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    eps: float
    rope_theta: float
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    tied: bool


def shape_of(config: dict[str, Any]) -> Shape | None:
    """The :class:`Shape` of a config this module computes exactly as transformers does, else None."""
    kind = config.get("model_type")
    if kind not in ARCHITECTURES or config.get("quantization_config") or config.get("hidden_act", "silu") != "silu":
        return None
    if config.get("pretraining_tp", 1) not in (1, None):
        return None
    rope = config.get("rope_parameters")
    if isinstance(rope, dict):
        theta = rope.get("rope_theta") if rope.get("rope_type", "default") == "default" else None
    else:
        theta = config.get("rope_theta") if not config.get("rope_scaling") else None
    context = hf_config.context_length(config)
    window = config.get("sliding_window")
    if kind in ("qwen2", "qwen3"):
        window = window if config.get("use_sliding_window") else None
    if theta is None or (window is not None and window < context):
        return None  # scaled rope, or a window that can bind: transformers' classes
    if any(layer not in ("full_attention", "sliding_attention") for layer in config.get("layer_types") or ()):
        return None  # a kind of layer this module has not got (a sliding one that cannot bind is a full one)
    try:
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        bias = bool(config.get("attention_bias", False))
        return Shape(
            hidden=hidden, intermediate=int(config["intermediate_size"]), layers=int(config["num_hidden_layers"]),
            heads=heads, kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads), vocab=int(config["vocab_size"]),
            eps=float(config.get("rms_norm_eps", 1e-6)), rope_theta=float(theta),
            qkv_bias=True if kind == "qwen2" else bias, o_bias=bias if kind in ("llama", "qwen3") else False,
            mlp_bias=bool(config.get("mlp_bias", False)) if kind == "llama" else False,
            qk_norm=kind == "qwen3", tied=bool(config.get("tie_word_embeddings", False)),
        )
    except (KeyError, TypeError, ValueError):
        return None
