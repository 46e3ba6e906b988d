"""``fluid serve``: an OpenAI-compatible HTTP server (chat and text completions, SSE streaming)
whose concurrent requests join one continuous FLUID batch.

Every flag is checked before the model loads. The server binds to loopback unless told
otherwise; a host others can reach without ``--api-key`` gets a warning, since anyone who
can reach the port can then use the model.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import FluidError
from ..exposure import is_loopback
from ..fluid_config import FORWARD_TOKEN_BUDGET
from . import add_model_options

DEFAULT_PORT = 8080
DEFAULT_MAX_BATCH = 16  # rows decoding together; more requests wait
DEFAULT_MAX_QUEUE = 64  # requests waiting for a row; more are answered 503 with Retry-After


def register(subparsers) -> None:
    parser = subparsers.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API")
    add_model_options(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 to expose it)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument("--api-key", default=None, metavar="KEY",
                        help="require 'Authorization: Bearer KEY' on every /v1 request")
    parser.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH,
                        help=f"requests decoded together in one batch (default {DEFAULT_MAX_BATCH})")
    parser.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                        help=f"requests waiting for a batch row before new ones get 503 (default {DEFAULT_MAX_QUEUE})")
    parser.add_argument("--forward-token-budget", type=int, default=None, metavar="N",
                        help="token positions one shared forward may compute (rows x widest window); past it, "
                             f"drafts are cut, never a row's exact token (default {FORWARD_TOKEN_BUDGET})")
    parser.add_argument("--model-id", default=None,
                        help="the model name clients send and /v1/models lists (default: the --model reference)")
    parser.set_defaults(run=run)


def check(args: argparse.Namespace) -> None:
    """Refuse impossible flags before any model work."""
    if not 1 <= args.port <= 65535:
        raise FluidError(f"port must be between 1 and 65535 (got {args.port})", "port")
    if args.max_batch < 1:
        raise FluidError(f"max_batch must be at least 1 (got {args.max_batch})", "max_batch")
    if args.forward_token_budget is not None and args.forward_token_budget < 1:
        raise FluidError(f"forward_token_budget must be at least 1 (got {args.forward_token_budget})",
                         "forward_token_budget")
    if args.max_queue < 0:
        raise FluidError(f"max_queue must be 0 or more (got {args.max_queue})", "max_queue")
    if args.api_key is not None and not args.api_key.strip():
        raise FluidError("the API key is empty; pass a non-empty key or leave the option out", "api_key")
    if not args.host.strip():
        raise FluidError("the host is empty; pass an address such as 127.0.0.1", "host")


def run(args: argparse.Namespace) -> int:
    check(args)
    try:
        import uvicorn

        from ..serving.app import build_app
    except ImportError as exc:
        raise FluidError(f"serving needs uvicorn and starlette ({exc.name} is missing); "
                         "pip install 'fluid-app[serve]'") from None
    from ..serving.engine import Engine
    from . import load_model

    if not is_loopback(args.host) and args.api_key is None:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach this port can use the "
              "model", file=sys.stderr)
    model = load_model(args)
    model_id = args.model_id or args.model
    budget = FORWARD_TOKEN_BUDGET if args.forward_token_budget is None else args.forward_token_budget
    engine = Engine(model.backend, args.max_batch, args.max_queue, budget).start()
    app = build_app(model, engine, model_id, args.api_key)
    print(f"serving {model_id} ({model.backend.name}) on http://{args.host}:{args.port}/v1", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
