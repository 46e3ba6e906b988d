"""Sampler events -> what the live view draws. Pure: no Gradio, no torch, easy to test.

:class:`LiveView` folds the sampler's events (``fluid_app.events``) into the current block's
slots, the committed token ids, a per-forward series for the plot, and a list of
:class:`Frame` snapshots that the replay slider steps through. :func:`slots_html` and
:func:`plot_data` turn that state into an HTML row of slots and a long-format DataFrame.

Slot states (the legend in the page explains the colours):

* ``mask``: still a MASK token in the block;
* ``draft``: a drafted token, shaded by its confidence;
* ``exact``: a token the causal pass produced exactly (the block's anchor, or the token
  after an accepted run that filled a masked slot);
* ``accepted``: a draft that verification kept (equal to greedy AR; when sampling, kept by
  the lossless accept/reject test);
* ``corrected``: the causal token that replaced the first wrong (or, sampling, rejected)
  draft, which is shown struck through;
* ``bonus``: the extra exact token FLUID gets when every draft in the window matched;
* ``discarded``: drafts after a rejection, thrown away and re-drafted.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

from ..events import BlockStart, Commit, Draft, Finished, Verify

SLOT_STATES = ("mask", "draft", "exact", "accepted", "corrected", "bonus", "discarded")

STYLES = {  # state -> (background, text colour, border); every pair has a contrast of at least 4.5:1
    "mask": ("#f3f4f6", "#4b5563", "1px dashed #9ca3af"),
    "exact": ("#334155", "#ffffff", "1px solid #334155"),
    "accepted": ("#15803d", "#ffffff", "1px solid #166534"),
    "corrected": ("#c2410c", "#ffffff", "1px solid #9a3412"),
    "bonus": ("#0f766e", "#ffffff", "1px solid #115e59"),
    "discarded": ("#e5e7eb", "#4b5563", "1px solid #d1d5db"),
}
LEGEND = [("mask", "mask"), ("draft", "draft (darker = more confident)"), ("exact", "exact (causal)"),
          ("accepted", "accepted draft"), ("corrected", "rejected draft -> corrected"),
          ("bonus", "bonus token"), ("discarded", "discarded draft")]


@dataclass(frozen=True)
class Slot:
    token: int | None
    state: str
    confidence: float = 0.0
    replaced: int | None = None  # for ``corrected``: the rejected draft


@dataclass(frozen=True)
class Frame:
    """One replayable moment of a decode: everything the view needs to redraw it."""

    slots: tuple[Slot, ...]
    k: int
    block: int  # 1-based index of the current block (0 before the first)
    committed: int  # new tokens committed so far
    forwards: int  # decoding forwards so far (as counted in Generation.forwards)
    points: int  # plot points so far
    note: str
    finished: bool = False


@dataclass
class LiveView:
    """Accumulates one row's events. ``mode`` is the sampler mode that produced them."""

    mode: str = "fluid"
    committed: list[int] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)  # how each committed token came (events.TOKEN_SOURCES)
    slots: list[Slot] = field(default_factory=list)
    horizons: list[int] = field(default_factory=list)  # k of each block, in order
    points: list[dict[str, float]] = field(default_factory=list)
    frames: list[Frame] = field(default_factory=list)
    forwards: int = 0
    finish_reason: str = ""
    _commits: int = 0
    _accepted: int = 0
    _verified: bool = False
    _forwards_at_commit: int = 0

    @property
    def k(self) -> int:
        return self.horizons[-1] if self.horizons else 1

    @property
    def finished(self) -> bool:
        return bool(self.finish_reason)

    @property
    def tokens_per_forward(self) -> float:
        return len(self.committed) / self.forwards if self.forwards else float(len(self.committed))

    def feed(self, event: Any) -> bool:
        """Apply one sampler event; returns True when the view changed (a new frame)."""
        if getattr(event, "row", 0) != 0:
            return False
        handler = {BlockStart: self._block_start, Draft: self._draft, Verify: self._verify,
                   Commit: self._commit, Finished: self._finished}.get(type(event))
        if handler is None:
            return False
        self.forwards = event.forwards  # the sampler counts; the view only shows
        note = handler(event)
        self.frames.append(Frame(tuple(self.slots), self.k, len(self.horizons), len(self.committed),
                                 self.forwards, len(self.points), note, self.finished))
        return True

    # -- event handlers: each updates the state and returns the frame's caption --------------
    def _block_start(self, ev: BlockStart) -> str:
        self.horizons.append(ev.k)
        if self.mode == "fluid":  # the window starts with the last exact token, then masks
            anchor = self.committed[-1] if self.committed else None
            self.slots = [Slot(anchor, "exact", 1.0)] + [Slot(None, "mask")] * (ev.k - 1)
        else:
            self.slots = [Slot(None, "mask")] * ev.k
        return f"block {len(self.horizons)}: horizon k = {ev.k}"

    def _draft(self, ev: Draft) -> str:
        slots = []
        for i, token in enumerate(ev.slots):
            conf = float(ev.confidences[i]) if i < len(ev.confidences) else 0.0
            if token is None:
                slots.append(Slot(None, "mask", conf))
            elif self.mode == "fluid" and i == 0:
                slots.append(Slot(int(token), "exact", 1.0))
            else:
                slots.append(Slot(int(token), "draft", conf))
        self.slots = slots
        drafted = sum(s.state == "draft" for s in slots)
        if self.mode == "reference":
            return f"denoising forward {ev.iteration + 1}: {drafted} of {len(slots)} slots drafted"
        return f"drafted {drafted} of {len(slots) - 1} slots; the next forward verifies them"

    def _verify(self, ev: Verify) -> str:
        offset = 1 if self.mode == "fluid" else 0
        self._accepted = ev.accepted
        self._verified = True
        slots = list(self.slots)
        for i in range(offset, min(offset + ev.accepted, len(slots))):
            slots[i] = replace(slots[i], state="accepted")
        j = offset + ev.accepted
        if j < len(slots) and ev.correction is not None:
            slots[j] = Slot(int(ev.correction), "corrected", 1.0, replaced=slots[j].token)
        for i in range(j + 1, len(slots)):
            if slots[i].state == "draft":
                slots[i] = replace(slots[i], state="discarded")
        self.slots = slots
        fixed = ", first wrong draft corrected" if ev.correction is not None else ""
        return f"verify: {ev.accepted} draft(s) accepted{fixed}"

    def _commit(self, ev: Commit) -> str:
        self._commits += 1
        first = ev.forwards == 0  # the token from the prefill forward
        verified, self._verified = self._verified, False
        self.committed.extend(int(t) for t in ev.tokens)
        self.sources.extend(ev.sources or ("exact",) * len(ev.tokens))
        if self.mode == "ar" and self._commits > 2:  # AR: every token after the first block is a block of one
            self.horizons.append(1)
        if self.mode == "ar" or (self.mode == "fluid" and not verified):  # a window of one token
            self.slots = [Slot(int(t), "exact", 1.0) for t in ev.tokens]
        elif self.mode == "fluid" and len(ev.tokens) == self._accepted + 1:
            j, exact = 1 + self._accepted, int(ev.tokens[-1])
            slots = list(self.slots)
            if j >= len(slots):
                slots.append(Slot(exact, "bonus", 1.0))
            elif slots[j].state != "corrected":
                slots[j] = Slot(exact, "exact", 1.0)
            for i in range(j + 1, len(slots)):
                if slots[i].state == "draft":
                    slots[i] = replace(slots[i], state="discarded")
            self.slots = slots
        if not first:
            step = self.forwards - self._forwards_at_commit
            self._forwards_at_commit = self.forwards
            self.points.append({
                "forward": self.forwards,
                "tokens/forward": len(ev.tokens) / step if step else float(len(ev.tokens)),
                "mean tokens/forward": self.tokens_per_forward,
                "k": float(self.k),
            })
        return f"committed {len(ev.tokens)} token(s); {len(self.committed)} so far"

    def _finished(self, ev: Finished) -> str:
        """The row ended (EOS, or the length) inside a block: its masks will never be filled
        and its drafts never verified, so the block shows only what it committed."""
        self.finish_reason = ev.reason
        self.slots = [replace(s, state="discarded") if s.state == "draft" else s
                      for s in self.slots if s.state != "mask"]
        return f"finished ({ev.reason}): {len(self.committed)} tokens in {self.forwards} forwards"


