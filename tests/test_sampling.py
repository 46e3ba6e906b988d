"""Sampled decoding through the real sampler keeps the target model's distribution exactly.

A toy backend with real next-token distributions (``SamplingToyLM``) lets the exact AR
sampling distribution of the first tokens be enumerated; 20,000 seeded ``fluid`` decodes (one
seed per row) must match the joint of the 3rd to 5th tokens (the first ones drafts reach)
within bounds a correct sampler breaks with probability below 1e-6 (``distribution_checks``),
with mask drafts, with prompt-lookup drafts and with both. The same harness with a deliberately wrong proposal ``q`` fails, so
the test has the power to catch a biased rule.
"""

from __future__ import annotations

import numpy as np
import pytest
from distribution_checks import assert_matches, assert_rejected
from toy_backend import SamplingToyLM, ToyLM

from fluid_app.batching import FusedBatch
from fluid_app.errors import FluidError
from fluid_app.sampler import Decoder, DecodeSettings
from fluid_app.warping import warp

TRIALS = 20_000
# The checked tokens: the 3rd to the 5th. The first two never meet a draft (the first comes
# from the prefill, the second from a window of masks only), so checking them would not test
# the accept/reject rule; from the 3rd on, each token comes through verified drafts.
CHECKED = slice(2, 5)
DECODED = 8  # tokens decoded; the checked ones follow the AR joint marginal whatever comes after
PROMPT = [3, 4, 5, 3, 4]  # "3 4" recurs, so prompt lookup finds drafts
SAMPLING = dict(temperature=0.8, top_p=0.95)


def joint(lm: SamplingToyLM, **sampling) -> tuple[list[tuple[int, ...]], np.ndarray]:
    """The exact AR distribution of the checked tokens (enumerated, then marginalised)."""
    exact = lm.ar_distribution(PROMPT, CHECKED.stop, lambda logits: warp(logits, sampling["temperature"], 0,
                                                                         sampling.get("top_p", 1.0)))
    marginal: dict[tuple[int, ...], float] = {}
    for sequence, mass in exact.items():
        marginal[sequence[CHECKED]] = marginal.get(sequence[CHECKED], 0.0) + mass
    cells = sorted(marginal)
    return cells, np.array([marginal[c] for c in cells])


def decode_counts(lm, cells, decoder_class=Decoder, batch: int = 2000, **settings) -> tuple[np.ndarray, Decoder]:
    index = {c: i for i, c in enumerate(cells)}
    counts = np.zeros(len(cells), dtype=np.int64)
    for first in range(0, TRIALS, batch):
        seeds = tuple(range(first, first + batch))
        decoder = decoder_class(lm, [PROMPT] * batch, DecodeSettings(max_new_tokens=DECODED, seed=seeds,
                                                                     **SAMPLING, **settings))
        for result in decoder.run():
            counts[index[tuple(result.token_ids[CHECKED])]] += 1
    return counts, decoder


