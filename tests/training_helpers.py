"""What the training tests share: the tiny chat data, Stage I options and reading the logs.

One copy, so that the files testing training (losses, recovery, evaluation, distributed
runs, the GPU recipe) train the same way and a change of defaults is made once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from tiny_models import write_chat_file

from backends.torch_backend.training.stage1 import Stage1Options

STAGE1_DEFAULTS: dict[str, Any] = dict(k_max=4, max_len=96, batch_size=2, lr=2e-3, warmup_ratio=0.0, steps=4,
                                       device="cpu", progress=False)


def chat_file_fixture(count: int):
    """A module-scoped fixture: ``count`` short chats over the tiny tokenizer's corpus
    (learnable, so losses can fall). Assign it to a name in a test module to use it."""

    @pytest.fixture(scope="module")
    def chat_file(tmp_path_factory) -> Path:
        return write_chat_file(tmp_path_factory.mktemp("data") / "chat.jsonl", count)

    return chat_file


def stage1_options(base: Path | str, data: Path | str, out: Path | str, **over: Any) -> Stage1Options:
    """Stage I options for a tiny model on the CPU: a few quick steps unless ``over`` says otherwise."""
    return Stage1Options(base=str(base), data=str(data), out=str(out), **{**STAGE1_DEFAULTS, **over})


def read_log(out: Path, name: str = "train_log.jsonl", *, evals: bool | None = False) -> list[dict]:
    """The records of a run's JSONL log: step records (``evals=False``), evaluation records
    (``True``) or all lines in order (``None``)."""
    records = [json.loads(line) for line in (out / name).read_text().splitlines()]
    return records if evals is None else [r for r in records if ("eval" in r) == evals]
