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


def run_bench(model: FluidModel, prompts: Sequence[str], *, chat: bool = False,
              modes: Sequence[str] = MODES, **options: Any) -> dict[str, Any]:
    """Run every mode on every prompt; return per-mode totals and the comparisons."""
    for mode in modes:  # warm-up: first calls pay for allocation and kernel selection
        model.generate(prompts[0], chat=chat, mode=mode, **{**options, "max_new_tokens": 8})
    totals = {mode: ModeTotals() for mode in modes}
    for prompt in prompts:
        for mode in modes:
            out = model.generate(prompt, chat=chat, mode=mode, **options)
            t = totals[mode]
            t.tokens += out.new_tokens
            t.forwards += out.forwards
            t.seconds += out.seconds
            t.outputs.append(out)
    report: dict[str, Any] = {"prompts": len(prompts), "modes": {m: t.summary() for m, t in totals.items()}}
    tps = {m: report["modes"][m]["tokens_per_s"] for m in modes}
    if "fluid" in totals and "ar" in totals:
        pairs = zip(totals["fluid"].outputs, totals["ar"].outputs)
        mismatches = sum(f.token_ids != a.token_ids for f, a in pairs)
        report["speedup"] = round(tps["fluid"] / tps["ar"], 3) if tps["ar"] else 0.0
        report["identical"] = mismatches == 0
        report["mismatches"] = mismatches
    if "fluid" in totals and "reference" in totals:
        report["speedup_vs_reference"] = round(tps["fluid"] / tps["reference"], 3) if tps["reference"] else 0.0
    if "reference" in totals and "ar" in totals:
        pairs = zip(totals["reference"].outputs, totals["ar"].outputs)
        report["reference_mismatches"] = sum(r.token_ids != a.token_ids for r, a in pairs)
    report["per_prompt_tpf"] = {m: [o.tokens_per_forward for o in t.outputs] for m, t in totals.items()}
    report["horizons"] = {m: [b["k"] for o in t.outputs for b in o.blocks] for m, t in totals.items()}
    return report


def format_table(report: dict[str, Any]) -> str:
    """A short human table of a bench report."""
    lines = [f"{'mode':<10} {'tokens':>7} {'forwards':>8} {'seconds':>8} {'tok/s':>8} {'TPF':>6}"]
    for mode, s in report["modes"].items():
        lines.append(f"{mode:<10} {s['tokens']:>7} {s['forwards']:>8} {s['seconds']:>8.2f} "
                     f"{s['tokens_per_s']:>8.2f} {s['tokens_per_forward']:>6.2f}")
    extras = [f"{key}={report[key]}" for key in ("speedup", "speedup_vs_reference", "identical", "mismatches")
              if key in report]
    lines.append(", ".join(extras))
    return "\n".join(lines)
