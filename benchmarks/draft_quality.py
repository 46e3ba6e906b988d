"""Held-out draft quality of a finished checkpoint, scored as Stage I's ``--eval-every`` scores it.

Why: a training run logs its masks' top-1 accuracy at offsets 1..K and the mean accepted run
on held-out replies, but only for the run itself. Comparing runs with a model trained
elsewhere (the shipped default, a GPU run) needs the same figure for any loadable folder, on
the same held-out conversations. Run from the repository root::

    python benchmarks/draft_quality.py --model default \\
        --data recipes/default/sharegpt_selfdistill_gpu.jsonl.gz --holdout 0.01 --eval-count 32

``--data``, ``--holdout``, ``--eval-count``, ``--k-max`` and ``--max-len`` mean what they mean
to ``fluid train stage1``, so the conversations scored are those of a run with the same
values. The weights are loaded in float32 and scored under bfloat16 autocast, as Stage I's
CPU runs (``"bf16": true``) score them. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="a loadable FLUID checkpoint (default: the embedded one)")
    parser.add_argument("--data", required=True, help="the replies a Stage I run trained on")
    parser.add_argument("--holdout", type=float, default=0.01, help="the run's --holdout")
    parser.add_argument("--eval-count", type=int, default=32, help="the run's --eval-count")
    parser.add_argument("--k-max", type=int, default=8, help="mask slots per block (the run's --k-max)")
    parser.add_argument("--max-len", type=int, default=512, help="the run's --max-len")
    args = parser.parse_args()

    import torch

    from backends.torch_backend.loader import load
    from backends.torch_backend.training.evaluate import DraftEvaluator, held_out_examples
    from backends.torch_backend.training.model import FluidLossModule
    from fluid_app.errors import FluidError
    from fluid_app.model_refs import resolve_model

    try:
        backend = load(resolve_model(args.model), device="cpu", dtype="float32", pack=False)
        tokenizer = backend.tokenizer
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        examples = held_out_examples(args.data, tokenizer, holdout=args.holdout, count=args.eval_count,
                                     max_len=args.max_len)
        if not examples:
            raise FluidError(f"the held-out split of {args.data} is empty; raise --holdout", "holdout")
    except FluidError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    backend.model.set_attn_implementation("sdpa")
    evaluator = DraftEvaluator(examples, mask_token_id=int(backend.mask_token_id), k=args.k_max, batch_size=1,
                               pad_token_id=tokenizer.pad_token_id, attn_kind="sdpa", device=torch.device("cpu"),
                               bf16=True)
    quality = evaluator(FluidLossModule(backend.model).eval())
    print(json.dumps({"model": args.model, **quality.record()}))


if __name__ == "__main__":
    main()
