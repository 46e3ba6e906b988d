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

import numpy as np

from .api import FluidModel, Generation
from .data import check_text_file, text_lines
from .errors import FluidError, first_line
from .machine import describe, machine_text
from .sampler import MODES, DecodeSettings
from .warping import SamplingSettings


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a JSONL file with one ``{"prompt": ...}`` per line.

    Every prompt is checked here, before any model loads, so that a bad line is reported
    with its file and line number instead of failing minutes later inside decoding. Lines
    are split on bytes (a JSON string may hold U+2028, which ``str.splitlines`` would cut
    at) and decoded one by one, so a byte that is not UTF-8 is reported with its line; a
    leading BOM is dropped.
    """
    path = Path(path)
    fix = 'pass a JSONL file with one {"prompt": ...} per line'
    check_text_file(path, "prompts file", fix, "prompts")
    try:
        prompts = [_prompt(path, number, line) for number, line in text_lines(path, "prompts")]
    except OSError as exc:
        raise FluidError(f"cannot read {path} ({exc.strerror or first_line(exc)}); check the file", "prompts") from None
    if not prompts:
        raise FluidError(f"{path} holds no prompts; write one {{\"prompt\": ...}} per line", "prompts")
    return prompts


JSON_TYPES = {bool: "true/false", int: "a number", float: "a number", list: "a list", dict: "an object",
              type(None): "null"}


def _prompt(path: Path, number: int, line: str) -> str:
    """The prompt of one JSONL line, or a one-line error naming the file and line."""
    where = f"{path}:{number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise FluidError(f"{where} is not valid JSON ({exc.msg}); write one {{\"prompt\": ...}} object per line",
                         "prompts") from None
    if not isinstance(record, dict) or "prompt" not in record:
        raise FluidError(f"{where} is not a JSON object with a \"prompt\" key; write {{\"prompt\": \"...\"}}",
                         "prompts")
    prompt = record["prompt"]
    if not isinstance(prompt, str):
        raise FluidError(f"{where}: the prompt is not text (got {JSON_TYPES.get(type(prompt), 'something else')}); "
                         "write it as a JSON string", "prompts")
    if not prompt.strip():
        raise FluidError(f"{where} has an empty prompt; write some text or remove that line", "prompts")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate escape such as "\ud800"
        raise FluidError(f"{where}: the prompt is not valid UTF-8 text (a lone surrogate escape); fix that line",
                         "prompts") from None
    return prompt


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
        raise FluidError(f"unknown horizon policy {(unknown or [''])[0]!r}; use a comma-separated list of "
                         f"{', '.join(HORIZONS)}")
    return list(horizons)


# What a bench variant may change: FLUID's own knobs, never the text asked for (prompt, length, sampling)
VARIANT_OPTIONS = ("k_min", "k_max", "threshold", "prompt_lookup_num_tokens", "fallback_masks", "draft_store",
                   "sample_drafts")


def parse_variant(text: str) -> dict[str, Any]:
    """``"k_min=4,threshold=0.7"`` -> ``{"k_min": 4, "threshold": 0.7}``: one more FLUID run of a bench.

    Values are JSON scalars (``4``, ``0.7``, ``false``); the keys are :data:`VARIANT_OPTIONS`.
    Their values are checked with the rest of the decoding settings, before any decoding."""
    fix = f"write KEY=VALUE[,KEY=VALUE...] with keys from {', '.join(VARIANT_OPTIONS)}, e.g. k_min=4,threshold=0.7"
    variant: dict[str, Any] = {}
    for item in (part.strip() for part in text.split(",")):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or key not in VARIANT_OPTIONS or not value:
            raise FluidError(f"bad variant {text!r} at {item!r}; {fix}", "variant")
        try:
            variant[key] = json.loads(value)
        except json.JSONDecodeError:
            raise FluidError(f"bad variant {text!r}: {value!r} is not a number or true/false; {fix}",
                             "variant") from None
    return variant


def variant_text(variant: dict[str, Any]) -> str:
    """``{"k_min": 4, "draft_store": False}`` -> ``"k_min=4,draft_store=false"``, as typed."""
    return ",".join(f"{key}={json.dumps(value)}" for key, value in variant.items())


def variant_name(variant: dict[str, Any]) -> str:
    """The variant's run in a bench report."""
    return "fluid " + variant_text(variant)


