"""What the draft store is worth: AR, FLUID without the store, FLUID with it, in one process.

A shared machine's speed drifts by more than the effect, so the three settings run on each
prompt in turn, their order rotating from prompt to prompt (``fluid bench``'s own loop, with
the store-less run as a ``--variant``), and each setting's tokens/s is its total tokens over
its total seconds. Prints one line per setting (tokens, forwards,
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
from fluid_app.bench import read_prompts, run_bench, variant_name  # noqa: E402

NO_STORE = {"draft_store": False}


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
    report = run_bench(model, prompts, chat=True, modes=("ar", "fluid"), variants=[NO_STORE],
                       max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                       seed=args.seed)
    names = {"ar": "ar", "fluid, no store": variant_name(NO_STORE), "fluid + store": "fluid"}
    speed = {name: report["modes"][run]["tokens_per_s"] for name, run in names.items()}
    for name, run in names.items():
        totals, drafts = report["modes"][run], report["drafts"].get(run, {})
        same = ""
        if not args.temperature and run != "ar":
            mismatches = report["mismatches"] if run == "fluid" else report["fixed_horizons"][run]["mismatches"]
            same = f" identical={mismatches == 0}"
        kept = " ".join(f"{s} {r['accepted']}/{r['proposed']}" for s, r in drafts.items() if r["proposed"])
        print(f"{name:16s} tokens {totals['tokens']:6d} forwards {totals['forwards']:6d} {speed[name]:7.2f} tok/s "
              f"{speed[name] / speed['ar']:.3f}x TPF {totals['tokens_per_forward']:.3f}{same} {kept}")
    print(json.dumps({"prompts": len(prompts),
                      "speedup_without_store": round(speed["fluid, no store"] / speed["ar"], 3),
                      "speedup_with_store": round(speed["fluid + store"] / speed["ar"], 3),
                      "store_gain": round(speed["fluid + store"] / speed["fluid, no store"], 3)}))


if __name__ == "__main__":
    main()
