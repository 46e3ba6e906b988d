"""``--config FILE``: a command's options kept in a JSON file (a recipe), expanded into flags.

Keys are option names without the dashes (``"k_max": 8`` is ``--k-max 8``); ``true`` turns
a switch on. The file's flags are placed before the ones typed, so a flag given on the
command line wins over the file: ``fluid train stage1 --config recipe.json --steps 10``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from .errors import FluidError


def expand_config(argv: Sequence[str]) -> list[str]:
    """``argv`` with ``--config FILE`` replaced by the file's options as flags."""
    argv = list(argv)
    for index, token in enumerate(argv):
        if token == "--config" or token.startswith("--config="):
            if "=" in token:
                path, end = token.split("=", 1)[1], index + 1
            elif index + 1 < len(argv):
                path, end = argv[index + 1], index + 2
            else:
                raise FluidError("--config needs a file: --config recipe.json")
            rest = argv[:index] + argv[end:]
            first_flag = next((i for i, t in enumerate(rest) if t.startswith("-")), len(rest))
            return rest[:first_flag] + config_flags(path) + rest[first_flag:]
    return argv


def config_flags(path: str | Path) -> list[str]:
    """The flags a JSON options file stands for."""
    path = Path(path).expanduser()
    try:
        options = json.loads(path.read_text())
    except FileNotFoundError:
        raise FluidError(f"config file {path} not found; pass an existing JSON file to --config") from None
    except json.JSONDecodeError as exc:
        raise FluidError(f"config file {path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(options, dict):
        raise FluidError(f"config file {path} must hold one JSON object of option: value pairs")
    flags: list[str] = []
    for key, value in options.items():
        if key.startswith("_"):  # "_comment" and friends document the file
            continue
        flag = "--" + key.replace("_", "-")
        flags += _flag(flag, value, path)
    return flags


def _flag(flag: str, value: Any, path: Path) -> list[str]:
    if value is True:
        return [flag]
    if value is False or value is None:
        return []
    if isinstance(value, (int, float, str)):
        return [flag, str(value)]
    raise FluidError(f"config file {path}: {flag.lstrip('-')} must be a number, a string or true/false")
