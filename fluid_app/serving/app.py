"""The web side of ``fluid serve``: a Starlette app whose handlers talk to the decode thread.

Handlers run on the event loop. Each checks its request (:mod:`.openai_api`), hands the
decoder to the :class:`~.engine.Engine` with a sink that puts events into an asyncio queue,
and turns committed tokens into text through :class:`~fluid_app.text_stream.TextStream`
(whole characters, stop strings held back), which also accounts the token ids of the
text emitted so far. A stop string, a closed connection or a
cancelled handler cancels the request in the engine, so its row leaves the batch at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from typing import TYPE_CHECKING, Any, AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from ..text_stream import TextStream
from .engine import Engine, QueueFull
from .openai_api import ApiError, Job, Response, finish_reason, parse

if TYPE_CHECKING:
    from ..api import FluidModel

log = logging.getLogger("fluid.serve")
RETRY_AFTER_S = 1  # what a client told "busy" should wait before trying again
MAX_BODY = 4 * 1024 * 1024


def error_response(error: ApiError) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if error.status == 503 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


class Reply:
    """One request's events from the engine, as text pieces; cancels the request if abandoned."""

    def __init__(self, engine: Engine, job: Job, model: FluidModel):
        self.engine, self.job = engine, job
        self.text = TextStream(model.tokenizer, job.stop)
        self.reason = ""
        self.taken = 0  # completion ids already handed out by new_ids / rest_ids
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        try:
            self.ticket = engine.submit(job.decoder, lambda item: loop.call_soon_threadsafe(self.queue.put_nowait,
                                                                                             item))
        except QueueFull:
            raise ApiError(503, "the server is busy: every decode slot is taken and the waiting line is full; "
                                "retry shortly", None, "server_busy") from None

    @property
    def token_ids(self) -> list[int]:
        """The completion's token ids so far (after a stop string, through the token completing it)."""
        return self.text.completion_ids

    def new_ids(self) -> list[int]:
        """Ids of the tokens whose text has been emitted since the last call."""
        ids = self.token_ids[self.taken:self.text.emitted_tokens]
        self.taken += len(ids)
        return ids

    def rest_ids(self) -> list[int]:
        """Every completion id not handed out yet: for the final chunk."""
        ids = self.token_ids[self.taken:]
        self.taken += len(ids)
        return ids

    async def pieces(self) -> AsyncIterator[str]:
        """Text as it becomes safe to show; :attr:`reason` is set when it ends."""
        try:
            while not self.reason:
                kind, value = await self.queue.get()
                if kind == "tokens":
                    piece = self.text.push(value)
                    if self.text.stopped:
                        self.reason = "stop"
                        self.engine.cancel(self.ticket)
                    if piece:
                        yield piece
                elif kind == "done":
                    self.reason = finish_reason(value)
                    piece = self.text.finish()
                    if piece:
                        yield piece
                else:
                    raise value
        finally:
            if not self.reason:
                self.engine.cancel(self.ticket)  # the client went away or the handler was cancelled


def build_app(model: FluidModel, engine: Engine, model_id: str, api_key: str | None = None) -> Starlette:
    """The OpenAI-compatible app over one loaded model and its running engine."""

    def check_key(request: Request) -> None:
        if api_key is not None and not hmac.compare_digest(request.headers.get("authorization", "").encode(),
                                                           f"Bearer {api_key}".encode()):
            raise ApiError(401, "missing or wrong API key; send 'Authorization: Bearer KEY'", None, "invalid_api_key")

    async def read(request: Request, kind: str) -> Job:
        check_key(request)
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise ApiError(400, f"the request body is over {MAX_BODY} bytes", None, "body_too_large")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON ({exc})", None, "invalid_json") from None
        return parse(body, kind, model, model_id)

    async def complete(request: Request, kind: str):
        try:
            job = await read(request, kind)
            reply = Reply(engine, job, model)
        except ApiError as error:
            return error_response(error)
        response = Response(job, model_id)
        if job.stream:
            return StreamingResponse(stream(reply, response), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        pieces = reply.pieces()
        watcher = asyncio.ensure_future(_disconnected(request))
        try:
            text = ""
            while True:
                step = asyncio.ensure_future(anext(pieces, None))
                await asyncio.wait({step, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if not step.done():  # the client left before the reply was ready
                    step.cancel()
                    await pieces.aclose()
                    return JSONResponse({}, status_code=499)
                piece = step.result()
                if piece is None:
                    break
                text += piece
        except Exception as exc:
            log.exception("request failed")
            return JSONResponse(ApiError(500, f"the decode failed: {exc}").body(), status_code=500)
        finally:
            watcher.cancel()
        return JSONResponse(response.whole(text, reply.reason, reply.token_ids))

    async def stream(reply: Reply, response: Response) -> AsyncIterator[str]:
        first = True
        try:
            async for piece in reply.pieces():
                yield _sse(response.chunk(piece, reply.new_ids(), first=first))
                first = False
        except Exception as exc:
            log.exception("stream failed")
            yield _sse(ApiError(500, f"the decode failed: {exc}").body())
            return
        yield _sse(response.chunk(None, reply.rest_ids(), reply.reason, first=first))
        if reply.job.include_usage:
            yield _sse(response.usage_chunk(len(reply.token_ids)))
        yield "data: [DONE]\n\n"

    async def chat(request: Request):
        return await complete(request, "chat")

    async def completions(request: Request):
        return await complete(request, "completion")

    async def models(request: Request):
        try:
            check_key(request)
        except ApiError as error:
            return error_response(error)
        return JSONResponse({"object": "list", "data": [{"id": model_id, "object": "model", "created": 0,
                                                         "owned_by": "fluid"}]})

    async def health(request: Request):
        return JSONResponse({"status": "ok", "model": model_id, "backend": model.backend.name,
                             "fluid": engine.snapshot()})

    async def http_error(request: Request, exc: HTTPException):
        status = exc.status_code if exc.status_code in ApiError.TYPES else 400
        if exc.status_code == 405:
            status = 404
        return error_response(ApiError(status, f"{request.method} {request.url.path}: {exc.detail}", None,
                                       "not_found" if status == 404 else None))

    routes = [Route("/v1/chat/completions", chat, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]),
              Route("/health", health, methods=["GET"])]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        engine.stop()

    return Starlette(routes=routes, exception_handlers={HTTPException: http_error}, lifespan=lifespan)


async def _disconnected(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.25)


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
