"""Bad input through the real ``fluid`` command: one ``error:`` line naming the fix, exit
status 2, never a traceback, never a half-written file (README, "Bad input").

Every case here was tried by hand first; those marked in the report failed before their
fix (a traceback, a hang, exit 0 with a wrong or partial output, or a message naming the
wrong fix). They run the CLI as a subprocess on tiny real models, so what is tested is what
a user sees: the exit status, the last stderr line, and the files left behind.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from checkpoints import make_adapter_checkpoint
from conftest import run_cli
from test_cli import assert_one_line_error

HAS_MLX = importlib.util.find_spec("mlx") is not None and importlib.util.find_spec("mlx_lm") is not None
NOT_UTF8 = b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n'  # latin-1 on line 2
CHAT = {"messages": [{"role": "user", "content": "The quick brown"}, {"role": "assistant", "content": "fox"}]}


@dataclass(frozen=True)
class Checkpoints:
    """A tiny base model, a real LoRA adapter checkpoint on it, and its merged export."""

    base: Path
    adapter: Path
    merged: Path


@pytest.fixture(scope="module")
def ckpts(tiny_model_dir, tmp_path_factory) -> Checkpoints:
    from backends.torch_backend.export import export_merged
    from fluid_app.model_refs import resolve_model

    base = tiny_model_dir("llama")
    root = tmp_path_factory.mktemp("bad-input")
    adapter = make_adapter_checkpoint(base, root / "adapter")
    merged = export_merged(resolve_model(str(adapter)), root / "merged")
    return Checkpoints(base, adapter, merged)


def entries(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# ------------------------------------------------------------ damaged safetensors files


def corrupt(path: Path, how: str) -> None:
    """Damage a file the ways downloads and copies break: cut in half, empty, or noise."""
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(random.Random(0).randbytes(len(data)))


# (checkpoint, damaged file): the LoRA and the K-head of an adapter checkpoint, the full
# weights of a merged one.
FILES = [("adapter", "adapter_model.safetensors"), ("adapter", "k_head.safetensors"),
         ("merged", "model.safetensors")]
HOWS = ["truncated", "empty", "random"]
COMMANDS = ["generate", "generate-mlx", "export", "export-merge"]
# Not fixable in this change's files; strict, so the marker goes once the fix lands.
KNOWN: dict[tuple[str, str], str] = {}  # (file, command) -> why it still fails; strict xfail


def _matrix():
    for kind, name in FILES:
        for command in COMMANDS:
            for how in HOWS:
                marks = []
                if command == "generate-mlx":
                    marks.append(pytest.mark.skipif(not HAS_MLX, reason="mlx-lm is not installed"))
                if (name, command) in KNOWN:
                    marks.append(pytest.mark.xfail(strict=True, reason=KNOWN[name, command]))
                yield pytest.param(kind, name, how, command, marks=marks, id=f"{command}-{name}-{how}")


def cli_args(command: str, model: Path, out: Path) -> list[str]:
    if command.startswith("generate"):
        backend = "mlx" if command == "generate-mlx" else "torch"
        return ["generate", "--backend", backend, "--model", str(model), "--prompt", "hi", "--max-new-tokens", "2"]
    return ["export", str(model), str(out), *(["--merge"] if command == "export-merge" else [])]


@pytest.mark.parametrize("kind, name, how, command", list(_matrix()))
def test_damaged_safetensors_is_one_line(ckpts, tmp_path, kind, name, how, command):
    """Each file of a checkpoint, broken three ways, under every command that reads it: the
    error names the file and says to fetch it again; an export leaves no OUT and no temporary
    folder beside it."""
    model = tmp_path / "ckpt"  # the file's name must come from the message, not from this path
    shutil.copytree(getattr(ckpts, kind), model)
    corrupt(model / name, how)
    parent = tmp_path / "exports"
    parent.mkdir()
    proc = run_cli(*cli_args(command, model, parent / "out"))
    if (name, command) == ("model.safetensors", "export"):  # an adapter export of full weights is refused
        assert_one_line_error(proc, "holds full (merged) weights", "--merge")
    else:
        assert_one_line_error(proc, name, "damaged or incomplete", "re-download")
    assert entries(parent) == set()  # no OUT, no hidden .out.*.partial
    assert entries(model) == entries(getattr(ckpts, kind))


def test_k_head_holding_other_tensors_is_one_line(ckpts, tmp_path):
    """A readable safetensors file that is not a K-head (here the adapter copied over it)."""
    model = tmp_path / "ckpt"
    shutil.copytree(ckpts.adapter, model)
    shutil.copyfile(model / "adapter_model.safetensors", model / "k_head.safetensors")
    proc = run_cli(*cli_args("generate", model, tmp_path / "out"))
    assert_one_line_error(proc, "k_head.safetensors", "not a FLUID K-head")
    proc = run_cli(*cli_args("export", model, tmp_path / "out"))
    assert_one_line_error(proc, "k_head.safetensors", "not a FLUID K-head")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ the other bad inputs


@dataclass(frozen=True)
class Case:
    """``build(ckpts, tmp)`` writes what the case needs and returns the CLI arguments."""

    build: Callable[[Checkpoints, Path], list[str]]
    needles: tuple[str, ...]
    timeout: int = 600


def _file(tmp: Path, name: str, data: bytes | str) -> str:
    path = tmp / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return str(path)


def _fifo(tmp: Path) -> str:
    os.mkfifo(tmp / "prompts.jsonl")  # no writer: reading it would wait forever
    return str(tmp / "prompts.jsonl")


def _bench(prompts: Callable[[Path], str], *extra: str) -> Callable[[Checkpoints, Path], list[str]]:
    return lambda c, tmp: ["bench", "--model", str(c.base), "--prompts", prompts(tmp), "--max-new-tokens", "2",
                           *extra]


def _distill(*extra: str, data: Callable[[Path], str] | None = None,
             out: Callable[[Path], Path] = lambda tmp: tmp / "out" / "d.jsonl") -> Callable[[Checkpoints, Path], list[str]]:
    def build(c: Checkpoints, tmp: Path) -> list[str]:
        source = data(tmp) if data else _file(tmp, "chats.jsonl", json.dumps(CHAT) + "\n")
        return ["distill", "--model", str(c.base), "--data", source, "--out", str(out(tmp)),
                "--holdout", "0", "--max-new-tokens", "2", *extra]
    return build


CASES = {
    # 1. prompts and data files
    "bench-prompts-not-utf8": Case(_bench(lambda t: _file(t, "p.jsonl", NOT_UTF8)),
                                   ("is not UTF-8 text", "line 2", "save it as UTF-8", "(--prompts)")),
    "bench-prompts-folder": Case(_bench(lambda t: str(t)), ("is a folder", "JSONL file", "(--prompts)")),
    "bench-prompt-number": Case(_bench(lambda t: _file(t, "p.jsonl", '{"prompt": 5}\n')),
                                ("p.jsonl:1", "prompt is not text (got a number)", "(--prompts)")),
    "train-data-not-utf8": Case(lambda c, t: ["train", "stage1", "--base", str(c.base), "--out", str(t / "out"),
                                              "--data", _file(t, "d.jsonl", b'{"messages": []}\n\xff\n'),
                                              "--steps", "1", "--max-len", "64", "--no-progress"],
                                ("d.jsonl is not UTF-8 text", "line 2", "(--data)")),
    "train-lr-0": Case(lambda c, t: ["train", "stage1", "--base", str(c.base), "--out", str(t / "out"),
                                     "--data", _file(t, "d.jsonl", json.dumps(CHAT) + "\n"), "--lr", "0"],
                       ("lr must be positive (got 0.0)", "(--lr)")),
    "train-kl-loss-full": Case(lambda c, t: ["train", "stage1", "--base", str(c.base), "--out", str(t / "out"),
                                             "--data", _file(t, "d.jsonl", json.dumps(CHAT) + "\n"),
                                             "--ar-loss", "kl", "--full"],
                               ("ar_loss 'kl' distils the frozen base", "(--ar-loss, --full)")),
    "train-mask-loss-in-config": Case(lambda c, t: ["train", "stage1", "--base", str(c.base), "--out", str(t / "out"),
                                                    "--data", _file(t, "d.jsonl", json.dumps(CHAT) + "\n"),
                                                    "--config", _file(t, "c.json", '{"mask_loss": "soft"}')],
                                      ("argument --mask-loss: invalid choice: 'soft'",)),
    "distill-data-not-utf8": Case(_distill(data=lambda t: _file(t, "d.jsonl", b"\xef\xbb\xbf\xff\n")),
                                  ("d.jsonl is not UTF-8 text", "line 1", "(--data)")),
    "eval-ppl-sharegpt-not-utf8": Case(
        lambda c, t: ["eval-ppl", "--model", str(c.adapter), "--holdout", "0.5",
                      "--data", _file(t, "s.json", b'[{"conversations": []},\n\n {"x": "\xe9"}]')],
        ("s.json is not UTF-8 text", "line 3", "(--data)")),
    # 4. ten more of our own choosing (and a few that already held)
    "bench-prompts-fifo": Case(_bench(_fifo), ("not a regular file", "(--prompts)"), timeout=90),
    "bench-prompts-empty": Case(_bench(lambda t: _file(t, "p.jsonl", "\n\n")),
                                ("holds no prompts", "one {\"prompt\": ...} per line", "(--prompts)")),
    "bench-prompt-list": Case(_bench(lambda t: _file(t, "p.jsonl", '{"prompt": ["hi"]}\n')),
                              ("p.jsonl:1", "prompt is not text (got a list)")),
    "bench-prompt-lone-surrogate": Case(_bench(lambda t: _file(t, "p.jsonl", '{"prompt": "a\\ud800"}\n')),
                                        ("p.jsonl:1", "not valid UTF-8", "(--prompts)")),
    "bench-max-new-tokens-0": Case(_bench(lambda t: _file(t, "p.jsonl", '{"prompt": "hi"}\n'), "--max-new-tokens",
                                          "0"), ("max_new_tokens must be a whole number", "(--max-new-tokens)")),
    "bench-unknown-horizon": Case(_bench(lambda t: _file(t, "p.jsonl", '{"prompt": "hi"}\n'), "--horizons",
                                         "k-head,widest"), ("'widest'", "k-head, k-max, k-min")),
    "distill-count-negative": Case(_distill("--count", "-1"), ("count must be at least 1 (got -1)", "(--count)")),
    "distill-batch-size-0": Case(_distill("--batch-size", "0"), ("batch_size must be at least 1", "(--batch-size)")),
    "distill-max-prompt-tokens-0": Case(_distill("--max-prompt-tokens", "0"),
                                        ("max_prompt_tokens must be at least 1", "(--max-prompt-tokens)")),
    "distill-max-new-tokens-0": Case(_distill("--max-new-tokens", "0"),
                                     ("max_new_tokens must be a whole number", "(--max-new-tokens)")),
    "distill-out-is-a-folder": Case(_distill(out=lambda t: t), ("is a folder", "JSONL file", "(--out)")),
    "distill-no-prompt-fits": Case(_distill("--max-prompt-tokens", "1"),
                                   ("no user prompt", "fits in 1 tokens", "(--max-prompt-tokens, --data)")),
    "generate-text-file-as-gguf": Case(lambda c, t: ["generate", "--model", _file(t, "m.gguf", "hello\n"),
                                                     "--prompt", "hi"], ("not a GGUF file", "(--model)")),
    "generate-max-new-tokens-negative": Case(lambda c, t: ["generate", "--model", str(c.base), "--prompt", "hi",
                                                           "--max-new-tokens", "-3"],
                                             ("at least 1 (got -3)", "(--max-new-tokens)")),
    "generate-fallback-masks-negative": Case(lambda c, t: ["generate", "--model", str(c.base), "--prompt", "hi",
                                                           "--fallback-masks", "-1"],
                                             ("fallback_masks must be a whole number, 0 (off) or more (got -1)",
                                              "(--fallback-masks)")),
    "export-adapter-dtype": Case(lambda c, t: ["export", str(c.adapter), str(t / "o"), "--dtype", "int8"],
                                 ("float32 or float16",)),
    "pull-invalid-repo-id": Case(lambda c, t: ["pull", "not a/valid id!"], ("not a Hub repo id", "owner/name")),
    "push-missing-folder": Case(lambda c, t: ["push", str(t / "nope"), "owner/name"],
                                ("is not a folder", "FLUID checkpoint folder")),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line(ckpts, tmp_path, name):
    case = CASES[name]
    work = tmp_path / "work"
    work.mkdir()
    args = case.build(ckpts, work)
    before = entries(work)
    proc = run_cli(*args, timeout=case.timeout)
    assert_one_line_error(proc, *case.needles)
    assert entries(work) == before  # nothing written: no --out, no temporary file


# ------------------------------------------------------------------------- good input


def test_a_byte_order_mark_is_not_bad_input(tmp_path):
    """Editors on Windows start UTF-8 files with a BOM; the readers take it as UTF-8."""
    from fluid_app.bench import read_prompts
    from fluid_app.data import read_conversations

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n', encoding="utf-8-sig")
    assert read_prompts(prompts) == ["hi"]
    chats = tmp_path / "c.jsonl"
    chats.write_text(json.dumps(CHAT) + "\n", encoding="utf-8-sig")
    sharegpt = tmp_path / "s.json"
    sharegpt.write_text(json.dumps([{"conversations": [{"from": "human", "value": "hi"},
                                                       {"from": "gpt", "value": "yo"}]}]), encoding="utf-8-sig")
    assert read_conversations(str(chats)) == [CHAT["messages"]]
    assert read_conversations(str(sharegpt)) == [[{"role": "user", "content": "hi"},
                                                  {"role": "assistant", "content": "yo"}]]


def test_sharegpt_reader_decodes_across_chunks_and_names_the_bad_line(tmp_path):
    """The streamed ShareGPT reader decodes bytes itself: a character split between two
    reads is kept, a bad byte is reported on its line whatever the chunk size, and a file cut
    inside a character (the packaged dump is cut mid-record) just loses the cut record."""
    from fluid_app.data import iter_json_array
    from fluid_app.errors import FluidError

    records = [{"conversations": [{"from": "human", "value": "café ☕ 😀"}]}] * 3
    text = json.dumps(records, ensure_ascii=False, indent=1).encode()
    path = tmp_path / "s.json"
    path.write_bytes(b"\xef\xbb\xbf" + text)
    for chunk_size in (1, 2, 3, 7, 1 << 20):
        assert list(iter_json_array(path, chunk_size=chunk_size)) == records
    bad = text.replace("☕".encode(), b"\xe2\x98", 1)
    path.write_bytes(bad)
    line = bad[:bad.index(b"\xe2\x98")].count(b"\n") + 1
    for chunk_size in (1, 2, 5, 1 << 20):
        with pytest.raises(FluidError, match=f"is not UTF-8 text \\(line {line} has the byte 0xe2\\)"):
            list(iter_json_array(path, chunk_size=chunk_size))
    flat = json.dumps(records, ensure_ascii=False).encode()
    path.write_bytes(flat[:flat.rindex("😀".encode()) + 2])
    assert list(iter_json_array(path, chunk_size=4)) == records[:2]


@pytest.mark.parametrize("prompt", [5, None, ["hi", 3]])
def test_python_api_rejects_a_prompt_that_is_not_text(tiny_model_dir, prompt):
    import fluid_app
    from fluid_app.errors import FluidError

    model = fluid_app.load(str(tiny_model_dir("llama")), backend="torch", device="cpu")
    with pytest.raises(FluidError, match="prompt"):
        model.generate(prompt, max_new_tokens=2)
