"""``fluid demo``: the Gradio page that shows parallel denoising live and races FLUID vs AR.

Visitors pick from a list of models: ``--model`` (opened first) and each ``--allow-model``.
``--allow-any-model`` turns the list into a free-text box for this machine's own user, and is
refused with ``--share`` or a host others can reach. ``--auth``/``--auth-file`` put Gradio's
login in front of the page.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import add_model_options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Shared by ``fluid demo`` and the repository's ``app.py``."""
    add_model_options(parser, tensors=False)
    parser.add_argument("--allow-model", action="append", default=[], metavar="REF",
                        help="another model visitors may pick (repeatable); only --model and these are served")
    parser.add_argument("--allow-any-model", action="store_true",
                        help="let visitors type any model reference (any path on this machine); "
                             "only on a loopback --host and without --share")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0 to expose it)")
    parser.add_argument("--port", type=int, default=None, help="port (default: Gradio's, 7860 or the next free)")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    parser.add_argument("--auth", action="append", default=[], metavar="USER:PASSWORD",
                        help="require this login (Gradio's login page; repeatable)")
    parser.add_argument("--auth-file", default=None, metavar="FILE",
                        help="require a login from FILE: one user:password per line (# comments allowed)")
    parser.add_argument("--concurrency", type=int, default=1,
                        help="decodes served at once; more users wait in the queue (raise it on a GPU)")


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="launch the live Gradio demo")
    add_arguments(parser)
    parser.set_defaults(run=run)


def read_auth(pairs: list[str], file: str | None = None) -> list[tuple[str, str]]:
    """``user:password`` logins from the command line and from ``file`` (kept out of the shell
    history and the process list). The password is everything after the first colon."""
    from ..errors import FluidError

    logins = [_login(pair, "auth") for pair in pairs]
    if file:
        try:
            lines = Path(file).expanduser().read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or "not UTF-8 text"
            raise FluidError(f"cannot read the login file {file} ({reason})", "auth_file") from None
        found = [_login(line.strip(), "auth_file", f"{file} line {n}") for n, line in enumerate(lines, 1)
                 if line.strip() and not line.lstrip().startswith("#")]
        if not found:
            raise FluidError(f"the login file {file} holds no user:password line", "auth_file")
        logins += found
    return logins


def _login(text: str, param: str, where: str = "a login") -> tuple[str, str]:
    from ..errors import FluidError

    user, colon, password = text.partition(":")
    if not (colon and user.strip() and password):
        raise FluidError(f"{where} must be user:password with both parts non-empty", param)
    return user.strip(), password


def run(args: argparse.Namespace) -> int:
    import os

    from ..errors import FluidError
    from ..exposure import check_exposure

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline by default

    if args.concurrency < 1:
        raise FluidError(f"concurrency must be at least 1 (got {args.concurrency})", "concurrency")
    auth = read_auth(args.auth, args.auth_file)
    check_exposure(args.host, args.share, args.allow_any_model)
    try:
        from ..ui.app import launch
    except ImportError as exc:
        raise FluidError(f"the demo needs Gradio ({exc.name} is missing); pip install 'fluid-app[demo]'") from None
    launch(args.model, args.backend, args.host, args.port, args.share, args.concurrency,
           allow_models=args.allow_model, allow_any_model=args.allow_any_model, auth=auth)
    return 0
