"""FLUID training on PyTorch: Stage I (joint causal backbone) and Stage II (K-head).

Small modules with one job each: ``collate`` (per-example layouts -> padded tensors),
``masks`` (the attention rule as an SDPA boolean mask or a flex_attention BlockMask),
``model`` (loading the base, LoRA, the loss module), ``distributed`` (torch.distributed,
DDP/FSDP2), ``options`` (FLUID defaults from ``FluidConfig``), ``loop`` (the loop both
stages share: data plan, epoch order, progress, log), ``checkpoint`` (atomic saves, exact
resume, crash leftovers) with ``state_files`` (training state without pickle),
``stage1``/``stage2`` (their steps), ``evaluate`` (Stage I's held-out draft quality),
``throughput`` (Stage I vs plain causal step tokens/s).
"""
