"""``fluid push DIR REPO_ID``: upload a FLUID checkpoint with a generated model card."""

from __future__ import annotations

import argparse
import sys

from ..hub import push


def register(subparsers) -> None:
    parser = subparsers.add_parser("push", help="upload a FLUID checkpoint to the Hugging Face Hub")
    parser.add_argument("folder", metavar="DIR", help="FLUID checkpoint folder (adapter or merged)")
    parser.add_argument("repo_id", metavar="REPO_ID", help="owner/name; created if it does not exist")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--revision", default=None, help="branch to push to (created if needed; default main)")
    parser.add_argument("--base-model", default=None,
                        help="Hub id of the base model, written into the uploaded fluid_config.json "
                             "(needed when an adapter's base is a local folder)")
    parser.add_argument("--keep-readme", action="store_true",
                        help="upload DIR/README.md as the model card instead of generating one")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    print(f"uploading {args.folder} to {args.repo_id} ...", file=sys.stderr)
    print(push(args.folder, args.repo_id, private=args.private, revision=args.revision,
               keep_readme=args.keep_readme, base_model=args.base_model))
    return 0
