"""``fluid import-reference SRC OUT``: convert the authors' released layout to a FLUID folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..hub import is_hub_id, pull


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "import-reference", help="convert the authors' release (HF folder + model_head.bin) to FLUID format")
    parser.add_argument("src", metavar="SRC", help="folder (or Hub id, pulled first) with config.json, "
                                                   "weights and model_head.bin")
    parser.add_argument("out", metavar="OUT", help="FLUID folder to write (atomically)")
    parser.add_argument("--mask-token-id", type=int, default=None,
                        help="MASK id the model was trained with (default: mask_token_id in config.json)")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default float32)")
    parser.add_argument("--force", action="store_true", help="replace OUT if it already exists")
    parser.add_argument("--verify-tokens", type=int, default=16,
                        help="tokens to decode in fluid and ar mode as a losslessness check (0: skip)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from backends import import_reference

    src = Path(args.src).expanduser()
    if not src.exists() and is_hub_id(args.src):
        repo_id, _, revision = args.src.partition("@")
        src = pull(repo_id, revision=revision or None, follow_base=False)
    print(f"importing {args.src} ...", file=sys.stderr)
    out = import_reference(src, Path(args.out), mask_token_id=args.mask_token_id, dtype=args.dtype,
                           force=args.force, verify_tokens=args.verify_tokens)
    print(out)
    return 0