# -- drawing ---------------------------------------------------------------------------------
def token_label(text: str) -> str:
    """Make a token's text visible in a slot: spaces, newlines and empties get glyphs."""
    if text == "":
        return "∅"
    return text.replace(" ", "·").replace("\n", "⏎").replace("\t", "⇥")


def _slot_style(slot: Slot) -> str:
    if slot.state == "draft":  # blue, deeper with confidence, light enough for dark text to read
        alpha = 0.12 + 0.4 * max(0.0, min(1.0, slot.confidence))
        return f"background:rgba(37,99,235,{alpha:.2f});color:#172554;border:1px solid #1d4ed8"
    background, color, border = STYLES[slot.state]
    return f"background:{background};color:{color};border:{border}"


def slots_html(frame: Frame | None, token_text: Callable[[int], str], horizons: Sequence[int] = (),
               title: str = "") -> str:
    """The current block as a row of coloured slots, with a caption and the k history."""
    box = ("display:inline-flex;flex-direction:column;align-items:center;justify-content:center;"
           "min-width:2.6em;height:3.4em;margin:2px;padding:0 4px;border-radius:6px;"
           "font-family:ui-monospace,monospace;font-size:0.85em;vertical-align:top")
    parts = [f'<div class="fluid-live" data-frame="{0 if frame is None else frame.committed}">']
    if title:
        parts.append(f'<div style="font-weight:600;margin-bottom:4px">{html.escape(title)}</div>')
    if frame is None:
        parts.append('<div class="fluid-caption" style="color:#6b7280">waiting for a prompt</div></div>')
        return "".join(parts)
    caption = (f"block {frame.block} · k = {frame.k} · {frame.forwards} forwards · "
               f"{frame.committed} tokens · {frame.note}")
    parts.append(f'<div class="fluid-caption" style="margin-bottom:6px">{html.escape(caption)}</div>')
    parts.append('<div class="fluid-slots">')
    for slot in frame.slots:
        label = "▒" if slot.token is None else token_label(token_text(slot.token))
        # The page's stylesheet colours every span; the slot's text colour must win inside it.
        inner = f'<span style="color:inherit">{html.escape(label)}</span>'
        if slot.state == "corrected" and slot.replaced is not None:
            wrong = token_label(token_text(slot.replaced))
            inner = f'<s style="opacity:0.75;font-size:0.8em;color:inherit">{html.escape(wrong)}</s>' + inner
        elif slot.state in ("draft", "mask") and slot.confidence > 0:
            inner += f'<span style="font-size:0.7em;opacity:0.85;color:inherit">{slot.confidence:.2f}</span>'
        style = box + ";" + _slot_style(slot) + (";text-decoration:line-through" if slot.state == "discarded" else "")
        parts.append(f'<span class="fluid-slot fluid-{slot.state}" style="{style}" '
                     f'title="{slot.state}">{inner}</span>')
    parts.append("</div>")
    recent = list(horizons[: frame.block])[-32:]
    if recent:
        parts.append('<div style="margin-top:6px;font-size:0.85em;color:#4b5563">k per block: '
                     + html.escape(" ".join(str(k) for k in recent)) + "</div>")
    parts.append("</div>")
    return "".join(parts)


