"""A broken ``fluid_config.json``, a checkpoint whose base leads back to itself, a device the
machine lacks and a prompt that is not UTF-8: each is one ``error:`` line when the model is
resolved or the flags are read, never a traceback, and never mid-decode."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import run_cli
from test_cli import assert_one_line_error

from fluid_app.errors import FluidError
from fluid_app.fluid_config import FluidConfig


@pytest.mark.parametrize("content, needle", [
    ([1, 2], "must hold one JSON object"),
    ({"k_min": "two"}, "k_min must be a whole number"),
    ({"mask_token_id": "x"}, "mask_token_id must be a whole number or null"),
    ({"extra": "str"}, "extra must be an object"),
    ({"k_max": 1.5}, "k_max must be a whole number"),
    ({"threshold": None}, "threshold must be a finite number"),
    ({"restore": "yes"}, "restore must be true or false"),
    ({"sampling_k_min": 2.5}, "sampling_k_min must be a whole number or null"),
    ({"fallback_masks": None}, "fallback_masks must be a whole number"),
])
def test_a_mistyped_fluid_config_fails_at_load_not_mid_decode(tiny_model_dir, tmp_path, content, needle):
    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir("llama"), model)
    (model / "fluid_config.json").write_text(json.dumps(content))
    with pytest.raises(FluidError, match=needle):
        FluidConfig.load(model)
    proc = run_cli("generate", "--model", str(model), "--prompt", "hi", "--max-new-tokens", "2")
    assert_one_line_error(proc, needle)


def test_a_checkpoint_whose_base_model_leads_back_to_itself(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    for folder, base in ((one, two), (two, one)):
        folder.mkdir()
        FluidConfig(base_model=str(base)).save(folder)
    proc = run_cli("generate", "--model", str(one), "--prompt", "hi")
    assert_one_line_error(proc, "leads back to", "set base_model")
    FluidConfig(base_model=str(one)).save(one)  # naming its own folder
    proc = run_cli("generate", "--model", str(one), "--prompt", "hi")
    assert_one_line_error(proc, "leads back to")


def test_a_device_this_machine_lacks(tiny_model_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = run_cli("generate", "--model", str(tiny_model_dir("llama")), "--prompt", "hi", "--device", "cuda")
    assert_one_line_error(proc, "CUDA is not available", "(--device)")


def test_a_prompt_that_is_not_utf8(tiny_model_dir):
    # a terminal's undecodable bytes reach Python as lone surrogates (surrogateescape)
    proc = run_cli("generate", "--model", str(tiny_model_dir("llama")), "--prompt", "caf\udce9")
    assert_one_line_error(proc, "not valid UTF-8", "(--prompt)")