def bench_runs(settings: DecodeSettings, modes: Sequence[str], horizons: Sequence[str],
               options: dict[str, Any], compare_drafts: bool = False,
               variants: Sequence[dict[str, Any]] = ()) -> dict[str, tuple[str, dict[str, Any]]]:
    """Name -> (mode, decode options) of every run of a bench.

    ``horizons`` adds FLUID runs with the block size pinned at ``k_max`` or ``k_min`` (the
    K-head ignored), the ablation that shows what the K-head's choice is worth. When
    sampling, ``reference`` (greedy only) is left out, and ``compare_drafts`` adds a FLUID run
    whose mask drafts are their argmax (point masses) instead of draws from their distribution.
    Each of ``variants`` (see :func:`parse_variant`) adds a FLUID run with those options changed:
    how decoding defaults are chosen, against AR in the same run.
    """
    horizons = check_horizons(horizons or ("k-head",))
    runs: dict[str, tuple[str, dict[str, Any]]] = {}
    for mode in modes:
        if mode == "reference" and settings.sampling is not None:
            continue
        if mode != "fluid":
            runs[mode] = (mode, dict(options))
            continue
        if compare_drafts and settings.sampling is not None:
            runs["fluid argmax drafts"] = ("fluid", {**options, "sample_drafts": not settings.sample_drafts})
        for horizon in horizons:
            if horizon == "k-head":
                runs["fluid"] = ("fluid", dict(options))
            else:
                k = settings.k_max if horizon == "k-max" else settings.k_min
                runs[f"fluid k={k}"] = ("fluid", {**options, "k_min": k, "k_max": k})
    for variant in variants:  # asked for by name: run whatever --modes says
        runs[variant_name(variant)] = ("fluid", {**options, **variant})
    return runs


def run_bench(model: FluidModel, prompts: Sequence[str], *, chat: bool = False,
              modes: Sequence[str] = MODES, horizons: Sequence[str] = ("k-head",), compare_drafts: bool = False,
              variants: Sequence[dict[str, Any]] = (), **options: Any) -> dict[str, Any]:
    """Run every mode (and horizon policy, and variant) on every prompt; return totals and the comparisons.

    The runs take turns on each prompt, their order rotating from one prompt to the next, so
    a machine whose speed drifts (another process, heat) slows every run alike. Greedy runs
    are compared token for token (``identical``). Sampled runs cannot be: their
    ``distribution_check`` compares what FLUID and AR sampled instead (see
    :func:`distribution_check`).
    """
    settings = model.settings(**{k: v for k, v in options.items() if k != "max_new_tokens"})
    runs = bench_runs(settings, modes, horizons, options, compare_drafts, variants)
    for variant in variants:  # a bad value fails here, before any decoding, naming the variant
        try:
            model.settings(**{k: v for k, v in {**options, **variant}.items() if k != "max_new_tokens"})
        except FluidError as exc:
            raise FluidError(f"variant {variant_text(variant)!r}: {exc.message}", "variant") from None
    sampling = settings.sampling
    for mode, run_options in runs.values():  # warm-up: first calls pay for allocation and kernel selection
        model.generate(prompts[0], chat=chat, mode=mode, **{**run_options, "max_new_tokens": 8})
    totals = {name: ModeTotals() for name in runs}
    names = list(runs)
    for i, prompt in enumerate(_progress(prompts)):
        for name in names[i % len(names):] + names[: i % len(names)]:
            mode, run_options = runs[name]
            out = model.generate(prompt, chat=chat, mode=mode, **run_options)
            t = totals[name]
            t.tokens += out.new_tokens
            t.forwards += out.forwards
            t.seconds += out.seconds
            t.outputs.append(out)
    backend = model.backend
    report: dict[str, Any] = {"prompts": len(prompts), "modes": {m: t.summary() for m, t in totals.items()},
                              "backend": {"name": backend.name, "device": backend.device, "dtype": backend.dtype},
                              "machine": describe()}
    tps = {m: report["modes"][m]["tokens_per_s"] for m in runs}
    if "fluid" in totals and "ar" in totals:
        report["speedup"] = round(tps["fluid"] / tps["ar"], 3) if tps["ar"] else 0.0
        if sampling is None:
            report["mismatches"] = _mismatches(totals["fluid"], totals["ar"])
            report["identical"] = report["mismatches"] == 0
        else:
            prompt_ids = [model.encode(p, chat) for p in prompts]
            report["sampling"] = {"temperature": sampling.temperature, "top_p": sampling.top_p,
                                  "top_k": sampling.top_k, "seed": sampling.seed}
            report["distribution_check"] = distribution_check(model, prompt_ids, totals["ar"].outputs,
                                                              totals["fluid"].outputs, sampling)
    report["drafts"] = {name: _draft_rates(t.outputs) for name, t in totals.items() if runs[name][0] == "fluid"}
    if "fluid" in totals and "reference" in totals:
        report["speedup_vs_reference"] = round(tps["fluid"] / tps["reference"], 3) if tps["reference"] else 0.0
    if "reference" in totals and "ar" in totals:
        report["reference_mismatches"] = _mismatches(totals["reference"], totals["ar"])
    fixed = [name for name in runs if name.startswith("fluid k=")]
    fixed += [name for name in runs if name == "fluid argmax drafts"]
    fixed += [variant_name(variant) for variant in variants]
    if fixed and "ar" in totals:
        report["fixed_horizons"] = {
            name: {"speedup": round(tps[name] / tps["ar"], 3) if tps["ar"] else 0.0,
                   **({"mismatches": _mismatches(totals[name], totals["ar"])} if sampling is None else {})}
            for name in fixed}
    report["per_prompt_tpf"] = {m: [o.tokens_per_forward for o in t.outputs] for m, t in totals.items()}
    report["outputs"] = {m: [{"token_ids": o.token_ids, "forwards": o.forwards} for o in t.outputs]
                         for m, t in totals.items()}  # what a before/after comparison of a change needs
    report["horizons"] = {m: [b["k"] for o in t.outputs for b in o.blocks] for m, t in totals.items()}
    return report


