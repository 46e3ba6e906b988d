"""``fluid export DIR OUT --merge``: write a self-contained Hugging Face folder."""

from __future__ import annotations

import argparse
import sys

from ..errors import FluidError
from ..sources import resolve_model


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="merge a FLUID checkpoint into a self-contained Hugging Face folder")
    parser.add_argument("source", metavar="DIR", help="FLUID checkpoint (LoRA adapter or full) or Hub id")
    parser.add_argument("out", metavar="OUT", help="folder to write (created atomically)")
    parser.add_argument("--merge", action="store_true",
                        help="merge the LoRA adapter into the weights (the only export kind so far)")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default float32)")
    parser.add_argument("--force", action="store_true", help="replace OUT if it already exists")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if not args.merge:
        raise FluidError("only merged exports are supported; run: fluid export DIR OUT --merge")
    from backends.torch_backend.export import export_merged

    spec = resolve_model(args.source)
    print(f"merging {spec.label} into {args.out} ...", file=sys.stderr)
    out = export_merged(spec, args.out, dtype=args.dtype, force=args.force)
    print(out)
    return 0
