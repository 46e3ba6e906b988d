"""The Chat tab's conversation: its turns, and the transcript drawn from them. Pure: no Gradio.

A :class:`Turn` is one user message and the reply to it. The reply keeps its token ids and
how each token came (``exact``, ``mask``, ``lookup``, ``bonus``: :class:`fluid_app.events.Commit`),
so the transcript colours the text by where the parallelism paid off, with a legend per
reply that counts each kind, and the reply's cost (tokens/s, tokens per forward, forwards).
The history sent to the model is the plain text of the turns (:func:`messages`), so a turn
that was stopped half-way continues from exactly the text shown.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

# source -> (label in the legend, background of the token's text); the text itself stays dark
SOURCE_STYLES = {
    "exact": ("exact (causal)", "transparent"),
    "mask": ("accepted mask draft", "#bbf7d0"),
    "lookup": ("accepted lookup draft", "#e9d5ff"),
    "bonus": ("bonus token", "#99f6e4"),
}
TEXT_COLOUR = "#111827"


@dataclass(frozen=True)
class Turn:
    """One exchange. ``state``: ``decoding`` while the reply streams, then ``done`` or ``stopped``."""

    user: str
    reply: str = ""
    pieces: tuple[tuple[str, str], ...] = ()  # (text, source) per reply token
    stats: str = ""
    state: str = "decoding"


@dataclass
class Conversation:
    """The visitor's chat (kept in a ``gr.State``: it lives on the server)."""

    turns: list[Turn] = field(default_factory=list)

    def copy(self) -> "Conversation":
        return Conversation(list(self.turns))


def messages(system: str, turns: Sequence[Turn], user: str) -> list[dict[str, str]]:
    """The chat history for the model: the system prompt (if any), the turns' plain text, the new message."""
    out = [{"role": "system", "content": system.strip()}] if system and system.strip() else []
    for turn in turns:
        out += [{"role": "user", "content": turn.user}, {"role": "assistant", "content": turn.reply}]
    return out + [{"role": "user", "content": user}]


def token_pieces(decode: Callable[[Sequence[int]], str], ids: Sequence[int], sources: Sequence[str],
                 done: Sequence[tuple[str, str]] = ()) -> tuple[tuple[str, str], ...]:
    """Each token's share of the decoded text, with its source, continuing after the pieces
    ``done`` already has (a streaming reply decodes only its new tokens). Decoding prefixes
    (not tokens one by one) keeps multi-byte characters split across tokens intact: a token
    that ends inside a character gets no text, and the token completing it gets the character."""
    pieces = list(done)
    shown = "".join(text for text, _ in pieces)
    for i in range(len(pieces), min(len(ids), len(sources))):
        source = sources[i]
        text = decode(ids[: i + 1])
        if text.endswith("\ufffd"):  # a character still incomplete
            pieces.append(("", source))
            continue
        pieces.append((text[len(shown):], source))
        shown = text
    return tuple(pieces)


def with_reply(turn: Turn, text: str, pieces: tuple[tuple[str, str], ...], stats: str, state: str) -> Turn:
    return replace(turn, reply=text, pieces=pieces, stats=stats, state=state)


def _legend(pieces: Sequence[tuple[str, str]]) -> str:
    counts = {source: 0 for source in SOURCE_STYLES}
    for _, source in pieces:
        counts[source] = counts.get(source, 0) + 1
    chips = []
    for source, (label, background) in SOURCE_STYLES.items():
        chips.append(f'<span class="fluid-src fluid-src-{source}" style="background:{background};'
                     f'color:{TEXT_COLOUR};border:1px solid #d1d5db;border-radius:4px;padding:0 5px;'
                     f'margin-right:6px">{html.escape(label)} {counts[source]}</span>')
    return f'<div class="fluid-reply-legend" style="font-size:0.75em;margin-top:4px">{"".join(chips)}</div>'


def _reply_html(turn: Turn) -> str:
    spans = []
    for text, source in turn.pieces:
        if not text:
            continue
        background = SOURCE_STYLES.get(source, SOURCE_STYLES["exact"])[1]
        spans.append(f'<span class="fluid-tok fluid-tok-{source}" style="background:{background};'
                     f'color:{TEXT_COLOUR};border-radius:3px">{html.escape(text)}</span>')
    body = "".join(spans) or html.escape(turn.reply) or "…"
    state = {"decoding": "decoding…", "stopped": "stopped"}.get(turn.state, "")
    stats = " · ".join(part for part in (turn.stats, state) if part)
    return (f'<div class="fluid-reply" data-state="{turn.state}" data-text="{html.escape(turn.reply)}" '
            f'data-tokens="{len(turn.pieces)}" style="white-space:pre-wrap;'
            f'color:{TEXT_COLOUR}">{body}</div>' + _legend(turn.pieces)
            + f'<div class="fluid-reply-stats" style="font-size:0.75em;color:#4b5563">{html.escape(stats)}</div>')


def transcript_html(conversation: Conversation) -> str:
    """The conversation as HTML: user messages right, replies left with their legend and stats."""
    if not conversation.turns:
        return ('<div class="fluid-chat" data-turns="0" style="color:#6b7280;padding:8px">'
                "Say something to start a conversation.</div>")
    bubble = "border-radius:10px;padding:8px 10px;margin:6px 0;max-width:90%;"
    parts = [f'<div class="fluid-chat" data-turns="{len(conversation.turns)}">']
    for turn in conversation.turns:
        parts.append(f'<div class="fluid-user" style="{bubble}margin-left:auto;background:#dbeafe;'
                     f'color:{TEXT_COLOUR};white-space:pre-wrap;width:fit-content">{html.escape(turn.user)}</div>')
        parts.append(f'<div class="fluid-assistant" style="{bubble}background:#f9fafb;border:1px solid #e5e7eb">'
                     f"{_reply_html(turn)}</div>")
    parts.append("</div>")
    return "".join(parts)


def reply_stats(tokens: int, forwards: int, seconds: float) -> str:
    """The cost line under a reply."""
    rate = tokens / seconds if seconds > 0 else 0.0
    tpf = tokens / forwards if forwards else float(tokens)
    return f"{tokens} tokens · {rate:.1f} tokens/s · {tpf:.2f} tokens/forward · {forwards} forwards"
