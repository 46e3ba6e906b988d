"""Python API: ``fluid_app.load(model).generate(prompts)`` and ``.stream(prompt)``.

Argument names follow Hugging Face ``generate`` where one exists (``max_new_tokens``);
FLUID's own knobs (``threshold``, ``k_min``, ``k_max``) default to what the checkpoint was
trained with (its ``fluid_config.json``) and can be overridden per call.
"""

from __future__ import annotations

import numbers
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Sequence

from .draft_store import load_draft_store
from .errors import FluidError
from .events import Event
from .model_refs import ModelSpec, resolve_model
from .prompt_cache import PromptCache
from .protocol import Backend
from .sampler import Decoder, DecodeSettings, RowResult


def check_prompt(prompt: Any) -> str:
    """The one check of a text prompt, run before any model work: a non-empty string."""
    if not isinstance(prompt, str):
        raise FluidError(f"the prompt must be text (got {type(prompt).__name__})", "prompt")
    if not prompt.strip():
        raise FluidError("the prompt is empty; pass some text", "prompt")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:  # bytes a terminal could not decode arrive as lone surrogates
        raise FluidError("the prompt is not valid UTF-8 text; pass it in UTF-8", "prompt") from None
    return prompt


@dataclass
class Generation:
    """One prompt's output and its cost, as printed by ``fluid generate --json``."""

    text: str
    token_ids: list[int]
    new_tokens: int
    forwards: int
    tokens_per_forward: float
    seconds: float
    tokens_per_s: float
    blocks: list[dict[str, int]] = field(default_factory=list)
    mode: str = "fluid"
    finish_reason: str = ""
    drafts: dict[str, dict[str, int]] = field(default_factory=dict)  # per source: proposed, accepted

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _is_token_ids(value: Any) -> bool:
    return (isinstance(value, Sequence) and not isinstance(value, (str, bytes)) and len(value) > 0
            and all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in value))


def prompt_batch(prompts: Any) -> tuple[list[str | list[int]], bool]:
    """``(batch, single)`` from what ``generate`` accepts: a text, a list of token ids, or a
    list of those; anything else is a one-line error before any model work."""
    if isinstance(prompts, str):
        return [prompts], True
    if _is_token_ids(prompts):
        return [list(prompts)], True
    if isinstance(prompts, (list, tuple)) and prompts and all(isinstance(p, str) or _is_token_ids(p)
                                                                for p in prompts):
        return [p if isinstance(p, str) else list(p) for p in prompts], False
    kind = "an empty list" if isinstance(prompts, (list, tuple)) and not prompts else type(prompts).__name__
    raise FluidError(f"a prompt must be text or a list of token ids, or a list of those (got {kind})", "prompt")


CHAT_ROLES = ("system", "user", "assistant")


