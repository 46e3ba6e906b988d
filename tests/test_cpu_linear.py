"""Pre-packed CPU linear layers: same answers as the plain model, only faster."""

from __future__ import annotations

import pytest
import torch
from test_llama_family import _has_amx
from torch import nn

from backends.torch_backend.cpu_linear import CHECKED_ROWS, PackedFused, PackedLinear, fuses_exactly, pack_linear_layers
from backends.torch_backend.loader import load, load_pretrained, prepare
from fluid_app.model_refs import resolve_model

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")


def _packed_count(model: nn.Module) -> int:
    """Linear layers packed, alone or in a fused group."""
    return sum(1 if isinstance(m, PackedLinear) else len(m.sizes) if isinstance(m, PackedFused) else 0
               for m in model.modules())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_model_matches_the_plain_one(tiny_model_dir, arch):
    spec = resolve_model(str(tiny_model_dir(arch)))
    plain = load(spec, device="cpu", dtype="float32", pack=False).model
    tokenizer, model = load_pretrained(spec, dtype=torch.float32)  # the same transformers class, packed
    packed = prepare(spec, tokenizer, model, torch.device("cpu")).model
    assert _packed_count(plain) == 0
    # every projection and the LM head: 7 per layer x 2 layers + 1
    assert _packed_count(packed) == 15
    ids = torch.randint(0, 300, (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.allclose(packed(ids).logits, plain(ids).logits, atol=1e-4, rtol=1e-4)
        kwargs = dict(max_new_tokens=24, do_sample=False, pad_token_id=0)
        assert torch.equal(packed.generate(ids[:1], **kwargs), plain.generate(ids[:1], **kwargs))


def test_packed_layer_still_trains():
    linear = nn.Linear(32, 16)
    packed = PackedLinear.from_linear(nn.Linear(32, 16))
    packed.load_state_dict(linear.state_dict())
    x = torch.randn(4, 32)
    packed(x).sum().backward()  # gradient mode takes the dense path, so weights get gradients
    linear(x).sum().backward()
    assert torch.allclose(packed.weight.grad, linear.weight.grad)


def test_unsupported_dtype_is_left_alone():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4)).to(torch.float16)
    assert pack_linear_layers(model) == 0
    assert _packed_count(model) == 0


def test_a_deep_copy_is_plain_and_shares_nothing(tiny_model_dir):
    import copy

    packed = load(resolve_model(str(tiny_model_dir("llama"))), device="cpu", dtype="float32").model
    clone = copy.deepcopy(packed)
    assert _packed_count(clone) == 0 and _packed_count(packed) == 15
    assert clone.model.layers[0].self_attn.qkv is None and clone.model.layers[0].mlp.gate_up is None
    ids = torch.arange(10)[None]
    with torch.inference_mode():
        assert torch.allclose(clone(ids).logits, packed(ids).logits, atol=1e-5, rtol=1e-5)
    for layer in ("mlp.down_proj", "mlp.up_proj", "self_attn.k_proj"):  # a fused member too
        edited = copy.deepcopy(packed)
        with torch.no_grad():
            edited.model.layers[0].get_submodule(layer).weight.add_(1.0)  # edits to the copy stay in the copy
        with torch.inference_mode():
            assert not torch.allclose(edited(ids).logits, packed(ids).logits), layer


def test_fused_projections_equal_their_layers_bitwise():
    """q/k/v (and gate/up) as one packed matmul give each layer's own packed output bit for bit,
    at the default's sizes, for every window width decoding uses, a batch and a prefill (float32,
    where they hold on every CPU; bfloat16 is checked per machine, below)."""
    generator = torch.Generator().manual_seed(0)
    for sizes, bias in (((576, 192, 192), False), ((1536, 1536), False), ((64, 16, 16), True)):
        members = [nn.Linear(576, size, bias=bias) for size in sizes]
        fused = PackedFused(members)
        alone = [PackedLinear.from_linear(m) for m in members]
        for batch, width in [(1, w) for w in range(1, 18)] + [(3, 1), (3, 6), (2, 300)]:
            x = torch.randn(batch, width, 576, generator=generator)
            with torch.inference_mode():
                for got, layer in zip(fused(x), alone, strict=True):
                    assert torch.equal(got, layer(x)), (sizes, batch, width)


def test_a_fused_prefill_caches_only_the_values(tiny_model_dir):
    """A prefill's values are a view of the fused q/k/v output; the cache keeps a copy of their
    own columns, not the whole output (5x the values' memory at the default's sizes)."""
    backend = load(resolve_model(str(tiny_model_dir("llama"))), device="cpu", dtype="float32")
    assert backend.model.model.layers[0].self_attn.qkv is not None
    session, _ = backend.start([list(range(3, 40))])
    for layer in session.cache.layers:
        assert layer.values.untyped_storage().nbytes() == layer.values.numel() * layer.values.element_size()


def test_the_fusing_check_fails_on_other_bits():
    """:func:`fuses_exactly` is what lets a dtype fuse: it passes on a fresh group and fails as
    soon as one member's output differs in the last bit (here a member edited after packing)."""
    members = [nn.Linear(576, size, bias=False) for size in (576, 192, 192)]
    fused = PackedFused(members)
    assert fuses_exactly(fused, members)
    with torch.no_grad():
        members[2].weight[5, 7] = torch.nextafter(members[2].weight[5, 7], torch.tensor(1.0))
    assert not fuses_exactly(fused, members)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_loaded_model_fuses_only_groups_that_keep_their_bits(tiny_model_dir, dtype):
    """Whatever this CPU's kernels do, a fused group a load keeps gives each member's own packed
    output bit for bit at every decoding width (fresh inputs, not the load's own check's); float32
    always fuses, and bfloat16 does where AMX computes it (the speed it is kept for, README ``--dtype``)."""
    model = load(resolve_model(str(tiny_model_dir("llama"))), device="cpu", dtype=dtype).model
    groups = [(getattr(parent, name), [getattr(parent, m) for m in members]) for parent in model.modules()
              for name, members in getattr(parent, "fused_linears", {}).items()]
    fused = [(group, members) for group, members in groups if group is not None]
    if dtype == "float32" or _has_amx():
        assert len(fused) == len(groups) == 2 * len(model.model.layers)
    generator = torch.Generator().manual_seed(1)
    for group, members in fused:
        alone = [PackedLinear.from_linear(m) for m in members]
        for rows in CHECKED_ROWS:
            x = torch.randn(*rows, members[0].in_features, generator=generator).to(getattr(torch, dtype))
            with torch.inference_mode():
                assert all(torch.equal(got, layer(x)) for got, layer in zip(group(x), alone, strict=True)), rows
