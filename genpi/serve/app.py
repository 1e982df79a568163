"""The HTTP side of the embedded engine: the Starlette app that `build_app` makes over a `Scheduler`.

    GET  /v1/models             the base model's name and the prompt ids that have an adapter
    POST /v1/chat/completions   `model` = a prompt id: the base plus that prompt's adapter, no prompt tokens;
                                `model` = the base's name: the base alone (send the prompt yourself)
    GET  /health                200 while the server is up (no key needed: for orchestrators' probes)
    GET  /metrics               Prometheus metrics per model (genpi.serve.metrics): requests, tokens in and out,
                                queue depth, time to first token (the API key, when there is one)

A request is read within the `Limits` (its body's size and time), checked by `protocol.parse_chat`, tokenized in
a thread of its own (one that does not fit the context never reaches the engine, so no prompt stalls the running
rows), and handed to the scheduler; it is refused 503 once the engine's rows and `max_waiting` more are held.
Streamed requests get Server-Sent Events as their tokens come (held back while a stop string may be forming); a
client that goes away has its row stopped. Every error is OpenAI's JSON error shape; what went wrong inside goes
to the server's log (logger `genpi.serve`), not to the client.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from jinja2 import TemplateError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from genpi.engines import CONTEXT_LENGTH_ERROR, Completion
from genpi.serve.metrics import CONTENT_TYPE, ServeMetrics
from genpi.serve.protocol import (
    INTERNAL_ERROR,
    ApiError,
    Chat,
    Limits,
    chat_completion,
    chunk,
    context_error,
    finish_reason,
    parse_chat,
    usage_of,
)
from genpi.serve.scheduler import Adapter, Job, Prefixes, Scheduler

log = logging.getLogger("genpi.serve")  # the name the docs give for the whole server


def build_app(
    scheduler: Scheduler,
    tokenizer,
    base_name: str,
    adapters: list[Adapter],
    api_key: str | None = None,
    default_max_tokens: int = 512,
    merged: bool = False,
    limits: Limits = Limits(),
):
    """The ASGI app over an embedded engine. `tokenizer` (its own copy: the engine thread uses the engine's)
    counts each request's prompt tokens, in a thread of its own, and decodes streamed tokens. `merged`: the
    engine's model is the one adapter merged into the base, served under its prompt id alone (the base without
    it is not there to serve). The engine's `max_batch` rows plus `limits.max_waiting` requests are held at once."""
    if api_key is not None and not api_key.strip():
        raise ValueError("an empty API key: give one, or None to serve without")
    if merged:  # the engine's model is the merged one: no PEFT adapter to name
        [adapter] = adapters
        served = {adapter.prompt_id: None}
    else:  # model: PEFT adapter name (None: the base alone)
        served = {a.prompt_id: a.name for a in adapters} | {base_name: None}
    created, prefixes, metrics = int(time.time()), Prefixes(), ServeMetrics(list(served))
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
        data = [
            {"id": m, "object": "model", "created": created, "owned_by": "genpi", "root": base_name} for m in served
        ]
        return JSONResponse({"object": "list", "data": data})

    async def prometheus(request: Request):
        authorize(request)
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    def release(_=None) -> None:
        nonlocal held
        held -= 1

    def finished(model: str, job: Job, arrived: float):  # the job's figures, as it leaves the engine
        def done(result) -> None:
            completion = Completion() if result.cancelled() else result.result()  # cancelled: its waiter went away
            first = job.first_token_at - arrived if job.first_token_at is not None else None
            metrics.finished(model, completion, first, time.perf_counter() - arrived)

        return done

    def counted(route):  # every answer counted by model and status
        async def answer(request: Request):
            response = await route(request)
            metrics.answered(getattr(request.state, "model", ""), response.status_code)
            return response

        return answer

    async def chat_completions(request: Request):
        nonlocal held
        arrived = time.perf_counter()
        authorize(request)
        if held >= capacity:
            raise ApiError(
                503,
                f"the server is busy: {held} requests are running or waiting; retry later",
                code="server_overloaded",
                headers={"Retry-After": "1"},
            )
        held += 1
        job = None
        try:
            body = await _read_json(request, limits.max_body_bytes, limits.body_timeout_s)
            chat = parse_chat(body, set(served), default_max_tokens, limits)
            request.state.model = chat.model  # one of those served: the metrics' label
            try:
                n = await asyncio.get_running_loop().run_in_executor(tokenizing, prompt_tokens, chat.request.messages)
            except TemplateError as e:  # the chat template refuses these messages (e.g. roles out of order)
                raise ApiError(400, f"the model's chat template refuses these messages: {e}", "messages") from e
            if n + chat.request.sampling.max_tokens > max_model_len:
                raise context_error(
                    f"{n} prompt tokens + {chat.request.sampling.max_tokens} max tokens > {max_model_len}"
                )
            chat.request.prefix_messages = prefixes.shared(chat.model, chat.request.messages)
            job = scheduler.submit(Job(chat.request, served[chat.model], chat.stream))
            metrics.submitted(chat.model)
        finally:
            if job is None:
                release()
            else:  # held until the engine is done with it
                job.result.add_done_callback(release)
                job.result.add_done_callback(finished(chat.model, job, arrived))
        if not chat.stream:
            completion = await _wait(request, job)
            if completion.error:
                raise _error_of(completion)
            return JSONResponse(chat_completion(tokenizer, chat, completion))
        first = await _next_token(job)  # an error before the first token is still an HTTP error
        if first is None and job.result.result().error:
            raise _error_of(job.result.result())
        return StreamingResponse(_events(chat, job, first), media_type="text/event-stream")

    async def _events(chat: Chat, job: Job, first: int | None):
        def event(delta: dict | None, finish: str | None = None, usage: dict | None = None) -> str:
            return f"data: {json.dumps(chunk(chat, delta, finish, usage))}\n\n"

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
                yield event({}, finish_reason(completion))
                if chat.include_usage:
                    yield event(None, usage=usage_of(completion))
            yield "data: [DONE]\n\n"
        except Exception:  # the status is sent: the stream ends with an error event instead
            log.exception("genpi serve: a stream failed")
            yield f"data: {json.dumps(ApiError(500, INTERNAL_ERROR).body())}\n\n"
        finally:  # the client went away (or the stream ended): stop generating this row
            job.cancelled = True

    async def http_error(request: Request, error: HTTPException):  # Starlette's own: no such route or method
        message = f"{request.method} {request.url.path}: {error.detail}"
        return _respond(ApiError(error.status_code, message, headers=error.headers))

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", _api(models), methods=["GET"]),
        Route("/v1/chat/completions", counted(_api(chat_completions)), methods=["POST"]),
        Route("/metrics", _api(prometheus), methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error})
    app.state.metrics = metrics  # genpi.serve.metrics.ServeMetrics: its registry, for tests and embedding
    return app


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


