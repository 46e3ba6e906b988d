"""OpenAI-shaped requests and responses for ``fluid serve``: parsing, checks, JSON bodies.

Status codes follow one rule. **400**: the request cannot be read as asked (not JSON, a field
of the wrong type, an unknown field, or a field FLUID does not support that would change
the result, such as ``n`` > 1 or ``logprobs``: never silently ignored). **422**: the request
reads fine but the library refuses a value (a negative ``max_tokens``, ``k_min`` above
``k_max``, a prompt longer than the model's context); the message is the library's own
:class:`~fluid_app.errors.FluidError`, with ``param`` naming the request field. **401** wrong
or missing API key, **404** unknown model or path, **503** the waiting line is full.

``return_token_ids: true`` (vLLM's extra field) adds ``token_ids`` to each choice; see
:class:`Response` for what a stream chunk carries.
"""

from __future__ import annotations

import numbers
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import FluidError
from ..sampler import Decoder

if TYPE_CHECKING:
    from ..api import FluidModel

# request field -> DecodeSettings option; FLUID's own knobs are extra fields
SETTINGS_FIELDS = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens", "seed": "seed",
                   "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "k_min": "k_min",
                   "k_max": "k_max", "threshold": "threshold", "prompt_lookup_num_tokens": "prompt_lookup_num_tokens",
                   "mode": "mode"}
INTEGERS = {"max_tokens", "max_completion_tokens", "seed", "top_k", "k_min", "k_max", "prompt_lookup_num_tokens"}
NUMBERS = {"temperature", "top_p", "threshold"}
SERVED_MODES = ("fluid", "ar")  # the fused loop; 'reference' decodes one row at a time and cannot join a batch

# fields that change the result and that FLUID does not do: refused unless left at their no-op value
UNSUPPORTED = {"n": (1,), "logprobs": (False, 0), "top_logprobs": (0,), "tools": ([],), "tool_choice": ("none",),
               "functions": ([],), "function_call": ("none",), "logit_bias": ({},), "presence_penalty": (0,),
               "frequency_penalty": (0,), "response_format": ({"type": "text"},), "best_of": (1,), "echo": (False,),
               "suffix": ("",), "audio": (), "modalities": (["text"],), "prediction": ()}
HARMLESS = {"model", "stream", "stream_options", "user", "metadata", "store", "parallel_tool_calls", "service_tier"}
# vLLM's extra field: each choice (or stream chunk's choice) also carries its completion token ids
COMMON = HARMLESS | set(SETTINGS_FIELDS) | set(UNSUPPORTED) | {"stop", "return_token_ids"}
FIELDS = {"chat": COMMON | {"messages"}, "completion": COMMON | {"prompt"}}
ROLES = ("system", "developer", "user", "assistant")


class ApiError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}``."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             422: "invalid_request_error", 503: "server_overloaded"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


@dataclass
class Job:
    """A checked request, ready for the decode thread."""

    kind: str  # "chat" or "completion"
    decoder: Decoder
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    return_token_ids: bool = False

    @property
    def prompt_tokens(self) -> int:
        return len(self.decoder.prompts[0])


def _bad(name: str, wanted: str, value: Any) -> ApiError:
    return ApiError(400, f"'{name}' must be {wanted} (got {type(value).__name__})", name, "invalid_type")


