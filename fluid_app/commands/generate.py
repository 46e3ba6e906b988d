"""``fluid generate``: decode one prompt and print the text (or JSON with its cost)."""

from __future__ import annotations

import argparse
import json

from . import add_decode_options, add_model_options, check_decode_options, decode_options, load_model


def register(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="generate text from a prompt")
    add_model_options(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt")
    source.add_argument("--messages", metavar="FILE",
                        help="a chat history instead of a prompt: a JSON list of {role, content} messages "
                             "(system, user, assistant), through the chat template")
    add_decode_options(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..api import check_messages, check_prompt

    if args.messages is not None:
        messages = check_messages(read_messages(args.messages))
    else:
        check_prompt(args.prompt)
    check_decode_options(args)
    model = load_model(args)
    prompt = model.encode_chat(messages) if args.messages is not None else args.prompt
    result = model.generate(prompt, chat=args.chat, mode=args.mode, **decode_options(args))
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(result.text)
    return 0


def read_messages(path: str) -> object:
    """The ``--messages`` file's JSON (``-``: standard input), or a one-line error."""
    import sys
    from pathlib import Path

    from ..errors import FluidError

    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
        return json.loads(text)
    except OSError as exc:
        raise FluidError(f"cannot read {path} ({exc.strerror}); pass a JSON file of messages", "messages") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise FluidError(f"{path} is not JSON; pass a list of {{role, content}} messages", "messages") from None
