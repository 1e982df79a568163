"""The OpenAI-compatible engine: any server with `POST /v1/chat/completions` (genpi serve, vLLM, hosted APIs).

Named `openai:BASE_URL/MODEL` on the command line (`--generator`, `--target`), e.g.
`openai:http://127.0.0.1:8000/v1/calc`: the model is what follows the last "/" (or, where the URL holds
"/v1/", all that follows it, so model names with "/" work: `openai:https://host/v1/meta-llama/Llama-3.3-70B`).
The API key comes from $GENPI_OPENAI_API_KEY, else $OPENAI_API_KEY (none: no Authorization header).

Every request is sent as it comes (the server batches), at most `max_concurrency` at a time. Rate limits
(429), server errors (5xx), timeouts and dropped connections are retried with exponential backoff (the
server's Retry-After wins, up to MAX_RETRY_WAIT_S); when the retries run out, the request's overall time
limit (`request_timeout_s`, from its first send) passes, or the server refuses the request (other 4xx), the
request fails alone with the server's error text. Top-k log-probabilities need token ids: they are asked
with vLLM's `return_tokens_as_token_ids`, which genpi serve honours too (vLLM also lists the end-of-turn
token of a reply that stopped; training aligns the longest common run of tokens, so it does no harm).
"""

from __future__ import annotations

import asyncio
import json
import os
import random

from genpi.engines import CONTEXT_LENGTH_ERROR, ChatRequest, Completion, Message, Sampling

API_KEY_VARIABLES = ("GENPI_OPENAI_API_KEY", "OPENAI_API_KEY")
MAX_RETRY_WAIT_S = 60.0  # the longest wait before a retry, whatever Retry-After asks: a server (or a proxy before
# it) that answers "Retry-After: 100000" must not park a request, and the run behind it, for a day
PREFIX = "openai:"


def split_spec(spec: str) -> tuple[str, str]:
    """`BASE_URL/MODEL` (with or without `openai:`) as (base URL, model)."""
    spec = spec.removeprefix(PREFIX)
    if "/v1/" in spec:
        base, model = spec.split("/v1/", 1)
        base += "/v1"
    else:
        base, _, model = spec.rpartition("/")
    if not base.startswith(("http://", "https://")) or not model:
        raise ValueError(
            f"{PREFIX}{spec}: expected {PREFIX}BASE_URL/MODEL, e.g. {PREFIX}http://127.0.0.1:8000/v1/MODEL"
        )
    return base, model


