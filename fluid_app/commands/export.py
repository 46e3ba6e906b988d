"""``fluid export DIR OUT``: the shippable FLUID files of a checkpoint (with new decoding
defaults, optionally a half-precision adapter), or with ``--merge`` a self-contained
Hugging Face folder."""

from __future__ import annotations

import argparse
import sys

from ..errors import FluidError
from ..model_refs import resolve_model

DECODING_DEFAULTS = ("k_min", "k_max", "threshold", "prompt_lookup_num_tokens", "sampling_k_min", "fallback_masks")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="copy a FLUID checkpoint's shippable files, or --merge it into a Hugging Face folder")
    parser.add_argument("source", metavar="DIR", help="FLUID checkpoint (LoRA adapter or full) or Hub id")
    parser.add_argument("out", metavar="OUT", help="folder to write (created atomically)")
    parser.add_argument("--merge", action="store_true",
                        help="merge the LoRA adapter into the weights: a folder plain transformers and mlx-lm load")
    parser.add_argument("--dtype", default="float32",
                        help="float32, bfloat16 or float16 (default float32; an adapter export takes float32 "
                             "or float16)")
    parser.add_argument("--k-min", type=int, default=None, help="decoding default to record (adapter export)")
    parser.add_argument("--k-max", type=int, default=None, help="decoding default to record (adapter export)")
    parser.add_argument("--threshold", type=float, default=None, help="decoding default to record (adapter export)")
    parser.add_argument("--prompt-lookup-num-tokens", type=int, default=None,
                        help="decoding default to record (adapter export)")
    parser.add_argument("--sampling-k-min", type=int, default=None,
                        help="decoding default to record (adapter export): k_min when sampling")
    parser.add_argument("--fallback-masks", type=int, default=None,
                        help="decoding default to record (adapter export): masks of the fallback branch")
    parser.add_argument("--draft-store", metavar="REPLIES", default=None,
                        help="adapter export: build the draft store from the assistant replies of this chat "
                             "JSONL (the base model's own replies, as `fluid distill` writes them)")
    parser.add_argument("--force", action="store_true", help="replace OUT if it already exists")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    overrides = {name: getattr(args, name) for name in DECODING_DEFAULTS if getattr(args, name) is not None}
    spec = resolve_model(args.source)
    if not args.merge:
        from ..adapter_export import export_adapter

        store = None
        if args.draft_store is not None:
            from backends import load_tokenizer

            from ..adapter_export import replies_array

            store = replies_array(args.draft_store, load_tokenizer(spec))
        print(export_adapter(spec, args.out, dtype=args.dtype, force=args.force, overrides=overrides,
                             draft_store=store))
        return 0
    if overrides or args.draft_store is not None:
        flags = "/".join("--" + name.replace("_", "-") for name in (*DECODING_DEFAULTS, "draft_store"))
        raise FluidError(f"{flags} apply to an adapter export; drop --merge or those flags")
    from backends import export_merged

    print(f"merging {spec.label} into {args.out} ...", file=sys.stderr)
    out = export_merged(spec, args.out, dtype=args.dtype, force=args.force)
    print(out)
    return 0
