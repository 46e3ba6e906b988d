"""The small contract between the backend-agnostic sampler and a tensor library.

A backend only has to run a *standard causal forward* over new tokens on top of a KV cache
and then keep a prefix of what it just appended. Every FLUID draft, verification and AR
step is such a forward (FLUID_METHOD.md section 5), so no custom attention mask is needed at
inference. A backend that can also attend a *branched* window (``branched_windows``; see
:mod:`fluid_app.branches`) lets FLUID feed a fallback branch of masks beside the drafts.
Results come back as small numpy arrays: the greedy token, its probability and the K-head's
preferred horizon at each new position. Full next-token logits come back only
for a session started with ``logits=True`` (sampled decoding), so that warping, random
draws and accept/reject all happen once, in the numpy core, the same for every backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from .fluid_config import FluidConfig


@dataclass(frozen=True)
class StepOutput:
    """What the sampler needs from the outputs at ``T`` new positions of ``B`` rows."""

    tokens: np.ndarray  # [B, T] int64, argmax of the next-token distribution
    confidence: np.ndarray  # [B, T] float32, probability of that argmax
    horizon: np.ndarray | None  # [B, T] int64, argmax(K-head) + 1; None without a K-head
    logits: np.ndarray | None = None  # [B, T, V] float32, only from a session started with logits=True


@runtime_checkable
class DecodeSession(Protocol):
    """KV-cached state of a batch of rows, each with its own committed length.

    The batch is continuous: between a :meth:`commit` and the next :meth:`forward`, rows may
    join (:meth:`add`) and leave (:meth:`drop`). Rows are numbered by their place in the
    batch; ``add`` appends at the end and ``drop`` closes the gaps, keeping the order. Rows
    can also be rewound (:meth:`truncate`) and prefilled further (:meth:`extend`), which is
    how a prompt cache reuses a conversation's session for its next turn.
    """

    # outputs carry full logits; the core may switch it between forwards (rows with other
    # settings joined or left, a session reused for a new decode)
    logits: bool

    def forward(self, tokens: np.ndarray, parents: np.ndarray | None = None) -> StepOutput:
        """Run ``tokens[B, T]`` at each row's next ``T`` positions; cache them provisionally.

        ``parents`` (``[B, T]``, only for a backend with ``branched_windows``) makes a window
        with branches: token ``j`` follows window token ``parents[b, j]`` (``-1``: the row's
        committed tokens), sees only its ancestors there, and sits at its depth
        (:mod:`fluid_app.branches`). None: a chain, the plain causal forward."""

    def commit(self, keep: Sequence[int]) -> None:
        """Row ``b`` keeps the first ``keep[b]`` tokens of the last forward; the rest are dropped."""

    def add(self, prompts: Sequence[Sequence[int]]) -> StepOutput:
        """Prefill new rows and append them to the batch; return the outputs at each one's last
        prompt token (``[len(prompts), 1]`` arrays), as :meth:`Backend.start` does."""

    def drop(self, rows: Sequence[int]) -> None:
        """Remove these rows from the batch and free their cache at once."""

    def truncate(self, lengths: Sequence[int]) -> None:
        """Row ``b`` keeps only its first ``lengths[b]`` committed tokens (at most what it holds);
        a forward not yet committed is dropped first. How a prompt cache rewinds a conversation
        to the prefix the next turn shares with it (:mod:`fluid_app.prompt_cache`)."""

    def extend(self, tokens: Sequence[Sequence[int]]) -> StepOutput:
        """Append ``tokens[b]`` (at least one) to row ``b`` as committed tokens, like a prefill on
        top of what the row holds, and return the outputs at each row's last new token
        (``[B, 1]`` arrays, as :meth:`Backend.start` does). Between a commit and the next
        forward, like :meth:`add`."""


@runtime_checkable
class Backend(Protocol):
    """A loaded model: tokenizer, limits, FLUID settings, and a way to start decode sessions.

    Everything the core reads from a backend is named here; the core never reaches past it
    into a backend's model or tensors.
    """

    name: str  # "torch" or "mlx"
    device: str  # where the forwards run, as the backend names it ("cpu", "cuda:0", "gpu")
    dtype: str  # the weights' precision ("float32", "bfloat16", "float16"), ``auto`` resolved
    label: str  # the model reference it was loaded from, for messages
    tokenizer: Any  # a Hugging Face compatible tokenizer (encode/decode/apply_chat_template)
    fluid_config: FluidConfig  # the checkpoint's settings, MASK token resolved
    vocab_size: int
    max_context: int
    mask_token_id: int | None
    eos_token_ids: frozenset[int]
    has_k_head: bool
    branched_windows: bool  # its sessions' forward takes ``parents`` (fallback masks need it)

    def start(self, prompts: Sequence[Sequence[int]], logits: bool = False) -> tuple[DecodeSession, StepOutput]:
        """Prefill the prompts; return the session and the outputs at each last prompt token
        (``[B, 1]`` arrays): the first new token and the first horizon. With ``logits`` every
        output of the session (this one included) also carries the full logits."""
