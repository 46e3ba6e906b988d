"""Pre-packed oneDNN weights for the linear layers of a CPU inference model.

Why: FLUID's speed on a CPU comes from forwards of several tokens costing little more than
one. PyTorch's default CPU ``F.linear`` does not deliver that for the skinny matrices of
decoding: measured on a 2-core AVX-512 machine with SmolLM2-135M in float32 (KV cache of
300 tokens), a 1-token forward took 40 ms and an 8-token one 1.42x that. With each weight
reordered once into oneDNN's blocked layout (what ``torch.compile``'s CPU weight freezing
does, without compiling anything), the same forwards took 23 ms and 1.21x. AR decoding
gets faster too; wide FLUID windows get relatively cheaper.

The packed copy is kept beside the dense weight, so ``.weight`` stays usable (tied
embeddings, exports) at the cost of holding the linear weights twice in memory. The pack is
made once: weights edited in place afterwards (a LoRA merge) would not reach it, so a deep
copy of a packed model gets plain ``nn.Linear`` layers, safe to adapt or train.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

# The reorder picks a blocking for this many rows; 16 covers FLUID windows (measured: a
# hint of 1 made every width slower, 8 and 16 were equal).
ROWS_HINT = 16


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` whose forward uses a oneDNN-packed copy of its weight."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "PackedLinear":
        packed = linear_shell(cls, linear.in_features, linear.out_features, linear.weight, linear.bias)
        with torch.no_grad():
            packed.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), ROWS_HINT)
        return packed

    def __deepcopy__(self, memo: dict) -> nn.Linear:
        return linear_shell(nn.Linear, self.in_features, self.out_features, copy.deepcopy(self.weight, memo),
                            copy.deepcopy(self.bias, memo))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return F.linear(x, self.weight, self.bias)  # the packed copy carries no gradient
        bias = None if self.bias is None else self.bias.detach()
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, bias, "none", [], "")


def linear_shell(cls: type[nn.Linear], in_features: int, out_features: int, weight: nn.Parameter,
                 bias: nn.Parameter | None) -> nn.Linear:
    """A ``cls`` layer holding the given tensors, without ``nn.Linear.__init__`` allocating and
    initialising weights only to drop them (seconds for a model; on the meta device its
    initialisers import torch's compiler)."""
    layer = cls.__new__(cls)
    nn.Module.__init__(layer)
    layer.in_features, layer.out_features = in_features, out_features
    layer.weight, layer.bias = weight, bias
    return layer


def packing_works(dtype: torch.dtype) -> bool:
    """Whether this torch build packs ``dtype`` weights and gets ``F.linear``'s answer.

    The ops are the ones ``torch.compile`` uses, not a documented API, so a build without
    them (or with different ones) falls back to plain layers instead of failing.
    """
    if dtype not in (torch.float32, torch.bfloat16) or not torch.backends.mkldnn.is_available():
        return False
    try:
        generator = torch.Generator().manual_seed(0)
        linear = nn.Linear(64, 48, dtype=dtype)
        x = torch.randn(1, 5, 64, generator=generator).to(dtype)
        with torch.no_grad():
            expected = F.linear(x, linear.weight, linear.bias)
            got = PackedLinear.from_linear(linear)(x)
    except (RuntimeError, AttributeError):
        return False
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    return got.shape == expected.shape and bool(torch.allclose(got, expected, atol=tolerance, rtol=tolerance))


def pack_linear_layers(model: nn.Module) -> int:
    """Swap every ``nn.Linear`` of a CPU model for a :class:`PackedLinear`; returns how many.

    Does nothing (returns 0) on other devices, other dtypes, or a torch build without oneDNN.
    """
    linears = [(parent, name, child) for parent in model.modules()
               for name, child in parent.named_children() if type(child) is nn.Linear]
    if not linears or linears[0][2].weight.device.type != "cpu":
        return 0
    if not packing_works(linears[0][2].weight.dtype):
        return 0
    for parent, name, child in linears:
        setattr(parent, name, PackedLinear.from_linear(child))
    return len(linears)
