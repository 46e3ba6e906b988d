"""Continuous batching is exact: rows that join a running batch at different forwards and
leave it early (finished or cancelled) decode the same token ids as each decoded alone, on
tiny real models through torch and MLX. A finished or cancelled row's cache goes at once."""

from __future__ import annotations

import importlib.util
import itertools
import random

import pytest

import fluid_app
from fluid_app.batching import FusedBatch, allocate
from fluid_app.events import BlockStart, Commit, Draft, Verify
from fluid_app.sampler import Decoder

PROMPTS = ["The quick brown fox", "Paris is the capital of", "def add(a, b):", "Once upon a time there",
           "1, 2, 3,", "FLUID drafts blocks"]
# per request: its own settings (greedy, prompt lookup, AR mode, sampled with a seed, fallback masks)
REQUESTS = [dict(k_min=2, k_max=6, fallback_masks=2, max_new_tokens=30),
            dict(k_min=3, k_max=8, prompt_lookup_num_tokens=6, fallback_masks=1, max_new_tokens=40),
            dict(mode="ar", max_new_tokens=12),
            dict(k_min=2, k_max=6, temperature=0.9, top_p=0.95, seed=7, fallback_masks=1, max_new_tokens=30),
            dict(k_min=1, k_max=4, max_new_tokens=3),
            dict(k_min=2, k_max=8, prompt_lookup_num_tokens=4, temperature=0.7, seed=3, max_new_tokens=25)]
JOIN_AT = [0, 0, 1, 3, 3, 6]  # the batch forward before which each request joins
CANCEL = {1: 5}  # request 1 leaves after 5 forwards of the batch (a client gone)


def staggered(model: fluid_app.FluidModel, check_cache=None, token_budget: int | None = None,
              join_at: list[int] = JOIN_AT) -> tuple[list[list[int]], FusedBatch]:
    """Run REQUESTS through one batch, joining and cancelling as scheduled; tokens per request."""
    decoders = [Decoder(model.backend, [model.encode(p)], model.settings(**r)) for p, r in zip(PROMPTS, REQUESTS)]
    tokens: dict[int, list[int]] = {id(d): [] for d in decoders}
    batch = FusedBatch(model.backend, token_budget)
    forward = 0

    shown: dict[int, int] = {}  # each decoder's window width as its events last showed it
    seen: list[tuple[int, int]] = []  # (drafted slots shown, tokens fed) at each verification

    def collect(events):
        for decoder, event in events:
            if isinstance(event, Commit):
                tokens[id(decoder)].extend(event.tokens)
            elif isinstance(event, (BlockStart, Draft)):  # a block starts as its exact token and k - 1 masks
                shown[id(decoder)] = event.k if isinstance(event, BlockStart) else len(event.slots) + event.branch
            elif isinstance(event, Verify):
                fed = next(width for d, _, width in batch.fed if d is decoder)
                seen.append((shown[id(decoder)], fed))

    while forward <= max(join_at) or len(batch):
        for i, decoder in enumerate(decoders):
            if join_at[i] == forward:
                collect(batch.join(decoder))
            if CANCEL.get(i) == forward:
                batch.leave(decoder)
        rows, fed = len(batch), batch.tokens_fed
        collect(batch.step())
        if token_budget is not None and rows:  # the forward computed at most the budget (or one token a row)
            assert batch.tokens_fed - fed <= max(token_budget, rows), (forward, rows, batch.tokens_fed - fed)
        forward += 1
        if check_cache:
            check_cache(batch)
    for decoder in decoders:
        assert tokens[id(decoder)] == decoder.results[0].token_ids
    assert seen and all(slots == fed for slots, fed in seen), seen  # the view showed what was fed
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
    spare = getattr(session.cache.layers[0], "spare", None)  # the own forward's buffers hold live rows only
    assert spare is None or spare[0].shape[0] == spare[1].shape[0] == len(batch.lanes)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mistral"])
def test_rows_join_and_leave_exactly_torch(tiny_model_dir, arch):
    """(Mistral: transformers' own cache broke when a row joined; the backend's own forward runs it.)"""
    model = fluid_app.load(str(tiny_model_dir(arch)), backend="torch", device="cpu")
    check(model, torch_cache_fits)