def _draft_rates(outputs: Sequence[Generation]) -> dict[str, dict[str, float]]:
    """Drafts fed and accepted, per source (mask, lookup), over a run."""
    rates = {}
    for source in ("mask", "lookup"):
        proposed = sum(o.drafts.get(source, {}).get("proposed", 0) for o in outputs)
        accepted = sum(o.drafts.get(source, {}).get("accepted", 0) for o in outputs)
        rates[source] = {"proposed": proposed, "accepted": accepted,
                         "rate": round(accepted / proposed, 4) if proposed else 0.0}
    return rates


def sampled_log_probs(model: FluidModel, prompt_ids: Sequence[int], token_ids: Sequence[int],
                      sampling: SamplingSettings) -> np.ndarray:
    """Log-probability of each sampled token under the distribution it was sampled from
    (the model's warped ``p``), by one teacher-forced forward through the backend protocol."""
    if not token_ids:
        return np.zeros(0)
    session, first = model.backend.start([list(prompt_ids)], logits=True)
    logits = first.logits[0]
    if len(token_ids) > 1:
        logits = np.concatenate([logits, session.forward(np.array([list(token_ids[:-1])])).logits[0]])
    p = sampling.warp(logits)
    return np.log(np.maximum(p[np.arange(len(token_ids)), list(token_ids)], 1e-300))


def distribution_check(model: FluidModel, prompt_ids: Sequence[Sequence[int]], ar: Sequence[Generation],
                       fluid: Sequence[Generation], sampling: SamplingSettings) -> dict[str, Any]:
    """A check a sampled bench can afford that FLUID samples what AR samples (not a proof).

    Per prompt, the mean log-probability of the sampled tokens under the warped target; the
    same sampling distribution gives the same expectation, so the per-prompt differences
    (FLUID minus AR) should average to zero. A paired t statistic beyond 3.29 (two-sided
    p < 0.001) flags a biased sampler, for example one drifting toward the argmax. The exact
    proof is the enumeration test in ``tests/test_sampling.py``.
    """
    diffs = []
    for ids, a, f in zip(prompt_ids, ar, fluid):
        la, lf = (sampled_log_probs(model, ids, g.token_ids, sampling) for g in (a, f))
        if len(la) and len(lf):
            diffs.append(float(lf.mean() - la.mean()))
    d = np.array(diffs)
    spread = float(d.std(ddof=1)) if len(d) > 1 else 0.0
    t = float(d.mean() / (spread / np.sqrt(len(d)))) if spread > 0 else 0.0
    return {"test": "paired t-test of per-prompt mean sampled log-prob, fluid minus ar",
            "prompts": len(d), "mean_difference": round(float(d.mean()) if len(d) else 0.0, 4),
            "t": round(t, 3), "consistent": abs(t) < 3.29}


def _mismatches(a: ModeTotals, b: ModeTotals) -> int:
    return sum(x.token_ids != y.token_ids for x, y in zip(a.outputs, b.outputs))


def _progress(prompts: Sequence[str]):
    from tqdm.auto import tqdm

    return tqdm(prompts, desc="bench", unit="prompt", leave=False, disable=len(prompts) < 2)


def format_table(report: dict[str, Any]) -> str:
    """A short human table of a bench report."""
    where = report.get("backend")
    head = [f"{where['name']} on {where['device']}, {where['dtype']}"] if where else []
    if "machine" in report:
        head.append(machine_text(report["machine"]))
    lines = ["; ".join(head)] if head else []
    lines += [f"{'mode':<12} {'tokens':>7} {'forwards':>8} {'seconds':>8} {'tok/s':>8} {'TPF':>6}"]
    for mode, s in report["modes"].items():
        lines.append(f"{mode:<12} {s['tokens']:>7} {s['forwards']:>8} {s['seconds']:>8.2f} "
                     f"{s['tokens_per_s']:>8.2f} {s['tokens_per_forward']:>6.2f}")
    extras = [f"{key}={report[key]}" for key in ("speedup", "speedup_vs_reference", "identical", "mismatches")
              if key in report]
    extras += [f"speedup[{name}]={v['speedup']}" for name, v in report.get("fixed_horizons", {}).items()]
    lines.append(", ".join(extras))
    for name, rates in report.get("drafts", {}).items():
        lines.append(f"drafts accepted [{name}]: " + ", ".join(
            f"{source} {r['accepted']}/{r['proposed']} ({r['rate']:.1%})" for source, r in rates.items()))
    if "distribution_check" in report:
        check = report["distribution_check"]
        lines.append(f"sampled {report['sampling']}; distribution check ({check['test']}): t={check['t']}, "
                     f"consistent={check['consistent']}")
    return "\n".join(lines)
