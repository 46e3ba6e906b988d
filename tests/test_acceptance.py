"""The speculative acceptance rule emits exactly the target distribution.

Every test is Monte Carlo with a fixed seed (so it never flakes) judged by two bounds that a
correct sampler would break with probability below ``ALPHA`` for *any* seed:

* total variation: by the Bretagnolle-Huber-Carol inequality,
  ``P(||p_hat - p||_1 >= eps) <= 2**k * exp(-N * eps**2 / 2)`` for ``k`` cells and ``N``
  trials, so ``TV = ||p_hat - p||_1 / 2`` stays below
  ``sqrt(2 * (k * ln 2 + ln(1 / ALPHA)) / N) / 2`` (0.0212 for k=6, N=20,000; 0.0502 for the 125 cells of three tokens);
* Pearson's chi-square, with cells of expected count below 5 pooled, and its p-value from
  the closed-form chi-square survival function (scipy is not a dependency); the function
  is pinned to textbook critical values below.

Negative controls run the same harness with a deliberately wrong proposal and assert that
both bounds reject it, which shows the tests have the power to catch a biased rule.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Callable

import numpy as np
import pytest
from distribution_checks import ALPHA, assert_matches, assert_rejected, chi2_critical

from fluid_app.acceptance import sample, verify_candidates, verify_chain
from fluid_app.warping import row_generators, warp

TRIALS = 20_000


@pytest.mark.parametrize("df,alpha,critical", [(1, 0.05, 3.841), (4, 0.05, 9.488), (5, 0.001, 20.515),
                                               (10, 0.01, 23.209), (24, 0.001, 51.179), (99, 0.05, 123.225)])
def test_chi_square_survival_matches_textbook_tables(df, alpha, critical):
    assert chi2_critical(df, alpha) == pytest.approx(critical, abs=2e-3)


def histogram(draw: Callable[[np.random.Generator], int], cells: int, seed: int, trials: int = TRIALS) -> np.ndarray:
    rng = np.random.default_rng(seed)
    counts = np.zeros(cells, dtype=np.int64)
    for _ in range(trials):
        counts[draw(rng)] += 1
    return counts


# -- one slot --------------------------------------------------------------------------------------------
V = 6


def distributions(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A target with a zero (top-k cut) and a proposal that disagrees with it."""
    rng = np.random.default_rng(seed)
    p = warp(rng.normal(0, 1.2, V), 1.0, top_k=V - 1)
    q = warp(rng.normal(0, 1.2, V), 0.8)
    return p, q


BONUS = np.full(V, 1.0 / V)  # the target after the draft; only the first token is counted


def first_token(p: np.ndarray, draft: int, proposal: np.ndarray | None, rng: np.random.Generator) -> int:
    accepted, token = verify_chain((p, BONUS), [draft], [proposal], rng)
    return draft if accepted else token


@pytest.mark.parametrize("seed", [0, 1])
def test_sampled_mask_draft_emits_the_target(seed):
    p, q = distributions(seed)
    counts = histogram(lambda rng: first_token(p, sample(q, rng), q, rng), V, seed=100 + seed)
    assert_matches(f"mask draft (seed {seed})", counts, p)


def test_plain_sampling_emits_the_target():
    p, _ = distributions(2)
    assert_matches("sample()", histogram(lambda rng: sample(p, rng), V, seed=7), p)


@pytest.mark.parametrize("draft", ["argmax", "zero", "unlikely"])
def test_point_mass_draft_emits_the_target(draft):
    p, q = distributions(3)
    token = {"argmax": int(np.argmax(q)), "zero": int(np.flatnonzero(p == 0)[0]),
             "unlikely": int(np.argmin(np.where(p > 0, p, 2)))}[draft]
    counts = histogram(lambda rng: first_token(p, token, None, rng), V, seed=11)
    assert_matches(f"point-mass draft ({draft})", counts, p)


