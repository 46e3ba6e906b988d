"""Load a model (HF/MLX folder, GGUF, FLUID checkpoint) with mlx-lm as a FLUID backend.

mlx-lm builds the architecture and reads the weights (quantized MLX folders included). We
keep its *inner* model, whose output is the final post-norm hidden state, and compute the
logits ourselves with the output layer (``lm_head``, or the tied embedding's ``as_linear``)
so that the K-head can read the same hidden state. A probe forward at load checks that this
equals the family's own ``__call__``, so a family that does more (soft-capping, scaling)
fails loudly instead of decoding something else.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache
from mlx_lm.utils import load_model

from fluid_app.config import FluidConfig
from fluid_app.errors import FluidError
from fluid_app.mask_token import unused_special_token
from fluid_app.protocol import StepOutput
from fluid_app.sources import ModelSpec

from .hf_folder import base_folder, patched_config, read_config
from .k_head import KHead, load_k_head
from .lora import fuse_adapter
from .session import MLXSession

DTYPES = {"float32": mx.float32, "fp32": mx.float32, "bfloat16": mx.bfloat16, "bf16": mx.bfloat16,
          "float16": mx.float16, "fp16": mx.float16}
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
        self.max_context = _context_length(config)
        self.mask_token_id = fluid_config.mask_token_id
        self.eos_token_ids = frozenset(_eos_ids(config, tokenizer, folder))
        self.forward_calls = 0
        self.vocab_size = _check_hidden_path(self)

    @property
    def has_k_head(self) -> bool:
        return self.k_head is not None

    def new_cache(self) -> list[Any]:
        cache = make_prompt_cache(self.model)
        if not can_trim_prompt_cache(cache):
            raise FluidError(f"{self.label}: this architecture's MLX cache cannot be trimmed; use --backend torch")
        return cache

    def step(self, ids: mx.array, cache: list[Any], last_only: bool = False) -> StepOutput:
        """One causal forward of ``ids[1, T]`` over ``cache``: greedy token, its probability, horizon."""
        hidden = self.inner(ids, cache=cache)
        if last_only:
            hidden = hidden[:, -1:, :]
        logits = self.output_layer(hidden).astype(mx.float32)
        tokens = mx.argmax(logits, axis=-1)
        confidence = mx.max(mx.softmax(logits, axis=-1, precise=True), axis=-1)
        horizon = None
        if self.k_head is not None:
            horizon = mx.argmax(self.k_head(hidden), axis=-1) + 1
        mx.eval(tokens, confidence, *(() if horizon is None else (horizon,)))
        return StepOutput(
            tokens=_numpy(tokens, "int64"),
            confidence=_numpy(confidence, "float32"),
            horizon=None if horizon is None else _numpy(horizon, "int64"),
        )

    def start(self, prompts: Sequence[Sequence[int]]) -> tuple[MLXSession, StepOutput]:
        self.forward_calls += 1
        session = MLXSession(self, prompts)
        return session, session.first


def load(spec: ModelSpec, *, dtype: str = "auto", mask_token_id: int | None = None, k_head: bool = True,
         device: str = "auto") -> MLXBackend:
    """Load a model and its FLUID pieces with mlx-lm; pick the MASK token like the torch backend."""
    _pick_device(device)
    folder = base_folder(spec)
    raw = read_config(folder)
    config_dict = patched_config(raw)
    model = build_model(folder, {k: v for k, v in config_dict.items() if raw.get(k) != v}, spec.label)
    if spec.adapter is not None:
        if "quantization" in config_dict:
            raise FluidError(f"cannot fuse the adapter in {spec.adapter} into the quantized {spec.base}; "
                             "use an unquantized base model")
        fuse_adapter(model, folder, spec.adapter, config_dict.get("model_type"))
    if dtype != "auto":
        if dtype not in DTYPES:
            raise FluidError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(sorted(DTYPES))}")
        model.set_dtype(DTYPES[dtype])
    tokenizer = load_tokenizer(folder, spec.label)
    config = spec.fluid_config or FluidConfig()
    if mask_token_id is not None:
        config = config.with_overrides(mask_token_id=mask_token_id)
    if config.mask_token_id is None:
        # Without an unused special token there is no MASK to draft with: ``ar`` still works,
        # and the sampler says to use it. (The torch backend adds a token and resizes
        # embeddings; a real FLUID checkpoint ships its MASK token.)
        chosen = unused_special_token(tokenizer)
        if chosen is not None:
            config = config.with_overrides(mask_token_id=int(chosen))
    config.validate(vocab_size=int(config_dict.get("vocab_size") or len(tokenizer)))
    head = None
    if k_head and spec.k_head_file is not None:
        head = load_k_head(spec.k_head_file, _hidden_size(config_dict))
    return MLXBackend(model, tokenizer, config, head, config_dict, folder=folder, label=spec.label)


def build_model(folder: Path, overrides: dict[str, Any], label: str = "") -> nn.Module:
    """mlx-lm's loader with our config fixes applied (``overrides`` win over config.json).

    GPT-2 checkpoints saved by transformers prefix their keys with ``transformer.`` and may
    have an untied ``lm_head``; mlx-lm's GPT-2 expects the original OpenAI key names and a
    tied head, so those are loaded here: keys renamed, head attached as ``lm_head``.
    """
    config = {**read_config(folder), **overrides}
    keys = _weight_keys(folder)
    fixup = config.get("model_type") == "gpt2" and (
        any(k.startswith("transformer.") for k in keys) or "lm_head.weight" in keys)
    try:
        model, _ = load_model(folder, lazy=fixup, strict=not fixup, model_config=overrides)
        if fixup:
            _load_gpt2_weights(model, folder, tied=config.get("tie_word_embeddings", True))
    except (ValueError, KeyError, TypeError, FileNotFoundError, ImportError) as exc:
        raise FluidError(f"mlx-lm cannot load {label or folder}: {_first_line(exc)}; "
                         "use --backend torch for this architecture") from None
    if not isinstance(getattr(model, "model", None), nn.Module):
        raise FluidError(f"mlx-lm's {type(model).__module__} exposes no inner model; use --backend torch")
    return model


def hf_weight_names(model_type: str | None, weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Rename transformers-saved keys to what the mlx-lm family's ``sanitize`` expects."""
    if model_type == "gpt2":
        return {k.removeprefix("transformer."): v for k, v in weights.items()}
    return weights


