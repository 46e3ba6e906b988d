"""Continuous batching is exact: rows that join a running batch at different forwards and
leave it early (finished or cancelled) decode the same token ids as each decoded alone, on
tiny real models through torch and MLX. A finished or cancelled row's cache goes at once."""

from __future__ import annotations

import importlib.util

import pytest

import fluid_app
from fluid_app.batching import FusedBatch
from fluid_app.events import Commit
from fluid_app.sampler import Decoder

PROMPTS = ["The quick brown fox", "Paris is the capital of", "def add(a, b):", "Once upon a time there",
           "1, 2, 3,", "FLUID drafts blocks"]
# per request: its own settings (greedy, prompt lookup, AR mode, sampled with a seed)
REQUESTS = [dict(k_min=2, k_max=6, max_new_tokens=30),
            dict(k_min=3, k_max=8, prompt_lookup_num_tokens=6, max_new_tokens=40),
            dict(mode="ar", max_new_tokens=12),
            dict(k_min=2, k_max=6, temperature=0.9, top_p=0.95, seed=7, max_new_tokens=30),
            dict(k_min=1, k_max=4, max_new_tokens=3),
            dict(k_min=2, k_max=8, prompt_lookup_num_tokens=4, temperature=0.7, seed=3, max_new_tokens=25)]
JOIN_AT = [0, 0, 1, 3, 3, 6]  # the batch forward before which each request joins
CANCEL = {1: 5}  # request 1 leaves after 5 forwards of the batch (a client gone)


def staggered(model: fluid_app.FluidModel, check_cache=None) -> tuple[list[list[int]], FusedBatch]:
    """Run REQUESTS through one batch, joining and cancelling as scheduled; tokens per request."""
    decoders = [Decoder(model.backend, [model.encode(p)], model.settings(**r)) for p, r in zip(PROMPTS, REQUESTS)]
    tokens: dict[int, list[int]] = {id(d): [] for d in decoders}
    batch = FusedBatch(model.backend)
    forward = 0

    def collect(events):
        for decoder, event in events:
            if isinstance(event, Commit):
                tokens[id(decoder)].extend(event.tokens)

    while forward <= max(JOIN_AT) or len(batch):
        for i, decoder in enumerate(decoders):
            if JOIN_AT[i] == forward:
                collect(batch.join(decoder))
            if CANCEL.get(i) == forward:
                batch.leave(decoder)
        collect(batch.step())
        forward += 1
        if check_cache:
            check_cache(batch)
    for decoder in decoders:
        assert tokens[id(decoder)] == decoder.results[0].token_ids
    return [tokens[id(d)] for d in decoders], batch


def check(model: fluid_app.FluidModel, check_cache=None) -> None:
    alone = [model.generate(model.encode(p), **r).token_ids for p, r in zip(PROMPTS, REQUESTS)]
    together, batch = staggered(model, check_cache)
    for i, (got, want) in enumerate(zip(together, alone)):
        if i in CANCEL:
            assert 0 < len(got) < len(want) and got == want[: len(got)], i
        else:
            assert got == want, (i, REQUESTS[i])
    assert batch.rows_per_forward > 1 and batch.session is None  # shared forwards; everything freed at the end


def torch_cache_fits(batch: FusedBatch) -> None:
    """The torch cache holds exactly the live rows, and no column that none of them uses."""
    if batch.session is None:
        return
    session = batch.session
    keys = session.cache.layers[0].keys
    assert keys.shape[0] == len(batch.lanes) == len(session.lengths)
    assert keys.shape[2] == session.valid.shape[1] and bool(session.valid.any(dim=0).all())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_rows_join_and_leave_exactly_torch(tiny_model_dir, arch):
    model = fluid_app.load(str(tiny_model_dir(arch)), backend="torch", device="cpu")
    check(model, torch_cache_fits)


@pytest.mark.skipif(importlib.util.find_spec("mlx") is None, reason="mlx not installed")
def test_rows_join_and_leave_exactly_mlx(tiny_model_dir):
    model = fluid_app.load(str(tiny_model_dir("llama")), backend="mlx")
    check(model, lambda batch: batch.session is None or len(batch.session.caches) == len(batch.lanes))
