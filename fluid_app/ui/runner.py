"""Drive decodes for the demo: loaded-model cache, one watched decode, and the AR-vs-FLUID race.

Thread safety: every decode gets its own backend session (the torch backend builds a fresh
KV cache per :meth:`Backend.start`), and the model weights are only read, so decodes never
share mutable state. Still, each *step* of a decode runs under its model's lock: on a small
CPU two interleaved forwards only fight over the cores, and backends whose runtime is not
known to be thread-safe (MLX) are kept to one forward at a time. Locking per step, not per
decode, means a cancelled decode can never leave the lock held.

Race: AR and FLUID run interleaved on one thread, always stepping the one that has used
less compute so far, so on a 2-core CPU both advance as if each had the machine to itself
and neither steals the other's cores. Tokens/s come from each decode's own compute time.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from ..api import FluidModel, Generation
from ..errors import FluidError
from .render import LiveView


class ModelCache:
    """Loaded models keyed by (model reference, backend); a few at most, least recent out."""

    def __init__(self, loader: Callable[..., FluidModel] | None = None, max_models: int = 3):
        self._loader = loader
        self._max = max_models
        self._models: OrderedDict[tuple[str, str], tuple[FluidModel, threading.Lock]] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[tuple[str, str], threading.Lock] = {}

    @staticmethod
    def key(model: str, backend: str) -> tuple[str, str]:
        return (model or "").strip() or "default", (backend or "auto").strip()

    def put(self, model: str, backend: str, loaded: FluidModel) -> None:
        with self._lock:
            self._models[self.key(model, backend)] = (loaded, threading.Lock())

    def get(self, model: str, backend: str) -> tuple[FluidModel, threading.Lock]:
        """The cached model, loading it once even when several users ask at the same time."""
        key = self.key(model, backend)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:  # loads of different models may overlap; the same one loads once
            with self._lock:
                if key in self._models:
                    return self._models[key]
            loaded = self._load(*key)
            with self._lock:
                self._models[key] = (loaded, threading.Lock())
                while len(self._models) > self._max:
                    self._models.popitem(last=False)
                self._loading.pop(key, None)
                return self._models[key]

    def _load(self, model: str, backend: str) -> FluidModel:
        if self._loader is not None:
            return self._loader(model, backend)
        from backends import pick_backend

        from ..api import load

        chosen, _ = pick_backend(backend)
        return load(model, backend=chosen)


class TokenText:
    """Token id -> its text, cached (slots are redrawn many times)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, token: int) -> str:
        if token not in self.cache:
            self.cache[token] = self.tokenizer.decode([int(token)])
        return self.cache[token]


@dataclass
class Run:
    """One watched decode: its event stream, its :class:`LiveView`, compute time, result."""

    model: FluidModel
    lock: threading.Lock
    view: LiveView
    stream: Iterator[Any]
    busy: float = 0.0
    generation: Generation | None = None

    @classmethod
    def start(cls, model: FluidModel, lock: threading.Lock, prompt: str, chat: bool, mode: str,
              **options: Any) -> "Run":
        """Validate everything cheap up front so bad input fails before any forward."""
        model.settings(mode=mode, **options)
        model.encode(prompt, chat)
        return cls(model, lock, LiveView(mode), model.stream(prompt, chat=chat, mode=mode, **options))

    @property
    def done(self) -> bool:
        return self.generation is not None

    def step(self) -> Any:
        """Advance by one event (one sampler event, or the final Generation); None when done."""
        if self.done:
            return None
        with self.lock:
            started = time.perf_counter()
            try:
                item = next(self.stream)
            except StopIteration:
                raise FluidError("the decode ended without a result; try again") from None
            self.busy += time.perf_counter() - started
        if isinstance(item, Generation):
            self.generation = item
        else:
            self.view.feed(item)
        return item

    @property
    def tokens_per_s(self) -> float:
        return len(self.view.committed) / self.busy if self.busy > 0 else 0.0


def race(ar: Run, fluid: Run) -> Iterator[Run]:
    """Step AR and FLUID interleaved, the one with less compute used first; yields who moved."""
    while not (ar.done and fluid.done):
        runner = min((r for r in (ar, fluid) if not r.done), key=lambda r: r.busy)
        runner.step()
        yield runner


def verdict(ar: Run, fluid: Run) -> dict[str, Any]:
    """Speedup and losslessness of a finished race."""
    assert ar.generation is not None and fluid.generation is not None
    identical = ar.generation.token_ids == fluid.generation.token_ids
    speedup = fluid.tokens_per_s / ar.tokens_per_s if ar.tokens_per_s > 0 else 0.0
    return {"identical": identical, "speedup": round(speedup, 3),
            "ar_tokens_per_s": round(ar.tokens_per_s, 2), "fluid_tokens_per_s": round(fluid.tokens_per_s, 2),
            "ar_tokens_per_forward": ar.generation.tokens_per_forward,
            "fluid_tokens_per_forward": fluid.generation.tokens_per_forward,
            "forward_ratio": round(ar.generation.forwards / max(1, fluid.generation.forwards), 3)}
