"""The demo's decode driver: the model cache and the interleaved AR-vs-FLUID race."""

from __future__ import annotations

import threading

import pytest

import fluid_app
from fluid_app.errors import FluidError
from fluid_app.ui.runner import ModelCache, Run, race, verdict


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


def test_run_start_rejects_bad_settings_before_any_forward(tiny_model_dir):
    model = fluid_app.load(str(tiny_model_dir("llama")), backend="torch", device="cpu")
    calls = model.backend.forward_calls
    with pytest.raises(FluidError, match="k_min"):
        Run.start(model, threading.Lock(), "hi", False, "fluid", k_min=6, k_max=2)
    with pytest.raises(FluidError, match="empty"):
        Run.start(model, threading.Lock(), "  ", False, "fluid")
    assert model.backend.forward_calls == calls
