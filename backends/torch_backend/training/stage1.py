"""Stage I: joint causal backbone training (FLUID_METHOD.md section 3).

One step = ``grad_accum`` micro-batches of ``batch_size`` examples per rank. Each example
gets its own layout; the loss is one token mean over every labelled slot of the *global*
batch (main and mask together), so one process, gradient accumulation and N ranks all take
the same step. ``loss_ar`` (main tokens) and ``loss_diff`` (masks) are logged apart.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from fluid_app.errors import FluidError
from fluid_app.fluid_config import CONFIG_FILENAME, FluidConfig
from fluid_app.layout import IGNORE_INDEX
from fluid_app.model_refs import ModelSpec, resolve_model

from . import checkpoint as ckpt
from .collate import LayoutOptions, collate, make_layouts
from .distributed import Dist, wrap
from .evaluate import DraftEvaluator, held_out_examples
from .loop import Plan, Step, check_max_len, cosine_scheduler, plan_steps, run_stage, run_steps
from .masks import build_attention_mask
from .model import (
    AR_LOSSES,
    MASK_LOSSES,
    FluidLossModule,
    LoadedBase,
    attach_lora,
    causal_lm,
    load_base,
    start_from_adapter,
)
from .options import fill_fluid_defaults

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
    init_adapter: str | None = None  # a FLUID LoRA checkpoint whose adapter the run starts from
    ar_loss: str = "ce"  # ce: labels (the method) | kl: the frozen base's distribution (keeps perplexity)
    ar_weight: float = 1.0  # weight of the main-token loss; 1.0 is the method's plain sum L_AR + L_Diff
    mask_loss: str = "ce"  # ce: labels (the method) | kl: the model's own next-token distribution there
    mask_token_id: int | None = None
    k_max: int | None = None  # None: FluidConfig's (so for the next three)
    k_min: int | None = None
    anchor_rate: float | None = None
    noise_rate: float | None = None
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
    time_limit: float | None = None  # seconds from the start: stop (saving, as stop_at_step) after the step past it
    eval_every: int = 0  # held-out draft quality every N steps and at the end (0: off); needs holdout > 0
    eval_count: int = 32  # held-out conversations it reads at most
    holdout: float = 0.0
    limit: int | None = None
    attention: str = "auto"  # auto | flex | sdpa
    device: str = "auto"
    fsdp: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        fill_fluid_defaults(self, ("k_max", "k_min", "anchor_rate", "noise_rate"))

    def validate(self) -> None:
        for name in ("k_max", "max_len", "batch_size", "grad_accum", "lora_rank"):
            if getattr(self, name) < 1:
                raise FluidError(f"{name} must be at least 1 (got {getattr(self, name)})", name)
        if self.lr <= 0:
            raise FluidError(f"lr must be positive (got {self.lr})", "lr")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise FluidError(f"warmup_ratio must be in [0, 1) (got {self.warmup_ratio})", "warmup_ratio")
        if self.steps is not None and self.steps < 1 or self.epochs is not None and self.epochs <= 0:
            raise FluidError(f"steps must be at least 1 and epochs positive (got {self.steps} and {self.epochs})",
                             "steps", "epochs")
        if self.ar_weight < 0:
            raise FluidError(f"ar_weight must be 0 or more (got {self.ar_weight})", "ar_weight")
        if self.ar_loss not in AR_LOSSES:
            raise FluidError(f"unknown ar_loss {self.ar_loss!r}; use {' or '.join(AR_LOSSES)}", "ar_loss")
        if self.mask_loss not in MASK_LOSSES:
            raise FluidError(f"unknown mask_loss {self.mask_loss!r}; use {' or '.join(MASK_LOSSES)}", "mask_loss")
        if self.init_adapter is not None and self.full:
            raise FluidError("init_adapter starts a LoRA adapter from a checkpoint's; full fine-tuning trains "
                             "no adapter: drop --full or --init-adapter", "init_adapter", "full")
        if self.ar_loss == "kl" and self.full:
            raise FluidError("ar_loss 'kl' distils the frozen base (the LoRA adapter switched off), which full "
                             "fine-tuning has not got; train a LoRA adapter or use ar_loss 'ce'", "ar_loss", "full")
        if self.attention not in ("auto", "flex", "sdpa"):
            raise FluidError(f"unknown attention {self.attention!r}; use auto, flex or sdpa", "attention")
        if self.time_limit is not None and self.time_limit <= 0:
            raise FluidError(f"time_limit must be a positive number of seconds (got {self.time_limit})",
                             "time_limit")
        if self.eval_every < 0 or self.eval_count < 1:
            raise FluidError(f"eval_every must be 0 (off) or more and eval_count at least 1 "
                             f"(got {self.eval_every} and {self.eval_count})", "eval_every", "eval_count")
        if self.eval_every and not self.holdout:
            raise FluidError("eval_every scores held-out replies: set holdout (e.g. 0.02, the last 2% of the "
                             "records) or turn eval_every off (0)", "eval_every", "holdout")


def base_reference(base: str) -> str:
    """What fluid_config.json records as ``base_model``: an absolute path for local files, the
    package file for ``default`` (so the reference keeps meaning the *base* model)."""
    from fluid_app.model_refs import DEFAULT_BASE

    if base == "default":
        return DEFAULT_BASE
    path = Path(base).expanduser()
    return str(path.resolve()) if path.exists() else base


def run_stage1(opts: Stage1Options) -> dict[str, Any]:
    return run_stage(opts, _train)


def _check_resume(opts: Stage1Options, out: Path, global_batch: int | None = None) -> tuple[Path, dict] | None:
    """The checkpoint to resume and its state, checked against ``opts``; ``None`` to start
    from step 0 (refused where ``out`` holds a finished run or checkpoint not asked for)."""
    folder = ckpt.find_resume_dir(opts.resume, out) if opts.resume is not None else None
    if folder is None:
        if ckpt.holds_run(out):
            raise FluidError(f"{out} already holds a training run; resume it or choose another output folder",
                             "resume", "out")
        return None
    state = ckpt.read_training_state(folder)
    saved = state["options"]
    if saved.get("base_model") != base_reference(opts.base):
        raise FluidError(f"{folder} was trained from base {saved.get('base_model')}, not {base_reference(opts.base)}; "
                         "pass the same --base or another --resume folder")
    for name in ("full", "lora_rank", "k_max", "max_len", "seed"):
        if saved.get(name) != getattr(opts, name):
            raise FluidError(f"{folder} was trained with {name}={saved.get(name)}, not {getattr(opts, name)}; "
                             "resume with the same settings")
    if global_batch is not None and saved.get("global_batch") != global_batch:
        raise FluidError(f"{folder} used a global batch of {saved.get('global_batch')} examples, not {global_batch}; "
                         "keep batch size x grad accumulation x processes the same")
    return folder, state


def _train(opts: Stage1Options, env: Dist, started: float) -> dict[str, Any]:
    out = Path(opts.out).expanduser()
    spec = resolve_model(base_reference(opts.base))
    if spec.adapter is not None:
        raise FluidError(f"{opts.base} is a FLUID LoRA checkpoint; pass its base model "
                         f"({spec.base}) as --base, or --resume to continue that run")
    _check_resume(opts, out)
    use_flex = opts.attention == "flex" or (opts.attention == "auto" and env.device.type == "cuda")
    dtype = torch.bfloat16 if opts.bf16 and not opts.full else torch.float32
    base = load_base(spec, dtype=dtype, attn_implementation="flex_attention" if use_flex else "sdpa",
                     mask_token_id=opts.mask_token_id)
    check_max_len(opts.max_len, base.max_context)
    plan = plan_steps(opts, base.tokenizer, env, per_rank=opts.batch_size * opts.grad_accum,
                      batch_flags="--batch-size/--grad-accum")
    resume = _check_resume(opts, out, plan.global_batch)
    start_adapter = _start_adapter(opts, spec, base) if opts.init_adapter is not None and resume is None else None
    run = _Stage1Run.build(opts, env, base, plan, out, "flex" if use_flex else "sdpa", start_adapter)
    if opts.eval_every:
        run.evaluator = _evaluator(opts, env, base, run.attn_kind)
    start = 0
    if resume is not None:
        ckpt.load_training_state(resume[0], env, run.module, run.optimizer, run.scheduler)
        start = int(resume[1]["step"])
    elif opts.resume is not None and env.is_main:
        print(f"note: {out} holds no finished checkpoint to resume; starting from step 0", file=sys.stderr)
    if env.is_main:
        ckpt.clear_stale_temps(out)
    deadline = started + opts.time_limit if opts.time_limit else None
    last = run_steps(plan, env, opts, start=start, stop=run.stop, log_path=out / LOG_FILE, desc="stage1",
                     step=run.step, postfix=_postfix, after_step=run.after_step, deadline=deadline)
    done = int(last.get("step", start))
    if done == plan.total:
        run.export_final()
    return {"steps": done, "total_steps": plan.total, "last": last, "eval": run.last_eval, "out": str(out),
            "examples": len(plan.examples), "rank": env.rank}


def _start_adapter(opts: Stage1Options, spec: ModelSpec, base: LoadedBase) -> Path:
    """The adapter folder of ``--init-adapter``'s checkpoint, checked to belong to this run's base
    model and MASK token (its drafts were learned for that token)."""
    start = resolve_model(opts.init_adapter)
    if start.adapter is None:
        raise FluidError(f"{opts.init_adapter} has no LoRA adapter to start from; pass a FLUID LoRA checkpoint "
                         "('default', or a folder that Stage I or fluid export wrote)", "init_adapter")
    if start.base != spec.base:
        raise FluidError(f"{opts.init_adapter} adapts {start.base}, not this run's base {spec.base}; pass its "
                         "base as --base", "init_adapter", "base")
    mask = start.fluid_config.mask_token_id if start.fluid_config is not None else None
    if mask is not None and mask != base.mask_token_id:
        raise FluidError(f"{opts.init_adapter} drafts with MASK token {mask}, this run with {base.mask_token_id}; "
                         f"pass --mask-token-id {mask}", "init_adapter", "mask_token_id")
    return start.adapter


def _evaluator(opts: Stage1Options, env: Dist, base: LoadedBase, attn_kind: str) -> DraftEvaluator:
    """The scorer ``--eval-every`` runs, on :func:`.evaluate.held_out_examples`; an empty held-out
    split is an error naming both options."""
    examples = held_out_examples(opts.data, base.tokenizer, holdout=opts.holdout, count=opts.eval_count,
                                 max_len=opts.max_len)
    if not examples:
        raise FluidError(f"the held-out split of {opts.data} is empty (holdout {opts.holdout} of its records "
                         "rounds down to none); raise holdout or turn eval_every off", "holdout", "eval_every")
    return DraftEvaluator(examples, mask_token_id=base.mask_token_id, k=opts.k_max, batch_size=opts.batch_size,
                          pad_token_id=base.tokenizer.pad_token_id, attn_kind=attn_kind, device=env.device,
                          bf16=opts.bf16)


@dataclass
class _Stage1Run:
    """What a Stage I step and its checkpoints use."""

    opts: Stage1Options
    env: Dist
    plan: Plan
    out: Path
    model: Any
    module: FluidLossModule
    wrapped: torch.nn.Module
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    tokenizer: Any
    layout_options: LayoutOptions
    fluid_config: FluidConfig
    attn_kind: str
    autocast: Any
    stop: int
    evaluator: DraftEvaluator | None = None
    last_eval: dict[str, Any] | None = None

    @classmethod
    def build(cls, opts: Stage1Options, env: Dist, base: LoadedBase, plan: Plan, out: Path,
              attn_kind: str, start_adapter: Path | None = None) -> "_Stage1Run":
        """The model to train (LoRA or full, seeded; the adapter from ``start_adapter`` when given),
        wrapped for DDP/FSDP, its optimizer and schedule."""
        torch.manual_seed(opts.seed)
        model = base.model
        if opts.full:
            model.requires_grad_(True)
        else:
            model = attach_lora(model, rank=opts.lora_rank, alpha=opts.lora_alpha, dropout=opts.lora_dropout,
                                mask_token_id=base.mask_token_id,
                                train_mask_embedding=opts.train_mask_embedding or base.added_mask_token)
            if start_adapter is not None:
                start_from_adapter(model, start_adapter, rank=opts.lora_rank, alpha=opts.lora_alpha)
        if opts.gradient_checkpointing:
            causal_lm(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.to(env.device)
        module = FluidLossModule(model, ar_loss=opts.ar_loss, mask_loss=opts.mask_loss)
        module.train()
        wrapped = wrap(module, env, fsdp=opts.fsdp, bf16=opts.bf16)
        params = [p for p in module.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)
        scheduler = cosine_scheduler(optimizer, opts.warmup_ratio, plan.total)
        tokenizer = base.tokenizer
        vocab_size = int(causal_lm(model).get_output_embeddings().weight.shape[0])
        layout_options = LayoutOptions(
            mask_token_id=base.mask_token_id, k_max=opts.k_max, vocab_size=vocab_size,
            special_ids=tuple(sorted(set(tokenizer.all_special_ids))), anchor_rate=opts.anchor_rate,
            noise_rate=opts.noise_rate)
        fluid_config = FluidConfig(
            mask_token_id=base.mask_token_id, k_min=min(opts.k_min, opts.k_max), k_max=opts.k_max,
            anchor_rate=opts.anchor_rate, noise_rate=opts.noise_rate, base_model=base_reference(opts.base),
            extra={"stage1": {**_metadata(opts), "examples": len(plan.examples), "global_batch": plan.global_batch,
                              "total_steps": plan.total, "world_size": env.world_size}})
        autocast = torch.autocast(env.device.type, dtype=torch.bfloat16) if opts.bf16 else contextlib.nullcontext()
        stop = min(plan.total, opts.stop_at_step) if opts.stop_at_step else plan.total
        return cls(opts, env, plan, out, model, module, wrapped, params, optimizer, scheduler, tokenizer,
                   layout_options, fluid_config, attn_kind, autocast, stop)

    def step(self, step: Step) -> dict[str, Any]:
        """``grad_accum`` micro-batches, one token-mean loss over the global batch, one update."""
        opts, env = self.opts, self.env
        micro = [step.indices[m * opts.batch_size:(m + 1) * opts.batch_size] for m in range(opts.grad_accum)]
        pad_multiple = 128 if self.attn_kind == "flex" else 1
        batches = [collate(make_layouts(self.plan.examples, ix, self.layout_options, seed=opts.seed, epoch=step.epoch),
                           self.tokenizer.pad_token_id, pad_multiple).to(env.device) for ix in micro]
        local_count = sum(int((b.labels != IGNORE_INDEX).sum()) for b in batches)
        global_count = float(env.all_sum(torch.tensor([local_count], dtype=torch.float64, device=env.device)).item())
        sums = torch.zeros(5, dtype=torch.float64, device=env.device)
        for m, batch in enumerate(batches):
            sync = m == len(batches) - 1
            with _no_sync(self.wrapped, opts.fsdp, sync), self.autocast:
                mask = build_attention_mask(batch, self.attn_kind)
                s_ar, s_diff, n_ar, n_diff = self.wrapped(batch.input_ids, batch.position_ids, mask, batch.labels,
                                                          batch.is_mask)
                loss = (opts.ar_weight * s_ar + s_diff) * (env.world_size / global_count)
            loss.backward()
            sums += torch.stack([s_ar.detach().double(), s_diff.detach().double(), n_ar.double(), n_diff.double(),
                                 torch.tensor(batch.num_tokens, dtype=torch.float64, device=env.device)])
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, opts.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        sums = env.all_sum(sums).tolist()
        return {"step": step.index + 1, "loss_ar": sums[0] / max(sums[2], 1), "loss_diff": sums[1] / max(sums[3], 1),
                "loss": (sums[0] + sums[1]) / max(sums[2] + sums[3], 1), "lr": lr,
                "grad_norm": float(grad_norm), "tokens_per_s": sums[4] / step.elapsed(), "epoch": step.epoch,
                "seconds": step.elapsed()}

    def after_step(self, done: int, final: bool) -> dict[str, Any] | None:
        """Evaluate if due (its record is returned, to be logged), then save if due: a
        checkpoint of step N then always follows the evaluation of step N in the log."""
        record = self.evaluate_if_due(done, final)
        self.save_if_due(done, final)
        return record

    def evaluate_if_due(self, done: int, final: bool) -> dict[str, Any] | None:
        """Held-out draft quality every ``--eval-every`` steps and after the last step of the run."""
        every = self.opts.eval_every
        if self.evaluator is None or not every or not (done % every == 0 or final):
            return None
        quality = self.evaluator(self.module)
        self.last_eval = {"step": done, "eval": quality.record()}
        return self.last_eval

    def save_if_due(self, done: int, final: bool) -> None:
        """A resumable checkpoint every ``--save-every`` steps and where the run stops early
        (``--stop-at-step`` or ``--time-limit``)."""
        opts, total = self.opts, self.plan.total
        periodic = opts.save_every and done % opts.save_every == 0 and done < total
        if not (periodic or (final and done < total)):
            return
        state = {"step": done, "options": {**_metadata(opts), "global_batch": self.plan.global_batch}}
        # LoRA step folders are also loadable FLUID checkpoints (small); full weights are not doubled
        export = None if opts.full else (
            lambda folder, weights: ckpt.export_fluid(folder, self.model, self.tokenizer, weights, self.fluid_config,
                                                      full=False))
        ckpt.save_training_state(self.out / ckpt.CHECKPOINTS / f"step-{done:07d}", self.env, self.module,
                                 self.optimizer, self.scheduler, state, export=export)
        if self.env.is_main:
            ckpt.prune(self.out / ckpt.CHECKPOINTS, opts.keep_checkpoints)

    def export_final(self) -> None:
        weights = ckpt.trainable_state(self.module)
        if self.env.is_main:
            tmp = ckpt.final_temp_dir(self.out)
            ckpt.export_fluid(tmp, self.model, self.tokenizer, weights, self.fluid_config, full=self.opts.full)
            ckpt.publish(tmp, self.out, last=CONFIG_FILENAME)
        self.env.barrier()


def _postfix(record: dict[str, Any]) -> dict[str, str]:
    """What the progress bar shows: a step's losses, or an evaluation's offset-1 accuracy and run."""
    if "eval" in record:
        first = record["eval"]["accuracy"][0]
        return {"acc1": "-" if first is None else f"{first:.2f}", "run": f"{record['eval']['mean_accepted_run']:.2f}"}
    return {"loss_ar": f"{record['loss_ar']:.3f}", "loss_diff": f"{record['loss_diff']:.3f}",
            "lr": f"{record['lr']:.2e}", "tok_s": f"{record['tokens_per_s']:.0f}"}


def _metadata(opts: Stage1Options) -> dict[str, Any]:
    meta = asdict(opts)
    meta["base_model"] = base_reference(opts.base)
    for name in ("resume", "stop_at_step", "time_limit", "eval_every", "eval_count", "progress", "device", "out"):
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
