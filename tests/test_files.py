"""``fluid_app.files``: atomic files and folders with ordinary modes, and every writer using them.

The unit tests drive the helpers directly (including real crashes, in a child process that
dies inside the block); the end-to-end tests check that what ``fluid export`` (adapter and
``--merge``), ``fluid convert --to mlx`` and the MLX GGUF cache leave on disk has the modes
a plain ``mkdir``/``open`` gives under the umask, not ``mkdtemp``'s owner-only ones.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run_cli

from fluid_app.errors import FluidError
from fluid_app.files import atomic_file, atomic_folder, ordinary_mode, remove_stale_temps, write_json_atomic

UMASK = 0o022


@pytest.fixture
def umask():
    """Run the test (and the CLI processes it starts, which inherit it) under ``UMASK``."""
    old = os.umask(UMASK)
    yield UMASK
    os.umask(old)


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def assert_ordinary_modes(folder: Path) -> None:
    """``folder`` and everything in it have the modes mkdir/open would give under the umask."""
    assert ordinary_mode() == 0o666 & ~UMASK and ordinary_mode(directory=True) == 0o777 & ~UMASK
    entries = [folder, *folder.rglob("*")]
    assert len(entries) > 3, entries
    wrong = {str(p.relative_to(folder.parent)): oct(p.stat().st_mode & 0o777) for p in entries
             if not p.is_symlink() and p.stat().st_mode & 0o777 != ordinary_mode(directory=p.is_dir())}
    assert not wrong, f"not the umask's modes: {wrong}"


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def run_python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


# -- atomic_file -------------------------------------------------------------------------------------

def test_atomic_file_writes_with_ordinary_mode_and_no_temp(tmp_path, umask):
    target = tmp_path / "sub" / "report.json"
    write_json_atomic(target, {"b": 1, "a": [2]})
    assert target.read_text() == '{\n  "a": [\n    2\n  ],\n  "b": 1\n}\n'
    assert target.stat().st_mode & 0o777 == 0o644  # mkstemp's would be 0o600
    with atomic_file(target, suffix=".png") as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".report.json.") and tmp.suffix == ".png"
        tmp.write_text("new")
    assert target.read_text() == "new" and hidden(target.parent) == []


def test_atomic_file_error_keeps_old_file_and_removes_temp(tmp_path):
    target = tmp_path / "head.safetensors"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_file(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old" and hidden(tmp_path) == []


# -- atomic_folder -----------------------------------------------------------------------------------

def test_atomic_folder_builds_beside_and_gives_ordinary_modes(tmp_path, umask):
    out = tmp_path / "export"
    with atomic_folder(out) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".export.") and not out.exists()
        (tmp / "nested").mkdir()
        (tmp / "nested" / "a.bin").write_bytes(b"a")
        (tmp / "b.json").write_text("{}")
        os.chmod(tmp / "b.json", 0o600)  # as mkstemp inside a library would leave it
    assert sorted(p.name for p in out.rglob("*")) == ["a.bin", "b.json", "nested"]
    assert_ordinary_modes(out)
    assert hidden(tmp_path) == []


def test_atomic_folder_error_leaves_destination_unchanged(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(RuntimeError):
        with atomic_folder(out, force=True) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("failed half way")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert hidden(tmp_path) == []
    with pytest.raises(RuntimeError):  # a new destination is not created at all
        with atomic_folder(tmp_path / "new"):
            raise RuntimeError("failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_a_failed_write_leaves_no_folders_it_created(tmp_path):
    """A write into folders that do not exist yet makes them; if it fails, they go too (down
    to the first that existed before), and one that gained other content meanwhile stays."""
    for writer in (atomic_folder, atomic_file):
        with pytest.raises(RuntimeError):
            with writer(tmp_path / "a" / "b" / "out"):
                raise RuntimeError("failed")
        assert list(tmp_path.iterdir()) == [], writer
    with pytest.raises(RuntimeError):
        with atomic_folder(tmp_path / "a" / "b" / "out"):
            (tmp_path / "a" / "other.txt").write_text("another writer's")
            raise RuntimeError("failed")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["a", "a/other.txt"]
    with atomic_file(tmp_path / "c" / "d" / "out.txt") as tmp:  # a write that succeeds keeps them
        tmp.write_text("x")
    assert (tmp_path / "c" / "d" / "out.txt").read_text() == "x"


def test_atomic_folder_refuses_occupied_destination_without_force(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FluidError, match="already exists and is not empty") as caught:
        with atomic_folder(out):
            pytest.fail("the block must not run")
    assert caught.value.params == ("force",)
    assert (out / "keep.txt").read_text() == "mine" and hidden(tmp_path) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_folder(empty) as tmp:  # an empty folder is taken over
        (tmp / "x").write_text("x")
    assert [p.name for p in empty.iterdir()] == ["x"]


def test_atomic_folder_never_replaces_what_another_process_finished_first(tmp_path):
    out = tmp_path / "cache"
    with pytest.raises(FluidError, match="already exists"):
        with atomic_folder(out) as tmp:
            (tmp / "ours").write_text("ours")
            out.mkdir()  # meanwhile another process renamed its complete copy into place
            (out / "theirs").write_text("theirs")
    assert [p.name for p in out.iterdir()] == ["theirs"] and hidden(tmp_path) == []


def test_atomic_folder_force_replaces_a_file_without_leftovers(tmp_path):
    out = tmp_path / "target"
    out.write_text("a file in the way")
    with atomic_folder(out, force=True) as tmp:
        (tmp / "x").write_text("x")
    assert out.is_dir() and [p.name for p in out.iterdir()] == ["x"]
    assert hidden(tmp_path) == [], "the replaced file stayed behind"


def test_export_force_over_a_file_leaves_nothing_behind(tiny_model_dir, tmp_path, umask):
    from checkpoints import make_adapter_checkpoint

    ckpt = make_adapter_checkpoint(tiny_model_dir("llama"), tmp_path / "ckpt")
    out = tmp_path / "out" / "FILE"
    out.parent.mkdir()
    out.write_text("in the way")
    refused = run_cli("export", str(ckpt), str(out))
    assert refused.returncode == 2 and "already exists" in refused.stderr and out.read_text() == "in the way"
    result = run_cli("export", str(ckpt), str(out), "--force")
    assert result.returncode == 0, result.stderr
    assert (out / "fluid_config.json").exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["FILE"], "a .FILE.old-* or temp stayed behind"


# -- crashed writers and remove_stale_temps ------------------------------------------------------------

CRASH_INSIDE = """
import os
from fluid_app.files import atomic_folder
with atomic_folder({out!r}, force=True) as tmp:
    (tmp / "half.bin").write_bytes(b"x")
    os._exit(3)  # killed: no cleanup runs
