"""``fluid convert SRC OUT --to mlx``: an mlx-lm folder (optionally quantized) plus FLUID files.

The core never imports mlx: the conversion lives in ``backends.mlx_backend.convert`` and is
imported only when this command runs.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser("convert", help="convert a model or FLUID checkpoint for another backend")
    parser.add_argument("source", help="'default', a model or FLUID checkpoint folder, a .gguf file, or a Hub id")
    parser.add_argument("out", help="output folder (must not exist or be empty)")
    parser.add_argument("--to", default="mlx", choices=["mlx"], help="target format (mlx: an mlx-lm folder)")
    parser.add_argument("--quantize", type=int, default=None, choices=[4, 8], help="quantize weights to 4 or 8 bits")
    parser.add_argument("--group-size", type=int, default=32,
                        help="quantization group size (32: small models stay coherent at 4 bits; mlx-lm uses 64)")
    parser.add_argument("--dtype", default="auto", help="auto (keep), float32, bfloat16 or float16")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from backends import convert_to_mlx

    out = convert_to_mlx(args.source, args.out, quantize=args.quantize, group_size=args.group_size, dtype=args.dtype)
    print(f"wrote {out}; run: fluid generate --backend mlx --model {out} --prompt ...")
    return 0
