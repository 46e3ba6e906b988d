"""Import the authors' released layout: a merged HF model folder plus ``model_head.bin``.

``model_head.bin`` is a torch pickle state dict whose ``diffusion_k_head.*`` tensors are the
K-head ``Linear(h, h/4) -> GELU -> Linear(h/4, K)``. Their key names are not ours (and may be
``Sequential`` indices), so each tensor is placed by its shape: the weight reading ``h``
features is ``proj``, the one reading ``h/4`` is ``out``; biases follow their weight's
output size, and the key order breaks a tie when ``h/4 == K``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from fluid_app.errors import FluidError
from fluid_app.fluid_config import FluidConfig
from fluid_app.model_refs import ModelSpec

from .k_head import KHead

HEAD_FILE = "model_head.bin"
HEAD_PREFIX = "diffusion_k_head."
MASK_KEYS = ("mask_token_id", "mask_id", "diffusion_mask_token_id")


def _order(key: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


def k_head_from_reference(path: Path, hidden_size: int) -> KHead:
    """Build our :class:`KHead` from the authors' ``model_head.bin`` (shapes decide the mapping)."""
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt or non-torch file
        raise FluidError(f"cannot read {path} as a torch state dict ({type(exc).__name__}); "
                         "re-download the authors' model_head.bin") from None
    state = state if isinstance(state, dict) else {}
    head = {k[len(HEAD_PREFIX):]: v for k, v in state.items() if k.startswith(HEAD_PREFIX)}
    if not head:
        raise FluidError(f"{path} holds no {HEAD_PREFIX}* tensors; is it the authors' model_head.bin?")
    quarter = hidden_size // 4
    weights = sorted((k for k, v in head.items() if v.ndim == 2), key=_order)
    proj_w = [k for k in weights if tuple(head[k].shape) == (quarter, hidden_size)]
    out_w = [k for k in weights if head[k].shape[1] == quarter and k not in proj_w]
    if len(proj_w) != 1 or len(out_w) != 1:
        shapes = {k: tuple(v.shape) for k, v in head.items()}
        raise FluidError(f"{path}: K-head tensors {shapes} do not fit Linear({hidden_size}, {quarter}) -> "
                         f"Linear({quarter}, K); is the model folder the one this head was trained with?")
    k_max = head[out_w[0]].shape[0]
    biases = sorted((k for k, v in head.items() if v.ndim == 1), key=_order)
    proj_b = [k for k in biases if head[k].shape[0] == quarter]
    out_b = [k for k in biases if head[k].shape[0] == k_max]
    if quarter == k_max and len(biases) == 2:  # same sizes: the first layer's bias comes first
        proj_b, out_b = [biases[0]], [biases[1]]
    if len(proj_b) != 1 or len(out_b) != 1:
        raise FluidError(f"{path}: cannot tell the K-head biases apart ({biases}); expected one of size "
                         f"{quarter} and one of size {k_max}")
    module = KHead(hidden_size, k_max)
    module.load_state_dict({"proj.weight": head[proj_w[0]], "proj.bias": head[proj_b[0]],
                            "out.weight": head[out_w[0]], "out.bias": head[out_b[0]]})
    return module


def reference_mask_id(folder: Path, given: int | None) -> int:
    """The MASK id: from the command line, else a key of config.json, else a clear error."""
    if given is not None:
        return given
    config = json.loads((folder / "config.json").read_text())
    for key in MASK_KEYS:
        if isinstance(config.get(key), int):
            return int(config[key])
    raise FluidError(f"{folder / 'config.json'} names no mask token id; pass --mask-token-id N "
                     "(the unused token id the authors trained with)")


def import_reference(src: Path, out: Path, *, mask_token_id: int | None = None, dtype: str = "float32",
                     force: bool = False, verify_tokens: int = 16) -> Path:
    """Write ``src`` (authors' layout) as a FLUID folder at ``out`` and check it decodes losslessly."""
    from fluid_app.files import atomic_folder

    from .export import save_merged
    from .loader import load

    if not (src / "config.json").exists() or not (src / HEAD_FILE).exists():
        raise FluidError(f"{src} is not in the authors' layout (needs config.json, weights and {HEAD_FILE})")
    mask = reference_mask_id(src, mask_token_id)
    with atomic_folder(out, force=force) as tmp:
        backend = load(ModelSpec(str(src), src), device="cpu", dtype=dtype, mask_token_id=mask, k_head=False,
                       pack=False)
        hidden = backend.model.config.get_text_config().hidden_size
        head = k_head_from_reference(src / HEAD_FILE, hidden)
        config = FluidConfig.from_dict({**backend.fluid_config.to_dict(), "k_max": head.k_max,
                                        "k_min": min(backend.fluid_config.k_min, head.k_max)})
        backend.fluid_config = config
        backend.k_head = head
        save_merged(backend, tmp, source_label=str(src))
        verify_lossless(tmp, verify_tokens)
    return out.expanduser().resolve()


def verify_lossless(folder: Path, max_new_tokens: int) -> None:
    """Decode a few tokens in FLUID and AR mode from the written folder; they must agree."""
    if max_new_tokens <= 0:
        return
    from fluid_app.model_refs import resolve_model
    from fluid_app.sampler import Decoder, DecodeSettings

    from .loader import load

    backend = load(resolve_model(str(folder)), device="cpu", dtype="float32")
    bos = backend.tokenizer.bos_token_id
    prompt = [int(bos)] if bos is not None else list(backend.tokenizer("Hello")["input_ids"])
    fluid, ar = (Decoder(backend, [prompt], DecodeSettings.from_config(
        backend.fluid_config, mode=mode, max_new_tokens=max_new_tokens)).run()[0].token_ids for mode in ("fluid", "ar"))
    if fluid != ar:
        raise FluidError(f"the imported model does not decode losslessly (fluid {fluid[:8]} vs ar {ar[:8]}); "
                         "check --mask-token-id")
