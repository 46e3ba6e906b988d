"""``fluid distill``: the model's own greedy replies to training prompts, as chat JSONL."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import add_model_options, load_model


def register(subparsers) -> None:
    parser = subparsers.add_parser("distill", help="write self-distilled chat data (the model's own replies)")
    add_model_options(parser)
    parser.add_argument("--data", required=True, help="chat JSONL, ShareGPT JSON, package: or hf: source")
    parser.add_argument("--out", required=True, help="JSONL file to append to (an interrupted run resumes)")
    parser.add_argument("--count", type=int, default=1000, help="how many replies to write in all")
    parser.add_argument("--holdout", type=float, default=0.02, help="fraction kept out, last in file order")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--max-prompt-tokens", type=int, default=256)
    parser.set_defaults(run=run, json=True)


def run(args: argparse.Namespace) -> int:
    from ..distill import check_distill_options, distill

    check_distill_options(Path(args.out), count=args.count, batch_size=args.batch_size,
                          max_new_tokens=args.max_new_tokens, max_prompt_tokens=args.max_prompt_tokens)
    model = load_model(args)  # the options are checked first: loading a model takes a while
    written = distill(model, args.data, Path(args.out), count=args.count, holdout=args.holdout,
                      batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                      max_prompt_tokens=args.max_prompt_tokens)
    print(f"{written} conversations in {args.out}")
    return 0
