"""Load a Hugging Face causal LM (folder, GGUF, FLUID checkpoint) as a FLUID backend."""

from __future__ import annotations

import inspect
from typing import Sequence

import torch

from fluid_app import hf_config
from fluid_app.data import Example
from fluid_app.errors import FluidError, damaged, first_line
from fluid_app.fluid_config import FluidConfig
from fluid_app.model_refs import ModelSpec
from fluid_app.protocol import StepOutput

from ..converted_base import base_folder
from ..transformers_io import load_tokenizer, quiet
from .cpu_linear import pack_linear_layers
from .k_head import KHead, load_k_head
from .llama_family import LlamaFamilyLM, load_llama_family
from .lora_merge import is_plain_lora, merge_plain_lora
from .session import TorchSession

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device: str = "auto") -> torch.device:
    if device != "auto":
        try:
            chosen = torch.device(device)
        except RuntimeError:
            raise FluidError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps", "device") from None
        if chosen.type == "cuda" and not torch.cuda.is_available():
            raise FluidError("CUDA is not available on this machine; use device cpu (or auto)", "device")
        if chosen.type == "mps" and not torch.backends.mps.is_available():
            raise FluidError("MPS is not available on this machine; use device cpu (or auto)", "device")
        return chosen
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    name = hf_config.dtype_name(dtype)
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


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
        self.max_context = hf_config.context_length(model.config.to_dict())
        self.mask_token_id = fluid_config.mask_token_id
        generation = getattr(model, "generation_config", None)
        self.eos_token_ids = hf_config.eos_token_ids(
            [model.config.to_dict(), generation.to_dict() if generation is not None else None], tokenizer)
        self.forward_calls = 0  # every model forward, prefill included (for honest counting)
        # transformers renamed ``past_key_values`` to ``cache``; speak whichever this version knows
        parameters = inspect.signature(model.base_model.forward).parameters
        self.cache_kwarg = "cache" if "cache" in parameters else "past_key_values"
        # the own Llama-family forward takes a window's attention mask as given; transformers'
        # models are left to their causal masks
        self.branched_windows = isinstance(model, LlamaFamilyLM)

    def new_cache(self):
        """An empty KV cache for a decode session: the model's own, else transformers'."""
        if hasattr(self.model, "new_cache"):
            return self.model.new_cache()
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    @property
    def dtype(self) -> str:
        """The weights' precision, as ``--dtype`` names it (``auto`` resolved)."""
        return str(self.model.dtype).removeprefix("torch.")

    @property
    def has_k_head(self) -> bool:
        return self.k_head is not None

    def start(self, prompts: Sequence[Sequence[int]], logits: bool = False) -> tuple[TorchSession, StepOutput]:
        self.forward_calls += 1
        session = TorchSession(self, prompts, logits)
        return session, session.first

    def score(self, examples: Sequence[Example], desc: str = "scoring") -> tuple[float, int]:
        """Teacher-forced AR negative log-likelihood of the labelled tokens, and their count."""
        from .perplexity import assistant_nll

        return assistant_nll(self.model, examples, self.torch_device, desc=desc)

    def step_output(self, hidden: torch.Tensor, logits: bool = False) -> StepOutput:
        """Final hidden states ``[B, T, h]`` -> greedy token, its probability, K-head horizon
        (and the float32 logits themselves with ``logits``)."""
        scores = self.model.get_output_embeddings()(hidden).float()
        confidence, tokens = torch.softmax(scores, dim=-1).max(dim=-1)
        horizon = None
        if self.k_head is not None:
            horizon = (self.k_head(hidden.to(self.k_head.out.weight.dtype)).argmax(-1) + 1).cpu().numpy()
        return StepOutput(tokens.cpu().numpy(), confidence.cpu().numpy(), horizon,
                          scores.cpu().numpy() if logits else None)


def load(spec: ModelSpec, *, device: str = "auto", dtype: str = "auto",
         mask_token_id: int | None = None, k_head: bool = True, pack: bool = True) -> TorchBackend:
    """Load a model and its FLUID pieces; pick or add the MASK token.

    ``pack`` pre-packs the linear layers of a CPU model for fast decoding (see
    :mod:`.cpu_linear`); code that saves or trains the weights passes ``False``.
    """
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(dtype, torch_device)
    # an adapter the plain merge cannot take goes through peft, which wraps transformers' classes.
    # On a CPU a plain adapter for a bfloat16 or float16 decode merges in float32 (peft's
    # arithmetic) and the merged weights are cast once: the rounding of W + BA, not of W, BA and
    # their sum. The float32 copy is transient; a GPU load keeps half precision and peft.
    half_on_cpu = torch_dtype != torch.float32 and torch_device.type == "cpu"
    own_forward = pack and (spec.adapter is None or ((torch_dtype == torch.float32 or half_on_cpu)
                                                     and is_plain_lora(spec.adapter)))
    merge_first = own_forward and spec.adapter is not None and half_on_cpu
    tokenizer, model = load_pretrained(spec, dtype=torch.float32 if merge_first else torch_dtype,
                                       own_forward=own_forward)
    return prepare(spec, tokenizer, model, torch_device, mask_token_id=mask_token_id, k_head=k_head, pack=pack,
                   dtype=torch_dtype)


