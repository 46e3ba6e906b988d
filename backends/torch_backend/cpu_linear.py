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
        packed.packed_weight = pack(linear.weight)
        return packed

    def __deepcopy__(self, memo: dict) -> nn.Linear:
        return linear_shell(nn.Linear, self.in_features, self.out_features, copy.deepcopy(self.weight, memo),
                            copy.deepcopy(self.bias, memo))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return F.linear(x, self.weight, self.bias)  # the packed copy carries no gradient
        return apply_packed(x, self.packed_weight, self.bias)


def pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (``[out, in]``) reordered into oneDNN's blocked layout for :func:`apply_packed`."""
    with torch.no_grad():
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), ROWS_HINT)


def apply_packed(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` with a :func:`pack`-ed weight."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, None if bias is None else bias.detach(), "none", [], "")


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


class PackedFused(nn.Module):
    """Linear layers that read the same input, packed as one matmul whose output is split back.

    Why: a decoding forward of a small model is many short matmuls, and each pays for its own
    pass over the input and its own call. Measured on a 2-core AMD EPYC (AVX2) with the 30
    layers of SmolLM2-135M in float32, q/k/v as one matmul and gate/up as another (4 calls a
    layer instead of 7) took the linear layers of a 6-token forward from 54 to 46 ms. Each output
    column is the same dot product over the same input as in its own layer, and oneDNN blocks
    that sum by the input size alone, so the outputs equal the separate packed layers' bit for
    bit (``tests/test_cpu_linear.py`` holds them to it at every window width).

    Whether the bits hold is the machine's kernels' business, so :func:`pack_linear_layers`
    checks each group shape once before fusing it (:func:`fuses_exactly`) and keeps one layer a
    call where they do not. In float32 they held on every CPU measured; in bfloat16 on a 2-core
    Intel Xeon with AMX they hold for decoding windows, where fusing made bfloat16 AR 9% and
    FLUID 6% faster (a long prompt's prefill can differ in the last bits, as the bfloat16
    layers' own rows already do from 64 rows on; every mode prefills with the same call).

    A model opts in by naming its groups in a ``fused_linears`` class attribute (name ->
    member layer names) and calling the fused module when it is set. The members stay plain
    ``nn.Linear`` layers holding the weights (state dicts, LoRA merges and exports see them
    unchanged); the packed copy carries no gradient and goes on a deep copy, which gets
    ``None`` in its place and so runs the members.
    """

    def __init__(self, linears: list[nn.Linear]):
        super().__init__()
        self.sizes = [linear.out_features for linear in linears]
        self.packed_weight = pack(torch.cat([linear.weight.detach() for linear in linears]))
        has_bias = linears[0].bias is not None
        self.bias = torch.cat([linear.bias.detach() for linear in linears]) if has_bias else None

    def __deepcopy__(self, memo: dict) -> None:
        return None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return apply_packed(x, self.packed_weight, self.bias).split(self.sizes, dim=-1)


# The row counts a decoding forward feeds: one token, FLUID windows up to k_max = 16 and one
# past it, and a batch of rows.
CHECKED_ROWS = tuple((1, width) for width in (1, 2, 3, 5, 8, 16, 17)) + ((3, 6),)


def fuses_exactly(fused: PackedFused, members: list[nn.Linear]) -> bool:
    """Whether ``fused`` gives every member's own packed output bit for bit here.

    Why a check on the machine instead of a rule: oneDNN picks its blocking per CPU, dtype and
    shape, and fusing is only an optimisation if nothing downstream can tell. Checked on the
    members' real weights with random inputs of the decoding widths, once a group shape per
    load: 10-60 ms for the default's two shapes on a 2-core Intel Xeon.
    """
    alone = [PackedLinear.from_linear(m) for m in members]
    generator = torch.Generator().manual_seed(0)
    dtype = members[0].weight.dtype
    with torch.no_grad():
        for rows in CHECKED_ROWS:
            x = torch.randn(*rows, members[0].in_features, generator=generator).to(dtype)
            if not all(torch.equal(got, layer(x)) for got, layer in zip(fused(x), alone, strict=True)):
                return False
    return True


def _fusable(members: list[nn.Module]) -> bool:
    """Plain layers of one input size, all with or all without a bias."""
    return (all(type(m) is nn.Linear for m in members) and len({m.in_features for m in members}) == 1
            and len({m.bias is None for m in members}) == 1)


def pack_linear_layers(model: nn.Module) -> int:
    """Swap every ``nn.Linear`` of a CPU model for a :class:`PackedLinear`, or, where its parent
    names them in ``fused_linears``, a group of them for one :class:`PackedFused`; returns how
    many layers were packed (alone or in a group).

    Does nothing (returns 0) on other devices, other dtypes, or a torch build without oneDNN.
    """
    linears = [(parent, name, child) for parent in model.modules()
               for name, child in parent.named_children() if type(child) is nn.Linear]
    if not linears or linears[0][2].weight.device.type != "cpu":
        return 0
    if not packing_works(linears[0][2].weight.dtype):
        return 0
    grouped: set[int] = set()
    exact: dict[tuple, bool] = {}  # per group shape: whether fusing keeps each layer's bits here
    for parent in list(model.modules()):
        for fused, names in getattr(parent, "fused_linears", {}).items():
            members = [getattr(parent, name) for name in names]
            if not _fusable(members):
                continue
            shape = (members[0].in_features, tuple(m.out_features for m in members), members[0].bias is None,
                     members[0].weight.dtype)
            if exact.get(shape) is False:
                continue
            group = PackedFused(members)
            if shape not in exact:
                exact[shape] = fuses_exactly(group, members)
            if exact[shape]:
                setattr(parent, fused, group)
                grouped.update(id(m) for m in members)
    for parent, name, child in linears:
        if id(child) not in grouped:
            setattr(parent, name, PackedLinear.from_linear(child))
    return len(linears)
