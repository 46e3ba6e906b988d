"""Warpers against a plain brute-force reference (and against Hugging Face where installed),
setting validation, and per-row generators that do not depend on the rest of the batch."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fluid_app.acceptance import verify_chain
from fluid_app.errors import FluidError
from fluid_app.warping import SamplingSettings, check_sampling, row_generators, warp


def reference_warp(row: list[float], temperature: float, top_k: int, top_p: float) -> list[float]:
    """HF's three warpers written out with Python lists: divide, keep >= k-th largest, then
    keep the tokens at or above the smallest logit of the nucleus (whole tie groups)."""
    z = [v / temperature for v in row]
    vocab = len(z)
    if 0 < top_k < vocab:
        kth = sorted(z, reverse=True)[top_k - 1]
        z = [v if v >= kth else -math.inf for v in z]
    if top_p < 1:
        top = max(z)
        weights = [math.exp(v - top) for v in z]
        total = sum(weights)
        ascending = sorted(range(vocab), key=lambda i: z[i])
        cumulative, dropped = 0.0, 0
        for i in ascending:
            cumulative += weights[i] / total
            if cumulative <= 1 - top_p:
                dropped += 1
        dropped = min(dropped, vocab - 1)
        smallest_kept = z[ascending[dropped]]
        z = [v if v >= smallest_kept else -math.inf for v in z]
    top = max(z)
    weights = [math.exp(v - top) for v in z]
    return [w / sum(weights) for w in weights]


def random_logits(seed: int, rows: int, vocab: int, ties: bool) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if ties:  # small integers: many exact ties, also straddling every cut
        return rng.integers(-3, 3, size=(rows, vocab)).astype(np.float64)
    return rng.normal(0.0, 2.0, size=(rows, vocab))


SETTINGS = [(t, k, p) for t in (0.3, 1.0, 2.5) for k in (0, 1, 3, 7, 12, 40) for p in (1e-9, 0.05, 0.5, 0.9, 1.0)]


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("temperature,top_k,top_p", SETTINGS)
def test_warp_equals_brute_force_reference(temperature, top_k, top_p, ties):
    logits = random_logits(int(temperature * 10) + top_k + int(top_p * 100), 16, 12, ties)
    got = warp(logits, temperature, top_k, top_p)
    assert got.dtype == np.float64 and got.shape == logits.shape
    for row, probs in zip(logits, got):
        want = np.array(reference_warp(list(row), temperature, top_k, top_p))
        np.testing.assert_array_equal(probs > 0, want > 0)  # the same kept set
        np.testing.assert_allclose(probs, want, rtol=1e-12, atol=1e-300)
        assert probs.sum() == pytest.approx(1.0, abs=1e-12)
        assert np.count_nonzero(probs) >= 1


@pytest.mark.parametrize("scale", [0.3, 3.0, 8.0])
def test_the_nucleus_from_the_largest_candidates_equals_the_brute_force_one(scale):
    """A vocabulary several times NUCLEUS_CANDIDATES: peaked rows find the nucleus among the
    candidates, flat ones fall back to a full sort; ties (rounded logits) straddle the cut
    and the candidate boundary. Both must give the reference's kept set."""
    from fluid_app import warping

    vocab = 4 * warping.NUCLEUS_CANDIDATES + 7
    rng = np.random.default_rng(int(scale * 10))
    logits = np.round(rng.standard_normal((6, vocab)) * scale, 1)
    for top_p in (0.3, 0.9, 0.95, 0.999):
        got = warp(logits, 0.7, 0, top_p)
        for row, probs in zip(logits, got):
            want = np.array(reference_warp(list(row), 0.7, 0, top_p))
            np.testing.assert_array_equal(probs > 0, want > 0)
            np.testing.assert_allclose(probs, want, rtol=1e-12, atol=1e-300)


def test_top_k_at_or_above_vocab_and_top_p_one_are_plain_softmax():
    logits = random_logits(1, 4, 9, ties=False)
    plain = np.exp(logits / 0.7 - (logits / 0.7).max(axis=-1, keepdims=True))
    plain /= plain.sum(axis=-1, keepdims=True)
    for top_k in (0, 9, 10, 1000):
        np.testing.assert_allclose(warp(logits, 0.7, top_k, 1.0), plain, rtol=1e-14)


def test_ties_at_a_cut_are_kept_whole():
    flat = np.zeros(4)
    np.testing.assert_array_equal(warp(flat, 1.0, top_p=0.5), [0.25] * 4)
    np.testing.assert_array_equal(warp([3.0, 1.0, 3.0, 2.0], 1.0, top_k=1), [0.5, 0.0, 0.5, 0.0])


def test_tiny_top_p_keeps_the_most_likely_token():
    probs = warp([0.1, 2.0, -1.0, 1.9], 1.0, top_p=1e-12)
    np.testing.assert_array_equal(probs, [0.0, 1.0, 0.0, 0.0])


def test_banned_tokens_stay_at_zero_and_batched_shapes_match_rows():
    logits = random_logits(2, 2 * 3, 10, ties=False)
    logits[:, 4] = -np.inf
    got = warp(logits.reshape(2, 3, 10), 0.8, 5, 0.8)
    assert np.all(got[..., 4] == 0)
    np.testing.assert_array_equal(got.reshape(6, 10), warp(logits, 0.8, 5, 0.8))


