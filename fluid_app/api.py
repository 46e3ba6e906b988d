"""Python API: ``fluid_app.load(model).generate(prompts)`` and ``.stream(prompt)``.

Argument names follow Hugging Face ``generate`` where one exists (``max_new_tokens``);
FLUID's own knobs (``threshold``, ``k_min``, ``k_max``) default to what the checkpoint was
trained with (its ``fluid_config.json``) and can be overridden per call.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Sequence

from .errors import FluidError
from .events import Event
from .sampler import Decoder, DecodeSettings, RowResult
from .sources import ModelSpec, resolve_model


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class FluidModel:
    """A loaded model plus its FLUID settings, on one backend."""

    def __init__(self, backend: Any, spec: ModelSpec):
        self.backend = backend
        self.spec = spec
        self.config = backend.fluid_config

    @property
    def tokenizer(self) -> Any:
        return self.backend.tokenizer

    def encode(self, prompt: str | Sequence[int], chat: bool = False) -> list[int]:
        """Token ids of a prompt; ``chat`` wraps it as one user turn of the chat template."""
        if not isinstance(prompt, str):
            return [int(t) for t in prompt]
        if not prompt.strip():
            raise FluidError("the prompt is empty; pass some text with --prompt")
        if chat:
            if not getattr(self.tokenizer, "chat_template", None):
                raise FluidError("this model's tokenizer has no chat template; drop --chat")
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
            )
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return list(self.tokenizer(prompt)["input_ids"])

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def settings(self, mode: str = "fluid", max_new_tokens: int = 128, threshold: float | None = None,
                 k_min: int | None = None, k_max: int | None = None,
                 prompt_lookup_num_tokens: int | None = None) -> DecodeSettings:
        c = self.config
        return DecodeSettings(
            mode=mode,
            max_new_tokens=max_new_tokens,
            k_min=c.k_min if k_min is None else k_min,
            k_max=c.k_max if k_max is None else k_max,
            threshold=c.threshold if threshold is None else threshold,
            prompt_lookup_num_tokens=(c.prompt_lookup_num_tokens if prompt_lookup_num_tokens is None
                                      else prompt_lookup_num_tokens),
        ).validate()

    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]], *, chat: bool = False,
                 **options: Any) -> Generation | list[Generation]:
        """Decode one prompt (returns a Generation) or a batch (returns a list)."""
        single = isinstance(prompts, str) or (
            len(prompts) > 0 and isinstance(prompts[0], int)  # type: ignore[index]
        )
        batch = [prompts] if single else list(prompts)
        decoder = Decoder(self.backend, [self.encode(p, chat) for p in batch], self.settings(**options))
        started = time.perf_counter()
        results = decoder.run()
        elapsed = time.perf_counter() - started
        outputs = [self._generation(r, decoder.settings.mode, elapsed if len(batch) > 1 else None)
                   for r in results]
        return outputs[0] if single else outputs

    def stream(self, prompt: str | Sequence[int], *, chat: bool = False,
               **options: Any) -> Iterator[Event | Generation]:
        """Yield the sampler's events as they happen, then the final :class:`Generation`."""
        decoder = Decoder(self.backend, [self.encode(prompt, chat)], self.settings(**options))
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
        )


def load(model: str = "default", backend: str = "auto", **options: Any) -> FluidModel:
    """Load ``model`` (``default``, a folder, a ``.gguf`` file or a Hub id) on a backend.

    ``options`` go to the backend loader: ``device``, ``dtype``, ``mask_token_id``, ``k_head``.
    """
    from backends import load_backend

    spec = resolve_model(model)
    return FluidModel(load_backend(spec, backend, **options), spec)
