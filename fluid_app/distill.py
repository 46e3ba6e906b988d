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
from .errors import FluidError
from .sampler import DecodeSettings


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


def check_distill_options(out: Path, *, count: int, batch_size: int, max_new_tokens: int,
                          max_prompt_tokens: int) -> None:
    """Refuse impossible options before a model loads or ``out`` is touched.

    Why each: a negative ``count`` would slice the prompt list from its end (writing all but
    a few, silently), ``batch_size`` 0 crashes ``range``, ``max_prompt_tokens`` 0 keeps no
    prompt, and an ``out`` that cannot be a file only fails at the first append, after the
    model has loaded and a batch has been decoded.
    """
    for name, value in (("count", count), ("batch_size", batch_size), ("max_prompt_tokens", max_prompt_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise FluidError(f"{name} must be at least 1 (got {value})", name)
    DecodeSettings.from_config(None, mode="ar", max_new_tokens=max_new_tokens)
    if out.is_dir():
        raise FluidError(f"{out} is a folder; pass the JSONL file to write (or to resume)", "out")
    if out.exists() and not out.is_file():
        raise FluidError(f"{out} is not a regular file (a pipe or a device); pass a JSONL file to write", "out")
    folder = next(p for p in out.absolute().parents if p.exists())
    if not folder.is_dir():
        raise FluidError(f"{folder} is a file, so {out} cannot be written; pass a path in a folder", "out")


def distill(model: Any, source: str, out: Path, *, count: int, holdout: float = 0.02, batch_size: int = 16,
            max_new_tokens: int = 256, max_prompt_tokens: int = 256) -> int:
    """Write up to ``count`` self-distilled conversations to ``out``; return how many exist.

    ``out`` is opened only once the first batch of replies is ready, so a run that fails
    before (bad data, a model that cannot decode) leaves no empty file behind.
    """
    out = Path(out)
    check_distill_options(out, count=count, batch_size=batch_size, max_new_tokens=max_new_tokens,
                          max_prompt_tokens=max_prompt_tokens)
    conversations = read_conversations(source, holdout=holdout, split="train")
    prompts = list(first_user_prompts(conversations, model.tokenizer, max_prompt_tokens))[:count]
    if not prompts:
        raise FluidError(f"no user prompt in {source} fits in {max_prompt_tokens} tokens "
                         f"({len(conversations)} conversations read); raise max_prompt_tokens or pass other data",
                         "max_prompt_tokens", "data")
    done = completed_records(out)
    handle = None
    try:
        with tqdm(total=len(prompts), initial=min(done, len(prompts)), desc="self-distilling", unit="reply") as bar:
            for start in range(done, len(prompts), batch_size):
                batch = prompts[start:start + batch_size]
                replies = model.generate(batch, chat=True, mode="ar", max_new_tokens=max_new_tokens)
                if handle is None:
                    out.parent.mkdir(parents=True, exist_ok=True)
                    handle = out.open("a")
                for prompt, reply in zip(batch, replies if isinstance(replies, list) else [replies]):
                    record = {"messages": [{"role": "user", "content": prompt},
                                           {"role": "assistant", "content": reply.text}]}
                    handle.write(json.dumps(record) + "\n")
                handle.flush()
                bar.update(len(batch))
    finally:
        if handle is not None:
            handle.close()
    return completed_records(out)
