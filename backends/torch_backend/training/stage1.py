"""Stage I: joint causal backbone training (FLUID_METHOD.md section 3).

One step = ``grad_accum`` micro-batches of ``batch_size`` examples per rank. Each example
gets its own layout; the loss is one token mean over every labelled slot of the *global*
batch (main and mask together), so one process, gradient accumulation and N ranks all take
the same step. ``loss_ar`` (main tokens) and ``loss_diff`` (masks) are logged apart.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DistributedSampler

from fluid_app.config import FluidConfig
from fluid_app.data import build_examples, read_conversations
from fluid_app.errors import FluidError
from fluid_app.sources import resolve_model

from . import checkpoint as ckpt
from .collate import LayoutOptions, collate, make_layouts
from .distributed import Dist, setup, teardown, wrap
from .masks import build_attention_mask
from .model import AR_LOSSES, FluidLossModule, attach_lora, causal_lm, load_base

LOG_FILE = "train_log.jsonl"


@dataclass
class Stage1Options:
    base: str
    data: str
    out: str
    full: bool = False
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    train_mask_embedding: bool = False
    ar_loss: str = "ce"  # ce: labels (the method) | kl: the frozen base's distribution (keeps perplexity)
    ar_weight: float = 1.0  # weight of the main-token loss; 1.0 is the method's plain sum L_AR + L_Diff
    mask_token_id: int | None = None
    k_max: int = 16
    k_min: int = 4
    anchor_rate: float = 0.5
    noise_rate: float = 0.1
    max_len: int = 1024
    batch_size: int = 2
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    steps: int | None = None
    epochs: float | None = None
    bf16: bool = False
    gradient_checkpointing: bool = False
    seed: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2
    resume: str | None = None
    stop_at_step: int | None = None
    holdout: float = 0.0
    limit: int | None = None
    attention: str = "auto"  # auto | flex | sdpa
    device: str = "auto"
    fsdp: bool = False
    progress: bool = True

    def validate(self) -> None:
        for name in ("k_max", "max_len", "batch_size", "grad_accum", "lora_rank"):
            if getattr(self, name) < 1:
                raise FluidError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        if self.lr <= 0:
            raise FluidError(f"--lr must be positive (got {self.lr})")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise FluidError(f"--warmup-ratio must be in [0, 1) (got {self.warmup_ratio})")
        if self.steps is not None and self.steps < 1 or self.epochs is not None and self.epochs <= 0:
            raise FluidError("--steps must be at least 1 and --epochs positive")
        if self.ar_weight < 0:
            raise FluidError(f"--ar-weight must be 0 or more (got {self.ar_weight})")
        if self.ar_loss not in AR_LOSSES:
            raise FluidError(f"unknown --ar-loss {self.ar_loss!r}; use {' or '.join(AR_LOSSES)}")
        if self.ar_loss == "kl" and self.full:
            raise FluidError("--ar-loss kl distils the frozen base (the LoRA adapter switched off); drop --full")
        if self.attention not in ("auto", "flex", "sdpa"):
            raise FluidError(f"unknown --attention {self.attention!r}; use auto, flex or sdpa")


def base_reference(base: str) -> str:
    """What fluid_config.json records as ``base_model``: an absolute path for local files, the
    package file for ``default`` (so the reference keeps meaning the *base* model)."""
    from fluid_app.sources import DEFAULT_BASE

    if base == "default":
        return DEFAULT_BASE
    path = Path(base).expanduser()
    return str(path.resolve()) if path.exists() else base


def run_stage1(opts: Stage1Options) -> dict[str, Any]:
    opts.validate()
    env = setup(opts.device)
    try:
        return _train(opts, env)
    finally:
        teardown(env)


def _check_resume(opts: Stage1Options, out: Path, global_batch: int | None = None) -> tuple[Path, dict] | None:
    if opts.resume is None:
        if (out / "fluid_config.json").exists() or (out / ckpt.CHECKPOINTS).exists():
            raise FluidError(f"{out} already holds a training run; pass --resume to continue it or another --out")
        return None
    folder = ckpt.find_resume_dir(opts.resume, out)
    state = ckpt.read_training_state(folder)
    saved = state["options"]
    if saved["base_model"] != base_reference(opts.base):
        raise FluidError(f"{folder} was trained from base {saved['base_model']}, not {base_reference(opts.base)}; "
                         "pass the same --base or another --resume folder")
    for name in ("full", "lora_rank", "k_max", "max_len", "seed"):
        if saved.get(name) != getattr(opts, name):
            raise FluidError(f"{folder} was trained with {name}={saved.get(name)}, not {getattr(opts, name)}; "
                             "resume with the same settings")
    if global_batch is not None and saved.get("global_batch") != global_batch:
        raise FluidError(f"{folder} used a global batch of {saved.get('global_batch')} examples, not {global_batch}; "
                         "keep batch size x grad accumulation x processes the same")
    return folder, state


def _train(opts: Stage1Options, env: Dist) -> dict[str, Any]:
    out = Path(opts.out).expanduser()
    spec = resolve_model(base_reference(opts.base))
    if spec.adapter is not None:
        raise FluidError(f"{opts.base} is a FLUID LoRA checkpoint; pass its base model "
                         f"({spec.base}) as --base, or --resume to continue that run")
    resume = _check_resume(opts, out)
    use_flex = opts.attention == "flex" or (opts.attention == "auto" and env.device.type == "cuda")
    attn_kind = "flex" if use_flex else "sdpa"
    dtype = torch.bfloat16 if opts.bf16 and not opts.full else torch.float32
    base = load_base(spec, dtype=dtype, attn_implementation="flex_attention" if use_flex else "sdpa",
                     mask_token_id=opts.mask_token_id)
    if opts.max_len > base.max_context:
        raise FluidError(f"--max-len {opts.max_len} is longer than the model context ({base.max_context} tokens); "
                         f"pass --max-len {base.max_context} or less")
    conversations = read_conversations(opts.data, holdout=opts.holdout, limit=opts.limit)
    examples = build_examples(conversations, base.tokenizer, max_len=opts.max_len, source=opts.data,
                              progress=env.is_main and opts.progress)
    global_batch = opts.batch_size * opts.grad_accum * env.world_size
    steps_per_epoch = len(examples) // global_batch
    if steps_per_epoch == 0:
        raise FluidError(f"{len(examples)} examples are fewer than one global batch ({global_batch}); "
                         "lower --batch-size/--grad-accum or add data")
    total = opts.steps if opts.steps is not None else max(1, math.ceil((opts.epochs or 1.0) * steps_per_epoch))
    resume = _check_resume(opts, out, global_batch)

    torch.manual_seed(opts.seed)
    model = base.model
    if opts.full:
        model.requires_grad_(True)
    else:
        model = attach_lora(model, rank=opts.lora_rank, alpha=opts.lora_alpha, dropout=opts.lora_dropout,
                            mask_token_id=base.mask_token_id,
                            train_mask_embedding=opts.train_mask_embedding or base.added_mask_token)
    if opts.gradient_checkpointing:
        causal_lm(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(env.device)
    module = FluidLossModule(model, ar_loss=opts.ar_loss)
    module.train()
    wrapped = wrap(module, env, fsdp=opts.fsdp, bf16=opts.bf16)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)
    from transformers import get_cosine_schedule_with_warmup

    scheduler = get_cosine_schedule_with_warmup(optimizer, int(opts.warmup_ratio * total), total)
    start = 0
    if resume is not None:
        ckpt.load_training_state(resume[0], env, module, optimizer, scheduler)
        start = int(resume[1]["step"])

    tokenizer = base.tokenizer
    layout_options = LayoutOptions(
        mask_token_id=base.mask_token_id, k_max=opts.k_max, vocab_size=int(causal_lm(model).get_output_embeddings().weight.shape[0]),
        special_ids=tuple(sorted(set(tokenizer.all_special_ids))), anchor_rate=opts.anchor_rate,
        noise_rate=opts.noise_rate)
    fluid_config = FluidConfig(
        mask_token_id=base.mask_token_id, k_min=min(opts.k_min, opts.k_max), k_max=opts.k_max,
        anchor_rate=opts.anchor_rate, noise_rate=opts.noise_rate, base_model=base_reference(opts.base),
        extra={"stage1": {**_metadata(opts), "examples": len(examples), "global_batch": global_batch,
                          "total_steps": total, "world_size": env.world_size}})
    sampler = DistributedSampler(range(len(examples)), num_replicas=env.world_size, rank=env.rank,
                                 shuffle=True, seed=opts.seed, drop_last=True)
    log = _TrainLog(out / LOG_FILE, start) if env.is_main else None
    autocast = (torch.autocast(env.device.type, dtype=torch.bfloat16) if opts.bf16
                else contextlib.nullcontext())
    pad_multiple = 128 if use_flex else 1
    stop = min(total, opts.stop_at_step) if opts.stop_at_step else total
    bar = _progress(total, start, enabled=env.is_main and opts.progress)
    order_epoch, order = -1, []
    last: dict[str, Any] = {}
    per_rank = opts.batch_size * opts.grad_accum
    for step in range(start, stop):
        started = time.perf_counter()
        epoch, in_epoch = divmod(step, steps_per_epoch)
        if epoch != order_epoch:
            sampler.set_epoch(epoch)
            order, order_epoch = list(sampler), epoch
        first = in_epoch * per_rank
        micro = [order[first + m * opts.batch_size: first + (m + 1) * opts.batch_size] for m in range(opts.grad_accum)]
        batches = [collate(make_layouts(examples, ix, layout_options, seed=opts.seed, epoch=epoch),
                           tokenizer.pad_token_id, pad_multiple).to(env.device) for ix in micro]
        local_count = sum(int((b.labels != -100).sum()) for b in batches)
        global_count = float(env.all_sum(torch.tensor([local_count], dtype=torch.float64, device=env.device)).item())
        sums = torch.zeros(5, dtype=torch.float64, device=env.device)
        for m, batch in enumerate(batches):
            sync = m == len(batches) - 1
            with _no_sync(wrapped, opts.fsdp, sync), autocast:
                mask = build_attention_mask(batch, attn_kind)
                s_ar, s_diff, n_ar, n_diff = wrapped(batch.input_ids, batch.position_ids, mask, batch.labels,
                                                     batch.is_mask)
                loss = (opts.ar_weight * s_ar + s_diff) * (env.world_size / global_count)
            loss.backward()
            sums += torch.stack([s_ar.detach().double(), s_diff.detach().double(), n_ar.double(), n_diff.double(),
                                 torch.tensor(batch.num_tokens, dtype=torch.float64, device=env.device)])
        grad_norm = torch.nn.utils.clip_grad_norm_(params, opts.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        sums = env.all_sum(sums).tolist()
        seconds = time.perf_counter() - started
        last = {"step": step + 1, "loss_ar": sums[0] / max(sums[2], 1), "loss_diff": sums[1] / max(sums[3], 1),
                "loss": (sums[0] + sums[1]) / max(sums[2] + sums[3], 1), "lr": lr,
                "grad_norm": float(grad_norm), "tokens_per_s": sums[4] / seconds, "epoch": epoch}
        if log:
            log.write(last)
        bar.update(1)
        bar.set_postfix(loss_ar=f"{last['loss_ar']:.3f}", loss_diff=f"{last['loss_diff']:.3f}",
                        lr=f"{lr:.2e}", tok_s=f"{last['tokens_per_s']:.0f}")
        done = step + 1
        periodic = opts.save_every and done % opts.save_every == 0 and done < total
        if periodic or (done == stop and stop < total):
            state = {"step": done, "options": {**_metadata(opts), "global_batch": global_batch}}
            # LoRA step folders are also loadable FLUID checkpoints (small); full weights are not doubled
            export = None if opts.full else (
                lambda folder, weights: ckpt.export_fluid(folder, model, tokenizer, weights, fluid_config, full=False))
            ckpt.save_training_state(out / ckpt.CHECKPOINTS / f"step-{done:07d}", env, module, optimizer,
                                     scheduler, state, export=export)
            if env.is_main:
                ckpt.prune(out / ckpt.CHECKPOINTS, opts.keep_checkpoints)
    bar.close()
    if stop == total:
        weights = ckpt.trainable_state(module)
        if env.is_main:
            tmp = ckpt.new_temp_dir(out / ".final")
            ckpt.export_fluid(tmp, model, tokenizer, weights, fluid_config, full=opts.full)
            ckpt.publish(tmp, out, last="fluid_config.json")
        env.barrier()
    return {"steps": stop, "total_steps": total, "last": last, "out": str(out), "examples": len(examples),
            "rank": env.rank}


def _metadata(opts: Stage1Options) -> dict[str, Any]:
    meta = asdict(opts)
    meta["base_model"] = base_reference(opts.base)
    for name in ("resume", "stop_at_step", "progress", "device", "out"):
        meta.pop(name, None)
    return meta


def _no_sync(wrapped, fsdp: bool, sync: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    if fsdp and hasattr(wrapped, "set_requires_gradient_sync"):
        wrapped.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    if not sync and hasattr(wrapped, "no_sync"):
        return wrapped.no_sync()
    return contextlib.nullcontext()


def _progress(total: int, initial: int, enabled: bool, desc: str = "stage1"):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, unit="step", dynamic_ncols=True)


class _TrainLog:
    """``train_log.jsonl``: one line per step; on resume, lines past the resumed step are dropped."""

    def __init__(self, path: Path, start: int):
        self.path = path
        if path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= start]
            from fluid_app.files import write_text_atomic

            write_text_atomic(path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
