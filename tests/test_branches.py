"""Branched windows (fluid_app/branches.py): the rule against brute force and against FLUID's own
attention rule, and the torch backend's branched forward against plain causal forwards."""

from __future__ import annotations

import numpy as np
import pytest
from test_llama_family import _has_amx

import fluid_app
from fluid_app.attention import may_attend
from fluid_app.branches import chain, depths, fallback_parents, is_chain, visible


def _random_parents(rng: np.random.Generator, rows: int, width: int) -> np.ndarray:
    return np.array([[int(rng.integers(-1, j)) for j in range(width)] for _ in range(rows)])


def test_visible_is_each_tokens_walk_up_its_parents():
    rng = np.random.default_rng(0)
    for width in (1, 2, 5, 9):
        parents = _random_parents(rng, 4, width)
        seen = visible(parents)
        for b in range(4):
            for j in range(width):
                walk, node = {j}, j
                while parents[b, node] >= 0:
                    node = int(parents[b, node])
                    walk.add(node)
                assert set(np.flatnonzero(seen[b, j])) == walk
                assert depths(parents)[b, j] == len(walk) - 1
    assert is_chain(np.stack([chain(6)] * 3)) and not is_chain(fallback_parents(4, 2)[None])


@pytest.mark.parametrize("parents", [[[0]], [[-1, 1]], [[-1, -2]], [[-1, 0, 3]]])
def test_a_parent_must_come_earlier(parents):
    with pytest.raises(ValueError, match="earlier window token"):
        visible(np.array(parents))


@pytest.mark.parametrize("drafts, masks, fallback", [(1, 3, 2), (3, 4, 1), (2, 0, 3), (0, 4, 0)])
def test_a_fallback_window_is_attended_as_the_fluid_rule_says(drafts, masks, fallback):
    """The window [exact, drafts, masks after them, fallback masks] in FLUID's terms: main tokens
    anchor themselves, the chain's masks form the block of the last draft, the fallback masks
    the block of the exact token. may_attend over that layout must be the branch rule."""
    width = 1 + drafts + masks
    parents = fallback_parents(width, fallback)[None]
    anchor = np.array(list(range(1 + drafts)) + [drafts] * masks + [0] * fallback)
    is_mask = np.array([False] * (1 + drafts) + [True] * (masks + fallback))
    position = depths(parents)[0]
    rule = may_attend(anchor[:, None], is_mask[:, None], position[:, None],
                      anchor[None, :], is_mask[None, :], position[None, :])
    assert np.array_equal(visible(parents)[0], rule)
    assert list(position[width:]) == list(range(1, fallback + 1))  # the fallback sits after the exact token


def _outputs(backend, prompt, window, parents=None):
    session, _ = backend.start([prompt], logits=True)
    out = session.forward(np.array([window]), None if parents is None else np.array([parents]))
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_branched_forward_computes_each_branch_as_if_fed_alone(tiny_model_dir, dtype):
    """The chain's outputs are those of the same window without the branch (what FLUID verifies
    does not change), and the branch's are those of a window of just the exact token and the
    branch (its drafts are what a mask block there would draft). In bfloat16 on a CPU with AMX,
    where windows are attended one query at a time to keep AR's bits, they are equal bit for
    bit; in float32 a window is attended whole, as before the branch, and agrees to float
    rounding (the tokens, always)."""
    model = fluid_app.load(str(tiny_model_dir("llama")), backend="torch", device="cpu", dtype=dtype,
                           mask_token_id=3)
    backend = model.backend
    assert backend.branched_windows
    prompt, mask = [5, 9, 12, 7, 30, 8], 3
    exact, drafts, masks, fallback = 17, [21, 40], [mask] * 2, [mask] * 3
    chain_window = [exact, *drafts, *masks]
    plain = _outputs(backend, prompt, chain_window)
    branched = _outputs(backend, prompt, chain_window + fallback, fallback_parents(len(chain_window), 3))
    alone = _outputs(backend, prompt, [exact, *fallback])
    width = len(chain_window)
    for got, want in ((branched.logits[:, :width], plain.logits), (branched.logits[:, width:], alone.logits[:, 1:])):
        if dtype == "float32":  # a whole window at once: SDPA sums over more keys, in another order
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
        elif _has_amx():  # one query at a time, as one-token forwards attend (llama_family.query_masks)
            assert np.array_equal(got, want)
    assert np.array_equal(branched.tokens[:, :width], plain.tokens)
    assert np.array_equal(branched.tokens[:, width:], alone.tokens[:, 1:])


def test_a_model_that_cannot_branch_refuses_a_branched_window(tiny_model_dir):
    model = fluid_app.load(str(tiny_model_dir("gpt2")), backend="torch", device="cpu", mask_token_id=3)
    assert not model.backend.branched_windows
    session, _ = model.backend.start([[5, 6, 7]])
    with pytest.raises(ValueError, match="branched window"):
        session.forward(np.array([[1, 3, 3, 3]]), fallback_parents(2, 2)[None])


def test_smollm2_fallback_masks_equal_ar_in_fewer_forwards(smollm2):
    """The embedded model with mask drafts alone: the fallback branch keeps every token AR's and
    drafts windows that would otherwise feed masks only."""
    prompts = ["Explain what a hash table is.", "Write a haiku about autumn leaves."]
    options = dict(chat=True, max_new_tokens=48, prompt_lookup_num_tokens=0, draft_store=False)
    ar = smollm2.generate(prompts, mode="ar", **options)
    without = smollm2.generate(prompts, mode="fluid", fallback_masks=0, **options)
    with_branch = smollm2.generate(prompts, mode="fluid", fallback_masks=2, **options)
    for a, w, f in zip(ar, without, with_branch, strict=True):
        assert f.token_ids == a.token_ids == w.token_ids
    assert sum(g.forwards for g in with_branch) < sum(g.forwards for g in without)
