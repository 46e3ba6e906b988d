"""The demo's decode driver: the model cache and the interleaved AR-vs-FLUID race."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

import fluid_app
from fluid_app.errors import FluidError
from fluid_app.ui.runner import ModelCache, ModelChoices, Run, race, verdict


def test_cache_loads_a_model_once_for_simultaneous_users(tiny_model_dir):
    folder = str(tiny_model_dir("llama"))
    loads: list[str] = []

    def loader(model: str, backend: str):
        loads.append(model)
        return fluid_app.load(model, backend=backend, device="cpu")

    cache = ModelCache(loader, max_models=1)
    got: list = []
    threads = [threading.Thread(target=lambda: got.append(cache.get(folder, "torch"))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert loads == [folder] and len(got) == 3 and all(g is got[0] for g in got)
    assert cache.get(f"  {folder} ", "torch") is got[0]  # same key after trimming
    cache.get(str(tiny_model_dir("gpt2")), "torch")  # evicts the least recent (max_models=1)
    cache.get(folder, "torch")
    assert loads == [folder, str(tiny_model_dir("gpt2")), folder]
    with pytest.raises(FluidError, match="unknown backend"):
        ModelCache().get(folder, "tpu")


def test_race_interleaves_by_compute_and_is_lossless(tiny_model_dir):
    model = fluid_app.load(str(tiny_model_dir("llama")), backend="torch", device="cpu")
    lock = threading.Lock()
    options = dict(max_new_tokens=16, k_min=2, k_max=5, threshold=0.9)
    ar = Run.start(model, lock, "The quick brown fox", False, "ar", **options)
    fluid = Run.start(model, lock, "The quick brown fox", False, "fluid", **options)
    movers = [runner.view.mode for runner in race(ar, fluid)]
    assert ar.done and fluid.done and {"ar", "fluid"} <= set(movers)
    assert movers.index("fluid") < movers.index("ar") + 5  # neither runs to the end before the other starts
    result = verdict(ar, fluid)
    assert result["identical"] and ar.generation.text == fluid.generation.text
    assert result["speedup"] > 0 and ar.view.committed == ar.generation.token_ids
    assert fluid.view.forwards == fluid.generation.forwards


def test_a_sampled_race_gives_both_runs_the_one_seed(tiny_model_dir):
    """Each side equals the library's sampled decode in its mode with the race's seed, and the
    verdict says the race was sampled (so the page judges no texts)."""
    model = fluid_app.load(str(tiny_model_dir("llama")), backend="torch", device="cpu")
    lock = threading.Lock()
    options = dict(max_new_tokens=16, k_min=2, k_max=5, threshold=0.9, temperature=0.8, top_p=0.9, seed=21)
    ar = Run.start(model, lock, "The quick brown fox", False, "ar", **options)
    fluid = Run.start(model, lock, "The quick brown fox", False, "fluid", **options)
    for _ in race(ar, fluid):
        pass
    result = verdict(ar, fluid)
    assert result["sampling"] == {"temperature": 0.8, "top_p": 0.9, "top_k": 0, "seed": 21}
    for run in (ar, fluid):
        expected = model.generate("The quick brown fox", mode=run.view.mode, **options)
        assert run.generation.token_ids == expected.token_ids
    assert result["speedup"] > 0 and result["fluid_tokens_per_forward"] > 0
    greedy = Run.start(model, lock, "hi", False, "fluid", max_new_tokens=2)
    assert greedy.sampling is None


def test_run_start_rejects_bad_settings_before_any_forward(tiny_model_dir):
    model = fluid_app.load(str(tiny_model_dir("llama")), backend="torch", device="cpu")
    calls = model.backend.forward_calls
    with pytest.raises(FluidError, match="k_min"):
        Run.start(model, threading.Lock(), "hi", False, "fluid", k_min=6, k_max=2)
    with pytest.raises(FluidError, match="empty"):
        Run.start(model, threading.Lock(), "  ", False, "fluid")
    with pytest.raises(FluidError, match="greedy only") as caught:
        Run.start(model, threading.Lock(), "hi", False, "reference", temperature=0.8)
    assert caught.value.params == ("temperature", "mode")
    assert model.backend.forward_calls == calls


def _spellings(folder: Path, tmp_path: Path) -> list[str]:
    """Five ways to name one folder (run with the working directory at ``folder.parent``)."""
    link = tmp_path / "link-to-model"
    link.symlink_to(folder, target_is_directory=True)
    return [str(folder), f"{folder}/", f"./{folder.name}",
            f"{folder.parent}/../{folder.parent.name}/{folder.name}", str(link)]


def test_spellings_of_one_folder_are_one_cache_entry_and_one_load(tiny_model_dir, tmp_path, monkeypatch):
    folder = tiny_model_dir("llama")
    monkeypatch.chdir(folder.parent)
    spellings = _spellings(folder, tmp_path)
    loads: list[str] = []

    def loader(model: str, backend: str):
        loads.append(model)
        return fluid_app.load(model, backend=backend, device="cpu")

    cache = ModelCache(loader, max_models=3)
    got = [cache.get(s, "torch") for s in spellings]
    assert loads == [spellings[0]], loads
    assert all(g is got[0] for g in got) and len(cache) == 1
    assert cache.get(spellings[2], "auto") is got[0]  # "auto" is the backend it picks, not a new entry
    # the demo lists the model once; the choice is checked by name (never on disk)
    choices = ModelChoices(spellings)
    assert choices.names == [spellings[0]] and choices.check(spellings[0]) == spellings[0]
    for other in spellings[1:]:
        with pytest.raises(FluidError, match="not available on this demo"):
            choices.check(other)


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads RSS from /proc")
def test_spellings_of_one_folder_hold_one_model_in_memory(tmp_path, monkeypatch):
    """RSS, not just a load count: a model wide enough (~17 MB of weights) to see in it."""
    import gc

    import torch
    from tiny_models import build_tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = build_tokenizer()
    config = AutoConfig.for_model("llama", vocab_size=len(tokenizer), hidden_size=256, intermediate_size=1024,
                                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                                  max_position_embeddings=256, tie_word_embeddings=False,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    wide = AutoModelForCausalLM.from_config(config)
    weight_bytes = sum(p.numel() * p.element_size() for p in wide.parameters())
    folder = tmp_path / "models" / "wide"
    wide.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del wide
    spellings = _spellings(folder, tmp_path)
    monkeypatch.chdir(folder.parent)
    loader = lambda model, backend: fluid_app.load(model, backend=backend, device="cpu")  # noqa: E731
    loader(str(folder), "torch")  # one-off costs (imports, kernels) out of the way
    gc.collect()
    cache = ModelCache(loader, max_models=3)
    cache.get(spellings[0], "torch")
    after_one = _rss()
    for spelling in spellings[1:]:
        cache.get(spelling, "torch")
    gc.collect()
    grown = _rss() - after_one
    assert grown < 0.3 * weight_bytes, f"RSS grew {grown / 2**20:.1f} MiB over 4 more spellings " \
                                       f"(weights {weight_bytes / 2**20:.1f} MiB)"


def test_allow_list_answers_alike_for_existing_and_missing_paths(tiny_model_dir, tmp_path):
    """An unlisted model gets one message whether the path is a file, a folder (even a real
    model) or nothing: a visitor learns nothing about the server's disk."""
    served = str(tiny_model_dir("llama"))
    choices = ModelChoices([served])
    (tmp_path / "secret.txt").write_text("x")
    probes = [str(tmp_path / "secret.txt"), str(tmp_path), str(tiny_model_dir("gpt2")), str(tmp_path / "missing"),
              "package:fluid_app/../../../../etc/passwd", "default"]
    messages = set()
    for probe in probes:
        with pytest.raises(FluidError) as caught:
            choices.check(probe)
        assert caught.value.params == ("model",)
        messages.add(caught.value.message.replace(repr(probe), "'X'"))
    assert messages == {"model 'X' is not available on this demo; pick one of the models it serves"}
    assert choices.check(served) == served and choices.check("  ") == served  # empty: the launched model
    assert ModelChoices([served], allow_any=True).check(str(tmp_path)) == str(tmp_path)
