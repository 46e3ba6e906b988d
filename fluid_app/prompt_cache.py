"""Keep a conversation's KV cache between turns, so the next turn prefills only what is new.

A chat turn's prompt is the previous turn's prompt, its reply and the new user message, all
through the chat template. Its tokens share a long prefix with what the previous decode left
in its session's KV cache, so that session is reused: it is rewound to the longest common
token prefix (:meth:`~fluid_app.protocol.DecodeSession.truncate`, which also drops anything
after it: an edited turn, a regenerated reply) and only the rest of the prompt is prefilled
(:meth:`~fluid_app.protocol.DecodeSession.extend`). Reusing KV entries is exact: they are the
same causal states a cold prefill computes, so the reply is the cold reply token for token.

Memory is bounded: at most ``slots`` sessions are kept, least recently used out first; a
prompt that shares no token with any of them starts cold, and its session later takes the
oldest slot. A session is taken *out* of the cache while a decode uses it, so two decodes
never share one. What a session holds is tracked by the decoder, exactly: after a decode the
KV holds the prompt and the tokens fed and kept (the last exact token is not in it yet; the
fused loop would feed it first), which the decoder hands to :meth:`PromptCache.store`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Sequence

from .fluid_config import PROMPT_CACHE_SLOTS
from .protocol import Backend, DecodeSession, StepOutput


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class _Entry:
    session: DecodeSession
    tokens: list[int]  # exactly the committed tokens its single row's KV cache holds


class PromptCache:
    """Up to ``slots`` single-row decode sessions, each with the tokens its KV cache holds."""

    def __init__(self, backend: Backend, slots: int = PROMPT_CACHE_SLOTS):
        self.backend = backend
        self.slots = max(0, int(slots))
        self._entries: list[_Entry] = []  # least recently used first
        self._lock = threading.Lock()
        self.reused = 0  # tokens the last start took from the cache (0: a cold prefill)
        self.prefilled = 0  # tokens the last start had to run through the model

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def start(self, prompt: Sequence[int], logits: bool = False) -> tuple[DecodeSession, StepOutput]:
        """A session holding ``prompt`` and the outputs at its last token, like ``Backend.start``
        for one row, reusing the cached session that shares the longest prefix with it.

        At least the prompt's last token is always run, since its outputs start the decode."""
        prompt = [int(t) for t in prompt]
        with self._lock:
            best, shared = None, 0
            for entry in self._entries:
                n = min(common_prefix(entry.tokens, prompt), len(prompt) - 1)
                if n > shared:
                    best, shared = entry, n
            if best is not None:
                self._entries.remove(best)  # checked out: no other decode can touch it meanwhile
        self.reused, self.prefilled = shared, len(prompt) - shared
        if best is None:
            return self.backend.start([prompt], logits=logits)
        session = best.session
        session.truncate([shared])
        session.logits = logits
        return session, session.extend([prompt[shared:]])

    def store(self, session: DecodeSession, tokens: Sequence[int]) -> None:
        """Keep ``session`` (one row holding exactly ``tokens``) as the most recent entry.

        A forward it ran but did not commit (a decode stopped between the two) is dropped here."""
        if self.slots == 0 or not tokens:
            return
        session.truncate([len(tokens)])
        with self._lock:
            self._entries.append(_Entry(session, [int(t) for t in tokens]))
            while len(self._entries) > self.slots:
                self._entries.pop(0)
