"""Llama, Mistral, Qwen2 and Qwen3 decoders in plain PyTorch, for decoding without transformers' model code.

Why: on a 2-core CPU, importing transformers' modeling code (its lazy module scan, the
distributed-tensor and kernel-hub imports it pulls in) and ``from_pretrained`` took about 6 s
of the 10 s a four-token ``fluid generate`` of the 135M default needed; the decode itself took
well under one. These four architectures are one network (pre-norm blocks, rotary attention
with grouped KV heads, a SwiGLU MLP) differing only in biases and Qwen3's per-head q/k norms,
so an inference load of any of them builds this module straight from ``config.json`` and the
safetensors files. Everything else (training, export, other architectures, configs with rope
scaling or a sliding window that can bind) keeps transformers' classes.

It computes what transformers' SDPA path computes, op for op and with the same kernel choices
(except where fewer calls give the same bits: q/k/v and gate/up packed as one matmul each on a
CPU, :class:`.cpu_linear.PackedFused`; the rotary rotation as a roll, :func:`signed_halves`):
no mask when the window is causal on its own (one query, or a fresh prefill), a boolean
``[B, 1, q, kv]`` mask otherwise (padding and causality over cache columns), GQA through
SDPA's ``enable_gqa`` without a mask, by folding the heads into the query for a single masked
query. For several masked queries (a FLUID window in a batch) transformers copies every KV
head ``groups`` times, about a third of such a forward of the default on a 2-core CPU; here
``enable_gqa`` computes the same bits without the copy. So with packed CPU weights (how
decoding runs) its logits equal transformers' bit for bit in every session operation
(``tests/test_llama_family.py``). With plain ``F.linear`` the two can differ in the last float
bits (about 1e-6): the weights here are private copies, transformers' stay mapped from the
file, and a CPU matmul's summation order follows the weights' memory alignment.
One deliberate exception: in bfloat16 or float16 on a CPU, a decoding window is attended one
query at a time, as one-token forwards attend it, so that FLUID equals AR bit for bit there too
(:func:`query_masks`).

The module keeps transformers' parameter names (``model.layers.N.self_attn.q_proj``...), so
safetensors load directly, a peft LoRA merges by name, and the linear layers pack as before.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fluid_app import hf_config

from ..llama_shape import Shape, shape_of
from .cpu_linear import linear_shell


def linear(inputs: int, outputs: int, bias: bool, dtype: torch.dtype | None = None) -> nn.Linear:
    """An ``nn.Linear`` with unset weights, for the checkpoint to fill (:func:`linear_shell`)."""
    def unset(*shape: int) -> nn.Parameter:
        return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)

    return linear_shell(nn.Linear, inputs, outputs, unset(outputs, inputs), unset(outputs) if bias else None)


def embedding(rows: int, dim: int, dtype: torch.dtype | None = None) -> nn.Embedding:
    """An ``nn.Embedding`` with unset weights, for the same reason as :func:`linear`."""
    return nn.Embedding(rows, dim, _weight=torch.empty(rows, dim, dtype=dtype), _freeze=True)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def signed_halves(sin: torch.Tensor) -> torch.Tensor:
    """``sin`` with its first half negated, once a forward for every layer.

    transformers rotates as ``x * cos + rotate_half(x) * sin``, where ``rotate_half(x)`` is
    ``cat(-x2, x1)``. ``x.roll(half) * signed_halves(sin)`` is ``cat(x2 * -s1, x1 * s2)``, the
    same bits (a product's rounding does not depend on the sign), in one call a tensor instead
    of four (about 180 fewer calls a forward of the default).
    """
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


class Attention(nn.Module):
    fused_linears = {"qkv": ("q_proj", "k_proj", "v_proj")}  # one packed matmul on a CPU (cpu_linear)

    def __init__(self, shape: Shape, index: int):
        super().__init__()
        self.qkv: nn.Module | None = None
        self.index, self.head_dim = index, shape.head_dim
        self.groups = shape.heads // shape.kv_heads
        self.scale = shape.head_dim ** -0.5
        self.q_proj = linear(shape.hidden, shape.heads * shape.head_dim, shape.qkv_bias)
        self.k_proj = linear(shape.hidden, shape.kv_heads * shape.head_dim, shape.qkv_bias)
        self.v_proj = linear(shape.hidden, shape.kv_heads * shape.head_dim, shape.qkv_bias)
        self.o_proj = linear(shape.heads * shape.head_dim, shape.hidden, shape.o_bias)
        if shape.qk_norm:
            self.q_norm = RMSNorm(shape.head_dim, shape.eps)
            self.k_norm = RMSNorm(shape.head_dim, shape.eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, rope: tuple[torch.Tensor, torch.Tensor],
                cache: KVCache | None, queries: list[torch.Tensor | None] | None = None) -> torch.Tensor:
        batch, width = x.shape[:2]
        split = (batch, width, -1, self.head_dim)
        q, k, v = self.qkv(x) if self.qkv is not None else (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        q, k, v = q.view(split), k.view(split), v.view(split)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cos, signed_sin = rope
        half = self.head_dim // 2
        q, k = q * cos + q.roll(half, -1) * signed_sin, k * cos + k.roll(half, -1) * signed_sin
        if cache is not None:
            k, v = cache.update(k, v, self.index)
        if queries is not None:  # one query at a time, as one-token forwards attend it (query_masks)
            past = k.shape[-2] - width
            out = torch.cat([self._attend(q[:, :, j:j + 1], k[:, :, :past + j + 1], v[:, :, :past + j + 1], row)
                             for j, row in enumerate(queries)], dim=1)
        else:
            out = self._attend(q, k, v, mask)
        return self.o_proj(out.reshape(batch, width, -1).contiguous())

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """SDPA as transformers dispatches it, so the same kernels see the same tensors; ``[B, W, heads, D]``."""
        batch, width = q.shape[0], q.shape[2]
        options: dict[str, Any] = {}
        if self.groups > 1:
            if mask is None and k.shape[-1] == v.shape[-1] <= 256:
                options["enable_gqa"] = True
            elif width == 1:
                q = q.reshape(batch, q.shape[1] // self.groups, self.groups, self.head_dim)
            elif k.shape[-1] == v.shape[-1] <= 256:  # where transformers repeats the KV heads under a
                options["enable_gqa"] = True  # mask: the same bits without copying the cache
            else:
                k, v = repeat_kv(k, self.groups), repeat_kv(v, self.groups)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, scale=self.scale,
                                             is_causal=width > 1 and mask is None, **options)
        return out.reshape(batch, -1, width, v.shape[-1]).transpose(1, 2).contiguous()


def query_masks(mask: torch.Tensor | None, width: int, past: int,
                x: torch.Tensor) -> list[torch.Tensor | None] | None:
    """For a decoding window in half precision on a CPU, each query's mask as a one-token forward
    would see it (its own columns; None where it may see them all); else None: the window is
    attended whole. Worked out once a forward, for every layer.

    Why a window is attended one query at a time there: SDPA's CPU kernels block a window's
    queries differently from a single query, so a window's rows differ from one-token forwards
    in the last bits. In float32 that flips a greedy token almost never; in bfloat16 every
    layer rounds to 8 mantissa bits, and a window's logits and AR's drifted up to 0.75 apart
    (2 of 4 prompts decoded differently). Computed as AR computes it, each query gets AR's bits
    (the packed bfloat16 linear layers are row-invariant already), so FLUID stays identical to
    AR in bfloat16 too, for a few small SDPA calls per layer. Prefills (``past`` 0) are the same
    call in every mode and stay whole.
    """
    if width == 1 or past == 0 or x.dtype == torch.float32 or x.device.type != "cpu":
        return None
    rows: list[torch.Tensor | None] = []
    for j in range(width):
        row = None if mask is None else mask[:, :, j:j + 1, :past + j + 1]
        rows.append(None if row is None or bool(row.all()) else row)
    return rows


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    batch, heads, length, dim = x.shape
    return x[:, :, None].expand(batch, heads, groups, length, dim).reshape(batch, heads * groups, length, dim)


class MLP(nn.Module):
    fused_linears = {"gate_up": ("gate_proj", "up_proj")}

    def __init__(self, shape: Shape):
        super().__init__()
        self.gate_up: nn.Module | None = None
        self.gate_proj = linear(shape.hidden, shape.intermediate, shape.mlp_bias)
        self.up_proj = linear(shape.hidden, shape.intermediate, shape.mlp_bias)
        self.down_proj = linear(shape.intermediate, shape.hidden, shape.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x) if self.gate_up is not None else (self.gate_proj(x), self.up_proj(x))
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, shape: Shape, index: int):
        super().__init__()
        self.self_attn = Attention(shape, index)
        self.mlp = MLP(shape)
        self.input_layernorm = RMSNorm(shape.hidden, shape.eps)
        self.post_attention_layernorm = RMSNorm(shape.hidden, shape.eps)

    def forward(self, x, mask, rope, cache, queries=None):
        x = x + self.self_attn(self.input_layernorm(x), mask, rope, cache, queries)
        return x + self.mlp(self.post_attention_layernorm(x))


class KVCache:
    """Per-layer keys and values ``[B, kv_heads, columns, head_dim]``.

    The attributes and ``crop`` follow transformers' ``DynamicCache`` (``layers[i].keys`` /
    ``.values``), which :class:`.session.TorchSession` edits directly to add, drop and rewind rows.
    Unlike it, a layer does not grow by concatenation: a new tensor per layer and forward,
    which measured half of a batched decoding forward of the default on a 2-core CPU (8 rows
    of 400 tokens: 355 ms a forward with it, 163 ms without; one row, 95 and 76 ms). A layer's
    tensors are the leading columns of buffers with spare columns (``spare``), and a forward
    writes its keys and values into them in place. When the session puts other tensors there
    (a row added, dropped or rewound), it calls :meth:`release` and the next forward starts
    new buffers, so a dropped row's memory goes at once.
    """

    def __init__(self, layers: int):
        self.layers = [SimpleNamespace(keys=None, values=None, spare=None) for _ in range(layers)]

    def get_seq_length(self) -> int:
        keys = self.layers[0].keys
        return 0 if keys is None else int(keys.shape[-2])

    def update(self, keys: torch.Tensor, values: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.layers[index]
        if layer.keys is None:  # values can be a view of a fused q/k/v output: keep only their own columns
            layer.keys, layer.values = keys, values.contiguous()
            return keys, values
        length, total = layer.keys.shape[-2], layer.keys.shape[-2] + keys.shape[-2]
        if not _leads(layer.spare, layer.keys, layer.values) or layer.spare[0].shape[-2] < total:
            shape = (*layer.keys.shape[:2], total + max(64, total // 2), layer.keys.shape[-1])
            spare = layer.keys.new_empty(shape), layer.values.new_empty(shape[:3] + layer.values.shape[3:])
            spare[0][:, :, :length], spare[1][:, :, :length] = layer.keys, layer.values
            layer.spare = spare
        layer.spare[0][:, :, length:total], layer.spare[1][:, :, length:total] = keys, values
        layer.keys, layer.values = layer.spare[0][:, :, :total], layer.spare[1][:, :, :total]
        return layer.keys, layer.values

    def release(self) -> None:
        """Forget the buffers: the session has put tensors of its own in the layers."""
        for layer in self.layers:
            layer.spare = None

    def crop(self, length: int) -> None:
        """Keep the first ``length`` columns (a negative ``length`` drops that many from the end)."""
        if length < 0:
            length = self.get_seq_length() + length
        for layer in self.layers:
            if layer.keys is not None:
                layer.keys, layer.values = layer.keys[..., :length, :], layer.values[..., :length, :]


def _leads(spare: tuple[torch.Tensor, torch.Tensor] | None, keys: torch.Tensor, values: torch.Tensor) -> bool:
    """Whether ``keys`` and ``values`` are the leading columns of the buffers ``spare`` (not
    tensors put in the layer since, which the buffers do not hold)."""
    return spare is not None and all(
        buffer.data_ptr() == tensor.data_ptr() and buffer.stride() == tensor.stride()
        and buffer.shape[:2] == tensor.shape[:2] and buffer.shape[3:] == tensor.shape[3:]
        for buffer, tensor in zip(spare, (keys, values)))


def causal_mask(padding: torch.Tensor | None, width: int, past: int, batch: int) -> torch.Tensor | None:
    """transformers' SDPA mask: None when causality alone describes the window (one query, or
    every key visible to a fresh prefill), else True where query row may attend cache column."""
    if (width == 1 or past == 0) and (padding is None or bool(padding.all())):
        return None
    device = padding.device if padding is not None else None
    queries = torch.arange(width, device=device)[None, None, :, None] + past
    keys = torch.arange(past + width, device=device)[None, None, None, :]
    mask = keys <= queries
    if padding is not None:
        mask = mask & padding.bool()[:, None, None, :]
    return mask.expand(batch, -1, width, past + width)


class Inner(nn.Module):
    """The decoder stack (transformers' ``model.model``): ids in, final hidden states out."""

    def __init__(self, shape: Shape):
        super().__init__()
        self.embed_tokens = embedding(shape.vocab, shape.hidden)
        self.layers = nn.ModuleList(Block(shape, i) for i in range(shape.layers))
        self.norm = RMSNorm(shape.hidden, shape.eps)
        steps = torch.arange(0, shape.head_dim, 2, dtype=torch.float)
        self.inv_freq = 1.0 / (shape.rope_theta ** (steps / shape.head_dim))

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                use_cache: bool = True) -> SimpleNamespace:
        x = self.embed_tokens(input_ids)
        batch, width = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + width, device=x.device)[None].expand(batch, -1)
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)
        angles = torch.cat((freqs, freqs), dim=-1)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        rope = cos.unsqueeze(1), signed_halves(sin).unsqueeze(1)
        if attention_mask is not None and attention_mask.dim() == 4:  # a branched window's own mask
            mask = attention_mask.bool().expand(batch, -1, width, past + width)
        else:
            mask = causal_mask(attention_mask, width, past, batch)
        queries = query_masks(mask, width, past, x)
        for block in self.layers:
            x = block(x, mask, rope, cache, queries)
        return SimpleNamespace(last_hidden_state=self.norm(x))


