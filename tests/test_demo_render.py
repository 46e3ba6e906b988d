"""The demo's pure view layer: sampler events -> slots, counts, plot data, replay frames."""

from __future__ import annotations

import pytest

from fluid_app.events import BlockStart, Commit, Draft, Finished, Verify
from fluid_app.sampler import MODES
from fluid_app.ui.render import (
    SLOT_STATES,
    LiveView,
    legend_html,
    plot_data,
    race_summary,
    sampling_text,
    slots_html,
    token_label,
)


def states(view: LiveView) -> list[str]:
    return [s.state for s in view.slots]


def test_fluid_window_states_follow_verification():
    view = LiveView("fluid")
    view.feed(Commit(0, [10], 1, 0))  # from the prefill: no forward counted
    view.feed(BlockStart(0, 4, 1, 0))
    assert states(view) == ["exact", "mask", "mask", "mask"] and view.slots[0].token == 10
    view.feed(Verify(0, 0, None, 1))
    view.feed(Commit(0, [11], 2, 1))
    assert states(view) == ["exact", "exact", "mask", "mask"] and view.slots[1].token == 11

    view.feed(BlockStart(0, 4, 2, 1))
    view.feed(Draft(0, 0, [11, 12, 13, None], [1.0, 0.95, 0.5, 0.1], [True, True, True, False], 1))
    assert states(view) == ["exact", "draft", "draft", "mask"]
    view.feed(Verify(0, 1, 99, 2))
    assert states(view) == ["exact", "accepted", "corrected", "mask"]
    assert (view.slots[2].token, view.slots[2].replaced) == (99, 13)
    view.feed(Commit(0, [12, 99], 4, 2))
    assert states(view) == ["exact", "accepted", "corrected", "mask"]

    view.feed(BlockStart(0, 4, 4, 2))
    view.feed(Draft(0, 0, [99, 1, 2, 3], [1.0, 0.9, 0.9, 0.9], [True] * 4, 2))
    view.feed(Verify(0, 3, None, 3))
    view.feed(Commit(0, [1, 2, 3, 7], 8, 3))
    assert states(view) == ["exact", "accepted", "accepted", "accepted", "bonus"]
    view.feed(Finished(0, "length", 3))

    assert view.committed == [10, 11, 12, 99, 1, 2, 3, 7]
    assert view.forwards == 3 and view.horizons == [4, 4, 4] and view.finish_reason == "length"
    assert [p["tokens/forward"] for p in view.points] == [1.0, 2.0, 4.0]
    assert view.points[-1]["mean tokens/forward"] == pytest.approx(8 / 3)
    assert view.frames[-1].finished and view.frames[-1].committed == 8


def test_the_view_shows_the_forward_counts_the_sampler_reports():
    view = LiveView("reference")
    view.feed(BlockStart(0, 3, 0, 0))
    view.feed(Draft(0, 0, [5, None, None], [0.99, 0.2, 0.1], [True, False, False], 1))
    view.feed(Draft(0, 1, [5, 6, 7], [0.99, 0.6, 0.5], [True] * 3, 2))
    view.feed(Verify(0, 1, 8, 3))
    assert states(view) == ["accepted", "corrected", "discarded"]
    view.feed(Commit(0, [5, 8], 2, 3))
    assert view.forwards == 3
    view.feed(BlockStart(0, 2, 2, 4))  # the re-commit forward of the correction happened before it
    assert view.forwards == 4 and states(view) == ["mask", "mask"]


def test_other_rows_are_ignored():
    view = LiveView("fluid")
    assert not view.feed(Commit(1, [3], 1, 0))
    assert view.committed == [] and view.frames == []


@pytest.mark.parametrize("mode", MODES)
def test_view_of_a_real_decode_matches_the_generation(tiny_model_dir, mode):
    import fluid_app

    model = fluid_app.load(str(tiny_model_dir("llama")), backend="torch", device="cpu")
    view = LiveView(mode)
    items = list(model.stream("The quick brown fox", mode=mode, max_new_tokens=20, k_min=2, k_max=5))
    generation = items[-1]
    for event in items[:-1]:
        view.feed(event)
    assert view.committed == generation.token_ids
    assert view.forwards == generation.forwards
    assert view.tokens_per_forward == pytest.approx(generation.tokens_per_forward, abs=1e-3)
    assert view.finish_reason == generation.finish_reason
    ks = [b["k"] for b in generation.blocks]
    # the fused loop announces its first window always, later ones only when wider than 1
    assert view.horizons == (ks if mode == "reference" else ks[:1] + [k for k in ks[1:] if k > 1])
    assert all(s.state in SLOT_STATES for f in view.frames for s in f.slots)
    assert len({f.slots for f in view.frames}) > 3  # the view actually moves
    html = slots_html(view.frames[-1], lambda t: model.tokenizer.decode([t]), view.horizons)
    assert "fluid-slot" in html and "<script" not in html


