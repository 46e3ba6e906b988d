"""Stage II: K-head calibration on the frozen backbone (FLUID_METHOD.md section 4).

Every anchor gets exactly ``K`` masks, no restoration (``fixed_k=K, restore=False``). The
frozen model's per-mask cross-entropies give each anchor its target stride ``k*``
(:func:`fluid_app.horizon.horizon_target`), softened into a Gaussian over classes
(:func:`fluid_app.horizon.soft_horizon_target`); the head, reading the anchor's final
hidden state, is trained with soft cross-entropy. Only the head has gradients.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler

from fluid_app.data import build_examples, read_conversations
from fluid_app.errors import FluidError
from fluid_app.horizon import horizon_target, soft_horizon_target
from fluid_app.layout import IGNORE_INDEX
from fluid_app.sources import K_HEAD_FILENAME, resolve_model

from ..k_head import KHead, save_k_head
from . import checkpoint as ckpt
from .collate import Batch, LayoutOptions, collate, make_layouts
from .distributed import Dist, setup, teardown, wrap
from .masks import build_attention_mask
from .model import FluidLossModule

LOG_FILE = "stage2_log.jsonl"


@dataclass
class Stage2Options:
    model: str
    data: str
    out: str
    k_max: int | None = None
    tau: float = 2.8
    sigma: float = 1.5
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
    device: str = "auto"
    progress: bool = True

    def validate(self) -> None:
        if self.sigma <= 0 or self.tau <= 0:
            raise FluidError("--tau and --sigma must be positive (authors: tau 2.8 for 7B, sigma 1.5)")
        if self.batch_size < 1 or self.max_len < 1 or (self.k_max is not None and self.k_max < 1):
            raise FluidError("--batch-size, --max-len and --k-max must be at least 1")
        if self.steps is not None and self.steps < 1:
            raise FluidError("--steps must be at least 1")


def horizon_targets(batch: Batch, mask_losses: torch.Tensor, k_max: int, tau: float,
                    sigma: float) -> tuple[list[tuple[int, int]], np.ndarray]:
    """Per anchor (row, main index): the soft target over ``k_max`` classes.

    ``mask_losses`` is ``[B, L]`` with the cross-entropy of every labelled mask slot. A block
    ends at its first ignored label (end of the sequence or of the reply).
    """
    anchors: list[tuple[int, int]] = []
    targets = []
    is_mask = batch.is_mask.cpu().numpy()
    anchor_ids = batch.anchor_ids.cpu().numpy()
    positions = batch.position_ids.cpu().numpy()
    labels = batch.labels.cpu().numpy()
    losses = mask_losses.detach().float().cpu().numpy()
    for row in range(is_mask.shape[0]):
        slots = np.flatnonzero(is_mask[row])
        blocks: dict[int, list[int]] = {}
        for slot in slots:
            blocks.setdefault(int(anchor_ids[row, slot]), []).append(int(slot))
        for anchor, block in blocks.items():
            block.sort(key=lambda s: positions[row, s])
            existing = []
            for slot in block:
                if labels[row, slot] == IGNORE_INDEX:
                    break
                existing.append(float(losses[row, slot]))
            if not existing:
                continue
            anchors.append((row, anchor))
            targets.append(soft_horizon_target(horizon_target(existing, tau), k_max, sigma))
    return anchors, np.array(targets, dtype=np.float32).reshape(-1, k_max)


def run_stage2(opts: Stage2Options) -> dict[str, Any]:
    opts.validate()
    env = setup(opts.device)
    try:
        return _train(opts, env)
    finally:
        teardown(env)


def _train(opts: Stage2Options, env: Dist) -> dict[str, Any]:
    from backends.torch_backend.loader import load as load_backend

    out = Path(opts.out).expanduser()
    spec = resolve_model(opts.model)
    dtype = "bfloat16" if opts.bf16 else "float32"
    backend = load_backend(spec, device=str(env.device), dtype=dtype, k_head=False, pack=False)
    model, tokenizer, config = backend.model, backend.tokenizer, backend.fluid_config
    model.requires_grad_(False)
    if opts.max_len > backend.max_context:
        raise FluidError(f"--max-len {opts.max_len} is longer than the model context ({backend.max_context} tokens); "
                         f"pass --max-len {backend.max_context} or less")
    k_max = opts.k_max or config.k_max
    conversations = read_conversations(opts.data, holdout=opts.holdout, limit=opts.limit)
    examples = build_examples(conversations, tokenizer, max_len=opts.max_len, source=opts.data,
                              progress=env.is_main and opts.progress)
    global_batch = opts.batch_size * env.world_size
    steps_per_epoch = len(examples) // global_batch
    if steps_per_epoch == 0:
        raise FluidError(f"{len(examples)} examples are fewer than one global batch ({global_batch}); "
                         "lower --batch-size or add data")
    total = opts.steps if opts.steps is not None else max(1, math.ceil((opts.epochs or 1.0) * steps_per_epoch))

    torch.manual_seed(opts.seed)
    hidden_size = model.config.get_text_config().hidden_size
    head = KHead(hidden_size, k_max).to(env.device)
    trained = wrap(head, env, fsdp=False, bf16=False)
    optimizer = torch.optim.AdamW(head.parameters(), lr=opts.lr)
    from transformers import get_cosine_schedule_with_warmup

    scheduler = get_cosine_schedule_with_warmup(optimizer, int(opts.warmup_ratio * total), total)
    backbone = FluidLossModule(model).eval()
    lm_head = model.get_output_embeddings()
    use_flex = env.device.type == "cuda"
    if use_flex:
        model.set_attn_implementation("flex_attention")
    else:
        model.set_attn_implementation("sdpa")
    layout_options = LayoutOptions(mask_token_id=config.mask_token_id, k_max=k_max,
                                   vocab_size=backend.vocab_size, anchor_rate=config.anchor_rate,
                                   restore=False, fixed_k=k_max)
    sampler = DistributedSampler(range(len(examples)), num_replicas=env.world_size, rank=env.rank,
                                 shuffle=True, seed=opts.seed, drop_last=True)
    from .stage1 import _progress, _TrainLog

    log = _TrainLog(out / LOG_FILE, 0) if env.is_main else None

    bar = _progress(total, 0, enabled=env.is_main and opts.progress, desc="stage2")
    order_epoch, order, last = -1, [], {}
    for step in range(total):
        started = time.perf_counter()
        epoch, in_epoch = divmod(step, steps_per_epoch)
        if epoch != order_epoch:
            sampler.set_epoch(epoch)
            order, order_epoch = list(sampler), epoch
        indices = order[in_epoch * opts.batch_size:(in_epoch + 1) * opts.batch_size]
        batch = collate(make_layouts(examples, indices, layout_options, seed=opts.seed, epoch=epoch),
                        tokenizer.pad_token_id or 0, 128 if use_flex else 1).to(env.device)
        with torch.no_grad():
            hidden = backbone.hidden_states(batch.input_ids, batch.position_ids,
                                            build_attention_mask(batch, "flex" if use_flex else "sdpa"))
            mask_losses = torch.zeros(batch.labels.shape, device=env.device)
            scored = batch.is_mask & (batch.labels != IGNORE_INDEX)
            logits = lm_head(hidden[scored]).float()
            mask_losses[scored] = F.cross_entropy(logits, batch.labels[scored], reduction="none")
        anchors, targets = horizon_targets(batch, mask_losses, k_max, opts.tau, opts.sigma)
        count = env.all_sum(torch.tensor([len(anchors)], dtype=torch.float64, device=env.device)).item()
        rows = torch.tensor([a[0] for a in anchors], dtype=torch.long, device=env.device)
        cols = torch.tensor([a[1] for a in anchors], dtype=torch.long, device=env.device)
        features = hidden[rows, cols].float()
        log_probs = F.log_softmax(trained(features), dim=-1)
        target = torch.from_numpy(targets).to(env.device)
        loss_sum = -(target * log_probs).sum()
        (loss_sum * env.world_size / max(count, 1.0)).backward()
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        k_star = (target.argmax(-1) + 1).float().sum() if len(anchors) else torch.zeros((), device=env.device)
        sums = env.all_sum(torch.stack([loss_sum.detach().double(), k_star.double()])).tolist()
        last = {"step": step + 1, "loss_k": sums[0] / max(count, 1.0), "mean_k_star": sums[1] / max(count, 1.0),
                "anchors": int(count), "lr": lr, "seconds": time.perf_counter() - started}
        if log is not None:
            log.write(last)
        bar.update(1)
        bar.set_postfix(loss_k=f"{last['loss_k']:.3f}", k_star=f"{last['mean_k_star']:.2f}")
    bar.close()
    if env.is_main:
        _export(out, spec, config, head, k_max, opts, total, len(examples))
    env.barrier()
    return {"steps": total, "total_steps": total, "last": last, "out": str(out), "examples": len(examples),
            "rank": env.rank}


def _export(out: Path, spec, config, head: KHead, k_max: int, opts: Stage2Options, steps: int,
            examples: int) -> None:
    """The input checkpoint's adapter/weights reference + the new head + an updated config."""
    tmp = ckpt.new_temp_dir(out / ".final")
    source = spec.adapter or (spec.fluid if spec.fluid == spec.base else None)
    if source is not None and Path(source).resolve() != out.resolve():
        for item in Path(source).iterdir():
            if item.is_file() and item.name not in ("fluid_config.json", K_HEAD_FILENAME, LOG_FILE, "train_log.jsonl") \
                    and not item.name.startswith("."):
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
    from dataclasses import replace

    replace(new_config, extra=extra).save(tmp)
    ckpt.publish(tmp, out, last="fluid_config.json")
