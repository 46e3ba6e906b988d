"""``fluid eval-ppl``: perplexities of the adapted model and its base on held-out replies."""

from __future__ import annotations

import json
import math

import pytest
import torch
from checkpoints import make_adapter_checkpoint
from conftest import run_cli
from test_cli import assert_one_line_error
from tiny_models import write_chat_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from fluid_app.data import build_examples, read_conversations


def _brute_force_perplexity(folder, examples) -> float:
    """exp(mean next-token loss) over the labelled tokens, one example at a time."""
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for example in examples:
            logits = model(input_ids=torch.tensor([example.input_ids])).logits[0].double()
            for i in range(len(example.input_ids) - 1):
                target = example.labels[i + 1]
                if target != -100:
                    total += float(torch.logsumexp(logits[i], 0) - logits[i, target])
                    count += 1
    return math.exp(total / count)


def test_eval_ppl_scores_held_out_replies_for_both_models(tiny_model_dir, tmp_path):
    base = tiny_model_dir("llama")
    data = write_chat_file(tmp_path / "chat.jsonl", 40)
    ckpt = make_adapter_checkpoint(base, tmp_path / "ckpt")
    proc = run_cli("eval-ppl", "--model", str(ckpt), "--data", str(data), "--holdout", "0.1", "--count", "3",
                   "--max-len", "64", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    held_out = read_conversations(str(data), holdout=0.1, split="heldout", limit=3)
    assert len(held_out) == report["conversations"] == 3
    examples = build_examples(held_out, AutoTokenizer.from_pretrained(str(base)), max_len=64)
    assert report["base"]["perplexity"] == pytest.approx(_brute_force_perplexity(base, examples), rel=1e-5)
    assert report["base"]["tokens"] == report["adapted"]["tokens"] > 0
    assert report["adapted"]["perplexity"] != report["base"]["perplexity"]  # the adapter is applied
    assert report["ratio"] == round(report["adapted"]["perplexity"] / report["base"]["perplexity"], 4)

    table = run_cli("eval-ppl", "--model", str(ckpt), "--data", str(data), "--holdout", "0.1", "--count", "2",
                    "--max-len", "64")
    assert "base     perplexity" in table.stdout and "vs base" in table.stdout


def test_eval_ppl_bad_input(tiny_model_dir, tmp_path):
    data = write_chat_file(tmp_path / "chat.jsonl", 10)
    proc = run_cli("eval-ppl", "--model", str(tiny_model_dir("llama")), "--data", str(data), "--holdout", "0.2")
    assert_one_line_error(proc, "no FLUID adapter")
    proc = run_cli("eval-ppl", "--model", str(tiny_model_dir("llama")), "--data", str(data), "--holdout", "0")
    assert_one_line_error(proc, "--holdout must be positive")
    proc = run_cli("eval-ppl", "--data", str(tmp_path / "none.jsonl"))
    assert_one_line_error(proc, "not found")
