"""The OpenAI chat completions protocol as genpi serve speaks it: what one request may hold (`Limits`), a request
body checked into a `Chat` (every field that is wrong is refused with a message naming it), the response and the
stream chunk built from an engine's `Completion`, and OpenAI's JSON error shape (`ApiError`). Nothing here knows
HTTP or the engine: `app` reads bodies and routes, the scheduler runs the requests.
"""

from __future__ import annotations

import random
import time
import uuid
from dataclasses import dataclass, field

from genpi.engines import ChatRequest, Completion, Sampling
from genpi.flags import setting

ROLES = ("system", "user", "assistant")
MAX_STOPS = 4  # as the OpenAI API
MAX_TOP_LOGPROBS = 20
INTERNAL_ERROR = "the server failed on this request; its log says why"


@dataclass(frozen=True)
class Limits:
    """What one request may hold and how many requests the server holds at once (the --max-* flags of genpi serve).
    Tokenizing costs about a second per 2 MB of text on one core, off the event loop and the engine's worker."""

    # a 128k-token context of escaped JSON text fits
    max_body_bytes: int = setting(
        4 * 2**20, "transformers: the largest request body (default %(default)s; larger: 413)"
    )
    max_messages: int = setting(1024, "transformers: the most messages in a request")
    max_message_chars: int = setting(2**20, "transformers: the most characters in one message")
    # the engine decodes the last 4 tokens per stop character at every step of the row
    max_stop_chars: int = setting(64, "transformers: the most characters in one stop string")
    max_waiting: int = setting(
        64,
        "transformers: requests held beyond the --max-batch running ones, being read, tokenized or "
        "waiting for a row (default %(default)s); more are answered 503 with Retry-After",
    )
    # to send the body in: a client that trickles it holds a place no longer
    body_timeout_s: float = setting(
        30.0,
        "transformers: seconds a client has to send its request body (default %(default)s; then 408)",
        flag="--body-timeout",
        metavar="SECONDS",
    )