def prepare(spec: ModelSpec, tokenizer, model, torch_device: torch.device, *, mask_token_id: int | None = None,
            k_head: bool = True, pack: bool = True, dtype: torch.dtype | None = None) -> TorchBackend:
    """The FLUID backend around a loaded tokenizer and causal LM: the MASK token chosen (or
    added), the adapter fused, the weights cast to ``dtype`` (default: kept), moved and packed,
    the K-head attached. Split from :func:`load` so that one model can be prepared from any
    source the same way (the tests compare the converted copy of a GGUF against transformers'
    own reading of the file)."""
    torch_dtype = dtype or model.dtype
    config = spec.fluid_config or FluidConfig()
    if mask_token_id is not None:
        config = config.with_overrides(mask_token_id=mask_token_id)
    chosen, _ = ensure_mask_token(model, tokenizer, config.mask_token_id)
    config = config.with_overrides(mask_token_id=chosen)
    config.validate(vocab_size=int(model.get_input_embeddings().weight.shape[0]))
    if spec.adapter is not None:
        model = _fuse_adapter(model, spec)
    model.to(torch_device, torch_dtype)
    if pack:
        pack_linear_layers(model)
    head = None
    if k_head and spec.k_head_file is not None:
        head = load_k_head(spec.k_head_file, model.config.get_text_config().hidden_size).to(torch_dtype)
    return TorchBackend(model, tokenizer, config, head, torch_device, label=spec.label)


def load_pretrained(spec: ModelSpec, *, own_forward: bool = False, **model_kwargs):
    """Tokenizer and causal LM of ``spec`` (folder, or GGUF through its cached conversion),
    with one-line errors.

    ``own_forward`` (inference loads) builds a Llama-family model with
    :mod:`.llama_family`, which computes transformers' outputs without importing its model
    code, and reads the tokenizer without transformers where it can (see
    :mod:`..json_tokenizer`); other architectures, and every load for training or export,
    use transformers.

    A damaged weights file (a cut download, an empty or garbled copy) is named, with the
    fix: safetensors' own error says what is wrong but not in which file.
    """
    from safetensors import SafetensorError, safe_open

    def unreadable(path: str) -> bool:
        try:
            with safe_open(path, framework="pt"):
                return False
        except (SafetensorError, OSError):
            return True

    folder = base_folder(spec)  # a GGUF base: its converted copy, made once
    tokenizer = load_tokenizer(folder, str(spec.base), lean=own_forward)
    try:
        model = load_llama_family(folder, model_kwargs.get("dtype", torch.float32)) if own_forward else None
        if model is None:
            from transformers import AutoModelForCausalLM

            with quiet():
                model = AutoModelForCausalLM.from_pretrained(str(folder), **model_kwargs)
    except SafetensorError as exc:
        files = sorted(folder.glob("model*.safetensors"))
        where = next((path for path in files if unreadable(str(path))), folder)
        fix = (f"delete {folder} to convert {spec.base.name} again" if folder != spec.base
               else "re-download the model or re-export the checkpoint")
        raise damaged(where, exc, fix) from None
    except (OSError, ValueError, KeyError, RuntimeError, EOFError) as exc:
        raise FluidError(f"cannot load a causal LM from {spec.base}: {first_line(exc)}", "model") from None
    return tokenizer, model


def ensure_mask_token(model, tokenizer, mask_token_id: int | None) -> tuple[int, bool]:
    """The MASK id to use and whether it had to be added: the given one, else an unused special
    token, else a new ``<|fluid_mask|>`` (also re-added for a checkpoint whose MASK id is the
    tokenizer's length, i.e. one trained with an added token). Embeddings grow to hold it."""
    mask_token_id, added = hf_config.choose_mask_token(tokenizer, mask_token_id)
    if added:
        tokenizer.add_special_tokens({"additional_special_tokens": [hf_config.NEW_MASK_TOKEN]})
        mask_token_id = tokenizer.convert_tokens_to_ids(hf_config.NEW_MASK_TOKEN)
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
        layers = (model.get_input_embeddings(), model.get_output_embeddings())
        for layer in {id(m): m for m in layers if m is not None}.values():
            layer.weight[old:] = layer.weight[:old].mean(dim=0, keepdim=True)
            bias = getattr(layer, "bias", None)
            if bias is not None and bias.shape[0] == rows:
                bias[old:] = bias[:old].mean()


def _fuse_adapter(model, spec: ModelSpec):
    """Merge a peft LoRA adapter into the weights so inference pays nothing for it.

    A damaged adapter file is told apart from an adapter for another base: the fixes differ
    (fetch the file again, or load the right base).
    """
    if merge_plain_lora(model, spec.adapter):  # peft's arithmetic without peft's wrapping (seconds)
        return model
    from peft import PeftModel
    from safetensors import SafetensorError

    from fluid_app.model_refs import ADAPTER_WEIGHTS

    try:
        return PeftModel.from_pretrained(model, str(spec.adapter)).merge_and_unload()
    except SafetensorError as exc:
        raise damaged(spec.adapter / ADAPTER_WEIGHTS, exc) from None
    except (OSError, ValueError, RuntimeError) as exc:
        raise FluidError(
            f"the adapter in {spec.adapter} does not fit {spec.base}: {first_line(exc)}; "
            "load it with the base model it was trained on"
        ) from None
