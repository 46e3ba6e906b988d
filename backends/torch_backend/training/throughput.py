"""Stage I training throughput: a FLUID step vs a plain causal step of the same length.

FLUID_METHOD.md section 6 asks for the tokens/s of a Stage I step (the rule as a
flex_attention BlockMask, masks laid out last) against a plain causal SDPA step over the
same expanded length. Run on a GPU:

    python -m backends.torch_backend.training.throughput            # ~1B Llama, bf16, N=1024, K=16

``--tiny`` runs a toy config on the CPU (the SDPA boolean mask stands in for flex_attention
there, which has no CPU backward) so the script itself is tested without a GPU.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from fluid_app.fluid_config import FluidConfig
from fluid_app.layout import build_layout

from .collate import collate
from .masks import build_attention_mask
from .model import FluidLossModule

LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=512)


def _model(params: dict, attn: str, dtype: torch.dtype, device: torch.device, checkpointing: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**params, attn_implementation=attn, use_cache=False)).to(device, dtype)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def _time(step, steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / steps


def measure(*, tiny: bool = False, seq_len: int = 1024, k_max: int = FluidConfig.k_max, batch_size: int = 1,
            steps: int = 10, warmup: int = 3, checkpointing: bool = True, seed: int = 0) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    params = TINY if tiny else LLAMA_1B
    if tiny:
        seq_len = min(seq_len, 64)
        k_max = min(k_max, 4)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    kind = "flex" if device.type == "cuda" else "sdpa"
    vocab = params["vocab_size"]
    rng = np.random.default_rng(seed)
    layouts = []
    for _ in range(batch_size):
        tokens = rng.integers(4, vocab, size=seq_len)
        labels = tokens.copy()
        labels[: seq_len // 8] = -100  # a short prompt, the rest is "reply"
        layouts.append(build_layout(tokens, labels, mask_token_id=1, k_max=k_max, rng=rng, vocab_size=vocab,
                                    special_ids=(0, 1, 2, 3)))
    batch = collate(layouts, 0, 128 if kind == "flex" else 1).to(device)
    length = batch.input_ids.shape[1]

    fluid_model = FluidLossModule(_model(params, "flex_attention" if kind == "flex" else "sdpa", dtype, device,
                                         checkpointing))

    def fluid_step():
        mask = build_attention_mask(batch, kind)  # built every step: its cost counts
        s_ar, s_diff, n_ar, n_diff = fluid_model(batch.input_ids, batch.position_ids, mask, batch.labels, batch.is_mask)
        ((s_ar + s_diff) / (n_ar + n_diff)).backward()

    fluid_seconds = _time(fluid_step, steps, warmup, device)
    fluid_model = None  # free its memory before building the causal model
    causal_model = _model(params, "sdpa", dtype, device, checkpointing)
    tokens = batch.input_ids
    labels = torch.where(batch.labels == -100, batch.labels, tokens)

    def causal_step():
        causal_model(input_ids=tokens, labels=labels).loss.backward()

    causal_seconds = _time(causal_step, steps, warmup, device)
    real = batch.num_tokens
    report = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "attention": "flex_attention BlockMask" if kind == "flex" else "sdpa boolean mask",
        "model": "tiny llama" if tiny else "llama ~1.2B", "dtype": str(dtype).removeprefix("torch."),
        "seq_len": seq_len, "k_max": k_max, "batch_size": batch_size, "expanded_length": length,
        "fluid_tokens_per_s": real / fluid_seconds, "causal_tokens_per_s": real / causal_seconds,
        "ratio": causal_seconds / fluid_seconds, "fluid_step_s": fluid_seconds, "causal_step_s": causal_seconds,
    }
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="toy model (CPU smoke test)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--k-max", type=int, default=FluidConfig.k_max)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    report = measure(tiny=args.tiny, seq_len=args.seq_len, k_max=args.k_max, batch_size=args.batch_size,
                     steps=args.steps, warmup=args.warmup, checkpointing=args.checkpointing)
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key:>20}: {value:.4g}" if isinstance(value, float) else f"{key:>20}: {value}")
        print(f"Stage I step reaches {report['ratio']:.2f}x the tokens/s of a plain causal step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
