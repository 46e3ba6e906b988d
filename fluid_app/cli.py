"""``fluid`` command line. Each subcommand lives in ``fluid_app/commands/<name>.py`` and
exposes ``register(subparsers)``; this file only wires them and turns :class:`FluidError`
into a one-line message with exit status 2."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

from .errors import FluidError, phrase

# Subcommand modules, in the order ``fluid --help`` lists them.
COMMAND_MODULES = ["generate", "bench", "eval_ppl", "distill", "train", "demo", "serve", "export", "convert", "pull",
                   "push", "import_reference"]


class Parser(argparse.ArgumentParser):
    """argparse with the CLI's error style: one ``error:`` line (naming where help is), exit 2."""

    def error(self, message: str) -> None:
        print(f"error: {message} (see: {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="fluid", description="FLUID: lossless parallel decoding for GPT-style models.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"fluid_app.commands.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .option_files import expand_config

    parser = build_parser()
    try:
        argv = expand_config(sys.argv[1:] if argv is None else argv)
    except FluidError as exc:
        print(f"error: {phrase(exc)}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except FluidError as exc:  # the library's words, with the flags to change
        print(f"error: {phrase(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def run() -> None:
    """The ``fluid`` command (console script and ``python -m fluid_app``): :func:`main`, then
    a prompt exit with its status.

    Why: after a command has returned, Python's own teardown of the torch and transformers
    modules took 0.7-1 s on a 2-core CPU (0.7 s after a bare ``import torch``), as long as
    decoding a short reply. Nothing is left to clean up by then (files are written and
    closed through :mod:`fluid_app.files`), so once the exit handlers have run and the
    output is flushed the process ends at once. A command that leaves other threads
    running (a server stopped by Ctrl-C) exits the ordinary way. ``main`` itself returns
    normally, for callers in the same process (``app.py``, tests).
    """
    import atexit
    import logging
    import threading

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    code = main()
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (fluid generate | head): nothing more to say
            pass
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    run()
