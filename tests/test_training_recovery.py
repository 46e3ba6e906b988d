"""Training hardening: defaults from FluidConfig, no unpickling on --resume, recovery from a
run killed mid-write (real tiny models, CPU)."""

from __future__ import annotations

import argparse
import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from training_helpers import chat_file_fixture, read_log, stage1_options

from backends.torch_backend.training import options as training_options
from backends.torch_backend.training.loop import TrainLog
from backends.torch_backend.training.stage1 import Stage1Options, run_stage1
from backends.torch_backend.training.stage2 import Stage2Options, run_stage2
from backends.torch_backend.training.state_files import load_state, save_state
from fluid_app.commands import train as train_command
from fluid_app.errors import FluidError
from fluid_app.fluid_config import FluidConfig

chat_file = chat_file_fixture(16)
_opts = functools.partial(stage1_options, max_len=64, steps=3)
_steps = read_log


# ------------------------------------------------------------ defaults: one source


def test_training_defaults_are_read_from_fluid_config(monkeypatch):
    """Options and CLI flags left out take FluidConfig's values, whatever they are: a
    FluidConfig with other defaults changes them (a copied literal would not follow)."""
    from backends import train
    from backends.torch_backend.training import stage1, stage2

    @dataclass(frozen=True)
    class Other(FluidConfig):
        k_min: int = 3
        k_max: int = 9
        tau: float = 1.25
        sigma: float = 0.75
        anchor_rate: float = 0.25
        noise_rate: float = 0.05

    monkeypatch.setattr(training_options, "FluidConfig", Other)
    handed: list = []  # the options ``fluid train`` hands the trainers
    monkeypatch.setattr(stage1, "run_stage1", handed.append)
    monkeypatch.setattr(stage2, "run_stage2", handed.append)
    parser = argparse.ArgumentParser()
    train_command.register(parser.add_subparsers(dest="command"))
    for stage, flags in (("stage1", ["--base", "b"]), ("stage2", ["--model", "m"]), ("stage1", ["--base", "b", "--k-max", "5"])):
        train(stage, vars(parser.parse_args(["train", stage, *flags, "--data", "d", "--out", "o"])))
    one, two, typed = handed
    for options in (Stage1Options(base="b", data="d", out="o"), one):
        assert (options.k_max, options.k_min, options.anchor_rate, options.noise_rate) == (9, 3, 0.25, 0.05)
    for options in (Stage2Options(model="m", data="d", out="o"), two):
        assert (options.tau, options.sigma, options.k_max) == (1.25, 0.75, None)  # k_max: the checkpoint's
    assert typed.k_max == 5 and Stage2Options(model="m", data="d", out="o", tau=2.0).tau == 2.0


# ------------------------------------------------------------ state without pickle


def test_state_files_round_trip_exactly(tmp_path):
    """Optimizer-, scheduler- and RNG-shaped state comes back equal: tuples stay tuples,
    key order and integer keys are kept, tensors and numpy arrays are bit-identical."""
    state = {
        "torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": __import__("random").getstate(),
        "optimizer": {"state": {"w": {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3, dtype=torch.bfloat16)}},
                      "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "foreach": None, "params": ["w"]}]},
        "ints": {3: "three", 1: [1.5, float("inf")]}, "zed": {"b": 1, "a": 2, "__tensor__": "not a reference"},
    }
    save_state(tmp_path, "state", state)
    back = load_state(tmp_path, "state")
    assert list(back) == list(state) and list(back["zed"]) == ["b", "a", "__tensor__"]
    assert torch.equal(back["torch"], state["torch"])
    assert back["numpy"][0] == "MT19937" and back["numpy"][1].dtype == np.uint32
    assert all(np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y
               for x, y in zip(back["numpy"], state["numpy"]))
    assert back["python"] == state["python"] and isinstance(back["python"][1], tuple)
    groups = back["optimizer"]["param_groups"]
    assert groups == state["optimizer"]["param_groups"] and isinstance(groups[0]["betas"], tuple)
    saved, loaded = state["optimizer"]["state"]["w"], back["optimizer"]["state"]["w"]
    assert all(torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype for k, v in saved.items())
    assert back["ints"] == {3: "three", 1: [1.5, float("inf")]} and back["zed"] == state["zed"]
    (tmp_path / "state.json").write_text('{"format": 1, "state": {"__tensor__": "7"}}')
    with pytest.raises(FluidError, match="missing or damaged"):
        load_state(tmp_path, "state")