"""

CRASH_BETWEEN_RENAMES = """
import os
from fluid_app.files import atomic_folder
real = os.rename
def rename(source, target):  # die right after the previous folder is moved aside
    real(source, target)
    if os.fspath(source) == {out!r}:
        os._exit(4)
os.rename = rename
with atomic_folder({out!r}, force=True) as tmp:
    (tmp / "new.txt").write_text("new")
"""


def test_a_crashed_export_leaves_a_temp_that_the_next_run_removes(tmp_path):
    out = tmp_path / "export"
    crashed = run_python(CRASH_INSIDE.format(out=str(out)))
    assert crashed.returncode == 3, crashed.stderr
    leftovers = hidden(tmp_path)
    assert len(leftovers) == 1 and leftovers[0].startswith(".export.") and leftovers[0].endswith(".partial")
    assert not out.exists()
    with atomic_folder(out) as tmp:  # the next run clears it
        (tmp / "done").write_text("done")
    assert hidden(tmp_path) == [] and [p.name for p in out.iterdir()] == ["done"]


def test_remove_stale_temps_spares_live_writers_other_hosts_and_other_names(tmp_path):
    out = tmp_path / "model"
    assert run_python(CRASH_INSIDE.format(out=str(out))).returncode == 3
    assert run_python(CRASH_INSIDE.format(out=str(tmp_path / "model2"))).returncode == 3
    (stale,) = [n for n in hidden(tmp_path) if n.startswith(".model.")]
    tag = stale.split(".")[2]  # .model.<host>-<pid>.<random>.partial
    host, _, pid = tag.rpartition("-")
    assert int(pid) > 0 and host
    live = tmp_path / f".model.{host}-{os.getpid()}.abcdefgh.partial"  # this process: still writing
    elsewhere = tmp_path / f".model.otherhost-{pid}.abcdefgh.partial"  # its pid means nothing here
    unrelated = tmp_path / ".model.keep"
    for path in (live, elsewhere, unrelated):
        path.mkdir()
    (tmp_path / f".model.{host}-{dead_pid()}.zyxwvuts.partial.png").write_text("stale file temp")
    remove_stale_temps(tmp_path, "model")
    remaining = hidden(tmp_path)
    assert stale not in remaining and not [n for n in remaining if n.endswith(".partial.png")]
    assert {live.name, elsewhere.name, unrelated.name} <= set(remaining)
    assert [n for n in remaining if n.startswith(".model2.")], "another destination's temp was removed"


def test_a_crash_between_the_renames_restores_the_previous_folder(tmp_path):
    out = tmp_path.resolve() / "export"  # as atomic_folder names it
    out.mkdir()
    (out / "old.txt").write_text("previous")
    crashed = run_python(CRASH_BETWEEN_RENAMES.format(out=str(out)))
    assert crashed.returncode == 4, crashed.stderr
    assert not out.exists() and len(hidden(tmp_path)) == 2  # the new temp and the old folder moved aside
    remove_stale_temps(tmp_path, "export")
    assert [p.name for p in out.iterdir()] == ["old.txt"] and hidden(tmp_path) == []
    with atomic_folder(out, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"] and hidden(tmp_path) == []


# -- every exported or converted folder gets ordinary modes ------------------------------------------

@pytest.fixture(scope="module")
def ckpt(tiny_model_dir, tmp_path_factory):
    from checkpoints import make_adapter_checkpoint

    return make_adapter_checkpoint(tiny_model_dir("llama"), tmp_path_factory.mktemp("files") / "adapter")


@pytest.mark.parametrize("merge", [False, True], ids=["adapter", "merged"])
def test_torch_export_has_ordinary_modes(ckpt, tmp_path, umask, merge):
    out = tmp_path / "exported"
    result = run_cli("export", str(ckpt), str(out), *(["--merge"] if merge else []))
    assert result.returncode == 0, result.stderr
    assert {"k_head.safetensors", "config.json" if merge else "adapter_config.json"} <= {p.name for p in out.iterdir()}
    assert_ordinary_modes(out)
    assert hidden(tmp_path) == []


def test_mlx_convert_has_ordinary_modes(ckpt, tmp_path, umask):
    pytest.importorskip("mlx_lm", reason="mlx-lm is not installed")
    out = tmp_path / "mlx"
    result = run_cli("convert", str(ckpt), str(out), "--to", "mlx", timeout=300)
    assert result.returncode == 0, result.stderr
    written = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "fluid_config.json", "k_head.safetensors"} <= written
    assert_ordinary_modes(out)
    assert hidden(tmp_path) == []


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model_dir, tmp_path_factory):
    pytest.importorskip("gguf", reason="the gguf package is not installed")
    from tiny_models import make_tiny_gguf

    from fluid_app.model_refs import resolve_model

    return resolve_model(str(make_tiny_gguf(tiny_model_dir("llama"), tmp_path_factory.mktemp("gguf") / "tiny.gguf")))


def test_gguf_conversion_cache_has_ordinary_modes(tiny_gguf, tmp_path, umask, monkeypatch):
    from backends.converted_base import base_folder

    monkeypatch.setenv("FLUID_CACHE", str(tmp_path / "cache"))
    folder = base_folder(tiny_gguf)
    assert folder.parent == tmp_path / "cache" / "converted"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    assert_ordinary_modes(folder)
    assert hidden(folder.parent) == []
