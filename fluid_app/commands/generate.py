"""``fluid generate``: decode one prompt and print the text (or JSON with its cost)."""

from __future__ import annotations

import argparse
import json

from . import add_decode_options, add_model_options, check_decode_options, decode_options, load_model


def register(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="generate text from a prompt")
    add_model_options(parser)
    parser.add_argument("--prompt", required=True)
    add_decode_options(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..api import check_prompt

    check_prompt(args.prompt)
    check_decode_options(args)
    model = load_model(args)
    result = model.generate(args.prompt, chat=args.chat, mode=args.mode, **decode_options(args))
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(result.text)
    return 0
