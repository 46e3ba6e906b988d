"""Training options that are FLUID hyper-parameters take their defaults from ``FluidConfig``.

:class:`fluid_app.fluid_config.FluidConfig` is the one place the method's defaults (``k_max``,
``k_min``, ``tau``, ``sigma``, ``anchor_rate``, ``noise_rate``) are written. The training
options and the CLI flags default to ``None`` and are filled from it here, so changing a
default there changes training, the command line and decoding together.
"""

from __future__ import annotations

from typing import Any, Iterable

from fluid_app.fluid_config import FluidConfig


def fill_fluid_defaults(options: Any, names: Iterable[str]) -> None:
    """Set each option in ``names`` that is ``None`` to ``FluidConfig()``'s value for it."""
    defaults = FluidConfig()
    for name in names:
        if getattr(options, name) is None:
            setattr(options, name, getattr(defaults, name))
