"""``fluid bench --plot``: per-prompt tokens per forward and the histogram of chosen horizons.

Two panels that answer the two questions a bench table cannot: is the gain spread over
every prompt or carried by a few, and does the K-head actually vary the block size?
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import FluidError
from .files import atomic_file, check_output_file


def check_plot_path(path: str | Path) -> Path:
    """Fail before a long bench, not after it: a PNG name in an existing folder, matplotlib there."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise FluidError("the plot needs matplotlib; pip install matplotlib (or fluid-app[plot])", "plot")
    return check_output_file(path, ".png", "the plot is a PNG", "plot")


def save_plot(report: dict[str, Any], path: str | Path) -> Path:
    """Draw ``report`` (from :func:`fluid_app.bench.run_bench`) into a PNG, written atomically."""
    path = check_plot_path(path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_prompt = report["per_prompt_tpf"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    for name, values in per_prompt.items():
        left.plot(range(1, len(values) + 1), values, marker="o", markersize=3, linewidth=1,
                  label=f"{name} (mean {report['modes'][name]['tokens_per_forward']:.2f})")
    left.set_xlabel("prompt")
    left.set_ylabel("tokens per forward")
    left.set_title(f"Tokens per forward, {report['prompts']} prompts")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)

    horizons = report["horizons"].get("fluid") or next(iter(report["horizons"].values()), [])
    if horizons:
        ks = range(1, max(horizons) + 1)
        counts = [horizons.count(k) for k in ks]
        right.bar(list(ks), counts, color="tab:blue")
        right.set_xticks(list(ks))
    right.set_xlabel("horizon k chosen for a block")
    right.set_ylabel("blocks")
    right.set_title("Horizons chosen (fluid, K-head)")
    right.grid(alpha=0.3, axis="y")
    figure.tight_layout()

    try:
        with atomic_file(path, suffix=".png") as temp:
            figure.savefig(temp, dpi=110)
    finally:
        plt.close(figure)
    return path