def check_messages(messages: Any) -> list[dict[str, str]]:
    """The one check of a chat history, run before any model work: a non-empty list of
    ``{"role", "content"}`` turns with known roles, text contents, not all blank. As in the
    OpenAI API, any role may come last: the model writes the next assistant turn after it."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise FluidError("the chat history must be a non-empty list of {role, content} messages", "messages")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES \
                or not isinstance(message.get("content"), str):
            raise FluidError(f"message {i + 1} must be {{role, content}} with role one of {', '.join(CHAT_ROLES)} "
                             "and text content", "messages")
        checked.append({"role": message["role"], "content": message["content"]})
    if not any(message["content"].strip() for message in checked):
        raise FluidError("the chat history is empty; write a message", "messages")
    for message in checked:
        if message["content"].strip():
            check_prompt(message["content"])  # the UTF-8 check, on every turn with text
    return checked


class FluidModel:
    """A loaded model plus its FLUID settings, on one backend.

    :attr:`prompt_cache` keeps the KV caches of recent conversations; pass it to
    :meth:`generate` or :meth:`stream` so that a chat's next turn prefills only its new tokens.
    """

    def __init__(self, backend: Backend, spec: ModelSpec):
        self.backend = backend
        self.spec = spec
        self.config = backend.fluid_config
        self.prompt_cache = PromptCache(backend)
        store = spec.draft_store_file
        self.draft_store = load_draft_store(store, backend.vocab_size) if store is not None else None

    @property
    def tokenizer(self) -> Any:
        return self.backend.tokenizer

    def encode(self, prompt: str | Sequence[int], chat: bool = False) -> list[int]:
        """Token ids of a prompt; ``chat`` wraps it as one user turn of the chat template."""
        if not isinstance(prompt, str):
            ids = [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < self.backend.vocab_size]
            if bad:
                raise FluidError(f"token id {bad[0]} is outside the vocabulary (0..{self.backend.vocab_size - 1})",
                                 "prompt")
            return ids
        check_prompt(prompt)
        if chat:
            return self.encode_chat([{"role": "user", "content": prompt}])
        return list(self.tokenizer(prompt)["input_ids"])

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Token ids of a chat history (``[{"role", "content"}, ...]``) through
        the model's chat template, ready for the assistant's reply."""
        messages = check_messages(messages)
        if not getattr(self.tokenizer, "chat_template", None):
            raise FluidError("this model's tokenizer has no chat template; decode without chat", "chat")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def settings(self, mode: str = DecodeSettings.mode, max_new_tokens: int = DecodeSettings.max_new_tokens,
                 **options: Any) -> DecodeSettings:
        """Decoding settings: this checkpoint's FLUID defaults, then the given options."""
        return DecodeSettings.from_config(self.config, mode=mode, max_new_tokens=max_new_tokens, **options)

    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]], *, chat: bool = False,
                 prompt_cache: PromptCache | None = None, **options: Any) -> Generation | list[Generation]:
        """Decode one prompt (returns a Generation) or a batch (returns a list). With a
        ``prompt_cache`` (e.g. :attr:`prompt_cache`) a single prompt reuses the KV cache of an
        earlier decode it extends, and leaves its own there for the next."""
        batch, single = prompt_batch(prompts)
        decoder = Decoder(self.backend, [self.encode(p, chat) for p in batch], self.settings(**options),
                          prompt_cache=prompt_cache, draft_store=self.draft_store)
        started = time.perf_counter()
        results = decoder.run()
        elapsed = time.perf_counter() - started
        outputs = [self._generation(r, decoder.settings.mode, elapsed if len(batch) > 1 else None)
                   for r in results]
        return outputs[0] if single else outputs

    def stream(self, prompt: str | Sequence[int], *, chat: bool = False, prompt_cache: PromptCache | None = None,
               **options: Any) -> Iterator[Event | Generation]:
        """Yield the sampler's events as they happen, then the final :class:`Generation`
        (``prompt_cache`` as in :meth:`generate`)."""
        batch, single = prompt_batch(prompt)
        if not single:
            raise FluidError("stream takes one prompt; pass a text or a list of token ids", "prompt")
        decoder = Decoder(self.backend, [self.encode(batch[0], chat)], self.settings(**options),
                          prompt_cache=prompt_cache, draft_store=self.draft_store)
        yield from decoder.events()
        yield self._generation(decoder.results[0], decoder.settings.mode, None)

    def _generation(self, result: RowResult, mode: str, seconds: float | None) -> Generation:
        seconds = result.seconds if seconds is None else seconds
        n = len(result.token_ids)
        return Generation(
            text=self.decode(result.token_ids),
            token_ids=list(result.token_ids),
            new_tokens=n,
            forwards=result.forwards,
            tokens_per_forward=round(result.tokens_per_forward, 4),
            seconds=round(seconds, 4),
            tokens_per_s=round(n / seconds, 3) if seconds > 0 else 0.0,
            blocks=list(result.blocks),
            mode=mode,
            finish_reason=result.finish_reason,
            drafts={source: {"proposed": result.proposed[source], "accepted": result.accepted[source]}
                    for source in result.proposed},
        )


def load(model: str = "default", backend: str = "auto", **options: Any) -> FluidModel:
    """Load ``model`` (``default``, a folder, a ``.gguf`` file or a Hub id) on a backend.

    ``options`` go to the backend loader: ``device``, ``dtype``, ``mask_token_id``, ``k_head``.
    """
    from backends import load_backend

    spec = resolve_model(model)
    return FluidModel(load_backend(spec, backend, **options), spec)
