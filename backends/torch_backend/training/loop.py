"""The training loop Stage I and Stage II share; each stage supplies only its step.

Which examples a step sees (DistributedSampler's order for the step's epoch, this rank's
slice of it), how many steps a run has, the progress bar, the per-step JSONL log and the
step timer are the same for both stages, so they live here once: the two stages cannot
drift apart, and a resumed run replays exactly the order an uninterrupted one would.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from torch.utils.data import DistributedSampler

from fluid_app.data import Example, build_examples, read_conversations
from fluid_app.errors import FluidError
from fluid_app.files import write_text_atomic

from .distributed import Dist, setup, teardown


class LoopOptions(Protocol):
    """The options both stages' data and loop read."""

    data: str
    holdout: float
    limit: int | None
    max_len: int
    steps: int | None
    epochs: float | None
    seed: int
    progress: bool


@dataclass(frozen=True)
class Plan:
    """The training examples and the steps they make: ``per_rank`` examples per rank and step."""

    examples: list[Example]
    per_rank: int
    global_batch: int
    steps_per_epoch: int
    total: int


@dataclass(frozen=True)
class Step:
    """What one optimizer step is given: its 0-based number, its epoch, this rank's examples."""

    index: int
    epoch: int
    indices: list[int]
    started: float

    def elapsed(self) -> float:
        """Seconds since the step began (its data and layouts included)."""
        return time.perf_counter() - self.started


def run_stage(opts: Any, train: Callable[[Any, Dist, float], dict[str, Any]]) -> dict[str, Any]:
    """What both stages' entry points do around ``train(opts, env, started)``: note the start
    (``--time-limit`` counts from it), check the options, join the process group torchrun
    describes (if any), and leave it however training ends."""
    started = time.perf_counter()
    opts.validate()
    env = setup(opts.device)
    try:
        return train(opts, env, started)
    finally:
        teardown(env)


def check_max_len(max_len: int, context: int) -> None:
    if max_len > context:
        raise FluidError(f"max_len {max_len} is longer than the model context ({context} tokens); "
                         f"use {context} or less", "max_len")


def plan_steps(opts: LoopOptions, tokenizer: Any, env: Dist, *, per_rank: int, batch_flags: str) -> Plan:
    """Read and tokenize the data; the run is ``--steps`` steps, else ``--epochs`` (default 1)
    passes over it. ``batch_flags`` names the flags that set ``per_rank``, for the error."""
    conversations = read_conversations(opts.data, holdout=opts.holdout, limit=opts.limit)
    examples = build_examples(conversations, tokenizer, max_len=opts.max_len, source=opts.data,
                              progress=env.is_main and opts.progress)
    global_batch = per_rank * env.world_size
    steps_per_epoch = len(examples) // global_batch
    if steps_per_epoch == 0:
        raise FluidError(f"{len(examples)} examples are fewer than one global batch ({global_batch}); "
                         f"lower {batch_flags} or add data")
    total = opts.steps if opts.steps is not None else max(1, math.ceil((opts.epochs or 1.0) * steps_per_epoch))
    return Plan(examples, per_rank, global_batch, steps_per_epoch, total)


def cosine_scheduler(optimizer: torch.optim.Optimizer, warmup_ratio: float, total: int):
    """Linear warm-up over ``warmup_ratio`` of the steps, then cosine decay to zero (authors' recipe)."""
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, int(warmup_ratio * total), total)


def run_steps(plan: Plan, env: Dist, opts: LoopOptions, *, start: int, stop: int, log_path: Path, desc: str,
              step: Callable[[Step], dict[str, Any]], postfix: Callable[[dict[str, Any]], dict[str, str]],
              after_step: Callable[[int, bool], dict[str, Any] | None] | None = None,
              deadline: float | None = None) -> dict[str, Any]:
    """Run steps ``start..stop-1``; log each step's record; return the last one.

    ``step`` does one optimizer step and returns its log record; ``postfix`` picks what the
    progress bar shows of a record; ``after_step(done, final)`` runs after each (Stage I
    evaluates and saves there) and may return one more record to log (an evaluation), whose
    postfix stays on the bar until the next one. ``final`` is true after the last step of
    this run: step ``stop``, or the first step that ends past ``deadline``
    (``time.perf_counter()`` seconds), where the run stops early.
    """
    sampler = DistributedSampler(range(len(plan.examples)), num_replicas=env.world_size, rank=env.rank,
                                 shuffle=True, seed=opts.seed, drop_last=True)
    log = TrainLog(log_path, start) if env.is_main else None
    bar = progress_bar(plan.total, start, enabled=env.is_main and opts.progress, desc=desc)
    order_epoch, order, last = -1, [], {}
    shown: dict[str, str] = {}
    for index in range(start, stop):
        started = time.perf_counter()
        epoch, in_epoch = divmod(index, plan.steps_per_epoch)
        if epoch != order_epoch:
            sampler.set_epoch(epoch)
            order, order_epoch = list(sampler), epoch
        indices = order[in_epoch * plan.per_rank:(in_epoch + 1) * plan.per_rank]
        last = step(Step(index, epoch, indices, started))
        final = index + 1 == stop or _past(deadline, env)
        shown.update(_logged(log, last, postfix))  # before after_step: a step is logged before it is saved
        extra = after_step(index + 1, final) if after_step is not None else None
        if extra is not None:
            shown.update(_logged(log, extra, postfix))
        bar.update(1)
        bar.set_postfix(**shown)
        if final:
            break
    bar.close()
    return last


def _logged(log: "TrainLog | None", record: dict[str, Any],
            postfix: Callable[[dict[str, Any]], dict[str, str]]) -> dict[str, str]:
    """Write ``record`` to the log (main rank) and return what the progress bar shows of it."""
    if log is not None:
        log.write(record)
    return postfix(record)


def _past(deadline: float | None, env: Dist) -> bool:
    """Whether ``deadline`` has passed on any rank (so that all ranks stop after the same step)."""
    if deadline is None:
        return False
    late = torch.tensor([float(time.perf_counter() >= deadline)], device=env.device)
    return bool(env.all_sum(late).item() > 0)


def progress_bar(total: int, initial: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, unit="step", dynamic_ncols=True)


class TrainLog:
    """A JSONL log, one line per step. Opening it for a run starting at ``start`` keeps only
    the lines of steps up to ``start`` (a resumed run rewrites what followed).

    Lines are appended (rewriting the file every step would cost its whole size each time),
    so a crash can leave a torn last line; it belongs to a step after the last checkpoint
    and is dropped when the run is resumed. A damaged line elsewhere is reported.
    """

    def __init__(self, path: Path, start: int):
        self.path = path
        if path.exists():
            kept = self._lines_up_to(start) if start > 0 else []
            write_text_atomic(path, "".join(line + "\n" for line in kept))

    def _lines_up_to(self, start: int) -> list[str]:
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        kept = []
        for number, line in enumerate(lines, 1):
            try:
                step = json.loads(line)["step"]
            except (ValueError, TypeError, KeyError):
                if number == len(lines):
                    break  # torn by a crash mid-write
                raise FluidError(f"line {number} of {self.path} is not a step record; fix or delete that line "
                                 "and resume again") from None
            if step <= start:
                kept.append(line)
        return kept

    def write(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
