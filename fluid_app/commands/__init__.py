"""Subcommands of the ``fluid`` CLI, plus the option groups several of them share."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from backends import BACKENDS

from ..sampler import MODES, DecodeSettings

if TYPE_CHECKING:
    from ..api import FluidModel


def add_model_options(parser: argparse.ArgumentParser, tensors: bool = True) -> None:
    """``--model`` and ``--backend``; with ``tensors`` also device, dtype and MASK id."""
    parser.add_argument("--model", default="default",
                        help="'default' (the embedded SmolLM2-135M-Instruct FLUID model), a model or FLUID "
                             "checkpoint folder, a .gguf file, or a Hub id (owner/name[@revision], downloaded "
                             "first with: fluid pull)")
    parser.add_argument("--backend", default="auto", choices=list(BACKENDS))
    if not tensors:
        return
    parser.add_argument("--device", default="auto", help="torch device: auto, cpu, cuda, mps")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    parser.add_argument("--mask-token-id", type=int, default=None,
                        help="override the MASK token id (default: the checkpoint's or an unused special token)")


def add_decode_options(parser: argparse.ArgumentParser, mode: bool = True) -> None:
    """Decoding flags. They default to None: unset means the checkpoint's own value
    (``fluid_config.json``), else :class:`~fluid_app.sampler.DecodeSettings`' default."""
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help=f"tokens to generate at most (default {DecodeSettings.max_new_tokens})")
    parser.add_argument("--threshold", type=float, default=None,
                        help="draft confidence to fix a slot (0, 1] (default: the checkpoint's)")
    parser.add_argument("--k-min", type=int, default=None, help="smallest horizon (block size)")
    parser.add_argument("--k-max", type=int, default=None, help="largest horizon (block size)")
    parser.add_argument("--prompt-lookup-num-tokens", type=int, default=None,
                        help="fluid mode: when the mask draft is unsure, draft up to N tokens that followed the "
                             "last earlier occurrence of the latest n-gram (0: off; default: the checkpoint's)")
    parser.add_argument("--fallback-masks", type=int, default=None,
                        help="fluid mode: masks fed beside each window's drafts, blind to them, that draft the "
                             "next window when the first draft is rejected (0: off; default: the checkpoint's; "
                             "Llama-family models)")
    parser.add_argument("--no-draft-store", dest="draft_store", action="store_false", default=None,
                        help="fluid mode: do not look unsure drafts up in the checkpoint's draft store "
                             "(its model's own replies to other prompts), when it has one")
    sampling = parser.add_argument_group("sampling (default: greedy; fluid and ar modes stay lossless)")
    sampling.add_argument("--temperature", type=float, default=None,
                          help="0: greedy decoding (default); above 0: sample, with drafts verified so that the "
                               "output follows the model's own sampling distribution exactly")
    sampling.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1] (1: off)")
    sampling.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (0: off)")
    sampling.add_argument("--seed", type=int, default=None, help="random seed: same seed, same text")
    if mode:
        parser.add_argument("--mode", default=DecodeSettings.mode, choices=list(MODES))
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def load_model(args: argparse.Namespace) -> FluidModel:
    """Load ``args.model`` with the shared model options, saying which backend was picked."""
    import sys

    from backends import pick_backend

    from ..api import load

    backend, reason = pick_backend(args.backend)
    if args.backend == "auto":  # one line on standard error, so --json output stays clean
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


def decode_options(args: argparse.Namespace) -> dict[str, Any]:
    """The decoding flags the user set (None: leave it to the checkpoint or the default)."""
    return {"max_new_tokens": args.max_new_tokens, "threshold": args.threshold,
            "k_min": args.k_min, "k_max": args.k_max, "prompt_lookup_num_tokens": args.prompt_lookup_num_tokens,
            "fallback_masks": args.fallback_masks, "temperature": args.temperature, "top_p": args.top_p,
            "top_k": args.top_k, "seed": args.seed, "draft_store": args.draft_store}


def check_decode_options(args: argparse.Namespace) -> None:
    """Reject impossible decoding flags before any model is loaded (seconds saved per typo).

    A horizon left unset is filled with the loosest value, so that the check judges only what
    the user typed (the checkpoint's own k_min and k_max are not known before it loads).
    """
    options = decode_options(args)
    if options["k_max"] is not None and options["k_min"] is None:
        options["k_min"] = 1
    if options["k_min"] is not None and options["k_max"] is None:
        options["k_max"] = max(options["k_min"], DecodeSettings.k_max)
    DecodeSettings.from_config(None, mode=getattr(args, "mode", None), **options)