def _error_of(completion: Completion) -> ApiError:
    if completion.error.startswith(f"{CONTEXT_LENGTH_ERROR}:"):
        return context_error(completion.error.removeprefix(f"{CONTEXT_LENGTH_ERROR}:").strip())
    log.error("genpi serve: a request failed in the engine: %s", completion.error)  # the client is told no more
    return ApiError(500, INTERNAL_ERROR)


def _respond(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _api(handler):
    """The route `handler` with every failure as an OpenAI error: what went wrong inside is logged, not sent."""

    async def route(request):
        try:
            return await handler(request)
        except ApiError as e:
            return _respond(e)
        except Exception:
            log.exception("genpi serve: %s %s failed", request.method, request.url.path)
            return _respond(ApiError(500, INTERNAL_ERROR))

    return route


async def _read_json(request, limit: int, timeout_s: float):
    """The request's JSON body, read up to `limit` bytes (a body that says or turns out to be larger is refused
    before more of it is held) within `timeout_s` seconds."""
    too_large = ApiError(
        413, f"the request body is over this server's limit of {limit} bytes", code="request_too_large"
    )
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    body = bytearray()

    async def read() -> None:
        async for part in request.stream():
            body.extend(part)
            if len(body) > limit:
                raise too_large

    try:
        await asyncio.wait_for(read(), timeout_s)
    except ClientDisconnect as e:
        raise ApiError(400, "the client went away before sending its request body") from e
    except TimeoutError as e:
        raise ApiError(408, f"the request body did not arrive within {timeout_s:g} s", code="request_timeout") from e
    try:
        return json.loads(body)
    except RecursionError as e:  # the parser recurses per level: deep nesting is no valid request anyway
        raise ApiError(400, "the request body is not valid JSON: nested too deeply") from e
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4,300 digits
        raise ApiError(400, f"the request body is not valid JSON: {e}") from e