class _Planted:
    """Unpickling this creates ``path``: what a crafted checkpoint could do with any code."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_resume_refuses_pickled_state_without_unpickling_it(tiny_model_dir, chat_file, tmp_path, capsys):
    base = tiny_model_dir("llama")
    out = tmp_path / "run"
    run_stage1(_opts(base, chat_file, out, stop_at_step=1))
    step = out / "checkpoints" / "step-0000001"
    marker = tmp_path / "code-ran"
    torch.save({"optimizer": _Planted(marker), "scheduler": {}}, step / "optimizer.pt")
    with pytest.raises(FluidError, match="pickled training state"):
        run_stage1(_opts(base, chat_file, out, resume="auto"))
    assert not marker.exists()
    # an older version's folder (only pickles), through the command line: one line, exit 2
    for name in ("optimizer.safetensors", "optimizer.json", "rng-rank0.safetensors", "rng-rank0.json"):
        (step / name).unlink()
    torch.save(_Planted(marker), step / "rng-rank0.pt")
    from fluid_app.cli import main

    capsys.readouterr()
    code = main(["train", "stage1", "--base", str(base), "--data", str(chat_file), "--out", str(out), "--k-max", "4",
                 "--max-len", "64", "--steps", "3", "--device", "cpu", "--no-progress", "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "optimizer.pt, rng-rank0.pt" in err, err
    assert not marker.exists() and not (out / "fluid_config.json").exists()


# ------------------------------------------------------------ a run killed mid-write


def _killed_while_saving_its_first_checkpoint(out: Path) -> list[Path]:
    """What ``kill -9`` during the first ``--save-every`` save leaves (and an older version's
    final temp folder): a logged step, a torn log line, temp folders, no finished checkpoint."""
    (out / "checkpoints" / ".step-0000001.tmp").mkdir(parents=True)
    (out / "checkpoints" / ".step-0000001.tmp" / "trainable.safetensors").write_bytes(b"half")
    (out / "checkpoints" / "step-0000009").mkdir()  # no trainer_state.json: unfinished
    for name in (".final.tmp-999999999", "..final.tmp-999999998"):
        (out / name).mkdir()
        (out / name / "adapter_model.safetensors").write_bytes(b"half")
    (out / "train_log.jsonl").write_text(json.dumps({"step": 1, "loss_ar": 9.0}) + "\n" + '{"step": 2, "lo')
    return [p for p in out.rglob("*") if p.is_dir()]


@pytest.mark.parametrize("resume", ["auto", None])
def test_a_run_killed_while_writing_its_first_checkpoint_starts_over(tiny_model_dir, chat_file, tmp_path, resume):
    """Neither ``--resume`` nor a fresh start is blocked by what the killed run left; it is
    cleared, and the run equals one that was never interrupted."""
    base = tiny_model_dir("llama")
    straight = tmp_path / "straight"
    run_stage1(_opts(base, chat_file, straight, save_every=2))
    out = tmp_path / "killed"
    stale = _killed_while_saving_its_first_checkpoint(out)
    summary = run_stage1(_opts(base, chat_file, out, save_every=2, resume=resume))
    assert summary["steps"] == 3 and (out / "fluid_config.json").exists()
    assert not any(p.exists() for p in stale if p.name != "checkpoints")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002"]
    assert [r["step"] for r in _steps(out)] == [1, 2, 3]
    for x, y in zip(_steps(straight), _steps(out)):
        assert (x["loss_ar"], x["loss_diff"]) == (y["loss_ar"], y["loss_diff"])


def test_finished_work_is_never_started_over(tiny_model_dir, chat_file, tmp_path):
    """Only half-written leftovers are cleared: a finished checkpoint or export in ``--out``
    still needs ``--resume`` (or another ``--out``), and ``--resume`` of a finished run
    without checkpoints is refused rather than silently restarted."""
    base = tiny_model_dir("llama")
    stopped, done = tmp_path / "stopped", tmp_path / "done"
    run_stage1(_opts(base, chat_file, stopped, stop_at_step=1))
    run_stage1(_opts(base, chat_file, done, steps=1))
    for out in (stopped, done):
        with pytest.raises(FluidError, match="already holds a training run"):
            run_stage1(_opts(base, chat_file, out))
    with pytest.raises(FluidError, match="no training checkpoint to resume"):
        run_stage1(_opts(base, chat_file, done, resume="auto"))
    assert (stopped / "checkpoints" / "step-0000001" / "trainer_state.json").exists()


def test_stage2_from_a_step_folder_leaves_training_state_and_stale_temps_behind(tiny_model_dir, chat_file, tmp_path):
    """A K-head calibrated on a resumable step folder is a FLUID checkpoint, not a resumable
    one: the optimizer, RNG and trainer state stay behind; a killed export's temp is cleared."""
    base = tiny_model_dir("llama")
    run_stage1(_opts(base, chat_file, tmp_path / "s1", stop_at_step=1))
    step = tmp_path / "s1" / "checkpoints" / "step-0000001"
    out = tmp_path / "s2"
    (out / ".final.tmp-999999999").mkdir(parents=True)
    run_stage2(Stage2Options(model=str(step), data=str(chat_file), out=str(out), steps=1, max_len=64, device="cpu",
                             progress=False))
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                                      "fluid_config.json", "k_head.safetensors", "stage2_log.jsonl"]


