"""Pre-packed CPU linear layers: same answers as the plain model, only faster."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from backends.torch_backend.cpu_linear import PackedLinear, pack_linear_layers
from backends.torch_backend.loader import load, load_pretrained, prepare
from fluid_app.model_refs import resolve_model

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")


def _packed_count(model: nn.Module) -> int:
    return sum(isinstance(m, PackedLinear) for m in model.modules())


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
    with torch.no_grad():
        clone.model.layers[0].mlp.down_proj.weight.add_(1.0)  # edits to the copy stay in the copy
    ids = torch.arange(10)[None]
    with torch.inference_mode():
        assert not torch.allclose(clone(ids).logits, packed(ids).logits)