def test_acceptance_rates_are_those_of_the_rule():
    """Exactness alone would also pass a verifier that rejects everything; the rule must
    accept a sampled draft with probability sum(min(p, q)) and a point mass x with p(x).
    Hoeffding: a rate is within sqrt(ln(2 / ALPHA) / (2 N)) of its mean but for ALPHA."""
    p, q = distributions(0)
    slack = math.sqrt(math.log(2 / ALPHA) / (2 * TRIALS))
    rng = np.random.default_rng(5)
    rate = np.mean([verify_chain((p, BONUS), [sample(q, rng)], [q], rng)[0] for _ in range(TRIALS)])
    assert abs(rate - np.minimum(p, q).sum()) < slack, (rate, np.minimum(p, q).sum(), slack)
    star = int(np.argmax(q))
    rate = np.mean([verify_chain((p, BONUS), [star], [None], rng)[0] for _ in range(TRIALS)])
    assert abs(rate - p[star]) < slack, (rate, p[star], slack)


def test_negative_control_argmax_draft_judged_with_its_softmax_fails():
    """An argmax draft is a point mass; accepting it with min(1, p/q) using the softmax ``q``
    over-emits it. The exact wrong distribution is far from ``p``, and the harness sees it."""
    p, q = distributions(0)
    star = int(np.argmax(q))
    keep = min(1.0, p[star] / q[star])
    residual = np.maximum(p - q, 0)
    wrong = keep * np.eye(V)[star] + (1 - keep) * residual / residual.sum()
    assert 0.5 * np.abs(wrong - p).sum() > 0.05  # the control really is wrong
    counts = histogram(lambda rng: first_token(p, star, q, rng), V, seed=100)
    assert_rejected("wrong q: argmax draft with softmax q", counts, p)


# -- siblings of one slot (one tree level) ----------------------------------------------------------------
def without_replacement(q: np.ndarray, count: int, rng: np.random.Generator) -> list[int]:
    weights, out = q.copy(), []
    for _ in range(count):
        out.append(sample(weights, rng))
        weights[out[-1]] = 0.0
    return out


def level_token(p: np.ndarray, candidates: list[int], q: np.ndarray | None, rng: np.random.Generator,
                wor: bool = True) -> int:
    index, token = verify_candidates(p, candidates, q, rng, without_replacement=wor)
    assert index is None or token == candidates[index]
    return token


def test_independent_siblings_emit_the_target():
    p, q = distributions(4)
    counts = histogram(lambda rng: level_token(p, [sample(q, rng) for _ in range(3)], q, rng, wor=False), V, 21)
    assert_matches("3 iid siblings", counts, p)


def test_siblings_without_replacement_emit_the_target():
    p, q = distributions(4)
    counts = histogram(lambda rng: level_token(p, without_replacement(q, 3, rng), q, rng), V, 22)
    assert_matches("3 siblings without replacement", counts, p)


def test_deterministic_siblings_emit_the_target():
    p, q = distributions(4)
    top3 = [int(t) for t in np.argsort(-q, kind="stable")[:3]]
    counts = histogram(lambda rng: level_token(p, top3, None, rng), V, 23)
    assert_matches("top-3 point-mass siblings", counts, p)


def test_negative_control_siblings_without_replacement_judged_as_independent_fail():
    p, q = distributions(4)
    counts = histogram(lambda rng: level_token(p, without_replacement(q, 3, rng), q, rng, wor=False), V, 22)
    assert_rejected("wrong q: without-replacement siblings judged as iid", counts, p)


def test_a_repeated_sibling_judged_as_without_replacement_is_refused():
    """Independent siblings can repeat; a repeat cannot come from sampling without replacement."""
    p, q = distributions(4)
    with pytest.raises(ValueError, match="distribution it was drawn from"):
        zero = int(np.flatnonzero(p == 0)[0])  # always rejected, so the repeat is reached
        verify_candidates(p, [zero, zero], q, CountingRng([0.5, 0.5, 0.5]))


