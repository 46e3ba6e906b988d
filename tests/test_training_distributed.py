"""Distributed Stage I on the CPU: torchrun with gloo, DDP and FSDP2, against one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT, run_cli
from training_helpers import chat_file_fixture, read_log

chat_file = chat_file_fixture(16)
_log = read_log


def _torchrun(args: list[str], port: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(port), "-m", "fluid_app", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)


def test_torchrun_two_processes_match_one(tiny_model_dir, chat_file, tmp_path):
    """Same global batch (1 process x 2 examples vs 2 ranks x 1 example): same losses to 1e-5,
    and the same held-out draft quality (every rank evaluates: FSDP's forwards are collective),
    with DDP and with FSDP2 sharding."""
    base = tiny_model_dir("llama")
    common = ["train", "stage1", "--base", str(base), "--data", str(chat_file), "--k-max", "4", "--max-len", "96",
              "--steps", "3", "--lr", "2e-3", "--device", "cpu", "--no-progress", "--holdout", "0.25",
              "--eval-every", "2", "--eval-count", "2"]
    single = run_cli(*common, "--out", str(tmp_path / "one"), "--batch-size", "2")
    assert single.returncode == 0, single.stderr
    one = _log(tmp_path / "one")
    for name, extra, port in (("ddp", [], 29531), ("fsdp", ["--fsdp"], 29532)):
        result = _torchrun([*common, "--out", str(tmp_path / name), "--batch-size", "1", *extra], port)
        assert result.returncode == 0, result.stderr[-3000:]
        two = _log(tmp_path / name)
        assert len(one) == len(two) == 3
        for x, y in zip(one, two):
            assert abs(x["loss_ar"] - y["loss_ar"]) < 1e-5 and abs(x["loss_diff"] - y["loss_diff"]) < 1e-5, name
        evals = read_log(tmp_path / name, evals=True)
        assert [r["step"] for r in evals] == [2, 3] and evals == read_log(tmp_path / "one", evals=True), name
        config = json.loads((tmp_path / name / "fluid_config.json").read_text())
        assert config["extra"]["stage1"]["world_size"] == 2
        assert (tmp_path / name / "adapter_model.safetensors").exists()