class OpenAIEngine:
    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        max_concurrency: int = 32,
        timeout_s: float = 600.0,
        retries: int = 5,
        backoff_s: float = 1.0,
        request_timeout_s: float | None = None,
    ):
        """`timeout_s`: the most one try may take; `request_timeout_s`: the most one request may take from its first
        send, every try and wait between tries included (None: each try alone is bounded)."""
        self.base_url, self.model_name = base_url.rstrip("/"), model
        self.api_key = (
            api_key if api_key is not None else next(filter(None, map(os.environ.get, API_KEY_VARIABLES)), None)
        )
        self.max_concurrency, self.timeout_s, self.retries, self.backoff_s = (
            max_concurrency,
            timeout_s,
            retries,
            backoff_s,
        )
        if request_timeout_s is not None and request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s must be positive or None, not {request_timeout_s}")
        self.request_timeout_s = request_timeout_s
        self._session = self._limit = self._session_loop = None  # made in the event loop that uses them
        self._loop: asyncio.AbstractEventLoop | None = None  # for the synchronous `generate`

    @classmethod
    def from_spec(cls, spec: str, **kwargs) -> OpenAIEngine:
        return cls(*split_spec(spec), **kwargs)

    async def complete(self, request: ChatRequest) -> Completion:
        s = request.sampling
        body = {
            "model": self.model_name,
            "messages": request.messages,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "max_tokens": s.max_tokens,
            "seed": request.seed,
            "stream": False,
        }
        if s.stop:
            body["stop"] = list(s.stop)
        if s.logprobs:
            body.update(logprobs=True, top_logprobs=s.logprobs, return_tokens_as_token_ids=True)
        try:
            reply = await self._post("/chat/completions", body)
        except _Failed as e:
            return Completion.failure(str(e))
        try:
            return _completion(reply, s.logprobs)
        except (KeyError, IndexError, TypeError, ValueError) as e:
            return Completion.failure(
                f"engine: {self.model_name}: unexpected reply ({type(e).__name__}: {e}): {str(reply)[:300]}"
            )

    def generate(self, requests: list[ChatRequest]) -> list[Completion]:
        """All requests at once, from synchronous code; one event loop for the engine's life."""
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(self._gather(requests))

    async def _gather(self, requests: list[ChatRequest]) -> list[Completion]:
        try:
            return list(await asyncio.gather(*(self.complete(r) for r in requests)))
        finally:
            await self.aclose()

    def models(self, timeout_s: float = 30.0) -> list[str]:
        """The model ids the server lists (GET /models), asked once: a check before work starts should fail fast,
        so no retries. Raises RuntimeError with the reason when the server cannot be asked."""
        import urllib.error
        import urllib.request

        url = self.base_url + "/models"
        try:
            with urllib.request.urlopen(
                urllib.request.Request(url, headers=self._headers()), timeout=timeout_s
            ) as response:
                return [m["id"] for m in json.loads(response.read())["data"]]
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"{url}: HTTP {e.code}: {_error_text(e.read().decode(errors='replace'))}") from None
        except (OSError, ValueError, KeyError, TypeError) as e:  # unreachable, timed out, or not an OpenAI-style list
            raise RuntimeError(f"{url}: {type(e).__name__}: {e}") from None

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def count_tokens(self, messages: list[Message]) -> int:
        """The server's count (its tokenizer and chat template), from a one-token completion's usage."""
        [completion] = self.generate([ChatRequest(messages, Sampling(max_tokens=1))])
        if completion.error:
            raise RuntimeError(completion.error)
        return completion.prompt_tokens

    async def _post(self, path: str, body: dict) -> dict:
        import aiohttp

        loop = asyncio.get_running_loop()
        if self._session is None or self._session_loop is not loop:
            self._session = aiohttp.ClientSession(
                headers=self._headers(), timeout=aiohttp.ClientTimeout(total=self.timeout_s)
            )
            self._limit, self._session_loop = asyncio.Semaphore(self.max_concurrency), loop
        url = self.base_url + path
        deadline = None  # from the first send: time spent queued behind `max_concurrency` requests does not count
        tries, why = 0, ""
        for attempt in range(self.retries + 1):
            wait = self.backoff_s * 2**attempt * (0.5 + random.random())  # jitter: retries of many requests spread out
            async with self._limit:
                if deadline is None and self.request_timeout_s is not None:
                    deadline = loop.time() + self.request_timeout_s
                left = self.timeout_s if deadline is None else min(self.timeout_s, deadline - loop.time())
                if left <= 0:
                    break
                tries += 1
                try:
                    async with self._session.post(
                        url, json=body, timeout=aiohttp.ClientTimeout(total=left)
                    ) as response:
                        if response.status == 200:
                            return await response.json(content_type=None)
                        error = _error_text(await response.text())
                        if response.status != 429 and response.status < 500:  # the request itself is refused
                            if "context_length" in error or "maximum context length" in error:
                                raise _Failed(f"{CONTEXT_LENGTH_ERROR}: {self.model_name}: {error}")
                            raise _Failed(f"engine: {self.model_name}: HTTP {response.status}: {error}")
                        why = f"HTTP {response.status}: {error}"
                        retry_after = response.headers.get("Retry-After", "")
                        if retry_after.replace(".", "", 1).isdigit():
                            wait = float(retry_after)
                except (TimeoutError, aiohttp.ClientError) as e:
                    why = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            if attempt < self.retries:
                wait = min(wait, MAX_RETRY_WAIT_S)
                if deadline is not None and loop.time() + wait >= deadline:  # the retry would start too late
                    break
                await asyncio.sleep(wait)
        else:
            raise _Failed(f"engine: {self.model_name} at {url}: {why} (after {tries} tries)")
        raise _Failed(
            f"engine: {self.model_name} at {url}: no answer within {self.request_timeout_s:g} s, the limit for one "
            f"request, tries and waits included ({tries} tries, the last: {why})"
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def shutdown(self) -> None:
        if self._loop is not None:
            self._loop.close()
            self._loop = None


class _Failed(Exception):
    pass


def _error_text(text: str) -> str:
    """The message of an OpenAI-style error body, else the body's start."""
    try:
        error = json.loads(text).get("error")
        message = error.get("message") if isinstance(error, dict) else error
        code = error.get("code") if isinstance(error, dict) else None
        return f"{message} ({code})" if code else str(message)
    except (ValueError, AttributeError):
        return text.strip()[:500]


def _completion(reply: dict, logprobs: int) -> Completion:
    choice = reply["choices"][0]
    usage = reply.get("usage") or {}
    completion = Completion(
        text=choice["message"].get("content") or "",
        prompt_tokens=int(usage.get("prompt_tokens", 0)),
        completion_tokens=int(usage.get("completion_tokens", 0)),
        finish_reason="length" if choice.get("finish_reason") == "length" else "stop",
    )
    if logprobs:
        content = (choice.get("logprobs") or {}).get("content")
        if content is None:
            return Completion.failure("engine: the server returned no log-probabilities (run with --teacher-topk 0)")
        try:
            completion.token_ids = [_token_id(t["token"]) for t in content]
            completion.topk_ids = [[_token_id(t["token"]) for t in step["top_logprobs"]] for step in content]
        except ValueError:
            return Completion.failure(
                "engine: the server gave log-probabilities without token ids (it ignores vLLM's "
                "return_tokens_as_token_ids); run with --teacher-topk 0"
            )
        completion.topk_logprobs = [[float(t["logprob"]) for t in step["top_logprobs"]] for step in content]
    return completion


def _token_id(token: str) -> int:
    if not token.startswith("token_id:"):
        raise ValueError(token)
    return int(token.removeprefix("token_id:"))
