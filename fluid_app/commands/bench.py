"""``fluid bench``: AR vs the authors' sampler vs ours, on a prompts file, in one process."""

from __future__ import annotations

import argparse
import json

from ..bench import format_table, read_prompts, run_bench
from . import add_decode_options, add_model_options, check_decode_options, decode_options, load_model


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="compare ar, reference and fluid decoding")
    add_model_options(parser)
    parser.add_argument("--prompts", required=True, help="JSONL file, one {\"prompt\": ...} per line")
    add_decode_options(parser, mode=False)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    prompts = read_prompts(args.prompts)
    check_decode_options(args)
    model = load_model(args)
    report = run_bench(model, prompts, chat=args.chat, **decode_options(args))
    if args.json:
        print(json.dumps(report))
    else:
        print(format_table(report))
    return 0
