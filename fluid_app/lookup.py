"""Prompt lookup: draft the continuation of the latest earlier occurrence of the last n-gram.

A second, training-free source of drafts for the ``fluid`` sampler (Hugging Face
``generate`` calls it ``prompt_lookup_num_tokens``). Replies often copy spans of the prompt
(code, names, quoted text) or repeat themselves, and there the mask drafts of a small model
are weak while the text to come is already on the page. Drafts are verified like any
other, so the output is unchanged; only the number of forwards can drop.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def lookup_continuation(context: Sequence[int], num_tokens: int, max_ngram: int = 3,
                        min_ngram: int = 2) -> list[int]:
    """Up to ``num_tokens`` tokens that followed the most recent earlier occurrence of the
    context's last n-gram (longest n first, from ``max_ngram`` down to ``min_ngram``).

    The most recent occurrence is preferred because a greedy reply that repeats itself
    repeats its latest cycle. Returns ``[]`` when no n-gram recurs.
    """
    if num_tokens < 1 or len(context) <= min_ngram:
        return []
    ids = np.asarray(context, dtype=np.int64)
    for n in range(min(max_ngram, len(ids) - 1), min_ngram - 1, -1):
        tail = ids[-n:]
        # candidate starts whose n-gram ends before the last token, so something follows it
        starts = np.flatnonzero(ids[: len(ids) - n] == tail[0])
        for start in starts[::-1]:
            if np.array_equal(ids[start:start + n], tail):
                follow = ids[start + n: start + n + num_tokens]
                return [int(t) for t in follow]
    return []
