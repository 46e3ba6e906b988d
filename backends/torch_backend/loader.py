"""Load a Hugging Face causal LM (folder, GGUF, FLUID checkpoint) as a FLUID backend."""

from __future__ import annotations

import inspect
import logging
import warnings
from typing import Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fluid_app.config import FluidConfig
from fluid_app.errors import FluidError
from fluid_app.mask_token import NEW_MASK_TOKEN, unused_special_token
from fluid_app.protocol import StepOutput
from fluid_app.sources import ModelSpec

from .cpu_linear import pack_linear_layers
from .k_head import KHead, load_k_head
from .session import TorchSession

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def pick_device(device: str = "auto") -> torch.device:
    if device != "auto":
        try:
            return torch.device(device)
        except RuntimeError:
            raise FluidError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise FluidError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(sorted(DTYPES))}")
    return DTYPES[dtype]


class TorchBackend:
    """A loaded model ready for :class:`fluid_app.sampler.Decoder`."""

    name = "torch"

    def __init__(self, model, tokenizer, fluid_config: FluidConfig, k_head: KHead | None,
                 device: torch.device, label: str = ""):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.fluid_config = fluid_config
        self.k_head = k_head.to(device).eval() if k_head is not None else None
        self.torch_device = device
        self.device = str(device)
        self.label = label
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.max_context = int(_context_length(model.config))
        self.mask_token_id = fluid_config.mask_token_id
        self.eos_token_ids = frozenset(_eos_ids(model, tokenizer))
        self.forward_calls = 0  # every model forward, prefill included (for honest counting)
        # transformers renamed ``past_key_values`` to ``cache``; speak whichever this version knows
        parameters = inspect.signature(model.base_model.forward).parameters
        self.cache_kwarg = "cache" if "cache" in parameters else "past_key_values"

    @property
    def has_k_head(self) -> bool:
        return self.k_head is not None

    def start(self, prompts: Sequence[Sequence[int]]) -> tuple[TorchSession, StepOutput]:
        self.forward_calls += 1
        session = TorchSession(self, prompts)
        return session, session.first


def load(spec: ModelSpec, *, device: str = "auto", dtype: str = "auto",
         mask_token_id: int | None = None, k_head: bool = True, pack: bool = True) -> TorchBackend:
    """Load a model and its FLUID pieces; pick or add the MASK token.

    ``pack`` pre-packs the linear layers of a CPU model for fast decoding (see
    :mod:`.cpu_linear`); code that saves or trains the weights passes ``False``.
    """
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(dtype, torch_device)
    config = spec.fluid_config or FluidConfig()
    tokenizer, model = load_pretrained(spec, dtype=torch_dtype)
    if mask_token_id is not None:
        config = config.with_overrides(mask_token_id=mask_token_id)
    chosen, _ = ensure_mask_token(model, tokenizer, config.mask_token_id)
    config = config.with_overrides(mask_token_id=chosen)
    config.validate(vocab_size=int(model.get_input_embeddings().weight.shape[0]))
    if spec.adapter is not None:
        model = _fuse_adapter(model, spec)
    model.to(torch_device)
    if pack:
        pack_linear_layers(model)
    head = None
    if k_head and spec.k_head_file is not None:
        head = load_k_head(spec.k_head_file, model.config.get_text_config().hidden_size).to(torch_dtype)
    return TorchBackend(model, tokenizer, config, head, torch_device, label=spec.label)


def load_pretrained(spec: ModelSpec, **model_kwargs):
    """Tokenizer and causal LM of ``spec`` (folder or GGUF), with one-line errors."""
    kwargs = {"gguf_file": spec.gguf_file} if spec.gguf_file else {}
    with _quiet():
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(spec.base_dir), **kwargs)
        except (OSError, ValueError) as exc:
            raise FluidError(f"cannot load a tokenizer from {spec.base}: {_first_line(exc)}") from None
        try:
            model = AutoModelForCausalLM.from_pretrained(str(spec.base_dir), **model_kwargs, **kwargs)
        except (OSError, ValueError, KeyError) as exc:
            raise FluidError(f"cannot load a causal LM from {spec.base}: {_first_line(exc)}") from None
    return tokenizer, model


def ensure_mask_token(model, tokenizer, mask_token_id: int | None) -> tuple[int, bool]:
    """The MASK id to use and whether it had to be added: the given one, else an unused special
    token, else a new ``<|fluid_mask|>`` (also re-added for a checkpoint whose MASK id is the
    tokenizer's length, i.e. one trained with an added token). Embeddings grow to hold it."""
    added = False
    if mask_token_id is None:
        mask_token_id = unused_special_token(tokenizer)
    if mask_token_id is None or mask_token_id == len(tokenizer):
        tokenizer.add_special_tokens({"additional_special_tokens": [NEW_MASK_TOKEN]})
        mask_token_id = tokenizer.convert_tokens_to_ids(NEW_MASK_TOKEN)
        added = True
    if model.get_input_embeddings().weight.shape[0] <= mask_token_id < len(tokenizer):
        add_embedding_rows(model, len(tokenizer))
        added = True
    return int(mask_token_id), added


def add_embedding_rows(model, rows: int) -> None:
    """Grow the vocabulary to ``rows``; new rows (input and output) are the mean of the old ones,
    deterministically, so that training and every later load see the same weights (the MASK
    row itself is trained and saved with the adapter)."""
    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(rows, mean_resizing=False)
    with torch.no_grad():
        for layer in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}.values():
            layer.weight[old:] = layer.weight[:old].mean(dim=0, keepdim=True)
            bias = getattr(layer, "bias", None)
            if bias is not None and bias.shape[0] == rows:
                bias[old:] = bias[:old].mean()


def _fuse_adapter(model, spec: ModelSpec):
    """Merge a peft LoRA adapter into the weights so inference pays nothing for it."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(spec.adapter)).merge_and_unload()
    except (OSError, ValueError, RuntimeError) as exc:
        raise FluidError(
            f"the adapter in {spec.adapter} does not fit {spec.base}: {_first_line(exc)}; "
            "load it with the base model it was trained on"
        ) from None


def _context_length(config) -> int:
    text = config.get_text_config()
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(text, name, None)
        if value:
            return int(value)
    return 2048


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None) if source is not None else None
        if eos is not None:
            ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class _quiet:
    """Silence transformers' progress bars and warnings while loading (errors still raise)."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self._level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("ignore")
        logging.getLogger("gguf").setLevel(logging.ERROR)
        return self

    def __exit__(self, *exc):
        from transformers.utils import logging as hf_logging

        self._warnings.__exit__(*exc)
        hf_logging.set_verbosity(self._level)
        hf_logging.enable_progress_bar()
        return False
