"""Draft store: continue the last n-gram the way the model's own earlier replies did.

A third, training-free source of drafts beside the mask slots and prompt lookup (retrieval
drafting, as in REST, He et al. 2023). Prompt lookup only finds text already on the page, so
the first tokens of a reply, and every phrase it has not written yet, get nothing from it;
a small model's replies to *other* prompts share their openings, list markers and stock
phrases ("Sure! Here are some ..."). A checkpoint may ship the base model's greedy replies to
its training prompts (the data that trained its masks) as a flat token array; when the mask
draft is unsure and prompt lookup finds nothing, the sampler drafts the continuation most of
those replies took after the last ``NGRAM`` tokens. Drafts are verified like any other, so
the output does not change; only the number of forwards can drop.

File: ``draft_store.npz`` in a FLUID checkpoint folder, one array ``tokens`` of unsigned
integers: the replies' token ids concatenated, each reply followed by the separator (the
dtype's largest value). It is read with ``allow_pickle=False``: a data file never runs code.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import FluidError

FILENAME = "draft_store.npz"
NGRAM = 3  # tokens of context matched; 3 drafts better than 2 and still matches often
# Tokens a store draft holds at most. Another reply's wording is kept less often than the page's
# own (about 1.5 tokens an attempt), so longer drafts mostly widen the forward: on sixteen
# unseen training prompts, 3 beat 2 and 7 (recipes/default/README.md, step 4).
DRAFT_TOKENS = 3
MAX_OCCURRENCES = 512  # an n-gram seen more often is judged on this many, spread evenly
_BITS = 20  # per token in an n-gram key: vocabularies up to 2**20 ids, 3 * 20 bits in an int64


class DraftStore:
    """An index over a token array from every ``NGRAM``-gram to the positions it occurs at.

    :meth:`continuation` extends a draft one token at a time with the token most of the
    matching occurrences continued with (ties: the smaller id), keeping only the occurrences
    that agree so far, and stops at a reply's end or where fewer than two still agree.
    """

    def __init__(self, tokens: np.ndarray):
        tokens = np.asarray(tokens)
        self.tokens = tokens.astype(np.int64)
        self.tokens[tokens == np.iinfo(tokens.dtype).max] = -1  # the separator
        self._index: tuple[np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    def _lookup_index(self) -> tuple[np.ndarray, np.ndarray]:
        """(n-gram start positions sorted by key, then by position; their sorted keys), built
        on the first lookup rather than at load: sorting a 2M-token store's keys takes about a
        third of a second, which a model load that never drafts from the store should not pay.
        One assignment, so a second thread that races the first just builds the same index."""
        if self._index is None:
            keys = _keys(self.tokens)
            valid = np.flatnonzero(keys >= 0)
            starts = valid[np.argsort(keys[valid], kind="stable")]
            self._index = (starts, keys[starts])
        return self._index

    def continuation(self, context: Sequence[int], num_tokens: int) -> list[int]:
        """Up to ``num_tokens`` tokens the store's replies most often continued ``context`` with;
        ``[]`` when its last ``NGRAM`` tokens never occur (or the context is shorter)."""
        if num_tokens < 1 or len(context) < NGRAM:
            return []
        tail = [int(t) for t in context[-NGRAM:]]
        if min(tail) < 0 or max(tail) >= 1 << _BITS:
            return []
        key = 0
        for token in tail:
            key = (key << _BITS) | token
        starts, keys = self._lookup_index()
        lo, hi = np.searchsorted(keys, key), np.searchsorted(keys, key, side="right")
        if lo == hi:
            return []
        positions = starts[lo:hi]
        if len(positions) > MAX_OCCURRENCES:
            positions = positions[:: -(-len(positions) // MAX_OCCURRENCES)]
        positions = positions + NGRAM  # where each occurrence's continuation starts
        positions = positions[positions < len(self.tokens)]
        draft: list[int] = []
        while positions.size and len(draft) < num_tokens:
            following = self.tokens[positions]
            keep = following >= 0  # a reply's end continues nothing
            following, positions = following[keep], positions[keep]
            if not following.size:
                break
            values, counts = np.unique(following, return_counts=True)
            best = int(np.argmax(counts))
            if draft and counts[best] < 2:  # one reply alone is no evidence past the first token
                break
            draft.append(int(values[best]))
            positions = positions[following == values[best]] + 1
            positions = positions[positions < len(self.tokens)]
        return draft


def _keys(tokens: np.ndarray) -> np.ndarray:
    """The key of the n-gram starting at each position (-1 where it crosses a reply's end)."""
    count = len(tokens) - NGRAM + 1
    if count < 1:
        return np.zeros(0, dtype=np.int64)
    keys = np.zeros(count, dtype=np.int64)
    crossing = np.zeros(count, dtype=bool)
    for j in range(NGRAM):
        column = tokens[j: j + count]
        crossing |= column < 0
        keys = (keys << _BITS) | np.maximum(column, 0)
    keys[crossing] = -1
    return keys


def pack_replies(replies: Sequence[Sequence[int]]) -> np.ndarray:
    """The store's array for these replies' token ids: the smallest unsigned dtype whose largest
    value is free for the separator."""
    largest = max((max(r) for r in replies if len(r)), default=0)
    dtype = next(t for t in (np.uint16, np.uint32) if largest < np.iinfo(t).max)
    if largest >= 1 << _BITS:
        raise FluidError(f"token id {largest} is too large for a draft store (at most {(1 << _BITS) - 1})")
    separator = np.iinfo(dtype).max
    out = np.empty(sum(len(r) + 1 for r in replies), dtype=dtype)
    at = 0
    for reply in replies:
        out[at: at + len(reply)] = reply
        out[at + len(reply)] = separator
        at += len(reply) + 1
    return out


def save_draft_store(tokens: np.ndarray, path: Path) -> None:
    """Write the array (deflated: replies repeat themselves, a 2.4M-token store is about 1.4 MB).
    Callers write into an :func:`~fluid_app.files.atomic_folder`, so no half-written file is left."""
    with open(path, "wb") as handle:
        np.savez_compressed(handle, tokens=tokens)


def load_draft_store(path: Path, vocab_size: int | None = None) -> DraftStore:
    """Read and check a ``draft_store.npz``; a bad file is one :class:`FluidError` naming it."""
    def bad(why: str) -> FluidError:
        return FluidError(f"{path} is not a usable draft store ({why}); re-create it with "
                          "`fluid export --draft-store REPLIES.jsonl` or delete it")
    try:
        with np.load(path, allow_pickle=False) as archive:
            if set(archive.files) != {"tokens"}:
                raise bad(f"expected one array 'tokens', found {sorted(archive.files)}")
            tokens = archive["tokens"]
    except FluidError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise bad(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    if tokens.ndim != 1 or tokens.dtype not in (np.uint16, np.uint32):
        raise bad(f"'tokens' must be a 1-d array of uint16 or uint32, got {tokens.dtype} of shape {tokens.shape}")
    ids = tokens[tokens != np.iinfo(tokens.dtype).max]
    largest = int(ids.max()) if ids.size else -1
    if vocab_size is not None and largest >= vocab_size:
        raise bad(f"token id {largest} is outside the model's vocabulary of {vocab_size}")
    if largest >= 1 << _BITS:
        raise bad(f"token id {largest} is too large (at most {(1 << _BITS) - 1})")
    return DraftStore(tokens)
