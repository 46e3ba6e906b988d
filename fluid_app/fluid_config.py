"""FLUID hyper-parameters shared by training, horizon calibration and sampling.

One object travels from training to inference inside ``fluid_config.json`` so that a
checkpoint always decodes with the mask token and horizons it was trained for.
Defaults follow the authors' recipe (FLUID_METHOD.md sections 3-5). This dataclass is the
only place those defaults are written: training options, CLI flags, the demo's controls and
:class:`fluid_app.sampler.DecodeSettings` all read them from here.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .errors import FluidError
from .files import write_json_atomic

CONFIG_FILENAME = "fluid_config.json"
# Conversations whose KV cache a loaded model keeps between turns (fluid_app/prompt_cache.py):
# a few, so a handful of chats stay warm while memory stays bounded (~46 KB per token each
# for SmolLM2-135M in float32, up to half again while the torch cache has room to grow).
PROMPT_CACHE_SLOTS = 4
# Token positions one batched forward of ``fluid serve`` may compute (fluid_app/batching.py):
# rows x the widest window, since the backends pad every row to the widest. On a 2-core CPU,
# with 8 rows decoding the default, a forward of 2 tokens a row costs about 1.2x one of 1 and
# wider ones grow about linearly; budgets of 24 and 32 decoded 8 rows slower than 16, so past
# this, speculation costs more than it saves: with many rows decoding, drafts are cut (each
# row still feeds its exact token). A lone row always keeps its whole window.
FORWARD_TOKEN_BUDGET = 16


@dataclass(frozen=True)
class FluidConfig:
    """Everything the method needs besides the weights."""

    mask_token_id: int | None = None
    k_min: int = 4
    k_max: int = 16
    threshold: float = 0.9
    prompt_lookup_num_tokens: int = 0  # 0: drafts come from masks only (see fluid_app/lookup.py)
    # k_min when sampling (temperature > 0) and the caller names no k_min; None: k_min. Sampled
    # drafts are accepted less often than greedy ones (a draft is kept with probability
    # min(1, p/q), not when it equals the argmax), so slots far into a block rarely pay for
    # the positions they add to each forward, and a shorter smallest block decodes faster.
    sampling_k_min: int | None = None
    # Masks fed in a second branch of every drafted window, after the exact token and blind to
    # the drafts (fluid_app/branches.py): when the first draft is rejected, the masks after the
    # drafts saw a wrong token, and these draft the next window instead. 0: off. Both backends
    # feed them for the Llama-family configs (backends/llama_shape.py), so a sampled decode tries
    # the same drafts, and draws the same tokens, on torch and mlx; other models go without.
    fallback_masks: int = 0
    tau: float = 2.8
    sigma: float = 1.5
    anchor_rate: float = 0.5
    noise_rate: float = 0.1
    restore: bool = True
    base_model: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self, vocab_size: int | None = None) -> FluidConfig:
        """Raise a one-line :class:`FluidError` for settings that cannot work."""
        check_decoding(self.k_min, self.k_max, self.threshold, self.prompt_lookup_num_tokens, self.fallback_masks)
        if self.sampling_k_min is not None and not 1 <= self.sampling_k_min <= self.k_max:
            raise FluidError(f"sampling_k_min must be from 1 to k_max ({self.k_max}) (got {self.sampling_k_min}); "
                             "or null to sample with k_min", "sampling_k_min")
        for name in ("anchor_rate", "noise_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise FluidError(f"{name} is a probability (got {getattr(self, name)}); use a value in [0, 1]", name)
        for name in ("sigma", "tau"):
            if not getattr(self, name) > 0:
                raise FluidError(f"{name} must be positive (got {getattr(self, name)}); the authors use "
                                 f"{getattr(FluidConfig, name)}", name)
        if vocab_size is not None and self.mask_token_id is not None and not 0 <= self.mask_token_id < vocab_size:
            raise FluidError(f"mask token id {self.mask_token_id} is outside the vocabulary (0..{vocab_size - 1}); "
                             "pick an id inside it or leave it unset to choose one automatically", "mask_token_id")
        return self

    def with_overrides(self, **overrides: Any) -> FluidConfig:
        """Return a copy with the non-None overrides applied (CLI flags, UI controls)."""
        known = {f.name for f in fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise FluidError(f"unknown FLUID option(s) {sorted(unknown)}; known: {sorted(known)}")
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, source: str = "the FLUID config") -> FluidConfig:
        """Read a config, checking each value's type; keys this version does not know are
        kept under ``extra``. A wrong type is reported here, at load, not mid-decode."""
        if not isinstance(data, dict):
            raise FluidError(f"{source} must hold one JSON object, not {type(data).__name__}; re-export the checkpoint")
        known = {f.name: f for f in fields(cls)}
        extra = data.get("extra", {})
        if not isinstance(extra, dict):
            raise FluidError(f"{source}: extra must be an object (got {type(extra).__name__}); "
                             "re-export the checkpoint", "extra")
        extra = {**extra, **{k: v for k, v in data.items() if k not in known}}
        kwargs = {k: _checked(k, v, source) for k, v in data.items() if k in known and k != "extra"}
        return cls(**kwargs, extra=extra)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``fluid_config.json`` atomically (temp file, then rename)."""
        path = Path(directory) / CONFIG_FILENAME
        write_json_atomic(path, self.to_dict())
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> FluidConfig:
        path = Path(directory) / CONFIG_FILENAME
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FluidError(f"{path} not found; is {directory} a FLUID checkpoint?") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8 text"
            raise FluidError(f"{path} is not valid JSON ({reason}); re-export the checkpoint") from None
        except OSError as exc:
            raise FluidError(f"cannot read {path} ({exc.strerror}); check the checkpoint folder") from None
        return cls.from_dict(data, str(path))