class ApiError(Exception):
    """An OpenAI-style error response."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def context_error(message: str) -> ApiError:
    return ApiError(
        400,
        f"this model's context is too short for the request: {message}; shorten the messages or lower max_tokens",
        "messages",
        "context_length_exceeded",
    )


@dataclass
class Chat:
    """A validated chat completion request."""

    model: str
    request: ChatRequest
    stream: bool
    include_usage: bool
    logprobs: int  # top_logprobs asked (0: no logprobs)
    token_ids: bool  # vLLM's return_tokens_as_token_ids: tokens written "token_id:N"
    created: int = field(default_factory=lambda: int(time.time()))
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")


def _number(body: dict, name: str, default, low: float, high: float, integer: bool = False):
    value = body.get(name)
    if value is None:
        return default
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not low <= value <= high:
        what = "an integer" if integer else "a number"
        raise ApiError(
            400, f"'{name}' must be {what} in [{low:g}, {high:g}], got {repr(value)[:80]}", name
        )  # not an echo of a huge value
    return value


def parse_chat(body, models: set[str], default_max_tokens: int, limits: Limits = Limits()) -> Chat:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError(400, "'model' is required: a prompt id or the base model's name (GET /v1/models)", "model")
    if model not in models:
        raise ApiError(
            404,
            f"the model {repr(model)[:100]} does not exist; served: {', '.join(sorted(models))}",
            "model",
            "model_not_found",
        )
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    if len(messages) > limits.max_messages:
        raise ApiError(
            400,
            f"'messages' holds {len(messages)} messages; this server takes at most {limits.max_messages}",
            "messages",
        )
    chat = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # content parts: text only
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
            ):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        role = m.get("role") if isinstance(m, dict) else None
        role = "system" if role == "developer" else role  # OpenAI's newer name for the system role
        if role not in ROLES or not isinstance(content, str):
            raise ApiError(400, f"messages[{i}] must be {{'role': one of {ROLES}, 'content': text}}", f"messages[{i}]")
        if len(content) > limits.max_message_chars:
            raise ApiError(
                400,
                f"messages[{i}].content has {len(content)} characters; this server takes at most "
                f"{limits.max_message_chars} per message",
                f"messages[{i}].content",
            )
        chat.append({"role": role, "content": content})
    if _number(body, "n", 1, 1, 1, integer=True) != 1:
        raise ApiError(400, "'n' must be 1", "n")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOPS or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, f"'stop' must be a string or a list of at most {MAX_STOPS} non-empty strings", "stop")
    if any(len(s) > limits.max_stop_chars for s in stop):
        raise ApiError(400, f"a stop string has at most {limits.max_stop_chars} characters on this server", "stop")
    for name in ("stream", "logprobs", "return_tokens_as_token_ids"):
        if not isinstance(body.get(name, False), bool):
            raise ApiError(400, f"'{name}' must be true or false", name)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options")
    if body.get("top_p") == 0:
        raise ApiError(400, "'top_p' must be above 0", "top_p")
    logprobs = 0
    if body.get("logprobs"):
        logprobs = max(1, _number(body, "top_logprobs", 1, 0, MAX_TOP_LOGPROBS, integer=True))
    # max_completion_tokens is OpenAI's newer name; null (as clients send for "unset") falls back to max_tokens
    limit = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    seed = _number(body, "seed", None, -(2**63), 2**64 - 1, integer=True)
    sampling = Sampling(
        temperature=float(_number(body, "temperature", 1.0, 0, 2)),
        top_p=float(_number(body, "top_p", 1.0, 0, 1)),
        max_tokens=_number(body, limit, default_max_tokens, 1, 2**31, integer=True),
        stop=tuple(stop),
        logprobs=logprobs,
    )
    request = ChatRequest(chat, sampling, seed=random.randrange(2**31) if seed is None else seed % 2**31)
    return Chat(
        model,
        request,
        bool(body.get("stream")),
        bool(options.get("include_usage")),
        logprobs,
        bool(body.get("return_tokens_as_token_ids")),
    )


def finish_reason(completion: Completion) -> str:
    return "length" if completion.cut else "stop"


def usage_of(completion: Completion) -> dict:
    p, c = completion.prompt_tokens, completion.completion_tokens
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _logprobs(tokenizer, chat: Chat, completion: Completion) -> dict | None:
    """OpenAI's `logprobs.content` for the kept tokens. A token's own log-probability is its entry in the top-k;
    a sampled token outside the top-k gets the lowest of them (an upper bound)."""
    if not chat.logprobs or completion.token_ids is None:
        return None
    spell = (lambda t: f"token_id:{t}") if chat.token_ids else (lambda t: tokenizer.decode([t]))
    content = []
    for token, ids, values in zip(completion.token_ids, completion.topk_ids, completion.topk_logprobs):
        own = values[ids.index(token)] if token in ids else values[-1]
        top = [{"token": spell(i), "logprob": v, "bytes": None} for i, v in zip(ids, values)]
        content.append({"token": spell(token), "logprob": own, "bytes": None, "top_logprobs": top})
    return {"content": content}


def chat_completion(tokenizer, chat: Chat, completion: Completion) -> dict:
    """The `chat.completion` object answering `chat` (`tokenizer` spells the logprobs' tokens)."""
    message = {"role": "assistant", "content": completion.text}
    choice = {
        "index": 0,
        "message": message,
        "logprobs": _logprobs(tokenizer, chat, completion),
        "finish_reason": finish_reason(completion),
    }
    return {
        "id": chat.id,
        "object": "chat.completion",
        "created": chat.created,
        "model": chat.model,
        "choices": [choice],
        "usage": usage_of(completion),
    }


def chunk(chat: Chat, delta: dict | None, finish: str | None = None, usage: dict | None = None) -> dict:
    """One `chat.completion.chunk` of `chat`'s stream: a delta (None: no choice, as the usage chunk has none)."""
    choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}] if delta is not None else []
    return {
        "id": chat.id,
        "object": "chat.completion.chunk",
        "created": chat.created,
        "model": chat.model,
        "choices": choices,
        **({"usage": usage} if usage else {}),
    }
