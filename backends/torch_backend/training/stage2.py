"""Stage II: K-head calibration on the frozen backbone (FLUID_METHOD.md section 4).

Every anchor gets exactly ``K`` masks, no restoration (``fixed_k=K, restore=False``). The
frozen model's per-mask cross-entropies give each anchor its target stride ``k*``
(:func:`fluid_app.horizon.horizon_target`), softened into a Gaussian over classes
(:func:`fluid_app.horizon.soft_horizon_target`); the head, reading the anchor's final
hidden state, is trained with soft cross-entropy. Only the head has gradients.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fluid_app.errors import FluidError
from fluid_app.fluid_config import CONFIG_FILENAME
from fluid_app.horizon import horizon_target, soft_horizon_target
from fluid_app.layout import IGNORE_INDEX, Layout
from fluid_app.model_refs import K_HEAD_FILENAME, resolve_model

from ..k_head import KHead, save_k_head
from . import checkpoint as ckpt
from .collate import LayoutOptions, collate, make_layouts
from .distributed import Dist, wrap
from .loop import Plan, Step, check_max_len, cosine_scheduler, plan_steps, run_stage, run_steps
from .masks import build_attention_mask
from .model import FluidLossModule
from .options import fill_fluid_defaults
from .stage1 import LOG_FILE as STAGE1_LOG_FILE

LOG_FILE = "stage2_log.jsonl"


@dataclass
class Stage2Options:
    model: str
    data: str
    out: str
    k_max: int | None = None  # None: the checkpoint's
    tau: float | None = None  # None: FluidConfig's (so for sigma)
    sigma: float | None = None
    lr: float = 1e-3
    warmup_ratio: float = 0.0
    max_len: int = 1024
    batch_size: int = 2
    steps: int | None = None
    epochs: float | None = None
    holdout: float = 0.0
    limit: int | None = None
    bf16: bool = False
    seed: int = 0
    time_limit: float | None = None  # seconds from the start: train the head no longer (it is exported all the same)
    device: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        fill_fluid_defaults(self, ("tau", "sigma"))

    def validate(self) -> None:
        if self.sigma <= 0 or self.tau <= 0:
            raise FluidError(f"tau and sigma must be positive (got {self.tau} and {self.sigma}; the authors use "
                             "tau 2.8 for 7B, sigma 1.5)", "tau", "sigma")
        if self.batch_size < 1 or self.max_len < 1 or (self.k_max is not None and self.k_max < 1):
            raise FluidError(f"batch_size, max_len and k_max must be at least 1 (got {self.batch_size}, "
                             f"{self.max_len} and {self.k_max})", "batch_size", "max_len", "k_max")
        if self.steps is not None and self.steps < 1:
            raise FluidError(f"steps must be at least 1 (got {self.steps})", "steps")
        if self.time_limit is not None and self.time_limit <= 0:
            raise FluidError(f"time_limit must be a positive number of seconds (got {self.time_limit})",
                             "time_limit")


def horizon_targets(layouts: Sequence[Layout], mask_losses: torch.Tensor, k_max: int, tau: float,
                    sigma: float) -> tuple[list[tuple[int, int]], np.ndarray]:
    """Per anchor (row, main index): the soft target over ``k_max`` classes.

    ``layouts`` are the rows of the batch (collated from column 0, so a layout's slot index
    is its column); ``mask_losses`` is ``[B, L]`` with the cross-entropy of every labelled
    mask slot. A block ends at its first ignored label (end of the sequence or of the reply).
    """
    anchors: list[tuple[int, int]] = []
    targets = []
    losses = mask_losses.detach().float().cpu().numpy()
    for row, layout in enumerate(layouts):
        for anchor, block in layout.mask_blocks().items():
            existing = []
            for slot in block:
                if layout.labels[slot] == IGNORE_INDEX:
                    break
                existing.append(float(losses[row, slot]))
            if not existing:
                continue
            anchors.append((row, anchor))
            targets.append(soft_horizon_target(horizon_target(existing, tau), k_max, sigma))
    return anchors, np.array(targets, dtype=np.float32).reshape(-1, k_max)


def run_stage2(opts: Stage2Options) -> dict[str, Any]:
    return run_stage(opts, _train)


def _train(opts: Stage2Options, env: Dist, started: float) -> dict[str, Any]:
    from backends.torch_backend.loader import load as load_backend

    out = Path(opts.out).expanduser()
    spec = resolve_model(opts.model)
    dtype = "bfloat16" if opts.bf16 else "float32"
    backend = load_backend(spec, device=str(env.device), dtype=dtype, k_head=False, pack=False)
    backend.model.requires_grad_(False)
    check_max_len(opts.max_len, backend.max_context)
    k_max = opts.k_max or backend.fluid_config.k_max
    plan = plan_steps(opts, backend.tokenizer, env, per_rank=opts.batch_size, batch_flags="--batch-size")
    run = _Stage2Run.build(opts, env, backend, plan, k_max)
    if env.is_main:
        ckpt.clear_stale_temps(out)
    deadline = started + opts.time_limit if opts.time_limit else None
    last = run_steps(plan, env, opts, start=0, stop=plan.total, log_path=out / LOG_FILE, desc="stage2",
                     step=run.step, postfix=_postfix, deadline=deadline)
    done = int(last.get("step", 0))
    if env.is_main:
        _export(out, spec, backend.fluid_config, run.head, k_max, opts, done, len(plan.examples))
    env.barrier()
    return {"steps": done, "total_steps": plan.total, "last": last, "out": str(out),
            "examples": len(plan.examples), "rank": env.rank}


@dataclass
class _Stage2Run:
    """What a Stage II step uses: the frozen backbone and the K-head it trains."""

    opts: Stage2Options
    env: Dist
    plan: Plan
    k_max: int
    backbone: FluidLossModule
    lm_head: torch.nn.Module
    head: KHead
    trained: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    layout_options: LayoutOptions
    pad_token_id: int
    use_flex: bool

    @classmethod
    def build(cls, opts: Stage2Options, env: Dist, backend: Any, plan: Plan, k_max: int) -> "_Stage2Run":
        """A seeded K-head (wrapped for DDP), its optimizer and schedule; the backbone set to
        flex_attention on CUDA, SDPA elsewhere."""
        model, config = backend.model, backend.fluid_config
        torch.manual_seed(opts.seed)
        head = KHead(model.config.get_text_config().hidden_size, k_max).to(env.device)
        trained = wrap(head, env, fsdp=False, bf16=False)
        optimizer = torch.optim.AdamW(head.parameters(), lr=opts.lr)
        scheduler = cosine_scheduler(optimizer, opts.warmup_ratio, plan.total)
        use_flex = env.device.type == "cuda"
        model.set_attn_implementation("flex_attention" if use_flex else "sdpa")
        layout_options = LayoutOptions(mask_token_id=config.mask_token_id, k_max=k_max,
                                       vocab_size=backend.vocab_size, anchor_rate=config.anchor_rate,
                                       restore=False, fixed_k=k_max)
        return cls(opts, env, plan, k_max, FluidLossModule(model).eval(), model.get_output_embeddings(), head,
                   trained, optimizer, scheduler, layout_options, backend.tokenizer.pad_token_id or 0, use_flex)

    def step(self, step: Step) -> dict[str, Any]:
        """Score every mask with the frozen model, derive each anchor's soft target, train the head."""
        opts, env = self.opts, self.env
        layouts = make_layouts(self.plan.examples, step.indices, self.layout_options, seed=opts.seed, epoch=step.epoch)
        batch = collate(layouts, self.pad_token_id, 128 if self.use_flex else 1).to(env.device)
        with torch.no_grad():
            hidden = self.backbone.hidden_states(batch.input_ids, batch.position_ids,
                                                 build_attention_mask(batch, "flex" if self.use_flex else "sdpa"))
            mask_losses = torch.zeros(batch.labels.shape, device=env.device)
            scored = batch.is_mask & (batch.labels != IGNORE_INDEX)
            logits = self.lm_head(hidden[scored]).float()
            mask_losses[scored] = F.cross_entropy(logits, batch.labels[scored], reduction="none")
        anchors, targets = horizon_targets(layouts, mask_losses, self.k_max, opts.tau, opts.sigma)
        count = env.all_sum(torch.tensor([len(anchors)], dtype=torch.float64, device=env.device)).item()
        rows = torch.tensor([a[0] for a in anchors], dtype=torch.long, device=env.device)
        cols = torch.tensor([a[1] for a in anchors], dtype=torch.long, device=env.device)
        log_probs = F.log_softmax(self.trained(hidden[rows, cols].float()), dim=-1)
        target = torch.from_numpy(targets).to(env.device)
        loss_sum = -(target * log_probs).sum()
        (loss_sum * env.world_size / max(count, 1.0)).backward()
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        k_star = (target.argmax(-1) + 1).float().sum() if len(anchors) else torch.zeros((), device=env.device)
        sums = env.all_sum(torch.stack([loss_sum.detach().double(), k_star.double()])).tolist()
        return {"step": step.index + 1, "loss_k": sums[0] / max(count, 1.0), "mean_k_star": sums[1] / max(count, 1.0),
                "anchors": int(count), "lr": lr, "seconds": step.elapsed()}


