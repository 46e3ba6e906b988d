"""``fluid eval-ppl``: AR perplexity of an adapted model and of its base, on held-out replies.

The check that the FLUID adapter leaves the model's own (AR) behaviour intact: both models
score the same assistant turns of the held-out split (the last ``--holdout`` of the data in
file order, never trained on), teacher-forced, and the ratio is printed.
"""

from __future__ import annotations

import argparse
import json
import math

from ..data import SHAREGPT_PACKAGE_FILE
from ..errors import FluidError
from . import add_model_options, load_model


def register(subparsers) -> None:
    parser = subparsers.add_parser("eval-ppl", help="AR perplexity of a FLUID model vs its base on held-out replies")
    add_model_options(parser)
    parser.add_argument("--data", default=SHAREGPT_PACKAGE_FILE,
                        help="chat JSONL, ShareGPT JSON, package: or hf: source (default: the ShareGPT package)")
    parser.add_argument("--holdout", type=float, default=0.02,
                        help="score the last fraction of records, in file order (the split training never saw)")
    parser.add_argument("--count", type=int, default=100, help="held-out conversations to score")
    parser.add_argument("--max-len", type=int, default=512, help="cut each conversation to this many tokens")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.count < 1 or args.max_len < 2:
        raise FluidError("--count must be at least 1 and --max-len at least 2")
    if args.backend == "mlx":
        raise FluidError("eval-ppl runs on the torch backend; pass --backend torch (or leave --backend auto)")
    if args.holdout <= 0:
        raise FluidError("--holdout must be positive: eval-ppl scores the held-out split (e.g. --holdout 0.02)")
    args.backend = "torch"
    from ..data import build_examples, read_conversations

    conversations = read_conversations(args.data, holdout=args.holdout, split="heldout", limit=args.count)
    if not conversations:
        raise FluidError(f"the held-out split of {args.data} is empty; raise --holdout or pass more data")
    adapted = load_model(args)
    if adapted.spec.adapter is None and adapted.spec.fluid is None:
        raise FluidError(f"{args.model} is a plain model with no FLUID adapter to compare; "
                         "pass a FLUID checkpoint (e.g. --model default)")
    from backends import load_backend

    from ..model_refs import ModelSpec

    examples = build_examples(conversations, adapted.tokenizer, max_len=args.max_len, source=args.data)
    base_spec = ModelSpec(label=f"{adapted.spec.label} (base)", base=adapted.spec.base)
    base = load_backend(base_spec, "torch", device=args.device, dtype=args.dtype, k_head=False)
    scores = {}
    for name, backend in (("base", base), ("adapted", adapted.backend)):
        total, count = backend.score(examples, desc=name)
        scores[name] = {"perplexity": round(math.exp(total / count) if count else float("nan"), 4), "tokens": count}
    ratio = scores["adapted"]["perplexity"] / scores["base"]["perplexity"]
    report = {"conversations": len(examples), "data": args.data, "holdout": args.holdout,
              "max_len": args.max_len, **scores, "ratio": round(ratio, 4)}
    if args.json:
        print(json.dumps(report))
    else:
        print(f"held-out assistant tokens: {scores['base']['tokens']} in {len(examples)} conversations")
        print(f"base     perplexity {scores['base']['perplexity']:.3f}")
        print(f"adapted  perplexity {scores['adapted']['perplexity']:.3f}  ({(ratio - 1) * 100:+.2f}% vs base)")
    return 0
