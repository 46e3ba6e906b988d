"""A deterministic toy language model that implements the backend protocol in numpy.

It is not a stand-in for torch or transformers: it is a second, tiny backend whose greedy
continuation is known exactly, and whose MASK drafts are right with a chosen probability.
That lets the sampler tests reach every path (long accepted runs, rejections, corrections,
EOS and max_new_tokens inside a block) many times, with an exact oracle to compare against.

Semantics: the true next token is a hash of the last three tokens (sometimes EOS). A MASK
input is imputed left to right: with probability ``draft_accuracy`` as the true token, else a
wrong one; outputs read the imputed context. Outputs after real tokens are therefore exact,
exactly like a causal LM's, and outputs after masks are drafts.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

from fluid_app.branches import is_chain, visible
from fluid_app.fluid_config import FluidConfig
from fluid_app.protocol import StepOutput

EOS, MASK = 1, 2


def _hash(*values: int) -> int:
    return int.from_bytes(hashlib.blake2b(repr(values).encode(), digest_size=8).digest(), "little")


class ToyLM:
    name = "toy"
    device = "cpu"
    dtype = "float64"
    tokenizer = None
    has_k_head = True
    branched_windows = True  # a branch's outputs read only its own tokens (ToySession.forward)

    def __init__(self, vocab_size: int = 64, draft_accuracy: float = 0.7, eos_rate: float = 0.02,
                 max_context: int = 4096, seed: int = 0):
        self.vocab_size = vocab_size
        self.draft_accuracy = draft_accuracy
        self.eos_rate = eos_rate
        self.max_context = max_context
        self.seed = seed
        self.mask_token_id = MASK
        self.eos_token_ids = frozenset({EOS})
        self.fluid_config = FluidConfig(mask_token_id=MASK)
        self.forward_calls = 0
        self.prefills = 0

    def next_token(self, context: Sequence[int]) -> int:
        h = _hash(self.seed, *context[-3:])
        if (h % 10_000) / 10_000 < self.eos_rate:
            return EOS
        return 3 + (h // 10_000) % (self.vocab_size - 3)

    def greedy(self, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
        out: list[int] = []
        while len(out) < max_new_tokens:
            out.append(self.next_token(list(prompt) + out))
            if out[-1] == EOS:
                break
        return out

    def outputs(self, tokens: Sequence[int], start: int) -> StepOutput:
        """Outputs at positions ``start..`` of ``tokens`` (the whole row so far)."""
        imputed: list[int] = []
        for i, token in enumerate(tokens):
            if token == MASK:
                truth = self.next_token(imputed)
                right = (_hash(self.seed, 7, i, *imputed[-2:]) % 1000) / 1000 < self.draft_accuracy
                token = truth if right else 3 + (truth + 1) % (self.vocab_size - 3)
            imputed.append(token)
        preds, confs, horizons = [], [], []
        for i in range(start, len(tokens)):
            context = imputed[: i + 1]
            preds.append(self.next_token(context))
            confs.append((_hash(self.seed, 11, i, *context[-2:]) % 1000) / 1000)
            horizons.append(1 + _hash(self.seed, 13, *context[-2:]) % 16)
        return StepOutput(np.array([preds]), np.array([confs], dtype=np.float32), np.array([horizons]))

    def start(self, prompts, logits: bool = False):
        if logits:
            raise ValueError("ToyLM has no logits; use SamplingToyLM for sampled decoding")
        self.forward_calls += 1
        self.prefills += 1
        session = ToySession(self, prompts)
        rows = [self.outputs(p, len(p) - 1) for p in prompts]
        return session, _stack(rows)


class ToySession:
    def __init__(self, lm: ToyLM, prompts):
        self.lm = lm
        self.rows = [list(p) for p in prompts]
        self.pending: list[list[int]] = []

    @property
    def logits(self) -> bool:  # the protocol's switch; only SamplingToyLM has logits to give
        return bool(getattr(self.lm, "with_logits", False))

    @logits.setter
    def logits(self, value: bool) -> None:
        self.lm.with_logits = bool(value)

    def forward(self, tokens: np.ndarray, parents: np.ndarray | None = None) -> StepOutput:
        self.lm.forward_calls += 1
        self.pending = [list(map(int, row)) for row in tokens]
        if parents is None or is_chain(parents):
            return _stack([self.lm.outputs(self.rows[b] + self.pending[b], len(self.rows[b]))
                           for b in range(len(self.rows))])
        # a branched window: each token's outputs read the row, then its own branch up to it
        seen = visible(parents)
        rows = []
        for b, row in enumerate(self.rows):
            outs = [self.lm.outputs(row + [t for t, on in zip(self.pending[b], seen[b, j]) if on], len(row) + depth)
                    for j, depth in enumerate(seen[b].sum(-1) - 1)]
            rows.append(StepOutput(*(np.concatenate([getattr(o, name)[:, -1:] for o in outs], axis=1)
                                     if getattr(outs[0], name) is not None else None
                                     for name in ("tokens", "confidence", "horizon", "logits"))))
        return _stack(rows)

    def commit(self, keep):
        for b, k in enumerate(keep):
            self.rows[b].extend(self.pending[b][:k])
        self.pending = []

    def add(self, prompts):
        self.lm.forward_calls += 1
        self.rows += [list(p) for p in prompts]
        return _stack([self.lm.outputs(p, len(p) - 1) for p in prompts])

    def drop(self, rows):
        gone = set(rows)
        self.rows = [r for b, r in enumerate(self.rows) if b not in gone]

    def truncate(self, lengths):
        self.pending = []
        self.rows = [row[:n] for row, n in zip(self.rows, lengths)]

    def extend(self, tokens):
        self.lm.forward_calls += 1
        self.lm.prefilled = getattr(self.lm, "prefilled", 0) + sum(len(t) for t in tokens)
        for row, new in zip(self.rows, tokens):
            row.extend(int(t) for t in new)
        return _stack([self.lm.outputs(row, len(row) - 1) for row in self.rows])


class SamplingToyLM(ToyLM):
    """A toy with real next-token distributions, for sampled decoding.

    The target logits after a context are a fixed random vector of its last three tokens
    (EOS and MASK never sampled), so the exact AR sampling distribution of the first tokens
    can be enumerated. An output whose context holds a MASK is a draft: the MASK inputs are
    imputed with the target's argmax and the target logits there get ``draft_noise`` added, so
    mask drafts are plausible but wrong proposals. Outputs of all-real contexts are exact.
    """

    def __init__(self, vocab_size: int = 7, draft_noise: float = 1.0, scale: float = 1.5, seed: int = 0):
        super().__init__(vocab_size=vocab_size, eos_rate=0.0, seed=seed)
        self.draft_noise = draft_noise
        self.scale = scale

    def target_logits(self, context: Sequence[int]) -> np.ndarray:
        return self._vector(17, tuple(context[-3:]), self.scale, banned=True)

    def _vector(self, salt: int, key: tuple, scale: float, banned: bool = False) -> np.ndarray:
        """A fixed random vector per (salt, key), computed once (the tests draw millions)."""
        cache = self.__dict__.setdefault("_vectors", {})
        if (salt, key) not in cache:
            vector = np.random.default_rng(_hash(self.seed, salt, *key) % (2**63)).normal(0.0, scale, self.vocab_size)
            if banned:
                vector[[EOS, MASK]] = -np.inf
            cache[salt, key] = vector
        return cache[salt, key]

    def outputs(self, tokens: Sequence[int], start: int) -> StepOutput:
        imputed: list[int] = []
        for token in tokens:
            imputed.append(int(np.argmax(self.target_logits(imputed))) if token == MASK else int(token))
        rows = []
        for i in range(start, len(tokens)):
            logits = self.target_logits(imputed[: i + 1])
            if MASK in tokens[: i + 1]:
                logits = logits + self._vector(19, (i, *imputed[: i + 1][-3:]), self.draft_noise)
            rows.append(logits)
        logits = np.array([rows])
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        horizons = np.array([[1 + _hash(self.seed, 13, i) % 4 for i in range(start, len(tokens))]])
        return StepOutput(logits.argmax(-1), probs.max(-1).astype(np.float32), horizons,
                          logits.astype(np.float32) if self.with_logits else None)

    def start(self, prompts, logits: bool = False):
        self.with_logits = logits
        self.forward_calls += 1
        session = ToySession(self, prompts)
        return session, _stack([self.outputs(p, len(p) - 1) for p in prompts])

    def ar_distribution(self, prompt: Sequence[int], length: int, warp) -> dict[tuple[int, ...], float]:
        """Exact probability of every sequence of the first ``length`` sampled tokens."""
        out: dict[tuple[int, ...], float] = {(): 1.0}
        for _ in range(length):
            nxt: dict[tuple[int, ...], float] = {}
            for seq, mass in out.items():
                p = warp(self.target_logits(list(prompt) + list(seq)).astype(np.float32))
                for token in np.flatnonzero(p > 0):
                    nxt[seq + (int(token),)] = mass * float(p[token])
            out = nxt
        return out


def _stack(outputs: list[StepOutput]) -> StepOutput:
    logits = None if outputs[0].logits is None else np.concatenate([o.logits for o in outputs])
    return StepOutput(np.concatenate([o.tokens for o in outputs]), np.concatenate([o.confidence for o in outputs]),
                      np.concatenate([o.horizon for o in outputs]), logits)
