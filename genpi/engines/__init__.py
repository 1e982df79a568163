"""LLM engines behind one small interface: batched chat completion.

Every engine takes a list of `ChatRequest`s and returns one `Completion` per
request, in order. A request that cannot be served (too long for the context,
an error inside the engine) comes back with `error` set instead of raising, so
one bad dialogue never takes its batch down with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

Message = dict[str, str]  # {"role": ..., "content": ...}


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    logprobs: int = 0  # k > 0: return the top-k log-probabilities of every generated token


@dataclass
class ChatRequest:
    messages: list[Message]
    sampling: Sampling = field(default_factory=Sampling)
    seed: int = 0
    # How many leading messages form a fixed prefix shared by many requests
    # (the prompt P). Engines without automatic prefix caching reuse its KV cache.
    prefix_messages: int = 0
    # Input embeddings [k, hidden] in front of the messages' tokens, at positions 0..k-1, in place of a prompt
    # (an ICAE system's memory slots, genpi.train.icae); the transformers engine only. Any device and dtype: the
    # engine puts them on its model's.
    prefix_embeds: Any = None


@dataclass
class Completion:
    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = ""  # "stop" | "length" | "error"
    error: str | None = None  # set when the request failed; starts with "context_length:" for over-long prompts
    # With Sampling.logprobs = k: the generated token ids (as kept in `text`, end-of-turn excluded) and, per
    # token, the k most likely token ids and their log-probabilities (log-softmax of the unscaled logits).
    token_ids: list[int] | None = None
    topk_ids: list[list[int]] | None = None
    topk_logprobs: list[list[float]] | None = None

    @property
    def cut(self) -> bool:
        """The text was cut by the token limit (finish reason "length")."""
        return self.finish_reason == "length"

    @classmethod
    def failure(cls, error: str) -> Completion:
        return cls(finish_reason="error", error=error)


CONTEXT_LENGTH_ERROR = "context_length"


def text_token_ids(tokenizer, generated: list[int], text: str) -> list[int]:
    """The generated tokens that make up `text`: those before a stop string (or end-of-turn token) cut it."""
    kept = list(generated)
    while kept and not text.startswith(tokenizer.decode(kept, skip_special_tokens=True)):
        kept.pop()
    return kept


class Engine(Protocol):
    """Every engine also takes one request at a time for its own continuous batching, which the actors use:
    `submit(request) -> concurrent.futures.Future` (transformers: a worker thread) or `async complete(request)`
    (vLLM's async engine, an OpenAI-compatible server)."""

    model_name: str

    def generate(self, requests: list[ChatRequest]) -> list[Completion]: ...

    def count_tokens(self, messages: list[Message]) -> int: ...


class AsyncEngine(Protocol):
    """One request at a time, awaited: what synthesis and the evaluations' episodes talk to, whether the engine
    is a Ray actor (genpi.synth.actors), an adapter view of a local engine (genpi.eval.systems.Batcher) or an
    engine in this process (tests)."""

    model_name: str

    async def complete(self, request: ChatRequest) -> Completion: ...


@dataclass(frozen=True)
class EngineConfig:
    """What an engine actor loads and how much of the cluster it takes."""

    kind: str = "transformers"  # transformers | vllm | openai
    model: str = "smollm2"  # a local path, "smollm2" (the bundled SmolLM2-135M-Instruct); openai: BASE_URL/MODEL
    max_batch: int = 32
    dtype: str = "auto"
    max_model_len: int | None = None
    tensor_parallel_size: int = 1  # vllm only
    gpu_memory_utilization: float = 0.9  # vllm only: the share of each GPU's memory this engine may take
    max_logprobs: int = 20  # vllm only: the largest Sampling.logprobs a request may ask for
    num_cpus: float = 1
    num_gpus: float | None = 0  # None: not chosen (genpi.synth.run.engine_gpus decides once Ray is up)


def make_engine(config: EngineConfig) -> Engine:
    from genpi.models import resolve_model

    if config.kind == "openai":  # a server elsewhere: max_batch is the requests it has in flight
        from genpi.engines.openai import OpenAIEngine

        return OpenAIEngine.from_spec(config.model, max_concurrency=config.max_batch)
    path = resolve_model(config.model)
    if config.kind == "transformers":
        from genpi.engines.hf import TransformersEngine

        return TransformersEngine(
            path,
            max_batch=config.max_batch,
            dtype=config.dtype,
            max_model_len=config.max_model_len,
            threads=max(1, int(config.num_cpus)),
        )
    if config.kind == "vllm":
        from genpi.engines.vllm import VLLMEngine

        return VLLMEngine(
            path,
            tensor_parallel_size=config.tensor_parallel_size,
            dtype=config.dtype,
            max_model_len=config.max_model_len,
            gpu_memory_utilization=config.gpu_memory_utilization,
            max_logprobs=config.max_logprobs,
        )
    raise ValueError(f"unknown engine kind {config.kind!r}: expected 'transformers', 'vllm' or 'openai'")