def test_warped_rows_are_the_blocks_rows_bit_for_bit_and_warped_only_when_read():
    settings = SamplingSettings(temperature=0.7, top_k=0, top_p=0.95)
    logits = random_logits(3, 6, 49152, ties=False).astype(np.float32)
    rows = settings.warp_rows(logits)
    assert len(rows) == 6 and rows.warped == 0
    whole = settings.warp(logits)
    for i in (2, 0, -1, 2):
        np.testing.assert_array_equal(rows[i], whole[i])
    assert rows.warped == 3
    with pytest.raises(IndexError):
        rows[6]


def test_a_verification_warps_no_row_after_the_first_rejection():
    """Rows past a rejected draft are never read, so a NaN there (which :func:`warp` refuses)
    does no harm; warping the whole block up front fails on it."""
    settings = SamplingSettings(temperature=1.0)
    logits = np.array([[0.0, 5.0, 0.0]] * 4)
    logits[2:] = np.nan
    rng = np.random.default_rng(0)
    # draft 0 has p(0) = e^0 / (2 + e^5) < 0.007: rejected for almost every u; this seed's is 0.64
    assert verify_chain(settings.warp_rows(logits), [0, 1, 1], [None] * 3, rng) == (0, 1)
    with pytest.raises(ValueError, match="finite maximum"):
        verify_chain(settings.warp(logits), [0, 1, 1], [None] * 3, np.random.default_rng(0))


def test_warp_refuses_greedy_and_broken_logits():
    with pytest.raises(ValueError, match="greedy"):
        warp([1.0, 2.0], 0.0)
    for bad in ([np.nan, 1.0], [np.inf, 1.0], [-np.inf, -np.inf]):
        with pytest.raises(ValueError, match="finite maximum"):
            warp(bad, 1.0)


def test_agrees_with_hugging_face_warpers_on_tie_free_logits():
    torch = pytest.importorskip("torch")
    lp = pytest.importorskip("transformers.generation.logits_process")
    logits = random_logits(3, 64, 50, ties=False)
    for temperature, top_k, top_p in [(0.7, 0, 0.9), (1.3, 20, 0.5), (1.0, 5, 1.0), (0.5, 0, 0.3), (2.0, 49, 0.99)]:
        chain = [lp.TemperatureLogitsWarper(float(temperature))]
        chain += [lp.TopKLogitsWarper(top_k)] if top_k else []
        chain += [lp.TopPLogitsWarper(top_p)] if top_p < 1 else []
        scores = torch.tensor(logits)
        for warper in chain:
            scores = warper(None, scores)
        want = torch.softmax(scores, dim=-1).numpy()
        np.testing.assert_allclose(warp(logits, temperature, top_k, top_p), want, rtol=1e-10, atol=1e-300)


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=float("nan")), "temperature must be 0 (greedy) or a positive finite number (got nan)"),
    (dict(temperature=-0.5), "temperature must be 0 (greedy) or a positive finite number (got -0.5)"),
    (dict(temperature=float("inf")), "temperature must be 0 (greedy) or a positive finite number (got inf)"),
    (dict(temperature=True), "temperature must be"),
    (dict(temperature="1"), "temperature must be"),
    (dict(temperature=1.0, top_k=-1), "top_k must be a whole number, 0 (off) or more (got -1)"),
    (dict(temperature=1.0, top_k=2.5), "top_k must be a whole number"),
    (dict(temperature=1.0, top_p=0.0), "top_p must be a number above 0 and at most 1, where 1 turns it off (got 0.0)"),
    (dict(temperature=1.0, top_p=1.5), "top_p must be a number above 0"),
    (dict(temperature=1.0, top_p=float("nan")), "top_p must be a number above 0"),
    (dict(temperature=1.0, seed=-1), "seed must be a whole number, 0 or more, or unset for a random seed (got -1)"),
    (dict(temperature=1.0, seed=1.5), "seed must be a whole number"),
])
def test_bad_settings_raise_one_line_errors_naming_the_fix(kwargs, message):
    with pytest.raises(FluidError) as error:
        SamplingSettings(**kwargs).validate()
    assert str(error.value).startswith(message) and "\n" not in str(error.value) and "--" not in str(error.value)
    assert error.value.params == (message.split()[0],)


def test_good_settings_pass():
    for temperature, top_k, top_p, seed in [(0, 0, 1.0, None), (0.0, 50, 0.9, 0), (1, 1, 1, 2**70),
                                            (np.float32(0.7), np.int64(3), np.float64(0.5), np.uint32(5))]:
        check_sampling(temperature, top_k, top_p, seed)
    assert SamplingSettings().greedy and not SamplingSettings(temperature=0.1).greedy


def test_row_generators_depend_on_the_row_seed_alone():
    solo = [g.random(8) for g in row_generators(7, 1)]
    batch = [g.random(8) for g in row_generators(7, 3)]
    for draws in batch:
        np.testing.assert_array_equal(draws, solo[0])
    per_row = row_generators([5, None, 9], 3)
    np.testing.assert_array_equal(per_row[2].random(8), row_generators(9, 1)[0].random(8))
    np.testing.assert_array_equal(per_row[0].random(8), SamplingSettings(1.0, seed=5).generators(1)[0].random(8))
    unseeded = row_generators(None, 2)
    assert not np.array_equal(unseeded[0].random(4), unseeded[1].random(4))


def test_row_generators_check_their_seeds():
    with pytest.raises(FluidError, match="got 2 seeds for 3 prompts; give one seed per prompt") as error:
        row_generators([1, 2], 3)
    assert error.value.params == ("seed",)
    with pytest.raises(FluidError, match="seed must be a whole number"):
        row_generators([1, -2], 2)
