"""Stage II horizon targets (FLUID_METHOD.md section 4, steps 3-4).

The K-head learns how far the frozen model can draft before its masks get too uncertain:
the target stride ``k*`` is the longest prefix of an anchor's mask block whose mean
cross-entropy stays under the "entropy budget" ``tau``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def horizon_target(mask_losses: Sequence[float], tau: float) -> int:
    """Largest ``k`` whose first ``k`` mask losses have mean ``< tau``; 1 if there is none.

    ``mask_losses`` lists, in position order, the losses of the masks that exist for the
    anchor (a block cut by the end of the sequence, or by an ignored label, is shorter).
    """
    losses = np.asarray(mask_losses, dtype=np.float64)
    if losses.size == 0:
        return 1
    means = np.cumsum(losses) / np.arange(1, losses.size + 1)
    fitting = np.flatnonzero(means < tau)
    return int(fitting[-1]) + 1 if fitting.size else 1


def soft_horizon_target(k_star: int, k_max: int, sigma: float) -> np.ndarray:
    """Normalised Gaussian over classes ``0..k_max-1`` centred on ``k_star - 1``."""
    classes = np.arange(k_max, dtype=np.float64)
    weights = np.exp(-0.5 * ((classes - (k_star - 1)) / sigma) ** 2)
    return weights / weights.sum()