def _postfix(record: dict[str, Any]) -> dict[str, str]:
    return {"loss_k": f"{record['loss_k']:.3f}", "k_star": f"{record['mean_k_star']:.2f}"}


def _export(out: Path, spec, config, head: KHead, k_max: int, opts: Stage2Options, steps: int,
            examples: int) -> None:
    """The input checkpoint's adapter/weights reference + the new head + an updated config
    (what only training needs, logs and resumable state, stays behind)."""
    tmp = ckpt.final_temp_dir(out)
    source = spec.adapter or (spec.fluid if spec.fluid == spec.base else None)
    if source is not None and Path(source).resolve() != out.resolve():
        left_behind = (CONFIG_FILENAME, K_HEAD_FILENAME, LOG_FILE, STAGE1_LOG_FILE)
        for item in Path(source).iterdir():
            if item.is_file() and item.name not in left_behind and not item.name.startswith(".") \
                    and not ckpt.is_training_state(item.name):
                shutil.copy2(item, tmp / item.name)
    base_model = config.base_model
    if spec.adapter is None and spec.fluid != spec.base:
        base_model = str(spec.base)
    save_k_head(head, tmp / K_HEAD_FILENAME)
    extra = dict(config.extra)
    extra["stage2"] = {"model": opts.model, "data": opts.data, "steps": steps, "examples": examples,
                       "tau": opts.tau, "sigma": opts.sigma, "lr": opts.lr, "seed": opts.seed}
    new_config = config.with_overrides(k_max=k_max, k_min=min(config.k_min, k_max), tau=opts.tau,
                                       sigma=opts.sigma, base_model=base_model)
    replace(new_config, extra=extra).save(tmp)
    ckpt.publish(tmp, out, last=CONFIG_FILENAME)
