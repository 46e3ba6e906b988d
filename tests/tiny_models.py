"""Tiny random checkpoints of real architectures, saved the way users' models are.

Each is a genuine transformers model (Llama, GPT-2, Qwen2, Qwen3, Mistral) with a small
byte-level BPE tokenizer trained here, a chat template, and one unused special token, so
that loading, MASK selection, chat rendering and decoding all go through the real
libraries. Weights use a large init range so next-token distributions are peaked: greedy
argmax then has clear margins and float noise between block and single-token forwards
cannot flip it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "FLUID drafts blocks of tokens in parallel and verifies them causally.",
    "Paris is the capital of France. Rome is the capital of Italy.",
    "def add(a, b):\n    return a + b\n",
    "Once upon a time there was a small model that wanted to think faster.",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10",
] * 20

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|unused|>"]

ARCHITECTURES = {
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    "qwen3": dict(model_type="qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512),
    "mistral": dict(model_type="mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=512),
}


def build_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", unk_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", additional_special_tokens=["<|unused|>"])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(arch: str, folder: Path, seed: int = 0, init_range: float = 0.3) -> Path:
    """Save a tiny random ``arch`` model with its tokenizer to ``folder``; return it."""
    tokenizer = build_tokenizer()
    params = dict(ARCHITECTURES[arch])
    model_type = params.pop("model_type")
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        initializer_range=init_range, tie_word_embeddings=False, **params,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_chat_file(path: Path, count: int) -> Path:
    """``count`` short chats over CORPUS sentences (learnable, so training losses can fall)."""
    rng = random.Random(0)
    sentences = sorted(set(CORPUS))
    with open(path, "w") as handle:
        for _ in range(count):
            question = rng.choice(sentences)
            answer = " ".join(rng.choice(sentences) for _ in range(2))
            handle.write(json.dumps({"messages": [{"role": "user", "content": question},
                                                  {"role": "assistant", "content": answer}]}) + "\n")
    return path


def make_tiny_gguf(folder: Path, out: Path) -> Path:
    """Write the tiny Llama in ``folder`` (fp32 weights, byte-level BPE vocabulary) as a GGUF file."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    config = json.loads((folder / "config.json").read_text())
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(10000.0)
    special = {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    by_id = {i: t for t, i in {**tokenizer["model"]["vocab"], **special}.items()}
    tokens = [by_id[i] for i in range(config["vocab_size"])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]])
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for key, value in load_file(str(folder / "model.safetensors")).items():
        if key not in names:
            _, _, layer, *rest = key.split(".")
            names[key] = f"blk.{layer}.{parts['.'.join(rest[:-1])]}.weight"
        writer.add_tensor(names[key], value.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
