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
    # the fused loop announces its first window always, later ones only when wider than 1; AR's
    # blocks are its tokens, each counted by the view
    assert view.horizons == (ks if mode != "fluid" else ks[:1] + [k for k in ks[1:] if k > 1])
    assert len(view.sources) == len(view.committed)
    for source in ("mask", "lookup") if mode != "reference" else ():  # each accepted draft shows its source
        assert view.sources.count(source) == generation.drafts[source]["accepted"]
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


def test_ar_caption_counts_blocks_of_one():
    view = LiveView("ar")
    view.feed(Commit(0, [5], 1, 0))
    view.feed(BlockStart(0, 1, 1, 0))
    for i in range(1, 4):
        view.feed(Commit(0, [5 + i], 1 + i, i))
    assert [f.block for f in view.frames] == [0, 1, 1, 2, 3]
    assert "block 3 · k = 1" in slots_html(view.frames[-1], str, view.horizons)


def test_a_block_ended_by_eos_shows_no_masks():
    view = LiveView("fluid")
    view.feed(Commit(0, [10], 1, 0))
    view.feed(BlockStart(0, 4, 1, 0))
    view.feed(Draft(0, 0, [10, 11, None, None], [1.0, 0.95, 0.0, 0.0], [True, True, False, False], 0))
    view.feed(Verify(0, 1, None, 1))
    view.feed(Commit(0, [11, 2], 3, 1))  # 2 is EOS: the row ends inside the block
    view.feed(Finished(0, "eos", 1))
    assert "mask" not in states(view) and states(view) == ["exact", "accepted", "exact"]


def _luminance(colour: str) -> float:
    channels = [int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5)]
    linear = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def _contrast(a: str, b: str) -> float:
    hi, lo = sorted([_luminance(a), _luminance(b)], reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def test_every_slot_colour_pair_reads():
    """WCAG AA (4.5:1) for each state's text on its background; drafts at any confidence,
    their translucent blue blended over the white page."""
    from fluid_app.ui.render import STYLES, Slot, _slot_style

    for state, (background, text, _) in STYLES.items():
        assert _contrast(background, text) >= 4.5, state
    for confidence in (0.0, 0.5, 0.9, 1.0):
        style = _slot_style(Slot(1, "draft", confidence))
        r, g, b, alpha = (float(x) for x in style.split("rgba(")[1].split(")")[0].split(","))
        blended = "#" + "".join(f"{round(alpha * c + (1 - alpha) * 255):02x}" for c in (r, g, b))
        text = style.split("color:")[1].split(";")[0]
        assert _contrast(blended, text) >= 4.5, confidence


def test_chat_pieces_keep_characters_split_across_tokens():
    from fluid_app.ui.chat import Conversation, Turn, token_pieces, transcript_html

    data = "é!".encode()  # é is two bytes: two "tokens" of one byte each

    def decode(ids):
        return bytes(data[i] for i in ids).decode("utf-8", errors="replace")

    pieces = token_pieces(decode, [0, 1, 2], ["exact", "mask", "bonus"])
    assert pieces == (("", "exact"), ("é", "mask"), ("!", "bonus"))
    assert token_pieces(decode, [0, 1, 2], ["exact", "mask", "bonus"], pieces[:1]) == pieces
    html = transcript_html(Conversation([Turn("hi <b>", "é!", pieces, "2 tokens", "done")]))
    assert "hi &lt;b&gt;" in html and "accepted mask draft 1" in html and "bonus token 1" in html
