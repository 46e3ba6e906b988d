"""``fluid demo``: the Gradio page that shows parallel denoising live and races FLUID vs AR."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Shared by ``fluid demo`` and the repository's ``app.py``."""
    parser.add_argument("--model", default="default",
                        help="'default' (embedded SmolLM2-135M-Instruct), a model or FLUID checkpoint folder, "
                             "a .gguf file, or a Hub id already in the cache")
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "mlx"])
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0 to expose it)")
    parser.add_argument("--port", type=int, default=None, help="port (default: Gradio's, 7860 or the next free)")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    parser.add_argument("--concurrency", type=int, default=1,
                        help="decodes served at once; more users wait in the queue (raise it on a GPU)")


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="launch the live Gradio demo")
    add_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import os

    from ..errors import FluidError

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline by default

    if args.concurrency < 1:
        raise FluidError(f"--concurrency must be at least 1 (got {args.concurrency})")
    try:
        from ..ui.app import launch
    except ImportError as exc:
        raise FluidError(f"the demo needs Gradio ({exc.name} is missing); pip install 'fluid-app[demo]'") from None
    launch(args.model, args.backend, args.host, args.port, args.share, args.concurrency)
    return 0
