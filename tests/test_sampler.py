"""The elastic sampler on a toy LM with an exact greedy oracle: lossless in every mode,
honest forward counts, and the fused sampler never spends more forwards than the reference."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from toy_backend import EOS, ToyLM

from fluid_app.events import BlockStart, Commit, Draft, Finished, Verify
from fluid_app.sampler import Decoder, DecodeSettings

SETTINGS = [
    dict(k_min=1, k_max=4, threshold=0.9),
    dict(k_min=4, k_max=16, threshold=0.9),
    dict(k_min=2, k_max=8, threshold=0.3),
    dict(k_min=5, k_max=5, threshold=1.0),
    dict(k_min=3, k_max=12, threshold=0.05),
    dict(k_min=2, k_max=8, threshold=0.9, prompt_lookup_num_tokens=5),
    dict(k_min=1, k_max=6, threshold=0.5, prompt_lookup_num_tokens=10),
]


def prompts(seed: int, count: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [list(rng.integers(3, 64, size=int(rng.integers(1, 12)))) for _ in range(count)]


@pytest.mark.parametrize("accuracy", [0.0, 0.6, 0.95, 1.0])
@pytest.mark.parametrize("settings", SETTINGS)
def test_every_mode_equals_greedy_oracle(accuracy, settings):
    lm = ToyLM(draft_accuracy=accuracy, eos_rate=0.03)
    batch = prompts(int(accuracy * 100) + settings["k_max"], 6)
    for mode, max_new in itertools.product(["ar", "reference", "fluid"], [1, 7, 40]):
        results = Decoder(lm, batch, DecodeSettings(mode=mode, max_new_tokens=max_new, **settings)).run()
        for prompt, result in zip(batch, results):
            assert result.token_ids == lm.greedy(prompt, max_new), (mode, max_new)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_batched_fluid_equals_one_prompt_at_a_time(batch_size):
    lm = ToyLM(draft_accuracy=0.8, eos_rate=0.03)
    batch = prompts(5, 9)
    settings = DecodeSettings(mode="fluid", max_new_tokens=30, k_min=2, k_max=10, threshold=0.5)
    for i in range(0, len(batch), batch_size):
        chunk = batch[i : i + batch_size]
        for prompt, result in zip(chunk, Decoder(lm, chunk, settings).run()):
            assert result.token_ids == lm.greedy(prompt, 30)


def test_eos_and_max_new_tokens_inside_a_block_are_trimmed():
    """Blocks of 8 with limits of 5 and 11 tokens: the limit always falls inside a block."""
    lm = ToyLM(draft_accuracy=1.0, eos_rate=0.08)
    found_eos_inside = found_length = False
    for prompt in prompts(9, 40):
        for max_new in (5, 11):
            for mode in ("reference", "fluid"):
                result = Decoder(lm, [prompt], DecodeSettings(mode=mode, max_new_tokens=max_new, k_min=8,
                                                              k_max=8, threshold=0.01)).run()[0]
                assert result.token_ids == lm.greedy(prompt, max_new)
                last_block = result.blocks[-1] if result.blocks else {"k": 0, "accepted": 0}
                if result.finish_reason == "eos" and last_block["accepted"] < last_block["k"]:
                    found_eos_inside = True
                    assert result.token_ids[-1] == EOS and EOS not in result.token_ids[:-1]
                if result.finish_reason == "length":
                    assert len(result.token_ids) == max_new and EOS not in result.token_ids
                    found_length = True
    assert found_eos_inside and found_length


@pytest.mark.parametrize("accuracy", [0.0, 0.5, 0.9, 1.0])
def test_forward_counts_are_honest_and_fluid_never_costs_more_than_reference(accuracy):
    for settings in SETTINGS:
        for prompt in prompts(int(accuracy * 10), 8):
            spent = {}
            for mode in ("ar", "reference", "fluid"):
                lm = ToyLM(draft_accuracy=accuracy, eos_rate=0.02)
                result = Decoder(lm, [prompt], DecodeSettings(mode=mode, max_new_tokens=48, **settings)).run()[0]
                assert result.forwards == lm.forward_calls - lm.prefills
                spent[mode] = result.forwards
                n = len(result.token_ids)
                if mode == "ar":
                    assert result.forwards == n - 1
                if mode == "fluid":  # every fused forward commits at least one token
                    assert result.forwards <= max(n - 1, 0)
            assert spent["fluid"] <= spent["reference"]


def test_good_drafts_give_many_tokens_per_forward():
    lm = ToyLM(draft_accuracy=1.0, eos_rate=0.0)
    result = Decoder(lm, prompts(1, 1), DecodeSettings(mode="fluid", max_new_tokens=200, k_min=8, k_max=8,
                                                     threshold=0.01)).run()[0]
    assert result.tokens_per_forward > 6  # a window of 8 commits 8 exact tokens when every draft is right


def test_events_tell_the_whole_story():
    lm = ToyLM(draft_accuracy=0.7)
    for mode in ("reference", "fluid"):
        decoder = Decoder(lm, prompts(3, 2), DecodeSettings(mode=mode, max_new_tokens=25, k_min=3, k_max=6))
        events = list(decoder.events())
        for row, result in enumerate(decoder.results):
            committed = [t for e in events if isinstance(e, Commit) and e.row == row for t in e.tokens]
            assert committed == result.token_ids
            assert sum(isinstance(e, Finished) and e.row == row for e in events) == 1
            starts = [e for e in events if isinstance(e, BlockStart) and e.row == row]
            assert starts and all(3 <= e.k <= 6 or e.k == 25 - e.position for e in starts)
            for e in events:
                if isinstance(e, Draft) and e.row == row:
                    assert len(e.slots) == len(e.confidences) == len(e.decided)
                if isinstance(e, Verify) and e.row == row:
                    assert 0 <= e.accepted <= 6
            counts = [e.forwards for e in events if e.row == row]  # the cost travels on the events
            assert counts == sorted(counts) and counts[-1] == result.forwards


@pytest.mark.parametrize("mode", ["ar", "reference", "fluid"])
def test_event_forward_counts_are_the_backend_forwards(mode):
    """One row: every decoding forward the backend ran (prefill aside) shows on the events."""
    lm = ToyLM(draft_accuracy=0.6, eos_rate=0.0)
    for prompt in prompts(11, 4):
        lm.forward_calls = 0
        decoder = Decoder(lm, [prompt], DecodeSettings(mode=mode, max_new_tokens=30, k_min=2, k_max=6))
        events = list(decoder.events())
        assert events[-1].forwards == decoder.results[0].forwards == lm.forward_calls - 1


def _lookup_oracle(context, num_tokens, max_ngram=3, min_ngram=2):
    """Brute force: for n from long to short, scan every earlier start from the right."""
    for n in range(max_ngram, min_ngram - 1, -1):
        if len(context) <= n:
            continue
        tail = context[-n:]
        for start in range(len(context) - n - 1, -1, -1):
            if context[start:start + n] == tail:
                return context[start + n: start + n + num_tokens]
    return []


def test_prompt_lookup_matches_a_brute_force_scan():
    from fluid_app.lookup import lookup_continuation

    rng = np.random.default_rng(3)
    hits = 0
    for _ in range(400):
        context = [int(t) for t in rng.integers(0, int(rng.integers(2, 8)), size=int(rng.integers(0, 40)))]
        num = int(rng.integers(1, 9))
        expected = _lookup_oracle(context, num)
        assert lookup_continuation(context, num) == expected, (context, num)
        hits += bool(expected)
    assert 50 < hits < 400  # both outcomes are exercised
    assert lookup_continuation([5, 6, 7, 1, 5, 6, 9, 5, 6], 3) == [9, 5, 6]  # the latest occurrence wins
    assert lookup_continuation([1, 2, 3, 4], 3) == []


def test_prompt_lookup_cuts_forwards_on_text_that_repeats():
    """A reply that loops (as small greedy models' replies do): lookup drafts whole cycles,
    while the output stays the greedy one."""
    lm = ToyLM(vocab_size=8, draft_accuracy=0.0, eos_rate=0.0)  # few states: the greedy text cycles
    prompt = [3, 4, 5]
    expected = lm.greedy(prompt, 120)
    forwards = {}
    for lookup in (0, 7):
        result = Decoder(lm, [prompt], DecodeSettings(mode="fluid", max_new_tokens=120, k_min=8, k_max=8,
                                                      prompt_lookup_num_tokens=lookup)).run()[0]
        assert result.token_ids == expected
        forwards[lookup] = result.forwards
    assert forwards[7] < forwards[0] / 2


@pytest.mark.parametrize("accuracy", [0.0, 0.6, 0.8, 1.0])
@pytest.mark.parametrize("settings", SETTINGS[:3] + SETTINGS[5:6])
def test_fallback_masks_stay_exact_and_save_forwards(accuracy, settings):
    """A branch of masks after the exact token (fluid_app/branches.py) drafts the window after a
    rejection: fluid still equals the greedy oracle, and with drafts that are often but not
    always right, it decodes in fewer forwards than the same settings without the branch."""
    lm = ToyLM(draft_accuracy=accuracy, eos_rate=0.03)
    batch = prompts(int(accuracy * 100) + settings["k_max"] + 1, 6)
    forwards, used = {}, {}
    for fallback in (0, 1, 3):
        run = DecodeSettings(mode="fluid", max_new_tokens=40, fallback_masks=fallback, **settings)
        results = Decoder(lm, batch, run).run()
        for prompt, result in zip(batch, results):
            assert result.token_ids == lm.greedy(prompt, 40), fallback
        forwards[fallback] = sum(r.forwards for r in results)
        used[fallback] = sum(r.fallback_windows for r in results)
    assert used[0] == 0
    if 0 < accuracy < 1:
        assert used[1] > 0 and used[3] > 0, used
        assert forwards[1] < forwards[0] and forwards[3] < forwards[0], forwards