@pytest.mark.skipif(importlib.util.find_spec("mlx") is None, reason="mlx not installed")
def test_rows_join_and_leave_exactly_mlx(tiny_model_dir):
    model = fluid_app.load(str(tiny_model_dir("llama")), backend="mlx")
    check(model, lambda batch: batch.session is None or len(batch.session.caches) == len(batch.lanes))


@pytest.mark.parametrize("budget", [4, 12])
def test_a_token_budget_cuts_drafts_and_keeps_greedy_rows_exact(tiny_model_dir, budget):
    """Six rows under a small per-forward budget: drafts are cut (every row still feeds its
    exact token), no forward computes more than max(budget, rows) positions, and every greedy
    row decodes exactly what it decodes alone. Sampled rows run through the same trimmed
    windows (their draws differ from alone once trimmed, their distribution does not:
    tests/test_sampling.py)."""
    model = fluid_app.load(str(tiny_model_dir("llama")), backend="torch", device="cpu")
    alone = [model.generate(model.encode(p), **r).token_ids for p, r in zip(PROMPTS, REQUESTS)]
    # the sampled rows start first, with room for long windows, and are cut as the others join
    together, batch = staggered(model, torch_cache_fits, token_budget=budget, join_at=[1, 2, 3, 0, 3, 0])
    for i, (got, want, request) in enumerate(zip(together, alone, REQUESTS)):
        if "temperature" in request:
            assert len(got) == request["max_new_tokens"] or got[-1] in model.backend.eos_token_ids, i
        elif i in CANCEL:
            assert 0 < len(got) < len(want) and got == want[: len(got)], i
        else:
            assert got == want, (i, request)
    assert batch.trimmed > 0 and batch.max_tokens_fed <= max(budget, len(PROMPTS)) and batch.session is None


def test_a_lone_row_keeps_its_whole_window(tiny_model_dir):
    model = fluid_app.load(str(tiny_model_dir("llama")), backend="torch", device="cpu")
    decoder = Decoder(model.backend, [model.encode(PROMPTS[0])], model.settings(**REQUESTS[0]))
    batch = FusedBatch(model.backend, token_budget=1)
    for _ in Decoder._drain(batch, batch.join(decoder)):
        pass
    assert batch.trimmed == 0 and batch.max_tokens_fed > 1
    assert decoder.results[0].token_ids == model.generate(model.encode(PROMPTS[0]), **REQUESTS[0]).token_ids


def test_allocate_against_brute_force():
    """The allocation is the round-robin prefix in whole rounds, and of every allocation that
    keeps each row's exact token and a prefix of its window with rows x widest within the
    budget (or one token a row when the budget is below the rows), the one feeding the most."""
    rng = random.Random(0)
    for _ in range(400):
        rows = rng.randint(1, 4)
        widths = [rng.randint(1, 6) for _ in range(rows)]
        budget = rng.choice([None, rng.randint(1, 30)])
        kept = allocate(widths, budget)
        assert len(kept) == rows and all(1 <= k <= w for k, w in zip(kept, widths)), (widths, budget, kept)
        if budget is None or rows == 1 or rows * max(widths) <= budget:
            assert kept == widths, (widths, budget, kept)  # nothing cut when it fits
            continue
        limit = max(budget, rows)
        assert rows * max(kept) <= limit and sum(kept) <= limit, (widths, budget, kept)
        # round-robin by slot position, whole rounds: a row cut short keeps as much as any other
        assert all(k == w or k >= max(kept) for k, w in zip(kept, widths)), (widths, budget, kept)
        feasible = [c for c in itertools.product(*(range(1, w + 1) for w in widths)) if rows * max(c) <= limit]
        best = max(sum(c) for c in feasible)
        assert sum(kept) == best and [c for c in feasible if sum(c) == best] == [tuple(kept)], (widths, budget)
    assert allocate([5, 5, 5], 9) == [3, 3, 3] and allocate([1, 9], 8) == [1, 4] and allocate([3, 7], 1) == [1, 1]