def test_sampled_siblings_judged_as_point_masses_are_still_exact():
    """Not a negative control: the point-mass rule conditions on the drawn token, so it is exact
    for drafts of any origin; passing the real ``q`` of a sampled draft only accepts more often."""
    p, q = distributions(4)
    counts = histogram(lambda rng: level_token(p, without_replacement(q, 3, rng), None, rng), V, 22)
    assert_matches("sampled siblings judged as point masses", counts, p)


# -- several positions: a toy target whose next-token distribution depends on the prefix --------------
W = 5  # vocabulary of the toy models
LENGTH = 3


@lru_cache(maxsize=None)
def target(prefix: tuple[int, ...]) -> np.ndarray:
    logits = np.random.default_rng([1, len(prefix), *prefix]).normal(0, 1.5, W)
    return warp(logits, 0.9, top_k=4, top_p=0.95)  # zeros included: they must never be emitted


@lru_cache(maxsize=None)
def drafter(prefix: tuple[int, ...], slot: int) -> np.ndarray:
    """A weaker model: the target's logits (of the committed prefix) plus noise, per slot."""
    noise = np.random.default_rng([2, slot, len(prefix), *prefix]).normal(0, 1.0, W)
    logits = np.random.default_rng([1, len(prefix), *prefix]).normal(0, 1.5, W)
    return warp(logits + noise, 1.2)