def test_time_limit_stops_with_a_checkpoint_that_resumes_exactly(tiny_model_dir, chat_file, tmp_path):
    """``--time-limit``: the run stops after the first step that ends past the limit, saving a
    resumable checkpoint as ``--stop-at-step`` does; ``--resume`` then finishes the same run."""
    base = tiny_model_dir("llama")
    run_stage1(_opts(base, chat_file, tmp_path / "straight"))
    out = tmp_path / "timed"
    summary = run_stage1(_opts(base, chat_file, out, time_limit=1e-6))
    assert summary["steps"] == 1 and summary["total_steps"] == 3 and not (out / "fluid_config.json").exists()
    assert (out / "checkpoints" / "step-0000001" / "trainer_state.json").exists()
    assert run_stage1(_opts(base, chat_file, out, resume="auto", time_limit=3600))["steps"] == 3
    assert [(r["step"], r["loss"]) for r in _steps(out)] == [(r["step"], r["loss"]) for r in _steps(tmp_path / "straight")]
    with pytest.raises(FluidError, match="time_limit must be a positive") as error:
        run_stage1(_opts(base, chat_file, tmp_path / "bad", time_limit=0))
    assert error.value.params == ("time_limit",)


# ------------------------------------------------------------ the log


def test_train_log_drops_a_torn_last_line_and_reports_other_damage(tmp_path):
    path = tmp_path / "train_log.jsonl"
    lines = [json.dumps({"step": n, "loss": 1.0 / n}) for n in (1, 2, 3)]
    path.write_text("\n".join(lines) + "\n" + '{"step": 4, "lo')
    TrainLog(path, 2)
    assert path.read_text() == lines[0] + "\n" + lines[1] + "\n"
    path.write_text("\n".join(lines) + "\n" + '{"step": 4, "lo')
    TrainLog(path, 3).write({"step": 4, "loss": 0.25})
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
    path.write_text(lines[0] + "\n" + "garbage\n" + lines[2] + "\n")
    with pytest.raises(FluidError, match="line 2 of .* is not a step record"):
        TrainLog(path, 3)
