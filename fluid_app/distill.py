"""Self-distillation data: the base model's own greedy replies to real prompts.

Masks learn to predict *the adapted model's own* continuation far better from replies the
model itself would write than from human/ChatGPT replies (FLUID_METHOD.md section 6: mask
loss 1.7 instead of 3.1 after the same steps). This module turns the first user turn of
each training conversation into a chat JSONL record with the model's greedy reply, in
batches, appending as it goes so that an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Sequence

from tqdm import tqdm

from .data import Message, read_conversations


def first_user_prompts(conversations: Sequence[Sequence[Message]], tokenizer: Any,
                       max_prompt_tokens: int) -> Iterator[str]:
    """The first user turn of each conversation, if it is short enough to be worth a reply."""
    for messages in conversations:
        prompt = next((m["content"] for m in messages if m["role"] == "user"), "").strip()
        if prompt and len(tokenizer(prompt)["input_ids"]) <= max_prompt_tokens:
            yield prompt


def completed_records(path: Path) -> int:
    """Count complete lines already written, dropping a torn last line left by a crash."""
    if not path.exists():
        return 0
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        path.write_bytes(complete)
    return complete.count(b"\n")


def distill(model: Any, source: str, out: Path, *, count: int, holdout: float = 0.02, batch_size: int = 16,
            max_new_tokens: int = 256, max_prompt_tokens: int = 256) -> int:
    """Write up to ``count`` self-distilled conversations to ``out``; return how many exist."""
    conversations = read_conversations(source, holdout=holdout, split="train")
    prompts = list(first_user_prompts(conversations, model.tokenizer, max_prompt_tokens))[:count]
    done = completed_records(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as handle, tqdm(total=len(prompts), initial=min(done, len(prompts)),
                                       desc="self-distilling", unit="reply") as bar:
        for start in range(done, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            replies = model.generate(batch, chat=True, mode="ar", max_new_tokens=max_new_tokens)
            for prompt, reply in zip(batch, replies if isinstance(replies, list) else [replies]):
                record = {"messages": [{"role": "user", "content": prompt},
                                       {"role": "assistant", "content": reply.text}]}
                handle.write(json.dumps(record) + "\n")
            handle.flush()
            bar.update(len(batch))
    return completed_records(out)
