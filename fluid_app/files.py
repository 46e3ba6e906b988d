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
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import FluidError


def ordinary_mode(directory: bool = False) -> int:
    """The mode a plain ``open``/``mkdir`` would give now (the umask decides)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def public_modes(folder: Path) -> None:
    """Give a finished folder and everything in it the modes ``mkdir``/``open`` would have."""
    file_mode, directory_mode = ordinary_mode(), ordinary_mode(directory=True)
    folder.chmod(directory_mode)
    for path in folder.rglob("*"):
        if not path.is_symlink():
            path.chmod(directory_mode if path.is_dir() else file_mode)


@contextmanager
def atomic_file(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds, rename it over ``path``
    (readers see the old file or the new one, never half of one); on error, remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, ordinary_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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

    On any error the temporary folder is removed and ``out`` is left as it was. With
    ``force`` an existing ``out`` (a folder or a file) is replaced, and nothing of it stays.
    """
    out = Path(out).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise FluidError(f"{out} already exists and is not empty; pick another output or overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial"))
    try:
        yield tmp
        public_modes(tmp)
        if out.exists() or out.is_symlink():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            remove_path(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_path(path: Path) -> None:
    """Remove a file, a link or a whole folder, whichever ``path`` is."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()
