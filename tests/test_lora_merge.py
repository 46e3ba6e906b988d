"""The torch backend fuses a plain LoRA adapter itself, bitwise as peft would, and leaves
every other kind of adapter to peft."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from backends.torch_backend.lora_merge import merge_plain_lora
from fluid_app.errors import FluidError


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    from checkpoints import make_adapter_checkpoint

    return make_adapter_checkpoint(tiny_model_dir("llama"), tmp_path_factory.mktemp("lora") / "adapter")


def base(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir("llama")), dtype=torch.float32)


def peft_merged(tiny_model_dir, adapter):
    from peft import PeftModel

    return PeftModel.from_pretrained(base(tiny_model_dir), str(adapter)).merge_and_unload()


def with_config(adapter, tmp_path, **changes):
    out = tmp_path / "changed"
    shutil.copytree(adapter, out)
    config = json.loads((out / "adapter_config.json").read_text())
    config.update(changes)
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_plain_merge_equals_peft_bitwise(tiny_model_dir, adapter, tmp_path, rslora):
    source = with_config(adapter, tmp_path, use_rslora=True) if rslora else adapter
    ours = base(tiny_model_dir)
    assert merge_plain_lora(ours, source)
    theirs = peft_merged(tiny_model_dir, source).state_dict()
    untouched = base(tiny_model_dir).state_dict()
    changed = [k for k, v in ours.state_dict().items() if not torch.equal(v, untouched[k])]
    assert len(changed) >= 7  # the adapter really moved the weights
    assert ours.state_dict().keys() == theirs.keys()
    assert all(torch.equal(v, theirs[k]) for k, v in ours.state_dict().items())


@pytest.mark.parametrize("change", [{"use_dora": True}, {"alpha_pattern": {"q_proj": 2}},
                                    {"modules_to_save": ["lm_head"]}, {"some_future_variant": {"on": True}}])
def test_anything_but_plain_lora_is_left_to_peft(tiny_model_dir, adapter, tmp_path, change):
    model = base(tiny_model_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert not merge_plain_lora(model, with_config(adapter, tmp_path, **change))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_an_adapter_for_another_shape_is_one_error_and_merges_nothing(tiny_model_dir, adapter, tmp_path):
    from safetensors.torch import load_file, save_file

    out = with_config(adapter, tmp_path)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    last = sorted(k for k in tensors if k.endswith("lora_B.weight"))[-1]
    tensors[last] = torch.zeros(tensors[last].shape[0] + 1, tensors[last].shape[1])
    save_file(tensors, str(out / "adapter_model.safetensors"))
    model = base(tiny_model_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FluidError, match="does not fit this base model"):
        merge_plain_lora(model, out)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_bfloat16_load_merges_in_float32_then_casts(adapter):
    """A bfloat16 (or float16) decode of a plain adapter takes the own forward, with the
    adapter merged in float32 and the sum rounded once: the same weights as the float32 load
    cast, where merging into bfloat16 weights through peft rounded W, BA and W + BA."""
    from backends.torch_backend.llama_family import LlamaFamilyLM
    from backends.torch_backend.loader import load
    from fluid_app.model_refs import resolve_model

    spec = resolve_model(str(adapter))
    full = load(spec, device="cpu", dtype="float32")
    for dtype, torch_dtype in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        half = load(spec, device="cpu", dtype=dtype)
        assert isinstance(half.model, LlamaFamilyLM)
        weights = half.model.state_dict()
        assert weights.keys() == full.model.state_dict().keys()
        assert all(v.dtype == torch_dtype and torch.equal(v, full.model.state_dict()[k].to(torch_dtype))
                   for k, v in weights.items())
        assert half.k_head.out.weight.dtype == torch_dtype