def test_view_of_a_sampled_decode_matches_the_generation(tiny_model_dir):
    """At temperature 0.8 the events mean what they mean greedy: the view rebuilds the text,
    and a corrected slot always replaced a different (rejected) draft."""
    import fluid_app

    model = fluid_app.load(str(tiny_model_dir("llama")), backend="torch", device="cpu")
    view = LiveView("fluid")
    items = list(model.stream("The quick brown fox", max_new_tokens=20, k_min=2, k_max=5, temperature=0.8, seed=3))
    for event in items[:-1]:
        view.feed(event)
    assert view.committed == items[-1].token_ids and view.forwards == items[-1].forwards
    corrected = [s for f in view.frames for s in f.slots if s.state == "corrected"]
    assert corrected and all(s.token != s.replaced for s in corrected)
    assert len({f.slots for f in view.frames}) > 3


RACE = {"speedup": 1.5, "fluid_tokens_per_s": 30.0, "ar_tokens_per_s": 20.0, "fluid_tokens_per_forward": 1.8,
        "ar_tokens_per_forward": 1.0}


@pytest.mark.parametrize("identical", [True, False])
def test_a_sampled_race_never_claims_identical_texts(identical):
    """Sampled, equal texts prove nothing and different ones are no bug: whatever the texts
    did, the verdict reports the speeds and the sampling, and judges nothing."""
    summary = race_summary({**RACE, "identical": identical,
                            "sampling": {"temperature": 0.8, "top_p": 0.95, "top_k": 0, "seed": 7}})
    assert summary.startswith("**FLUID 1.50× AR**")
    assert "FLUID 30.0 tokens/s, TPF 1.80" in summary and "AR 20.0 tokens/s, TPF 1.00" in summary
    assert ("sampled (temperature 0.8, top-p 0.95, seed 7): FLUID and AR each follow the model's distribution; "
            "their texts can differ by design") in summary
    assert "identical" not in summary.lower() and "DIFFER" not in summary and "bug" not in summary


def test_a_greedy_race_judges_the_texts():
    assert race_summary({**RACE, "identical": True, "sampling": None}).endswith("· identical outputs (lossless)")
    assert race_summary({**RACE, "identical": False}).endswith("· outputs DIFFER (not lossless: a bug)")
    assert sampling_text(None) == "greedy"
    assert sampling_text({"temperature": 1.0, "top_p": 1.0, "top_k": 50, "seed": None}) == "temperature 1, top-k 50"


def test_slots_html_escapes_token_text_and_shows_corrections():
    view = LiveView("reference")
    view.feed(BlockStart(0, 2, 0, 0))
    view.feed(Draft(0, 0, [1, 2], [0.9, 0.4], [True, True], 1))
    view.feed(Verify(0, 0, 3, 2))
    text = {1: "<b>", 2: "wrong", 3: " right\n"}
    html = slots_html(view.frames[-1], text.__getitem__, view.horizons)
    assert "&lt;b&gt;" in html and "<b>" not in html
    assert "<s" in html and "wrong" in html and "·right⏎" in html
    assert "k per block: 2" in html
    assert token_label("") == "∅"
    assert "waiting" in slots_html(None, str)
    assert all(state in legend_html() for state in ("mask", "accepted", "bonus"))


def test_plot_data_is_long_format():
    view = LiveView("fluid")
    for event in (Commit(0, [1], 1, 0), BlockStart(0, 3, 1, 0), Verify(0, 0, None, 1), Commit(0, [2], 2, 1),
                  BlockStart(0, 3, 2, 1), Draft(0, 0, [2, 5, 6], [1, 0.9, 0.9], [True] * 3, 1),
                  Verify(0, 2, None, 2), Commit(0, [5, 6, 4], 5, 2)):
        view.feed(event)
    frame = plot_data(view.points)
    assert list(frame.columns) == ["forward", "value", "series"]
    assert len(frame) == 3 * len(view.points) == 6
    tpf = frame[frame.series == "tokens/forward"]["value"].tolist()
    assert tpf == [1.0, 3.0]
    assert plot_data([]).empty
    assert str(plot_data([]).dtypes["value"]) == "float64"  # else the live plot's axis turns nominal


def test_the_ui_never_imports_torch_or_mlx():
    import subprocess
    import sys

    from conftest import ROOT

    code = ("import sys, fluid_app.ui.app, fluid_app.commands.demo; "
            "print(sorted(m for m in ('torch', 'mlx') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
