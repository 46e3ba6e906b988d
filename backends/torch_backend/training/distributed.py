"""torch.distributed glue: process group from torchrun's environment, DDP or FSDP2 wrapping,
sum-reductions. Nothing home-made: sharding of the data is DistributedSampler's."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over ranks (a no-op for one process)."""
        if self.enabled:
            values = values.clone()
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values


def setup(device: str = "auto") -> Dist:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA), pick the device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    torch_device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu") if device in ("auto", "cuda") \
        else torch.device(device)
    if use_cuda:
        torch.cuda.set_device(torch_device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=torch_device if use_cuda else None)
    return Dist(rank, world_size, local_rank, torch_device)


def teardown(env: Dist) -> None:
    if env.enabled and dist.is_initialized():
        dist.destroy_process_group()


def wrap(module: nn.Module, env: Dist, *, fsdp: bool, bf16: bool) -> nn.Module:
    """DDP for models that fit one device; FSDP2 ``fully_shard`` (per decoder layer, then the
    root) for those that do not. One process: the module as it is."""
    if not env.enabled and not fsdp:
        return module
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
            else MixedPrecisionPolicy()
        layer_names = set(getattr(_inner_model(module), "_no_split_modules", None) or [])
        for sub in module.modules():
            if type(sub).__name__ in layer_names:
                fully_shard(sub, mp_policy=policy)
        fully_shard(module, mp_policy=policy)
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


def _inner_model(module: nn.Module):
    from .model import causal_lm

    return causal_lm(getattr(module, "model", module))