# What each field may hold in fluid_config.json (None: also null).
_TYPES: dict[str, tuple[str, bool]] = {
    "mask_token_id": ("int", True), "k_min": ("int", False), "k_max": ("int", False),
    "threshold": ("float", False), "prompt_lookup_num_tokens": ("int", False), "sampling_k_min": ("int", True),
    "fallback_masks": ("int", False), "tau": ("float", False),
    "sigma": ("float", False), "anchor_rate": ("float", False), "noise_rate": ("float", False),
    "restore": ("bool", False), "base_model": ("str", True),
}


def _checked(name: str, value: Any, source: str) -> Any:
    kind, nullable = _TYPES[name]
    if value is None and nullable:
        return None
    ok = {"int": isinstance(value, int) and not isinstance(value, bool),
          "float": isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
          "bool": isinstance(value, bool), "str": isinstance(value, str)}[kind]
    if not ok:
        wanted = {"int": "a whole number", "float": "a finite number", "bool": "true or false", "str": "a string"}[kind]
        raise FluidError(f"{source}: {name} must be {wanted}{' or null' if nullable else ''} (got {value!r}); "
                         "fix the file or re-export the checkpoint", name)
    return float(value) if kind == "float" else value


def check_decoding(k_min: int, k_max: int, threshold: float, prompt_lookup_num_tokens: int = 0,
                   fallback_masks: int = 0) -> None:
    """The decoding knobs every entry point shares, checked in one place (one-line errors)."""
    if k_min < 1:
        raise FluidError(f"k_min must be at least 1 (got {k_min})", "k_min")
    if k_min > k_max:
        raise FluidError(f"k_min ({k_min}) is larger than k_max ({k_max}); make k_min at most k_max", "k_min", "k_max")
    if not 0.0 < threshold <= 1.0:
        raise FluidError(f"threshold must be in (0, 1] (got {threshold}); e.g. 0.9", "threshold")
    if prompt_lookup_num_tokens < 0:
        raise FluidError(f"prompt_lookup_num_tokens must be 0 (off) or more (got {prompt_lookup_num_tokens})",
                         "prompt_lookup_num_tokens")
    if isinstance(fallback_masks, bool) or not isinstance(fallback_masks, int) or fallback_masks < 0:
        raise FluidError(f"fallback_masks must be a whole number, 0 (off) or more (got {fallback_masks})",
                         "fallback_masks")


def is_confident(confidence: float, threshold: float) -> bool:
    """The one confidence rule of both FLUID samplers: a draft whose probability reaches the
    threshold fixes its slot."""
    return confidence >= threshold
