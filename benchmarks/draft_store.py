"""What the draft store is worth: AR, FLUID without the store, FLUID with it, in one process.

A shared machine's speed drifts by more than the effect, so the three settings run on each
prompt in turn, their order rotating from prompt to prompt, and each setting's tokens/s is
its total tokens over its total seconds. Prints one line per setting (tokens, forwards,
tokens/s, speedup over AR, TPF, whether greedy outputs equal AR's, drafts kept per source)
and a JSON line with the ratios.

    python benchmarks/draft_store.py --model default --prompts benchmarks/sharegpt_heldout_10.jsonl \\
        --max-new-tokens 256 [--temperature 0.7 --top-p 0.95 --seed 0] [--every 3]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fluid_app  # noqa: E402
from fluid_app.bench import read_prompts  # noqa: E402

SETTINGS = [("ar", {"mode": "ar"}), ("fluid, no store", {"draft_store": False}), ("fluid + store", {})]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--prompts", default=str(ROOT / "benchmarks" / "sharegpt_heldout_10.jsonl"))
    parser.add_argument("--every", type=int, default=1, help="take every N-th prompt (1: all)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    model = fluid_app.load(args.model)
    if model.draft_store is None:
        sys.exit(f"error: {args.model} has no draft store; pass a checkpoint with draft_store.npz")
    prompts = read_prompts(args.prompts)[:: args.every]
    sampling = {"temperature": args.temperature, "top_p": args.top_p, "seed": args.seed}
    totals = {name: {"tokens": 0, "seconds": 0.0, "forwards": 0, "outputs": [], "drafts": {}} for name, _ in SETTINGS}
    model.generate(prompts[0], chat=True, max_new_tokens=8)  # warm-up
    for i, prompt in enumerate(prompts):
        for name, options in SETTINGS[i % 3:] + SETTINGS[: i % 3]:
            out = model.generate(prompt, chat=True, max_new_tokens=args.max_new_tokens, **sampling, **options)
            total = totals[name]
            total["tokens"] += out.new_tokens
            total["seconds"] += out.seconds
            total["forwards"] += out.forwards
            total["outputs"].append(out.token_ids)
            for source, counts in out.drafts.items():
                kept = total["drafts"].setdefault(source, [0, 0])
                kept[0] += counts["accepted"]
                kept[1] += counts["proposed"]
    speed = {name: t["tokens"] / t["seconds"] for name, t in totals.items()}
    for name, t in totals.items():
        same = "" if args.temperature else f" identical={t['outputs'] == totals['ar']['outputs']}"
        drafts = " ".join(f"{s} {a}/{p}" for s, (a, p) in t["drafts"].items() if p)
        print(f"{name:16s} tokens {t['tokens']:6d} forwards {t['forwards']:6d} {speed[name]:7.2f} tok/s "
              f"{speed[name] / speed['ar']:.3f}x TPF {t['tokens'] / t['forwards']:.3f}{same} {drafts}")
    print(json.dumps({"prompts": len(prompts),
                      "speedup_without_store": round(speed["fluid, no store"] / speed["ar"], 3),
                      "speedup_with_store": round(speed["fluid + store"] / speed["ar"], 3),
                      "store_gain": round(speed["fluid + store"] / speed["fluid, no store"], 3)}))


if __name__ == "__main__":
    main()