class Config(SimpleNamespace):
    """The parsed ``config.json``, read the way the backend reads a transformers config."""

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def get_text_config(self) -> "Config":
        return self


class LlamaFamilyLM(nn.Module):
    """The causal LM: :class:`Inner` plus its output layer (tied to the embedding or not)."""

    def __init__(self, shape: Shape, config: dict[str, Any], generation: dict[str, Any] | None):
        super().__init__()
        self.shape = shape
        self.config = Config(**config)
        self.generation_config = Config(**generation) if generation else None
        self.model = Inner(shape)
        self.lm_head = linear(shape.hidden, shape.vocab, False)
        if shape.tied:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def base_model(self) -> Inner:
        return self.model

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def new_cache(self) -> KVCache:
        return KVCache(self.shape.layers)

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False, **_: Any) -> SimpleNamespace:
        """Logits of a plain causal pass (teacher-forced scoring)."""
        return SimpleNamespace(logits=self.lm_head(self.model(input_ids, cache=None).last_hidden_state))

    def resize_token_embeddings(self, rows: int, mean_resizing: bool = False) -> None:
        """Grow the vocabulary to ``rows``. The new rows are zero whatever ``mean_resizing`` says
        (transformers' signature): their one caller, ``loader.add_embedding_rows``, sets them."""
        def grown(old: torch.Tensor) -> torch.Tensor:
            weight = torch.zeros(rows, old.shape[1], dtype=old.dtype, device=old.device)
            weight[: old.shape[0]] = old
            return weight

        with torch.no_grad():
            embed = embedding(rows, self.shape.hidden, self.model.embed_tokens.weight.dtype)
            embed.weight.data = grown(self.model.embed_tokens.weight)
            head = linear(self.shape.hidden, rows, False, self.lm_head.weight.dtype)
            head.weight = embed.weight if self.shape.tied else nn.Parameter(grown(self.lm_head.weight),
                                                                            requires_grad=False)
        self.model.embed_tokens, self.lm_head = embed, head
        self.config.vocab_size = rows