CASES = {
    "mask drafts": dict(k_min=3, k_max=3, threshold=0.01, prompt_lookup_num_tokens=0),
    "argmax mask drafts": dict(k_min=3, k_max=3, threshold=0.01, prompt_lookup_num_tokens=0, sample_drafts=False),
    "lookup drafts": dict(k_min=3, k_max=3, threshold=1.0, prompt_lookup_num_tokens=2),
    "mask and lookup drafts": dict(k_min=2, k_max=4, threshold=0.4, prompt_lookup_num_tokens=2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fluid_sampling_emits_the_exact_ar_distribution(case):
    lm = SamplingToyLM()
    cells, probs = joint(lm, **SAMPLING)
    counts, decoder = decode_counts(lm, cells, **CASES[case])
    assert_matches(case, counts, probs)
    proposed = {s: sum(r.proposed[s] for r in decoder.results) for s in ("mask", "lookup")}
    accepted = {s: sum(r.accepted[s] for r in decoder.results) for s in ("mask", "lookup")}
    # the case really exercises its draft source, with both outcomes
    for source in ("mask", "lookup"):
        if source in case:
            assert 0 < accepted[source] < proposed[source], (case, proposed, accepted)


def test_ar_sampling_emits_the_exact_ar_distribution():
    lm = SamplingToyLM()
    cells, probs = joint(lm, **SAMPLING)
    counts, _ = decode_counts(lm, cells, mode="ar")
    assert_matches("ar", counts, probs)


def test_fluid_sampling_under_a_forward_token_budget_stays_exact():
    """Rows sharing a forward with a token budget (fluid_app/batching.py) feed windows cut to
    a prefix of their slots; the sampled tokens keep the exact AR distribution."""
    lm = SamplingToyLM()
    cells, probs = joint(lm, **SAMPLING)
    index = {c: i for i, c in enumerate(cells)}
    counts = np.zeros(len(cells), dtype=np.int64)
    trimmed = 0
    for first in range(0, TRIALS, 2000):
        seeds = tuple(range(first, first + 2000))
        decoder = Decoder(lm, [PROMPT] * 2000, DecodeSettings(max_new_tokens=DECODED, seed=seeds, **SAMPLING,
                                                             **CASES["mask and lookup drafts"]))
        batch = FusedBatch(lm, token_budget=2 * 2000)  # the exact token and one slot a row: lookup runs are cut
        for _ in Decoder._drain(batch, batch.join(decoder)):
            pass
        trimmed += batch.trimmed
        for result in decoder.results:
            counts[index[tuple(result.token_ids[CHECKED])]] += 1
    assert trimmed > TRIALS  # most rows were cut more than once
    assert_matches("mask and lookup drafts, trimmed", counts, probs)


class WrongProposalDecoder(Decoder):
    """The known trap (transformers#32867): argmax drafts judged with the softmax they came
    from, as if they had been sampled from it."""

    def _mask_draft(self, b, logits, argmax):
        return int(argmax), self.sampling.warp(logits)


def test_a_wrong_proposal_is_caught():
    lm = SamplingToyLM()
    cells, probs = joint(lm, **SAMPLING)
    counts, _ = decode_counts(lm, cells, WrongProposalDecoder, **CASES["mask drafts"])
    assert_rejected("argmax drafts judged with their softmax", counts, probs)


def test_a_row_samples_the_same_alone_or_in_a_batch():
    lm = SamplingToyLM()
    prompts = [PROMPT, [5, 6, 3], [4], [6, 6, 6, 6, 3]]
    settings = dict(max_new_tokens=12, k_min=2, k_max=4, threshold=0.3, prompt_lookup_num_tokens=2, **SAMPLING)
    batch = Decoder(lm, prompts, DecodeSettings(seed=7, **settings)).run()
    for prompt, result in zip(prompts, batch):
        alone = Decoder(lm, [prompt], DecodeSettings(seed=7, **settings)).run()[0]
        again = Decoder(lm, [prompt], DecodeSettings(seed=7, **settings)).run()[0]
        assert result.token_ids == alone.token_ids == again.token_ids
    other = Decoder(lm, prompts, DecodeSettings(seed=8, **settings)).run()
    assert [r.token_ids for r in other] != [r.token_ids for r in batch]  # the seed matters


def test_temperature_zero_is_the_greedy_path():
    lm = ToyLM(draft_accuracy=0.7)
    prompts = [[5, 6, 7], [9, 3]]
    base = DecodeSettings(max_new_tokens=30, k_min=2, k_max=6)
    greedy = Decoder(lm, prompts, base).run()
    for options in (dict(temperature=0.0, seed=3), dict(do_sample=False, temperature=0.9, top_p=0.5)):
        settings = DecodeSettings(max_new_tokens=30, k_min=2, k_max=6, **options)
        assert settings.sampling is None
        out = Decoder(lm, prompts, settings).run()  # ToyLM refuses logits: no sampling path ran
        assert [r.token_ids for r in out] == [r.token_ids for r in greedy]
        assert [r.forwards for r in out] == [r.forwards for r in greedy]
    assert DecodeSettings(do_sample=True).sampling.temperature == 1.0  # HF's default temperature


def test_a_sampled_decode_takes_the_checkpoints_sampling_k_min_unless_k_min_is_named():
    from fluid_app.fluid_config import FluidConfig

    config = FluidConfig(k_min=5, k_max=8, sampling_k_min=3)
    k_min = {name: DecodeSettings.from_config(config, **options).k_min for name, options in {
        "greedy": {}, "temperature 0": dict(temperature=0.0), "sampled": dict(temperature=0.7, top_p=0.95),
        "do_sample": dict(do_sample=True), "do_sample off": dict(do_sample=False, temperature=0.7),
        "named": dict(temperature=0.7, k_min=6), "named 5": dict(temperature=0.7, k_min=5)}.items()}
    assert k_min == {"greedy": 5, "temperature 0": 5, "sampled": 3, "do_sample": 3, "do_sample off": 5,
                     "named": 6, "named 5": 5}
    assert DecodeSettings.from_config(FluidConfig(k_min=5, k_max=8), temperature=0.7).k_min == 5  # unset: k_min
    assert DecodeSettings.from_config(config, temperature=0.7, k_max=3).k_max == 3  # 3 <= 3: no conflict
    with pytest.raises(FluidError, match="temperature"):  # a bad temperature is still refused, not read
        DecodeSettings.from_config(config, temperature=float("nan"))
    for bad in (0, 9):
        with pytest.raises(FluidError, match=r"sampling_k_min must be from 1 to k_max \(8\)"):
            FluidConfig(k_min=5, k_max=8, sampling_k_min=bad).validate()


def test_a_sampled_decode_feeds_the_checkpoints_fallback_masks_as_a_greedy_one_does():
    """Both backends feed the branch (torch and mlx try the same drafts: test_mlx.py), so
    sampling takes the checkpoint's fallback masks; a request may still name its own."""
    from fluid_app.fluid_config import FluidConfig

    config = FluidConfig(k_min=5, k_max=8, fallback_masks=1)
    fallback = {name: DecodeSettings.from_config(config, **options).fallback_masks for name, options in {
        "greedy": {}, "sampled": dict(temperature=0.7), "do_sample": dict(do_sample=True),
        "do_sample off": dict(do_sample=False, temperature=0.7), "named": dict(temperature=0.7, fallback_masks=2),
        "named 0": dict(temperature=0.7, fallback_masks=0)}.items()}
    assert fallback == {"greedy": 1, "sampled": 1, "do_sample": 1, "do_sample off": 1, "named": 2, "named 0": 0}


@pytest.mark.parametrize("options, needle", [
    (dict(temperature=-0.1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=0.5, top_p=0.0), "top_p"), (dict(temperature=0.5, top_p=1.5), "top_p"),
    (dict(temperature=0.5, top_k=-1), "top_k"), (dict(temperature=0.5, seed=1.5), "seed"),
    (dict(temperature=0.5, seed=-2), "seed"), (dict(temperature=0.7, mode="reference"), "greedy only"),
])
def test_bad_sampling_settings_are_one_line_errors(options, needle):
    with pytest.raises(FluidError, match=needle) as caught:
        DecodeSettings(**options).validate()
    assert "\n" not in str(caught.value)


@pytest.mark.slow
def test_smollm2_same_seed_same_text_alone_in_a_batch_and_on_rerun(smollm2):
    prompts = ["Tell me about the Moon.", "Write a haiku about rain.", "List three colours.", "Hi"]
    options = dict(chat=True, max_new_tokens=24, temperature=0.8, top_p=0.95, seed=5)
    batch = smollm2.generate(prompts, **options)
    for prompt, row in zip(prompts, batch):
        alone = smollm2.generate(prompt, **options)
        assert alone.token_ids == row.token_ids
    assert [g.token_ids for g in smollm2.generate(prompts, **options)] == [g.token_ids for g in batch]
    assert smollm2.generate(prompts[0], **{**options, "seed": 6}).token_ids != batch[0].token_ids


def test_bench_reports_sampled_speed_drafts_and_a_distribution_check(tiny_model_dir, tmp_path):
    import json

    from conftest import run_cli

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ["Paris is", "Once upon", "The cat"]) + "\n")
    proc = run_cli("bench", "--model", str(tiny_model_dir("llama")), "--prompts", str(prompts), "--max-new-tokens",
                   "10", "--k-min", "2", "--k-max", "4", "--temperature", "0.8", "--top-p", "0.95", "--seed", "3",
                   "--compare-drafts", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert set(report["modes"]) == {"ar", "fluid", "fluid argmax drafts"}  # reference is greedy only: left out
    assert "identical" not in report and "speedup" in report
    check = report["distribution_check"]
    assert check["prompts"] == 3 and isinstance(check["consistent"], bool)
    assert set(report["drafts"]["fluid"]) == {"mask", "lookup"}
    assert "fluid argmax drafts" in report["fixed_horizons"]


def test_fallback_masks_keep_the_exact_ar_distribution():
    """Windows that also feed a branch of masks blind to their drafts (fluid_app/branches.py),
    which drafts the next window after a rejection: the sampled tokens keep the AR joint."""
    lm = SamplingToyLM()
    cells, probs = joint(lm, **SAMPLING)
    for case in ("mask drafts", "mask and lookup drafts"):
        counts, decoder = decode_counts(lm, cells, **CASES[case], fallback_masks=2)
        assert_matches(f"{case}, fallback masks", counts, probs)
        assert sum(r.fallback_windows for r in decoder.results) > 100  # the branch really drafted