def _load_gpt2_weights(model: nn.Module, folder: Path, tied: bool) -> None:
    weights: dict[str, mx.array] = {}
    for path in sorted(folder.glob("model*.safetensors")):
        weights.update(mx.load(str(path)))
    head = weights.pop("lm_head.weight", None)
    weights = model.sanitize(hf_weight_names("gpt2", weights))
    model.load_weights(list(weights.items()), strict=True)
    if head is not None and not tied:
        model.lm_head = nn.Linear(head.shape[1], head.shape[0], bias=False)
        model.lm_head.weight = head
        model.fluid_own_head = True  # mlx-lm's __call__ would use the tied embedding instead
    mx.eval(model.parameters())


def _weight_keys(folder: Path) -> set[str]:
    from safetensors import safe_open

    keys: set[str] = set()
    for path in folder.glob("model*.safetensors"):
        with safe_open(str(path), framework="numpy") as handle:
            keys.update(handle.keys())
    return keys


def load_tokenizer(folder: Path, label: str = ""):
    """The Hugging Face tokenizer itself (what the core calls), not mlx-lm's wrapper."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise FluidError(f"cannot load a tokenizer from {label or folder}: {_first_line(exc)}") from None
    finally:
        hf_logging.set_verbosity(level)


def output_layer(model: nn.Module) -> Callable[[mx.array], mx.array]:
    """The hidden -> logits map: ``lm_head`` if the model has one, else the tied embedding."""
    if "lm_head" in model:
        return model["lm_head"]
    inner = model.model
    for name in EMBEDDINGS:
        if name in inner:
            return inner[name].as_linear
    raise FluidError(f"cannot find the output layer of mlx-lm's {type(model).__module__}; use --backend torch")


def _check_hidden_path(backend: MLXBackend) -> int:
    """Probe: our hidden -> logits path must reproduce the family's own logits."""
    probe = mx.array([[1, 2, 3]])
    ours = backend.output_layer(backend.inner(probe)).astype(mx.float32)
    if getattr(backend.model, "fluid_own_head", False):
        return int(ours.shape[-1])
    expected = backend.model(probe).astype(mx.float32)
    if expected.shape != ours.shape or not mx.allclose(expected, ours, rtol=1e-3, atol=1e-3).item():
        raise FluidError(f"mlx-lm's {backend.config.get('model_type')} computes logits in its own way; "
                         "the MLX backend does not support it yet, use --backend torch")
    return int(expected.shape[-1])


def _pick_device(device: str) -> None:
    if device in ("auto", ""):
        return
    if device not in ("cpu", "gpu"):
        raise FluidError(f"unknown MLX device {device!r}; use auto, cpu or gpu")
    mx.set_default_device(mx.cpu if device == "cpu" else mx.gpu)


def _hidden_size(config: dict[str, Any]) -> int:
    text = config.get("text_config") or config
    for name in ("hidden_size", "n_embd", "d_model"):
        if text.get(name):
            return int(text[name])
    raise FluidError("the model config names no hidden size; cannot attach the K-head")


def _context_length(config: dict[str, Any]) -> int:
    text = config.get("text_config") or config
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        if text.get(name):
            return int(text[name])
    return 2048


def _eos_ids(config: dict[str, Any], tokenizer: Any, folder: Path | None) -> set[int]:
    """EOS ids from config.json, generation_config.json and the tokenizer (as the torch backend)."""
    ids: set[int] = set()
    sources = [config]
    if folder is not None and (folder / "generation_config.json").exists():
        try:
            sources.append(json.loads((folder / "generation_config.json").read_text()))
        except json.JSONDecodeError:
            pass
    for source in sources:
        eos = source.get("eos_token_id")
        if eos is not None:
            ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return {int(i) for i in ids}


def _numpy(array: mx.array, dtype: str):
    import numpy as np

    return np.asarray(array).astype(dtype, copy=False)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


logging.getLogger("mlx_lm").setLevel(logging.ERROR)
