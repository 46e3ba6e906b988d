"""Streamed text from committed token ids: whole characters only, stop strings never leaked.

FLUID commits several tokens per forward, and a block can end in the middle of a UTF-8
character (byte-level BPE splits emoji and CJK across tokens) or in the middle of a stop
string. :class:`TextStream` turns each commit into the text that is safe to show now:

* the whole reply is decoded again at each commit and only its new tail is emitted, held
  back while it ends in an incomplete character (U+FFFD) or while earlier text is still
  changing (tokenizers that clean up spaces);
* the last characters that could still grow into a stop string are held back too; when a
  stop string appears (inside one commit or across several), the text before it is emitted,
  the stop string and everything after it never are, and :attr:`TextStream.stopped` is set.

Token ids are accounted alongside the text. :attr:`TextStream.emitted_tokens` counts the
leading tokens whose text has been emitted in full (a token whose text is partly held back,
for a half character or a possible stop string, is not counted yet).
:attr:`TextStream.completion_ids` are the reply's ids: every committed token, or after a stop
string the tokens up to and including the one that completes it (the tokens a one-token-at-a-time
decoder would have produced before stopping; those committed after it in the same block are
dropped).
"""

from __future__ import annotations

from typing import Any, Sequence


class TextStream:
    """Incremental detokeniser plus stop-string matcher for one reply."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.token_ids: list[int] = []
        self.decoded = ""  # text of token_ids that has passed the character check
        self.held = ""  # decoded text not yet emitted: it may begin a stop string
        self.text = ""  # everything emitted so far
        self.stopped = False
        self.emitted_tokens = 0  # leading tokens whose text is all in self.text
        self._decoded_tokens = 0  # how many tokens self.decoded is the text of
        self._stop_at: int | None = None  # after a stop: the tokens through the one completing it

    @property
    def completion_ids(self) -> list[int]:
        """The reply's token ids: all of them, or after a stop those through the stop string."""
        return self.token_ids if self._stop_at is None else self.token_ids[: self._stop_at]

    def push(self, tokens: Sequence[int]) -> str:
        """Add committed tokens; return the text that may be shown now ("" after a stop)."""
        if self.stopped:
            return ""
        self.token_ids.extend(int(t) for t in tokens)
        full = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        if full.endswith("\ufffd") or not full.startswith(self.decoded):
            return ""  # an incomplete character, or earlier text still settling: wait
        self.held += full[len(self.decoded):]
        self.decoded, self._decoded_tokens = full, len(self.token_ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The reply ended: whatever is still held back (never a stop string)."""
        if self.stopped:
            return ""
        full = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        if full.startswith(self.decoded):  # a trailing partial character is shown as decoded
            self.held += full[len(self.decoded):]
            self.decoded, self._decoded_tokens = full, len(self.token_ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        hits = [i for i in (self.held.find(s) for s in self.stop) if i >= 0]
        if hits:
            out, self.held, self.stopped = self.held[: min(hits)], "", True
        else:
            keep = 0 if final else self._possible_stop_start()
            out, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep:]
        self.text += out
        self._count_emitted()
        if self.stopped:
            self._stop_at = self._stop_token()
        return out

    def _text_of(self, n: int) -> str:
        return self.tokenizer.decode(self.token_ids[:n], skip_special_tokens=True)

    def _count_emitted(self) -> None:
        """Advance :attr:`emitted_tokens` to the longest run of tokens whose text is all shown."""
        if self.text == self.decoded:  # nothing held back: every decoded token is shown
            self.emitted_tokens = self._decoded_tokens
            return
        for n in range(self._decoded_tokens - 1, self.emitted_tokens, -1):
            if self.text.startswith(self._text_of(n)):
                self.emitted_tokens = n
                return

    def _stop_token(self) -> int:
        """How many tokens it takes for the text to contain a stop string (all, if none does)."""
        for n in range(self.emitted_tokens + 1, len(self.token_ids) + 1):
            text = self._text_of(n)
            if any(s in text for s in self.stop):
                return n
        return len(self.token_ids)

    def _possible_stop_start(self) -> int:
        """Length of the longest tail of the held text that is a proper prefix of a stop string."""
        longest = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(self.held)), longest, -1):
                if self.held.endswith(stop[:n]):
                    longest = n
                    break
        return longest