def load_llama_family(folder: Path, dtype: torch.dtype) -> LlamaFamilyLM | None:
    """The model in ``folder`` as a :class:`LlamaFamilyLM`, or None when transformers must load it
    (another architecture, a setting computed differently, weights not laid out as expected)."""
    from safetensors import safe_open

    config = hf_config.read_config(folder)
    shape = shape_of(config)
    if shape is None:
        return None
    index = folder / "model.safetensors.index.json"
    try:
        files = (sorted({folder / name for name in json.loads(index.read_text())["weight_map"].values()})
                 if index.exists() else [folder / "model.safetensors"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    model = LlamaFamilyLM(shape, config, hf_config.read_generation_config(folder))
    wanted = {name: tensor for name, tensor in model.state_dict(keep_vars=True).items()}
    if shape.tied:
        wanted.pop("lm_head.weight")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        if not path.exists():
            return None
        with safe_open(str(path), framework="pt") as weights:  # a damaged file raises: named by the caller
            for name in weights.keys():
                if name in wanted:  # a private copy: writing (a LoRA merge) to the file's mapping costs 3x more
                    state[name] = weights.get_tensor(name).to(dtype, copy=True)
    if set(state) != set(wanted) or any(state[n].shape != wanted[n].shape for n in state):
        return None
    model.load_state_dict(state, strict=False, assign=True)
    if shape.tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()
