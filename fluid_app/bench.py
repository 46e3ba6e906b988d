"""Benchmark the three decoding modes on the same prompts in one process.

Speed claims are ratios measured here (same model, backend, dtype, prompts, one run):
``speedup`` is FLUID tokens/s over AR tokens/s, and ``identical`` checks the lossless
promise on every prompt. Prompts run one at a time (batch 1), after a warm-up per mode.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .api import FluidModel, Generation
from .errors import FluidError
from .sampler import MODES


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a JSONL file with one ``{"prompt": ...}`` per line."""
    path = Path(path)
    if not path.exists():
        raise FluidError(f"prompts file {path} not found; pass a JSONL file with one {{\"prompt\": ...}} per line")
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            prompt = record["prompt"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise FluidError(f"{path}:{number} is not a JSON object with a \"prompt\" key") from None
        if not isinstance(prompt, str) or not prompt.strip():
            raise FluidError(f"{path}:{number} has an empty prompt")
        prompts.append(prompt)
    if not prompts:
        raise FluidError(f"{path} holds no prompts")
    return prompts


@dataclass
class ModeTotals:
    tokens: int = 0
    forwards: int = 0
    seconds: float = 0.0
    outputs: list[Generation] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        return {
            "tokens": self.tokens,
            "forwards": self.forwards,
            "seconds": round(self.seconds, 3),
            "tokens_per_s": round(self.tokens / self.seconds, 3) if self.seconds else 0.0,
            "tokens_per_forward": round(self.tokens / self.forwards, 4) if self.forwards else 0.0,
        }


HORIZONS = ("k-head", "k-max", "k-min")


def check_horizons(horizons: Sequence[str]) -> list[str]:
    """The horizon policies to run, or a one-line error naming the accepted ones."""
    unknown = [h for h in horizons if h not in HORIZONS]
    if unknown or not horizons:
        raise FluidError(f"unknown --horizons value {(unknown or [''])[0]!r}; use a comma-separated list of "
                         f"{', '.join(HORIZONS)}")
    return list(horizons)


def bench_runs(model: FluidModel, modes: Sequence[str], horizons: Sequence[str],
               options: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """Name -> (mode, decode options) of every run of a bench.

    ``horizons`` adds FLUID runs with the block size pinned at ``k_max`` or ``k_min`` (the
    K-head ignored), the ablation that shows what the K-head's choice is worth.
    """
    horizons = check_horizons(horizons or ("k-head",))
    settings = model.settings(**{k: v for k, v in options.items() if k != "max_new_tokens"})
    runs: dict[str, tuple[str, dict[str, Any]]] = {}
    for mode in modes:
        if mode != "fluid":
            runs[mode] = (mode, dict(options))
            continue
        for horizon in horizons:
            if horizon == "k-head":
                runs["fluid"] = ("fluid", dict(options))
            else:
                k = settings.k_max if horizon == "k-max" else settings.k_min
                runs[f"fluid k={k}"] = ("fluid", {**options, "k_min": k, "k_max": k})
    return runs


def run_bench(model: FluidModel, prompts: Sequence[str], *, chat: bool = False,
              modes: Sequence[str] = MODES, horizons: Sequence[str] = ("k-head",),
              **options: Any) -> dict[str, Any]:
    """Run every mode (and horizon policy) on every prompt; return totals and the comparisons."""
    runs = bench_runs(model, modes, horizons, options)
    for mode, run_options in runs.values():  # warm-up: first calls pay for allocation and kernel selection
        model.generate(prompts[0], chat=chat, mode=mode, **{**run_options, "max_new_tokens": 8})
    totals = {name: ModeTotals() for name in runs}
    for prompt in _progress(prompts):
        for name, (mode, run_options) in runs.items():
            out = model.generate(prompt, chat=chat, mode=mode, **run_options)
            t = totals[name]
            t.tokens += out.new_tokens
            t.forwards += out.forwards
            t.seconds += out.seconds
            t.outputs.append(out)
    report: dict[str, Any] = {"prompts": len(prompts), "modes": {m: t.summary() for m, t in totals.items()}}
    tps = {m: report["modes"][m]["tokens_per_s"] for m in runs}
    if "fluid" in totals and "ar" in totals:
        report["speedup"] = round(tps["fluid"] / tps["ar"], 3) if tps["ar"] else 0.0
        report["mismatches"] = _mismatches(totals["fluid"], totals["ar"])
        report["identical"] = report["mismatches"] == 0
    if "fluid" in totals and "reference" in totals:
        report["speedup_vs_reference"] = round(tps["fluid"] / tps["reference"], 3) if tps["reference"] else 0.0
    if "reference" in totals and "ar" in totals:
        report["reference_mismatches"] = _mismatches(totals["reference"], totals["ar"])
    fixed = [name for name in runs if name.startswith("fluid k=")]
    if fixed and "ar" in totals:
        report["fixed_horizons"] = {
            name: {"speedup": round(tps[name] / tps["ar"], 3) if tps["ar"] else 0.0,
                   "mismatches": _mismatches(totals[name], totals["ar"])} for name in fixed}
    report["per_prompt_tpf"] = {m: [o.tokens_per_forward for o in t.outputs] for m, t in totals.items()}
    report["horizons"] = {m: [b["k"] for o in t.outputs for b in o.blocks] for m, t in totals.items()}
    return report


def _mismatches(a: ModeTotals, b: ModeTotals) -> int:
    return sum(x.token_ids != y.token_ids for x, y in zip(a.outputs, b.outputs))


def _progress(prompts: Sequence[str]):
    from tqdm.auto import tqdm

    return tqdm(prompts, desc="bench", unit="prompt", leave=False, disable=len(prompts) < 2)


def format_table(report: dict[str, Any]) -> str:
    """A short human table of a bench report."""
    lines = [f"{'mode':<12} {'tokens':>7} {'forwards':>8} {'seconds':>8} {'tok/s':>8} {'TPF':>6}"]
    for mode, s in report["modes"].items():
        lines.append(f"{mode:<12} {s['tokens']:>7} {s['forwards']:>8} {s['seconds']:>8.2f} "
                     f"{s['tokens_per_s']:>8.2f} {s['tokens_per_forward']:>6.2f}")
    extras = [f"{key}={report[key]}" for key in ("speedup", "speedup_vs_reference", "identical", "mismatches")
              if key in report]
    extras += [f"speedup[{name}]={v['speedup']}" for name, v in report.get("fixed_horizons", {}).items()]
    lines.append(", ".join(extras))
    return "\n".join(lines)
