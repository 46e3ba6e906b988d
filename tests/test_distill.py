"""Self-distillation writes the model's own greedy replies and resumes after a crash."""

from __future__ import annotations

import json

import fluid_app
from fluid_app.distill import distill


def test_distill_writes_greedy_replies_and_resumes(tiny_model_dir, tmp_path):
    source = tmp_path / "chats.jsonl"
    prompts = ["The quick brown fox", "Paris is the capital of", "def add(a, b):", "Once upon a time", "1, 2, 3,"]
    source.write_text("".join(json.dumps({"messages": [{"role": "user", "content": p},
                                                       {"role": "assistant", "content": "x"}]}) + "\n"
                              for p in prompts))
    model = fluid_app.load(str(tiny_model_dir("llama")), backend="torch", device="cpu")
    out = tmp_path / "distilled.jsonl"
    assert distill(model, str(source), out, count=3, holdout=0.2, batch_size=2, max_new_tokens=8) == 3
    out.write_text(out.read_text() + '{"messages": [{"role": "us')  # a crash mid-record
    assert distill(model, str(source), out, count=10, holdout=0.2, batch_size=2, max_new_tokens=8) == 4
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["messages"][0]["content"] for r in records] == prompts[:4]  # the held-out last 20% is never used
    for record in records:
        reply = model.generate(record["messages"][0]["content"], chat=True, mode="ar", max_new_tokens=8)
        assert record["messages"][1]["content"] == reply.text
