"""``fluid push DIR REPO_ID``: upload a FLUID checkpoint with a generated model card.

Only what a user of the checkpoint needs goes up (weights, K-head, configs, tokenizer, card;
``--include GLOB`` adds more); a training run's checkpoints/ and logs stay on this machine,
and the command says what it left out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..hub import publishable_files, push


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
                        help="upload DIR/README.md as the model card instead of generating one (its local paths "
                             "made portable like the configs')")
    parser.add_argument("--include", action="append", default=[], metavar="GLOB",
                        help="also upload files of DIR matching GLOB (repeatable; e.g. 'docs/*.png'); "
                             "training checkpoints and logs are never uploaded")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    folder = Path(args.folder).expanduser()
    if folder.is_dir():  # else push() says what is wrong
        _, left_out = publishable_files(folder, args.include)
        if left_out:
            print(f"not uploaded (training state, logs, other files; add some with --include): "
                  f"{_summary(left_out)}", file=sys.stderr)
    print(f"uploading {args.folder} to {args.repo_id} ...", file=sys.stderr)
    print(push(args.folder, args.repo_id, private=args.private, revision=args.revision,
               keep_readme=args.keep_readme, base_model=args.base_model, include=args.include))
    return 0


def _summary(paths: list[str], shown: int = 8) -> str:
    """Left-out paths by top-level entry (``checkpoints/`` once, not every step file)."""
    tops = list(dict.fromkeys(p.split("/")[0] + ("/" if "/" in p else "") for p in paths))
    return ", ".join(tops[:shown]) + (f" and {len(tops) - shown} more" if len(tops) > shown else "")
