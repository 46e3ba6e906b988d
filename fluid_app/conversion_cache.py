"""The conversion cache: a model that needs converting is converted once, then read back.

Why: a GGUF base (the embedded SmolLM2) is not something either backend can load fast.
transformers parses the GGUF metadata in Python and dequantizes every tensor on each load
(the tokenizer, the config and the weights each re-read the file), which made every
``fluid generate`` pay seconds before the first token. So the first load writes a converted
copy (a plain Hugging Face folder: ``model.safetensors``, ``config.json``,
``tokenizer.json``) into the user cache, and every later load, by either backend, reads that.

The rules, all here:

* **Where**: ``$FLUID_CACHE`` if set (tests point it at a temporary folder), else
  ``$XDG_CACHE_HOME/fluid``, else ``~/.cache/fluid``; entries under ``converted/``.
* **Key**: the source file's sha256 and :data:`CONVERTER_VERSION`. A changed file (a new
  package release) or a changed converter gets a new entry; nothing is trusted by path.
  Hashing 94 MB on every load would cost time, so the digest is memoised under ``digests/``
  keyed by the file's identity and status (device, inode, size, modification and change
  times): any write to the file changes its change time, so a memo is never stale.
* **Atomic**: an entry is written through :func:`fluid_app.files.atomic_folder`, its
  manifest (``fluid_conversion.json``: key, file sizes) last, so a crash or an error leaves
  no entry at all, never half of one.
* **Checked**: an entry whose manifest is missing or does not match its files (a file
  deleted, truncated or grown) is damaged: it is rebuilt, with one line saying so.

Pure path logic: the converter itself (which needs torch) is passed in by the backend.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

from .errors import FluidError
from .files import atomic_folder, write_json_atomic

ENV_VAR = "FLUID_CACHE"
# Bump when the converter writes anything differently: older entries are then left unused.
CONVERTER_VERSION = 1
MANIFEST = "fluid_conversion.json"
CONVERTED = "converted"
DIGESTS = "digests"


def cache_root() -> Path:
    """The user cache folder of FLUID (``$FLUID_CACHE`` wins)."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fluid"


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file, read from a memo while the file is unchanged since it was hashed."""
    path = Path(path).resolve()
    stamp = _stamp(path)
    memo = cache_root() / DIGESTS / (hashlib.sha256(str(path).encode()).hexdigest()[:32] + ".json")
    try:
        known = json.loads(memo.read_text(encoding="utf-8"))
        if known.get("path") == str(path) and known.get("stamp") == stamp and _is_hex(known.get("sha256")):
            return known["sha256"]
    except (OSError, ValueError, AttributeError):
        pass
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    sha256 = digest.hexdigest()
    if _stamp(path) == stamp:  # not rewritten while it was read
        try:
            write_json_atomic(memo, {"path": str(path), "stamp": stamp, "sha256": sha256})
        except OSError:
            pass  # a read-only cache only costs the hashing next time
    return sha256


def entry_folder(source: str | os.PathLike, sha256: str | None = None) -> Path:
    """Where the converted copy of ``source`` lives (whether or not it exists yet)."""
    source = Path(source)
    sha256 = sha256 or file_sha256(source)
    return cache_root() / CONVERTED / f"{source.stem}-{sha256[:16]}-v{CONVERTER_VERSION}"


def entry_problem(folder: Path, sha256: str) -> str | None:
    """Why ``folder`` is not a usable entry for a source with this sha256 (None: it is)."""
    if not folder.exists():
        return "missing"
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"no readable {MANIFEST}"
    if not isinstance(manifest, dict) or manifest.get("source_sha256") != sha256 \
            or manifest.get("converter_version") != CONVERTER_VERSION or not isinstance(manifest.get("files"), dict):
        return f"{MANIFEST} names another source or converter"
    for name, size in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, not {size}"
    return None


def converted_copy(source: str | os.PathLike, convert: Callable[[Path], Any], what: str = "",
                   say: Callable[[str], None] | None = None) -> Path:
    """The cached converted copy of ``source``, made first by ``convert(folder)`` if needed.

    ``convert`` writes the converted files into the (temporary) folder it is given; the
    manifest is added after it returns, and the folder renamed into place. ``what`` names
    the purpose in the message (``"for PyTorch and MLX"``); ``say`` prints progress lines
    (default: standard error). A copy another process finished first is kept.
    """
    say = say or _stderr
    source = Path(source)
    sha256 = file_sha256(source)
    target = entry_folder(source, sha256)
    problem = entry_problem(target, sha256)
    if problem is None:
        return target
    if problem != "missing":
        say(f"the cached copy {target} is damaged ({problem}); converting {source.name} again")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(target.parent, os.W_OK | os.X_OK):
            raise PermissionError(13, "permission denied")
    except OSError as exc:
        raise FluidError(f"cannot write the converted copy of {source.name} into {target.parent} "
                         f"({exc.strerror or exc}); set {ENV_VAR} to a writable folder") from None
    say(f"converting {source.name}{' ' + what if what else ''} once into {target} (later loads read this copy)")
    try:
        with atomic_folder(target, force=problem != "missing") as tmp:
            convert(tmp)
            files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
            write_json_atomic(tmp / MANIFEST, {"converter_version": CONVERTER_VERSION, "source": source.name,
                                               "source_sha256": sha256, "files": files})
    except FluidError:
        if entry_problem(target, sha256) is None:  # another process renamed its copy into place first
            return target
        raise
    return target


def _stamp(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]


def _is_hex(text: Any) -> bool:
    return isinstance(text, str) and len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
