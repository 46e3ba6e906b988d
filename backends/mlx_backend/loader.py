"""Load a model (HF/MLX folder, GGUF, FLUID checkpoint) with mlx-lm as a FLUID backend.

mlx-lm builds the architecture and reads the weights (quantized MLX folders included). We
keep its *inner* model, whose output is the final post-norm hidden state, and compute the
logits ourselves with the output layer (``lm_head``, or the tied embedding's ``as_linear``)
so that the K-head can read the same hidden state. A probe forward at load checks that this
equals the family's own ``__call__``, so a family that does more (soft-capping, scaling)
fails loudly instead of decoding something else.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache
from mlx_lm.utils import load_model

from fluid_app import hf_config
from fluid_app.errors import FluidError, first_line
from fluid_app.fluid_config import FluidConfig
from fluid_app.model_refs import ModelSpec
from fluid_app.protocol import StepOutput

from ..converted_base import base_folder
from ..transformers_io import load_tokenizer
from .k_head import KHead, load_k_head
from .lora import fuse_adapter
from .session import MLXSession
from .tree import feeds_branches
from .weights import load_gpt2_weights, weight_keys

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
EMBEDDINGS = ("embed_tokens", "wte", "tok_embeddings", "embed_in", "word_embeddings")


class MLXBackend:
    """A loaded mlx-lm model ready for :class:`fluid_app.sampler.Decoder`.

    Batches run as one mlx-lm KV cache per row, rows one after another inside each
    forward: exact and simple (no padding or per-row masks), at the cost of not
    batching the matmuls across rows.
    """

    name = "mlx"

    def __init__(self, model: nn.Module, tokenizer: Any, fluid_config: FluidConfig, k_head: KHead | None,
                 config: dict[str, Any], folder: Path | None = None, label: str = ""):
        self.model = model
        self.inner = model.model
        self.output_layer = output_layer(model)
        self.tokenizer = tokenizer
        self.fluid_config = fluid_config
        self.k_head = k_head
        self.config = config
        self.label = label
        self.folder = folder
        self.device = str(mx.default_device().type).split(".")[-1]
        self.max_context = hf_config.context_length(config)
        self.mask_token_id = fluid_config.mask_token_id
        self.eos_token_ids = hf_config.eos_token_ids([config, hf_config.read_generation_config(folder)], tokenizer)
        self.forward_calls = 0
        self.vocab_size = _check_hidden_path(self)
        # the configs the torch backend feeds branches for, run through mlx-lm's blocks (tree.py)
        self.branched_windows = feeds_branches(self.inner, config)

    @property
    def dtype(self) -> str:
        """The precision the model computes in (a quantized model: its scales'), as ``--dtype``
        names it."""
        from mlx.utils import tree_flatten

        first = next((v.dtype for _, v in tree_flatten(self.model.parameters()) if mx.issubdtype(v.dtype, mx.floating)),
                     mx.float32)
        return str(first).split(".")[-1]

    @property
    def has_k_head(self) -> bool:
        return self.k_head is not None

    def new_cache(self) -> list[Any]:
        cache = make_prompt_cache(self.model)
        if not can_trim_prompt_cache(cache):
            raise FluidError(f"{self.label}: this architecture's MLX cache cannot be trimmed; use the torch backend",
                             "backend")
        return cache

    def step(self, ids: mx.array, cache: list[Any], last_only: bool = False, logits: bool = False) -> StepOutput:
        """One causal forward of ``ids[1, T]`` over ``cache``."""
        hidden = self.inner(ids, cache=cache)
        return self.step_output(hidden[:, -1:, :] if last_only else hidden, logits)

    def step_output(self, hidden: mx.array, logits: bool = False) -> StepOutput:
        """Final hidden states ``[B, T, h]`` -> greedy token, its probability, K-head horizon
        (and the float32 logits themselves with ``logits``)."""
        scores = self.output_layer(hidden).astype(mx.float32)
        tokens = mx.argmax(scores, axis=-1)
        confidence = mx.max(mx.softmax(scores, axis=-1, precise=True), axis=-1)
        horizon = None
        if self.k_head is not None:
            horizon = mx.argmax(self.k_head(hidden), axis=-1) + 1
        mx.eval(tokens, confidence, *(() if horizon is None else (horizon,)), *((scores,) if logits else ()))
        return StepOutput(
            tokens=_numpy(tokens, "int64"),
            confidence=_numpy(confidence, "float32"),
            horizon=None if horizon is None else _numpy(horizon, "int64"),
            logits=_numpy(scores, "float32") if logits else None,
        )

    def start(self, prompts: Sequence[Sequence[int]], logits: bool = False) -> tuple[MLXSession, StepOutput]:
        self.forward_calls += 1
        session = MLXSession(self, prompts, logits)
        return session, session.first


def load(spec: ModelSpec, *, dtype: str = "auto", mask_token_id: int | None = None, k_head: bool = True,
         device: str = "auto", lean_tokenizer: bool = True) -> MLXBackend:
    """Load a model and its FLUID pieces with mlx-lm; pick the MASK token like the torch backend.

    ``lean_tokenizer`` reads the tokenizer without transformers where it can (decoding only);
    code that saves the tokenizer passes False."""
    _pick_device(device)
    folder = base_folder(spec)
    raw = hf_config.read_config(folder)
    config_dict = hf_config.mlx_lm_config(raw)
    model = build_model(folder, {k: v for k, v in config_dict.items() if raw.get(k) != v}, spec.label)
    if spec.adapter is not None:
        if "quantization" in config_dict:
            raise FluidError(f"cannot fuse the adapter in {spec.adapter} into the quantized {spec.base}; "
                             "use an unquantized base model")
        fuse_adapter(model, folder, spec.adapter, config_dict.get("model_type"))
    if hf_config.dtype_name(dtype) != "auto":
        model.set_dtype(DTYPES[hf_config.dtype_name(dtype)])
    tokenizer = load_tokenizer(folder, spec.label, lean=lean_tokenizer)
    config = spec.fluid_config or FluidConfig()
    if mask_token_id is not None:
        config = config.with_overrides(mask_token_id=mask_token_id)
    vocab_size = int(config_dict.get("vocab_size") or len(tokenizer))
    chosen, new = hf_config.choose_mask_token(tokenizer, config.mask_token_id)
    if new and chosen >= vocab_size:
        # mlx-lm models cannot grow their embeddings here: with no row for a MASK there is
        # nothing to draft with; ``ar`` still works and the sampler says so.
        chosen = None
    config = replace(config, mask_token_id=chosen)
    config.validate(vocab_size=vocab_size)
    head = None
    if k_head and spec.k_head_file is not None:
        head = load_k_head(spec.k_head_file, hf_config.hidden_size(config_dict))
    return MLXBackend(model, tokenizer, config, head, config_dict, folder=folder, label=spec.label)


def build_model(folder: Path, overrides: dict[str, Any], label: str = "") -> nn.Module:
    """mlx-lm's loader with our config fixes applied (``overrides`` win over config.json).

    GPT-2 checkpoints saved by transformers prefix their keys with ``transformer.`` and may
    have an untied ``lm_head``; mlx-lm's GPT-2 expects the original OpenAI key names and a
    tied head, so those are loaded here: keys renamed, head attached as ``lm_head``.
    """
    config = {**hf_config.read_config(folder), **overrides}
    keys = weight_keys(folder)
    fixup = config.get("model_type") == "gpt2" and (
        any(k.startswith("transformer.") for k in keys) or "lm_head.weight" in keys)
    try:
        model, _ = load_model(folder, lazy=fixup, strict=not fixup, model_config=overrides)
        if fixup:
            load_gpt2_weights(model, folder, tied=config.get("tie_word_embeddings", True))
    except (ValueError, KeyError, TypeError, FileNotFoundError, ImportError, RuntimeError) as exc:
        raise FluidError(f"mlx-lm cannot load {label or folder}: {first_line(exc)}; "
                         "use the torch backend for this architecture", "backend") from None
    if not isinstance(getattr(model, "model", None), nn.Module):
        raise FluidError(f"mlx-lm's {type(model).__module__} exposes no inner model; use the torch backend",
                         "backend")
    return model


def output_layer(model: nn.Module) -> Callable[[mx.array], mx.array]:
    """The hidden -> logits map: ``lm_head`` if the model has one, else the tied embedding."""
    if "lm_head" in model:
        return model["lm_head"]
    inner = model.model
    for name in EMBEDDINGS:
        if name in inner:
            return inner[name].as_linear
    raise FluidError(f"cannot find the output layer of mlx-lm's {type(model).__module__}; use the torch backend",
                     "backend")


def _check_hidden_path(backend: MLXBackend) -> int:
    """Probe: our hidden -> logits path must reproduce the family's own logits."""
    probe = mx.array([[1, 2, 3]])
    ours = backend.output_layer(backend.inner(probe)).astype(mx.float32)
    if getattr(backend.model, "fluid_own_head", False):
        return int(ours.shape[-1])
    expected = backend.model(probe).astype(mx.float32)
    if expected.shape != ours.shape or not mx.allclose(expected, ours, rtol=1e-3, atol=1e-3).item():
        raise FluidError(f"mlx-lm's {backend.config.get('model_type')} computes logits in its own way; "
                         "the MLX backend does not support it yet, use the torch backend", "backend")
    return int(expected.shape[-1])


def _pick_device(device: str) -> None:
    if device in ("auto", ""):
        return
    if device not in ("cpu", "gpu"):
        raise FluidError(f"unknown MLX device {device!r}; use auto, cpu or gpu", "device")
    mx.set_default_device(mx.cpu if device == "cpu" else mx.gpu)


def _numpy(array: mx.array, dtype: str):
    import numpy as np

    return np.asarray(array).astype(dtype, copy=False)


logging.getLogger("mlx_lm").setLevel(logging.ERROR)
