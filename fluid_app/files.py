"""The one place files and folders are written: atomically, with ordinary modes.

Every writer in the project goes through here, so the two rules hold everywhere:

* **Atomic.** A file or folder is built beside its destination under a hidden temporary
  name and renamed into place when complete. A reader (``--model``, ``--resume``) sees the
  old version or the new one, never half of one; an error or a crash removes the temporary
  entry or leaves only a hidden one that :func:`remove_stale_temps` clears later.
* **Ordinary modes.** ``mkstemp`` and ``mkdtemp`` make owner-only entries; what is renamed
  into place from them gets the modes a plain ``open`` / ``mkdir`` would give (the umask
  decides), so exported checkpoints, caches and plots stay readable like any other file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import FluidError


def ordinary_mode(directory: bool = False) -> int:
    """The mode a plain ``open``/``mkdir`` would give now (the umask decides)."""
    return (0o777 if directory else 0o666) & ~_umask()


def _umask() -> int:
    """The process umask, read where the kernel shows it: setting it to find it out (the only
    portable way) would leave other threads' new files world-writable for a moment."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0)
    os.umask(umask)
    return umask


def public_modes(folder: Path) -> None:
    """Give a finished folder and everything in it the modes ``mkdir``/``open`` would have."""
    file_mode, directory_mode = ordinary_mode(), ordinary_mode(directory=True)
    folder.chmod(directory_mode)
    for path in folder.rglob("*"):
        if not path.is_symlink():
            path.chmod(directory_mode if path.is_dir() else file_mode)


@contextmanager
def atomic_file(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds, rename it over ``path``
    (readers see the old file or the new one, never half of one); on error, remove it.

    ``suffix`` ends the temporary name, for writers that pick a format from it (``.png``).
    """
    path = Path(path)
    created = _make_parents(path)
    remove_stale_temps(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path.name), suffix=PARTIAL + suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, ordinary_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        _remove_empty(created)
        raise


def check_output_file(path: str | os.PathLike, suffix: str, what: str, param: str) -> Path:
    """Fail before long work, not after it: an output file named ``*suffix`` in an existing folder.

    ``what`` names the file in the error (``"the plot is a PNG"``); ``param`` is the option."""
    out = Path(path)
    if out.suffix.lower() != suffix:
        raise FluidError(f"{what}; pass a file name ending in {suffix} (got {out.name})", param)
    if not out.parent.exists():
        raise FluidError(f"folder {out.parent} does not exist; create it or pass another {param} path", param)
    if out.is_dir():
        raise FluidError(f"{out} is a folder; pass a file name ending in {suffix}", param)
    return out


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically (see :func:`atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON the way every file of this project is written: indented, sorted keys."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


@contextmanager
def atomic_folder(out: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success rename it to ``out``.

    On any error the temporary folder is removed and ``out`` is left as it was. Without
    ``force`` an ``out`` that is a file or a non-empty folder is refused, before the block
    runs and again at the rename (which cannot replace one), so a copy another process
    finished meanwhile is kept and :class:`FluidError` raised. With ``force`` an existing
    ``out`` is replaced, and nothing of it stays. Leftovers of crashed runs for the same
    ``out`` are cleared first (:func:`remove_stale_temps`).
    """
    out = Path(out).expanduser().resolve()
    created = _make_parents(out)
    remove_stale_temps(out.parent, out.name)
    if not force and _occupied(out):
        raise _exists_error(out)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=_temp_prefix(out.name), suffix=PARTIAL))
    try:
        yield tmp
        public_modes(tmp)
        _move_into_place(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise


def _make_parents(path: Path) -> list[Path]:
    """Create the folders above ``path`` that are missing; return them, deepest first, so
    that a failed write can take away what it made (:func:`_remove_empty`)."""
    missing = []
    for parent in path.parents:
        if parent.exists():
            break
        missing.append(parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    return missing


def _remove_empty(folders: list[Path]) -> None:
    """Remove the given folders, deepest first, while they are empty (another writer may have
    put something in one meanwhile: that one and those above it stay)."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def remove_path(path: Path) -> None:
    """Remove a file, a link or a whole folder, whichever ``path`` is."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


# Temporary names: ``.NAME.<host>-<pid>.<random>.partial[suffix]`` for what is being written,
# ``.NAME.<host>-<pid>.old`` for a replaced ``NAME`` between the two renames. The writer's
# host and pid are in the name so that a later run can tell a crashed writer's leftover from
# one still being written, even in a folder that several machines share (a cache on NFS).
PARTIAL = ".partial"
OLD = ".old"


def remove_stale_temps(parent: Path, name: str) -> None:
    """Clear what crashed writers of ``parent/name`` left: their temporary files and folders.

    Only entries whose writer ran on this host and is no longer alive are touched; a live
    writer's temporaries, another host's and anything not named by this module are left
    alone. A previous version moved aside by a writer that died before renaming the new one
    into place is the last complete copy, so it is put back when ``name`` is missing.
    """
    pattern = re.compile(rf"\.{re.escape(name)}\.(?P<host>[\w-]+)-(?P<pid>\d+)"
                         rf"(?:\.[a-z0-9_]+{re.escape(PARTIAL)}(?:\..+)?|(?P<old>{re.escape(OLD)}))")
    try:
        entries = [entry for entry in Path(parent).iterdir() if entry.name.startswith(f".{name}.")]
    except OSError:
        return
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if not match or match["host"] != _host() or _alive(int(match["pid"])):
            continue
        target = Path(parent) / name
        try:
            if match["old"] and not (target.exists() or target.is_symlink()):
                entry.rename(target)
            else:
                remove_path(entry)
        except OSError:
            pass  # another run is clearing it too


def _host() -> str:
    return re.sub(r"[^\w-]", "-", socket.gethostname())[:64] or "host"


def _temp_prefix(name: str) -> str:
    return f".{name}.{_host()}-{os.getpid()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _occupied(out: Path) -> bool:
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        return True
    return out.is_dir() and any(out.iterdir())


def _exists_error(out: Path) -> FluidError:
    return FluidError(f"{out} already exists and is not empty; pick another output or overwrite it", "force")


def _move_into_place(tmp: Path, out: Path, force: bool) -> None:
    """Rename ``tmp`` to ``out``; the rename itself refuses a file or a non-empty folder there."""
    try:
        os.rename(tmp, out)
        return
    except OSError:
        if not (out.exists() or out.is_symlink()):
            raise
        if not force:
            raise _exists_error(out) from None
    old = out.with_name(f".{out.name}.{_host()}-{os.getpid()}{OLD}")
    remove_path(old)
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        os.rename(old, out)  # put the previous version back
        raise
    remove_path(old)
