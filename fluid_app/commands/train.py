"""``fluid train stage1`` (joint causal backbone, LoRA or full) and ``fluid train stage2``
(K-head calibration). Torch code is imported inside ``run`` so ``fluid --help`` stays light.
Runs unchanged under ``torchrun --nproc_per_node N`` (DDP, or FSDP2 with ``--fsdp``).
FLUID hyper-parameter flags default to None: the options fill them from ``FluidConfig``."""

from __future__ import annotations

import argparse
import json
import sys

from fluid_app.fluid_config import FluidConfig


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train a FLUID model (stage1 backbone, stage2 K-head)")
    stages = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")

    one = stages.add_parser("stage1", help="Stage I: teach the model to fill masks, strictly causally")
    one.add_argument("--base", required=True, help="base model: folder, .gguf, Hub id in the cache, or 'default'")
    _data_options(one)
    one.add_argument("--full", action="store_true", help="train all weights instead of a LoRA adapter")
    one.add_argument("--lora-rank", type=int, default=16)
    one.add_argument("--lora-alpha", type=int, default=32)
    one.add_argument("--lora-dropout", type=float, default=0.0)
    one.add_argument("--train-mask-embedding", action="store_true",
                     help="also train the MASK token's embedding row (always on when the token had to be added)")
    one.add_argument("--init-adapter", metavar="MODEL", default=None,
                     help="start from this FLUID LoRA checkpoint's adapter ('default' or a folder) instead of "
                          "zero; a larger --lora-rank keeps it and adds capacity")
    one.add_argument("--mask-token-id", type=int, default=None, help="MASK token id (default: an unused special token)")
    one.add_argument("--ar-loss", choices=["ce", "kl"], default="ce",
                     help="main-token loss: ce on the labels (the method), or kl to the frozen base model's "
                          "next-token distribution (keeps AR perplexity when training on self-distilled data)")
    one.add_argument("--mask-loss", choices=["ce", "kl"], default="ce",
                     help="mask-slot loss: ce on the labels (the method), or kl to the model's own next-token "
                          "distribution at that position (what a sampled draft is verified against)")
    one.add_argument("--ar-weight", type=float, default=1.0,
                     help="weight of the main-token loss against the mask loss (1: the method's plain sum)")
    one.add_argument("--k-max", type=int, default=None,
                     help=f"largest mask block per anchor (K; default {FluidConfig.k_max})")
    one.add_argument("--k-min", type=int, default=None,
                     help=f"smallest horizon recorded for decoding (default {FluidConfig.k_min})")
    one.add_argument("--anchor-rate", type=float, default=None,
                     help=f"chance that a reply token gets a mask block (default {FluidConfig.anchor_rate})")
    one.add_argument("--noise-rate", type=float, default=None,
                     help=f"chance that a restored mask slot gets a random token (default {FluidConfig.noise_rate})")
    one.add_argument("--grad-accum", type=int, default=1)
    one.add_argument("--lr", type=float, default=2e-4)
    one.add_argument("--weight-decay", type=float, default=0.0)
    one.add_argument("--warmup-ratio", type=float, default=0.1)
    one.add_argument("--max-grad-norm", type=float, default=1.0)
    one.add_argument("--epochs", type=float, default=None, help="train this many epochs (default 1 unless --steps)")
    one.add_argument("--bf16", action="store_true", help="bfloat16 autocast (base weights in bf16 for LoRA)")
    one.add_argument("--gradient-checkpointing", action="store_true")
    one.add_argument("--save-every", type=int, default=0, help="save a resumable checkpoint every N steps")
    one.add_argument("--keep-checkpoints", type=int, default=2, help="resumable checkpoints to keep (0: all)")
    one.add_argument("--resume", nargs="?", const="auto", default=None,
                     help="continue from the latest checkpoint in --out (or the given folder)")
    one.add_argument("--stop-at-step", type=int, default=None,
                     help="save and stop after this step (split a long run into jobs); --resume continues")
    one.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                     help="save and stop after the first step that ends this many seconds after the start "
                          "(fits a job's time limit); --resume continues")
    one.add_argument("--eval-every", type=int, default=0, metavar="N",
                     help="every N steps and at the end, log the masks' top-1 accuracy at offsets 1..K and the "
                          "mean accepted draft run on held-out replies (needs --holdout; 0: off)")
    one.add_argument("--eval-count", type=int, default=32, metavar="N",
                     help="held-out conversations --eval-every scores (default 32)")
    one.add_argument("--attention", default="auto", choices=["auto", "flex", "sdpa"],
                     help="flex: BlockMask with flex_attention (CUDA default); sdpa: boolean mask (CPU default)")
    one.add_argument("--fsdp", action="store_true", help="shard the model with FSDP2 (under torchrun)")
    one.set_defaults(run=run_stage1)

    two = stages.add_parser("stage2", help="Stage II: calibrate the K-head on the frozen model")
    two.add_argument("--model", required=True, help="Stage I output folder (or any model reference)")
    _data_options(two)
    two.add_argument("--k-max", type=int, default=None, help="horizon classes (default: the checkpoint's k_max)")
    two.add_argument("--tau", type=float, default=None,
                     help=f"entropy budget of a stride (mean mask loss; default {FluidConfig.tau})")
    two.add_argument("--sigma", type=float, default=None,
                     help=f"width of the soft target (default {FluidConfig.sigma})")
    two.add_argument("--lr", type=float, default=1e-3)
    two.add_argument("--warmup-ratio", type=float, default=0.0)
    two.add_argument("--epochs", type=float, default=None)
    two.add_argument("--bf16", action="store_true", help="run the frozen backbone in bfloat16")
    two.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                     help="stop training the head after the first step that ends this many seconds after the "
                          "start, and export it as it is")
    two.set_defaults(run=run_stage2)


def _data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE.json",
                        help="options from a JSON file ({\"k_max\": 8, \"bf16\": true, ...}); flags typed here win")
    parser.add_argument("--data", required=True,
                        help="chat JSONL ({'messages': [...]}), ShareGPT JSON, or hf:<dataset>[:<split>]")
    parser.add_argument("--out", required=True, help="output folder (a loadable FLUID checkpoint)")
    parser.add_argument("--holdout", type=float, default=0.0,
                        help="keep the last fraction of records (file order) out of training, e.g. 0.02")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N training conversations")
    parser.add_argument("--max-len", type=int, default=1024, help="cut examples to this many tokens")
    parser.add_argument("--batch-size", type=int, default=2, help="examples per micro-batch per process")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print a JSON summary at the end")


def _finish(args: argparse.Namespace, summary: dict) -> int:
    if summary.get("rank", 0) != 0:  # under torchrun only the first process reports
        return 0
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"saved to {summary['out']} after {summary['steps']} step(s)", file=sys.stderr)
    return 0


def run_stage1(args: argparse.Namespace) -> int:
    from backends import train

    return _finish(args, train("stage1", vars(args)))


def run_stage2(args: argparse.Namespace) -> int:
    from backends import train

    return _finish(args, train("stage2", vars(args)))