def legend_html() -> str:
    chips = []
    for state, label in LEGEND:
        style = _slot_style(Slot(1, state, 0.8))
        chips.append(f'<span style="{style};padding:1px 6px;border-radius:4px;margin:0 6px 3px 0;'
                     f'font-size:0.8em;display:inline-block;white-space:nowrap">{html.escape(label)}</span>')
    return '<div class="fluid-legend">' + "".join(chips) + "</div>"


def plot_data(points: Sequence[dict[str, float]]):
    """Long-format DataFrame (forward, value, series) for ``gr.LinePlot(color="series")``."""
    import pandas as pd

    rows = [{"forward": p["forward"], "value": p[name], "series": name}
            for p in points for name in ("tokens/forward", "mean tokens/forward", "k")]
    frame = pd.DataFrame(rows, columns=["forward", "value", "series"])
    # typed even when empty: the plot fixes its axis types from the first frame it gets
    return frame.astype({"forward": "int64", "value": "float64", "series": "str"})


def sampling_text(sampling: dict[str, Any] | None) -> str:
    """How a decode picked its tokens, e.g. ``temperature 0.8, top-p 0.95, seed 7``
    (filters that are off are left out); ``greedy`` without sampling."""
    if not sampling:
        return "greedy"
    parts = [f"temperature {sampling['temperature']:g}"]
    if sampling.get("top_p", 1.0) < 1.0:
        parts.append(f"top-p {sampling['top_p']:g}")
    if sampling.get("top_k", 0):
        parts.append(f"top-k {sampling['top_k']}")
    if sampling.get("seed") is not None:
        parts.append(f"seed {sampling['seed']}")
    return ", ".join(parts)


def race_summary(result: dict[str, Any]) -> str:
    """The race's verdict line (Markdown) from :func:`~fluid_app.ui.runner.verdict`.

    Greedy, FLUID must write AR's text token for token, so the line says whether it did (a
    difference is a bug). Sampled, the two follow the same distribution but not the same
    draws, so comparing texts proves nothing: the line reports the speeds and says why the
    texts differ, and never claims them identical.
    """
    speeds = (f"**FLUID {result['speedup']:.2f}× AR** · FLUID {result['fluid_tokens_per_s']:.1f} tokens/s, "
              f"TPF {result['fluid_tokens_per_forward']:.2f} · AR {result['ar_tokens_per_s']:.1f} tokens/s, "
              f"TPF {result['ar_tokens_per_forward']:.2f}")
    if result.get("sampling"):
        how = (f"sampled ({sampling_text(result['sampling'])}): FLUID and AR each follow the model's "
               "distribution; their texts can differ by design (lossless in distribution, not token for token)")
    elif result["identical"]:
        how = "identical outputs (lossless)"
    else:
        how = "outputs DIFFER (not lossless: a bug)"
    return f"{speeds} · {how}"


def stats_text(view: LiveView, seconds: float) -> str:
    """One line of cost figures for a finished or running decode."""
    n = len(view.committed)
    rate = n / seconds if seconds > 0 else 0.0
    state = f"finished ({view.finish_reason})" if view.finished else "running"
    return (f"{state}: {n} tokens · {view.forwards} forwards · {view.tokens_per_forward:.2f} tokens/forward"
            f" · {rate:.1f} tokens/s · {seconds:.2f} s")
