"""FLUID training on PyTorch: Stage I (joint causal backbone) and Stage II (K-head).

Small modules with one job each: ``collate`` (per-example layouts -> padded tensors),
``masks`` (the attention rule as an SDPA boolean mask or a flex_attention BlockMask),
``model`` (loading the base, LoRA, the loss module), ``distributed`` (torch.distributed,
DDP/FSDP2), ``checkpoint`` (atomic saves and exact resume), ``stage1``/``stage2`` (loops),
``throughput`` (Stage I vs plain causal step tokens/s).
"""