def exact_joint(length: int) -> np.ndarray:
    """P(first ``length`` tokens) under plain AR sampling, enumerated; index = base-W number."""
    joint = np.zeros(W**length)
    for cell in range(W**length):
        tokens = [cell // W ** (length - 1 - i) % W for i in range(length)]
        joint[cell] = math.prod(target(tuple(tokens[:i]))[t] for i, t in enumerate(tokens))
    return joint


def cell_of(tokens: list[int]) -> int:
    return sum(t * W ** (len(tokens) - 1 - i) for i, t in enumerate(tokens))


# draft kinds per round (0 mask, 1 argmax, 2 lookup), cycled by round and committed length
SCHEDULE = [[1, 0, 2], [0, 1], [2, 1, 0], [], [0, 0, 0], [1], [0, 2, 1]]


def chain_decode(rng: np.random.Generator, length: int = LENGTH, wrong: bool = False) -> list[int]:
    """Decode with chains of 0-3 drafts (per ``SCHEDULE``) mixing the three kinds FLUID uses:

    * a mask draft, sampled from the drafter's distribution for that slot given the committed
      prefix only (the slots of one window are drafted in one forward, independently);
    * an argmax draft given the drafts so far (a point mass);
    * a prompt-lookup-like fixed token (a point mass; sometimes a token the target never emits).
    With ``wrong`` the argmax draft is judged with the softmax it came from.
    """
    out: list[int] = []
    rounds = 0
    while len(out) < length:
        committed = tuple(out)
        drafts: list[int] = []
        proposals: list[np.ndarray | None] = []
        for slot, kind in enumerate(SCHEDULE[(3 * rounds + len(out)) % len(SCHEDULE)]):
            if kind == 0:
                q = drafter(committed, slot)
                drafts.append(sample(q, rng))
                proposals.append(q)
            elif kind == 1:
                q = drafter(committed + tuple(drafts), 0)
                drafts.append(int(np.argmax(q)))
                proposals.append(q if wrong else None)
            else:
                drafts.append((7 * sum(committed + tuple(drafts)) + 3) % W)
                proposals.append(None)
        p_rows = [target(committed + tuple(drafts[:i])) for i in range(len(drafts) + 1)]
        accepted, token = verify_chain(p_rows, drafts, proposals, rng)
        out += drafts[:accepted] + [token]
        rounds += 1
    return out[:length]


def test_chain_of_mixed_drafts_emits_the_ar_joint():
    counts = histogram(lambda rng: cell_of(chain_decode(rng)), W**LENGTH, seed=31)
    assert_matches("3-token chain decode", counts, exact_joint(LENGTH))


def test_negative_control_chain_with_argmax_drafts_judged_by_softmax_fails():
    counts = histogram(lambda rng: cell_of(chain_decode(rng, wrong=True)), W**LENGTH, seed=31)
    assert_rejected("wrong q: 3-token chain decode", counts, exact_joint(LENGTH))


def tree_decode(rng: np.random.Generator, length: int = LENGTH) -> list[int]:
    """Rounds of a two-level tree with two siblings per node, drawn without replacement from
    the drafter; a round ends at the first level whose siblings all fail (with the correction)
    or with the bonus drawn at the accepted leaf."""
    out: list[int] = []
    while len(out) < length:
        for _level in range(2):
            q = drafter(tuple(out), 0)
            index, token = verify_candidates(target(tuple(out)), without_replacement(q, 2, rng), q, rng)
            out.append(token)
            if index is None:
                break
        else:
            out.append(sample(target(tuple(out)), rng))
    return out[:length]


def test_two_level_tree_emits_the_ar_joint():
    counts = histogram(lambda rng: cell_of(tree_decode(rng)), W**LENGTH, seed=41)
    assert_matches("2-level tree decode", counts, exact_joint(LENGTH))


# -- draw order, edge cases, batches -----------------------------------------------------------------------
class CountingRng:
    """Counts ``random()`` calls and can replay fixed values."""

    def __init__(self, values: list[float] | None = None, seed: int = 0):
        self.calls = 0
        self.values = values
        self.rng = np.random.default_rng(seed)

    def random(self) -> float:
        self.calls += 1
        return self.values[self.calls - 1] if self.values else float(self.rng.random())


def test_draws_follow_the_documented_order():
    p = np.array([0.5, 0.5, 0.0])
    rows = np.stack([p, p, p, p])
    rng = CountingRng([0.0, 0.0, 0.0, 0.7])  # accept, accept, accept, bonus from the upper half
    assert verify_chain(rows, [0, 1, 1], [None, None, None], rng) == (3, 1) and rng.calls == 4
    rng = CountingRng([0.0, 0.9, 0.2])  # accept, reject draft 1 (u=0.9 >= p=0.5), correction
    assert verify_chain(rows, [0, 1, 0], [None, None, None], rng) == (1, 0) and rng.calls == 3
    rng = CountingRng([0.99, 0.1])  # reject the zero-probability draft 2, correction
    assert verify_chain(rows[:2], [2], [None], rng) == (0, 0) and rng.calls == 2
    rng = CountingRng([0.9, 0.1])  # one candidate behaves exactly like a chain of one
    assert verify_candidates(p, [1], None, rng) == (None, 0) and rng.calls == 2


def test_sample_never_returns_a_zero_weight_token():
    top = float(np.nextafter(1.0, 0.0))
    assert sample(np.array([0.3, 0.7, 0.0, 0.0]), CountingRng([top])) == 1
    assert sample(np.array([0.0, 0.0, 2.0, 0.0]), CountingRng([0.0])) == 2
    with pytest.raises(ValueError, match="sum to 0"):
        sample(np.zeros(3), CountingRng([0.5]))


def test_a_draft_its_proposal_cannot_draw_is_refused():
    p = np.array([0.5, 0.5])
    with pytest.raises(ValueError, match="distribution it was drawn from"):
        verify_chain(np.stack([p, p]), [1], [np.array([1.0, 0.0])], CountingRng())
    with pytest.raises(ValueError, match="one proposal per draft"):
        verify_chain(np.stack([p, p]), [1, 0], [None], CountingRng())


def test_a_row_decodes_the_same_alone_or_in_a_batch():
    """Rows consume different numbers of draws; with one generator per row seed, each row
    still reproduces its solo decode, whatever else shares the batch."""
    seeds = [11, 12, 11, 3]
    batch = row_generators(seeds, len(seeds))
    batched = [[] for _ in seeds]
    for _ in range(20):  # interleave the rows the way a batched decoder would
        for row, rng in enumerate(batch):
            batched[row].append(chain_decode(rng, length=4))
    for row, seed in enumerate(seeds):
        solo = row_generators(seed, 1)[0]
        assert batched[row] == [chain_decode(solo, length=4) for _ in range(20)]
    assert batched[0] == batched[2] and batched[0] != batched[1]
