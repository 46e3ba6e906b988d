"""FLUID hyper-parameters shared by training, horizon calibration and sampling.

One object travels from training to inference inside ``fluid_config.json`` so that a
checkpoint always decodes with the mask token and horizons it was trained for.
Defaults follow the authors' recipe (FLUID_METHOD.md sections 3-5).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .errors import FluidError
from .files import write_json_atomic

CONFIG_FILENAME = "fluid_config.json"


@dataclass(frozen=True)
class FluidConfig:
    """Everything the method needs besides the weights."""

    mask_token_id: int | None = None
    k_min: int = 4
    k_max: int = 16
    threshold: float = 0.9
    prompt_lookup_num_tokens: int = 0  # 0: drafts come from masks only (see fluid_app/lookup.py)
    tau: float = 2.8
    sigma: float = 1.5
    anchor_rate: float = 0.5
    noise_rate: float = 0.1
    restore: bool = True
    base_model: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self, vocab_size: int | None = None) -> "FluidConfig":
        """Raise a one-line :class:`FluidError` for settings that cannot work."""
        check_horizons_and_threshold(self.k_min, self.k_max, self.threshold)
        if not 0.0 <= self.anchor_rate <= 1.0 or not 0.0 <= self.noise_rate <= 1.0:
            raise FluidError("anchor_rate and noise_rate are probabilities; use values in [0, 1]")
        if self.prompt_lookup_num_tokens < 0:
            raise FluidError(f"prompt_lookup_num_tokens must be 0 (off) or more (got {self.prompt_lookup_num_tokens})")
        if self.sigma <= 0:
            raise FluidError(f"sigma must be positive (got {self.sigma}); the authors use 1.5")
        if vocab_size is not None and self.mask_token_id is not None:
            if not 0 <= self.mask_token_id < vocab_size:
                raise FluidError(
                    f"mask token id {self.mask_token_id} is outside the vocabulary (0..{vocab_size - 1});"
                    " pick an id inside it or leave it unset to choose one automatically"
                )
        return self

    def with_overrides(self, **overrides: Any) -> "FluidConfig":
        """Return a copy with the non-None overrides applied (CLI flags, UI controls)."""
        known = {f.name for f in fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise FluidError(f"unknown FLUID option(s) {sorted(unknown)}; known: {sorted(known)}")
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FluidConfig":
        """Read a config, keeping keys this version does not know under ``extra``."""
        known = {f.name for f in fields(cls)}
        extra = dict(data.get("extra", {}))
        extra.update({k: v for k, v in data.items() if k not in known})
        kwargs = {k: v for k, v in data.items() if k in known and k != "extra"}
        return cls(**kwargs, extra=extra)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``fluid_config.json`` atomically (temp file, then rename)."""
        path = Path(directory) / CONFIG_FILENAME
        write_json_atomic(path, self.to_dict())
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "FluidConfig":
        path = Path(directory) / CONFIG_FILENAME
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise FluidError(f"{path} not found; is {directory} a FLUID checkpoint?") from None
        except json.JSONDecodeError as exc:
            raise FluidError(f"{path} is not valid JSON ({exc.msg}); re-export the checkpoint") from None


def check_horizons_and_threshold(k_min: int, k_max: int, threshold: float) -> None:
    """The decoding knobs every entry point shares; one-line errors naming the flag to fix."""
    if k_min < 1:
        raise FluidError(f"k_min must be at least 1 (got {k_min}); pass --k-min 1 or more")
    if k_min > k_max:
        raise FluidError(f"k_min ({k_min}) is larger than k_max ({k_max}); pass --k-min <= --k-max")
    if not 0.0 < threshold <= 1.0:
        raise FluidError(f"threshold must be in (0, 1] (got {threshold}); pass e.g. --threshold 0.9")
