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
When sampling, both get the same seed; FLUID is then lossless in distribution, not token for
token, so :func:`verdict` reports the race as sampled instead of judging the texts.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from ..api import FluidModel, Generation
from ..errors import FluidError
from ..model_refs import canonical_reference
from ..prompt_cache import PromptCache
from ..sampler import DecodeSettings
from .render import LiveView


def warm_up(model: FluidModel) -> None:
    """One short FLUID decode at start-up: the first multi-token forward pays one-off setup
    costs (seconds on a CPU) that would otherwise land on the first user and skew a race."""
    try:
        model.generate("Hello", mode="fluid", max_new_tokens=4)
    except FluidError:
        pass  # e.g. no MASK token: the page will say so when a user picks that mode


class ModelCache:
    """Loaded models keyed by (canonical model, backend); ``max_models`` at most, least recent out.

    Keys are canonical: :func:`~fluid_app.model_refs.canonical_reference` of the model (its real
    path, or its Hub snapshot) and the backend :func:`backends.pick_backend` picks for
    ``auto``. So ``./m``, ``m/`` and ``/abs/m`` are one entry and one load, and the bound on
    entries is a bound on memory. Loads run one at a time and the least recent models leave
    *before* a load starts, so even mid-load the cache holds at most ``max_models`` (a model
    still decoding for someone stays alive until that decode ends).
    """

    def __init__(self, loader: Callable[[str, str], FluidModel] | None = None, max_models: int = 3):
        self._loader = loader
        self._max = max(1, max_models)
        self._models: OrderedDict[tuple[str, str], tuple[FluidModel, threading.Lock]] = OrderedDict()
        self._lock = threading.Lock()  # guards _models; held only for dictionary work
        self._load_lock = threading.Lock()  # one load at a time: memory is bounded while loading too

    @staticmethod
    def key(model: str, backend: str) -> tuple[str, str]:
        """The entry ``model`` on ``backend`` is cached under (raises FluidError for an unknown one)."""
        from backends import pick_backend

        chosen, _ = pick_backend((backend or "auto").strip())
        return canonical_reference((model or "").strip() or "default"), chosen

    def get(self, model: str, backend: str) -> tuple[FluidModel, threading.Lock]:
        """The cached model, loading it once even when several users ask at the same time."""
        key = self.key(model, backend)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
        with self._load_lock:
            with self._lock:
                if key in self._models:  # loaded while this caller waited
                    self._models.move_to_end(key)
                    return self._models[key]
                while len(self._models) >= self._max:
                    self._models.popitem(last=False)
            loaded = self._load((model or "").strip() or "default", key[1])
            with self._lock:
                self._models[key] = (loaded, threading.Lock())
                return self._models[key]

    def __len__(self) -> int:
        with self._lock:
            return len(self._models)

    def _load(self, model: str, backend: str) -> FluidModel:
        if self._loader is not None:
            return self._loader(model, backend)
        from ..api import load

        return load(model, backend=backend)


class ModelChoices:
    """Which models a demo serves: an allow-list, or (``allow_any``) whatever a visitor names.

    A demo on a network must not be a way to read the server's disk. With an allow-list, a
    visitor's choice must *equal* one of the listed names: it is never looked up on disk, so
    an existing file, an existing folder and a missing path all get the same answer, and
    nothing is learnt about the machine. The list is checked when the demo starts, so an
    operator's typo fails at launch with the real reason, and spellings of one model are
    merged there: the first is listed, the others are not offered (one model, one entry).
    """

    def __init__(self, references: Sequence[str], allow_any: bool = False):
        self.allow_any = allow_any
        self.names: list[str] = []  # the Model list: one name per distinct model
        keys: set[str] = set()
        for reference in references:
            name = (reference or "").strip() or "default"
            key = canonical_reference(name)
            if key not in keys:
                keys.add(key)
                self.names.append(name)
        if not self.names:
            raise FluidError("the demo needs at least one model to serve", "model")

    @property
    def default(self) -> str:
        """The model the page opens with (the one the demo was launched with)."""
        return self.names[0]

    def check(self, reference: str | None) -> str:
        """The reference to load for a visitor's choice, or the one error any unlisted one gets."""
        name = (reference or "").strip() or self.default
        if self.allow_any or name in self.names:
            return name
        shown = name if len(name) <= 80 else name[:77] + "..."
        raise FluidError(f"model {shown!r} is not available on this demo; pick one of the models it serves", "model")


class Activity:
    """How many decodes run on this server right now, and the most that ever ran at once.

    Measured inside the handlers, after the Gradio queue, so it counts decodes that really
    run together, not requests waiting their turn; the page shows the count (a visitor then
    knows why tokens/s dropped) and tests read ``peak`` to see the queue's concurrency.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.running = 0
        self.peak = 0

    def __enter__(self) -> "Activity":
        with self._lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self.running -= 1


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
    settings: DecodeSettings | None = None  # as validated: the race's verdict reads the sampling from it

    @classmethod
    def start(cls, model: FluidModel, lock: threading.Lock, prompt: str | Sequence[int], chat: bool, mode: str,
              prompt_cache: PromptCache | None = None, **options: Any) -> "Run":
        """Validate everything cheap up front so bad input fails before any forward.
        ``prompt_cache``: reuse (and leave) the KV cache of a conversation this prompt extends."""
        settings = model.settings(mode=mode, **options)
        model.encode(prompt, chat)
        stream = model.stream(prompt, chat=chat, mode=mode, prompt_cache=prompt_cache, **options)
        return cls(model, lock, LiveView(mode), stream, settings=settings)

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
    def sampling(self) -> dict[str, Any] | None:
        """How this decode draws its tokens (temperature, top_p, top_k, seed), None when greedy."""
        sampling = self.settings.sampling if self.settings is not None else None
        if sampling is None:
            return None
        return {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
                "seed": sampling.seed}

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
    """Speedup and losslessness of a finished race.

    ``identical`` compares the token ids. Greedy FLUID must equal greedy AR, so a difference
    is a bug; a sampled race (``sampling`` set: temperature, top_p, top_k, seed) draws both
    from the same seed, but FLUID consumes its random numbers differently from AR, so equal
    texts are neither expected nor a test of anything there.
    """
    assert ar.generation is not None and fluid.generation is not None
    identical = ar.generation.token_ids == fluid.generation.token_ids
    speedup = fluid.tokens_per_s / ar.tokens_per_s if ar.tokens_per_s > 0 else 0.0
    return {"identical": identical, "speedup": round(speedup, 3), "sampling": fluid.sampling,
            "ar_tokens_per_s": round(ar.tokens_per_s, 2), "fluid_tokens_per_s": round(fluid.tokens_per_s, 2),
            "ar_tokens_per_forward": ar.generation.tokens_per_forward,
            "fluid_tokens_per_forward": fluid.generation.tokens_per_forward,
            "forward_ratio": round(ar.generation.forwards / max(1, fluid.generation.forwards), 3)}