def parse(body: Any, kind: str, model: FluidModel, model_id: str) -> Job:
    """Check a request body and build its decoder; raises :class:`ApiError`."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", None, "invalid_body")
    for name in body:
        if name not in FIELDS[kind]:
            raise ApiError(400, f"unknown field '{name}'", name, "unknown_parameter")
    for name, allowed in UNSUPPORTED.items():
        value = body.get(name)
        if value is not None and not any(value == a and isinstance(value, bool) == isinstance(a, bool)
                                         for a in allowed):
            raise ApiError(400, f"'{name}' is not supported by this server (FLUID decodes one greedy or "
                                f"sampled choice without log-probabilities or tools); remove it", name, "unsupported")
    name = body.get("model")
    if name is not None and not isinstance(name, str):
        raise _bad("model", "a string", name)
    if name not in (None, model_id):
        raise ApiError(404, f"the model '{name}' does not exist; this server serves '{model_id}'", "model",
                       "model_not_found")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("stream", "true or false", stream)
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}
                                or not isinstance(options.get("include_usage", False), bool)):
        raise ApiError(400, "'stream_options' must be an object with one field, include_usage: true or false",
                       "stream_options", "invalid_type")
    stop = _stop(body.get("stop"))
    return_ids = body.get("return_token_ids")
    if return_ids is None:
        return_ids = False
    elif not isinstance(return_ids, bool):
        raise _bad("return_token_ids", "true or false", return_ids)
    overrides: dict[str, Any] = {}
    for name, option in SETTINGS_FIELDS.items():
        value = body.get(name)
        if value is None:
            continue
        if name in INTEGERS and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
            raise _bad(name, "a whole number", value)
        if name in NUMBERS and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
            raise _bad(name, "a number", value)
        if name == "mode" and value not in SERVED_MODES:
            raise ApiError(400, f"'mode' must be one of {', '.join(SERVED_MODES)} (got {value!r})", "mode",
                           "invalid_value")
        overrides[option] = value
    if "max_tokens" in body and "max_completion_tokens" in body:
        raise ApiError(400, "give 'max_tokens' or 'max_completion_tokens', not both", "max_tokens", "invalid_value")
    prompt_field = "messages" if kind == "chat" else "prompt"
    names = {option: name for name, option in SETTINGS_FIELDS.items() if name in body} | {"prompt": prompt_field}
    try:
        ids = _chat_ids(body, model) if kind == "chat" else _prompt_ids(body, model)
        settings = model.settings(**overrides)
        decoder = Decoder(model.backend, [ids], settings, draft_store=model.draft_store)
    except FluidError as exc:
        param = next((names.get(p, p) for p in exc.params), None)
        raise ApiError(422, exc.message, param, "invalid_value") from None
    return Job(kind, decoder, stop, stream, bool(stream and (options or {}).get("include_usage")), return_ids)


def _stop(value: Any) -> list[str]:
    stops = [value] if isinstance(value, str) else value
    if stops is None:
        return []
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, "'stop' must be a non-empty string or a list of them", "stop", "invalid_type")
    return stops


def _chat_ids(body: dict[str, Any], model: FluidModel) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", "messages",
                       "invalid_type")
    turns = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad(where, "an object with 'role' and 'content'", message)
        extra = set(message) - {"role", "content", "name"}
        if extra:
            raise ApiError(400, f"{where} has fields this server does not support: {sorted(extra)}", where,
                           "unsupported")
        role = message.get("role")
        if role not in ROLES:
            raise ApiError(400, f"{where}.role must be one of {', '.join(ROLES)} (got {role!r})", f"{where}.role",
                           "invalid_value")
        turns.append({"role": "system" if role == "developer" else role,
                      "content": _content(message.get("content"), f"{where}.content")})
    try:
        return model.encode_chat(turns)
    except FluidError:
        raise
    except Exception as exc:  # the model's own chat template refused the conversation
        raise FluidError(f"the model's chat template refused these messages: {exc}", "prompt") from None


def _content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ApiError(400, f"{where} must be a string or a list of text parts", where, "invalid_type")


def _prompt_ids(body: dict[str, Any], model: FluidModel) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt
                                   and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
        return model.encode(prompt)
    raise ApiError(400, "'prompt' must be a string or a list of token ids (one prompt per request)", "prompt",
                   "invalid_type")


# -- responses -------------------------------------------------------------------------------------
def finish_reason(reason: str) -> str:
    """The library's finish reason in OpenAI's words."""
    return "length" if reason == "length" else "stop"


def usage(job: Job, completion_tokens: int) -> dict[str, Any]:
    result = job.decoder.results[0]
    return {"prompt_tokens": job.prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": job.prompt_tokens + completion_tokens, "forwards": result.forwards,
            "tokens_per_forward": round(result.tokens_per_forward, 4)}


class Response:
    """The ids and JSON objects of one reply, whole or as stream chunks.

    With ``return_token_ids``, a whole reply's choice carries ``token_ids``: the completion's
    token ids (see :attr:`~fluid_app.text_stream.TextStream.completion_ids`). A stream chunk's
    choice carries the ids of the tokens whose text has been emitted since the previous chunk
    (a token whose text is partly held back, for a half character or a possible stop string,
    waits for the chunk that shows the rest of it); the final chunk, the one with
    ``finish_reason``, carries the remaining ids, so the chunks' ids add up to the whole reply's.
    """

    def __init__(self, job: Job, model_id: str):
        self.job, self.model_id = job, model_id
        self.id = ("chatcmpl-" if job.kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _object(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model_id,
                "choices": choices}

    def _ids(self, choice: dict[str, Any], token_ids: list[int]) -> dict[str, Any]:
        if self.job.return_token_ids:
            choice["token_ids"] = list(token_ids)
        return choice

    def whole(self, text: str, reason: str, token_ids: list[int]) -> dict[str, Any]:
        if self.job.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
            body = self._object("chat.completion", [self._ids(choice, token_ids)])
        else:
            body = self._object("text_completion", [self._ids({"index": 0, "text": text, "logprobs": None,
                                                               "finish_reason": reason}, token_ids)])
        body["usage"] = usage(self.job, len(token_ids))
        return body

    def chunk(self, text: str | None, token_ids: list[int], reason: str | None = None,
              first: bool = False) -> dict[str, Any]:
        if self.job.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            return self._object("chat.completion.chunk",
                                [self._ids({"index": 0, "delta": delta, "finish_reason": reason}, token_ids)])
        return self._object("text_completion", [self._ids({"index": 0, "text": text or "", "logprobs": None,
                                                           "finish_reason": reason}, token_ids)])

    def usage_chunk(self, completion_tokens: int) -> dict[str, Any]:
        body = self._object("chat.completion.chunk" if self.job.kind == "chat" else "text_completion", [])
        body["usage"] = usage(self.job, completion_tokens)
        return body
