"""Stage II horizon targets against a brute-force reading of FLUID_METHOD.md 4.3-4.4."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fluid_app.horizon import horizon_target, soft_horizon_target


def brute_force_target(losses: list[float], tau: float) -> int:
    best = 1
    for k in range(1, len(losses) + 1):
        if sum(losses[:k]) / k < tau:
            best = k
    return best


@pytest.mark.parametrize("seed", range(200))
def test_horizon_target_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    losses = list(rng.exponential(2.5, size=int(rng.integers(0, 17))))
    tau = float(rng.uniform(0.5, 5))
    assert horizon_target(losses, tau) == brute_force_target(losses, tau)


def test_horizon_target_edge_cases():
    assert horizon_target([], 2.8) == 1  # block cut to nothing by the end of the sequence
    assert horizon_target([9.0, 9.0, 9.0], 2.8) == 1  # no prefix under tau
    assert horizon_target([1.0, 1.0, 1.0], 2.8) == 3  # every prefix fits: the whole (cut) block
    assert horizon_target([5.0, 0.1, 0.1, 0.1], 2.8) == 4  # largest k, not the first that fits
    assert horizon_target([1.0, 9.0, 9.0, 0.0], 2.8) == 1
    assert horizon_target([2.8], 2.8) == 1  # strictly below tau


@pytest.mark.parametrize("k_star", [1, 4, 16])
def test_soft_target_is_a_normalised_gaussian_centred_on_k_star(k_star):
    target = soft_horizon_target(k_star, 16, 1.5)
    assert target.shape == (16,) and math.isclose(target.sum(), 1.0)
    assert int(target.argmax()) == k_star - 1
    expected = np.exp(-0.5 * ((np.arange(16) - (k_star - 1)) / 1.5) ** 2)
    np.testing.assert_allclose(target, expected / expected.sum())
