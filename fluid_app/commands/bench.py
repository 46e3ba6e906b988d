"""``fluid bench``: AR vs the authors' sampler vs ours, on a prompts file, in one process."""

from __future__ import annotations

import argparse
import json

from ..bench import check_horizons, format_table, parse_variant, read_prompts, run_bench
from ..errors import FluidError
from ..files import check_output_file, write_text_atomic
from ..sampler import MODES
from . import add_decode_options, add_model_options, check_decode_options, decode_options, load_model


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="compare ar, reference and fluid decoding")
    add_model_options(parser)
    parser.add_argument("--prompts", required=True, help="JSONL file, one {\"prompt\": ...} per line")
    add_decode_options(parser, mode=False)
    parser.add_argument("--horizons", default="k-head",
                        help="comma-separated FLUID horizon policies to run: k-head (the K-head's choice), "
                             "k-max and k-min (block size fixed there); e.g. k-head,k-max,k-min")
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"comma-separated modes to run (default {','.join(MODES)}; reference is greedy only "
                             "and is skipped when sampling)")
    parser.add_argument("--compare-drafts", action="store_true",
                        help="when sampling, also run FLUID with argmax mask drafts (point masses) instead of "
                             "drafts sampled from their own distribution")
    parser.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                        help="also run FLUID with these options changed (k_min, k_max, threshold, "
                             "prompt_lookup_num_tokens, fallback_masks, draft_store, sample_drafts), "
                             "e.g. k_min=4,threshold=0.7; repeat for more. How the decoding defaults are chosen")
    parser.add_argument("--plot", default=None, metavar="FILE.png",
                        help="also draw per-prompt tokens per forward and the histogram of chosen horizons")
    parser.add_argument("--report", default=None, metavar="FILE.json",
                        help="also write the full report (what --json prints) to this file, while the table "
                             "goes to the screen: the table, the plot and the report from one run")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    prompts = read_prompts(args.prompts)
    check_decode_options(args)
    horizons = check_horizons([h.strip() for h in args.horizons.split(",") if h.strip()])
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise FluidError(f"unknown mode {(unknown or [''])[0]!r}; use a comma-separated list of {', '.join(MODES)}",
                         "modes")
    variants = [parse_variant(text) for text in args.variant]
    if args.plot:
        from ..bench_plot import check_plot_path

        check_plot_path(args.plot)
    if args.report:
        check_output_file(args.report, ".json", "the report is JSON", "report")
    model = load_model(args)
    report = run_bench(model, prompts, chat=args.chat, modes=modes, horizons=horizons,
                       compare_drafts=args.compare_drafts, variants=variants,
                       **decode_options(args))
    if args.plot:
        from ..bench_plot import save_plot

        save_plot(report, args.plot)
    if args.report:  # what --json prints, in its order (a table drawn from it lists the runs as run)
        write_text_atomic(args.report, json.dumps(report) + "\n")
    if args.json:
        print(json.dumps(report))
    else:
        print(format_table(report))
    return 0
