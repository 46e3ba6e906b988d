"""``fluid pull REPO_ID``: download a model or FLUID checkpoint (and its base) from the Hub."""

from __future__ import annotations

import argparse
import sys

from ..hub import has_fluid_files, pull


def register(subparsers) -> None:
    parser = subparsers.add_parser("pull", help="download a model or FLUID checkpoint from the Hugging Face Hub")
    parser.add_argument("repo_id", metavar="REPO_ID", help="owner/name on the Hub (HF_ENDPOINT picks the server)")
    parser.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    parser.add_argument("--local-dir", default=None,
                        help="download into this folder instead of the Hugging Face cache")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    folder = pull(args.repo_id, revision=args.revision, local_dir=args.local_dir)
    if not has_fluid_files(folder):
        print(no_adapter_notice(args.repo_id), file=sys.stderr)
    use = args.local_dir or (f"{args.repo_id}@{args.revision}" if args.revision else args.repo_id)
    print(f"ready: fluid generate --model {use} --prompt ...", file=sys.stderr)
    print(folder)
    return 0


def no_adapter_notice(label: str) -> str:
    """One line for plain causal LMs: they decode (losslessly) but FLUID cannot speed them up yet."""
    return (f"notice: {label} has no FLUID adapter: --mode ar works as usual, --mode fluid drafts from an "
            f"untrained MASK (still lossless, but few tokens per forward); adapt it with: "
            f"fluid train stage1 --base {label} --data CHATS.jsonl --out DIR")
