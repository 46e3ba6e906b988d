"""Subcommands of the ``fluid`` CLI, plus the option groups several of them share."""

from __future__ import annotations

import argparse
from typing import Any

from ..sampler import MODES


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default",
                        help="'default', a model or FLUID checkpoint folder, a .gguf file, or a Hub id "
                             "(owner/name[@revision], downloaded first with: fluid pull)")
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "mlx"])
    parser.add_argument("--device", default="auto", help="torch device: auto, cpu, cuda, mps")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    parser.add_argument("--mask-token-id", type=int, default=None,
                        help="override the MASK token id (default: the checkpoint's or an unused special token)")


def add_decode_options(parser: argparse.ArgumentParser, mode: bool = True) -> None:
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threshold", type=float, default=None, help="draft confidence to fix a slot (0, 1]")
    parser.add_argument("--k-min", type=int, default=None, help="smallest horizon (block size)")
    parser.add_argument("--k-max", type=int, default=None, help="largest horizon (block size)")
    parser.add_argument("--prompt-lookup-num-tokens", type=int, default=None,
                        help="fluid mode: when the mask draft is unsure, draft up to N tokens that followed the "
                             "last earlier occurrence of the latest n-gram (0: off; default: the checkpoint's)")
    if mode:
        parser.add_argument("--mode", default="fluid", choices=list(MODES))
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def load_model(args: argparse.Namespace):
    """Load ``args.model`` with the shared model options, saying which backend was picked."""
    import sys

    from backends import pick_backend

    from ..api import load

    backend, reason = pick_backend(args.backend)
    if args.backend == "auto" and not getattr(args, "json", False):
        print(f"backend: {backend} ({reason})", file=sys.stderr)
    options: dict[str, Any] = {"mask_token_id": args.mask_token_id}
    if backend == "torch":
        options.update(device=args.device, dtype=args.dtype)
    elif args.dtype != "auto":  # mlx: cast the loaded weights (quantized layers keep their bits)
        options.update(dtype=args.dtype)
    model = load(args.model, backend=backend, **options)
    if model.spec.fluid is None:
        from .pull import no_adapter_notice

        print(no_adapter_notice(args.model), file=sys.stderr)
    return model


def check_decode_options(args: argparse.Namespace) -> None:
    """Reject impossible decoding flags before any model is loaded (seconds saved per typo)."""
    from ..sampler import DecodeSettings

    k_min = args.k_min if args.k_min is not None else min(args.k_max or 1, 1)
    k_max = args.k_max if args.k_max is not None else max(k_min, 16)
    threshold = 0.9 if args.threshold is None else args.threshold
    DecodeSettings(mode=getattr(args, "mode", "fluid"), max_new_tokens=args.max_new_tokens,
                   k_min=k_min, k_max=k_max, threshold=threshold,
                   prompt_lookup_num_tokens=args.prompt_lookup_num_tokens or 0).validate()


def decode_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"max_new_tokens": args.max_new_tokens, "threshold": args.threshold,
            "k_min": args.k_min, "k_max": args.k_max, "prompt_lookup_num_tokens": args.prompt_lookup_num_tokens}
