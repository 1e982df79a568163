"""Serving latency of `genpi serve` (embedded engine), measured in one run. Prints:

(a) a 5-turn conversation served with the full prompt P (the base model, P's KV cache reused: prefix caching)
    and prompt-free with P's adapter, unmerged (the server of (b)) and merged into the base (a second server,
    `genpi serve --merge ID`): time to first token and total latency, summed over the 5 turns, and their ratios
    (adapter / full prompt). The three replay the same user turns, turn by turn one after the other, and, as
    history, the full-prompt replies, so each turn's context differs only by P.
(b) requests/s for 2 adapters served together (one stream of requests alternating between them, batched
    together) vs one at a time (the same requests, all of one adapter, then all of the other).

The server runs in its own process on the bundled SmolLM2 with the example catalog. Without --adapters, the
adapters are LoRA adapters of GenPI's shape (rank 16, all linear layers) with random weights: latency depends
on the shape, not on what was learned.

    .venv/bin/python benchmarks/serve_latency.py [--adapters DIR] [--prompt os-shell] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from genpi.catalog import load_catalog
from genpi.models import resolve_model

REPO = Path(__file__).resolve().parents[1]
CATALOG = REPO / "examples" / "agents.yaml"
TURNS = [
    "List the files in my home folder.",
    "Now only the hidden ones.",
    "How big is the largest?",
    "Delete it.",
    "Thanks, that is all.",
]


def random_adapters(folder: Path, entries) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    from genpi.data.adapters import AdapterManifest, write_adapter
    from genpi.train.qlora import LoraSettings, add_lora, save_adapter

    base, settings = resolve_model("smollm2"), LoraSettings()
    for i, entry in enumerate(entries):
        model = add_lora(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), settings)
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=generator) * 1e-3)
        manifest = AdapterManifest(entry.id, entry.sha256, "smollm2", "random", None, settings.to_dict(), "benchmark")
        write_adapter(folder / entry.id, manifest, lambda tmp: save_adapter(model, tmp))
    return folder


QUIET_S = 2.0  # before each request of (a): the other server's engine thread (and its spinning OpenMP pool) has
# exited after its 1 s idle, so neither server's idle threads slow the other's request


def start_server(adapters: Path, threads: int, *flags: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "genpi.cli",
        "serve",
        str(adapters),
        "--catalog",
        str(CATALOG),
        "--port",
        str(port),
        "--threads",
        str(threads),
        *flags,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.DEVNULL, start_new_session=True)
    while True:
        assert process.poll() is None, "genpi serve exited"
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5)
            return process, f"http://127.0.0.1:{port}/v1"
        except (urllib.error.URLError, ConnectionError):
            time.sleep(1)


def stream(url: str, model: str, messages: list[dict], max_tokens: int) -> tuple[float, float, str, int]:
    """(time to first token, total time, text, completion tokens) of one streamed greedy completion."""
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    request = urllib.request.Request(
        url + "/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    start = time.perf_counter()
    first, text, tokens = None, "", 0
    with urllib.request.urlopen(request, timeout=600) as response:
        for line in response:
            line = line.decode().strip()
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                if choice["delta"].get("content"):
                    first = first or time.perf_counter()
                    text += choice["delta"]["content"]
    end = time.perf_counter()
    return (first or end) - start, end - start, text, tokens


def conversation(systems: dict[str, tuple[str, str, list[dict]]], max_tokens: int, turns: list[str]) -> dict:
    """Each system (name: url, model, leading messages) answers the same user turns, turn by turn, on the same
    history: the first system's replies."""
    history: list[dict] = []
    totals = {name: [0.0, 0.0, 0] for name in systems}
    for text in turns:
        history.append({"role": "user", "content": text})
        replies = []
        for name, (url, model, leading) in systems.items():
            time.sleep(QUIET_S)
            ttft, total, reply, tokens = stream(url, model, leading + history, max_tokens)
            totals[name] = [totals[name][0] + ttft, totals[name][1] + total, totals[name][2] + tokens]
            replies.append(reply)
        history.append({"role": "assistant", "content": replies[0]})
    return {k: {"ttft_s": v[0], "total_s": v[1], "completion_tokens": v[2]} for k, v in totals.items()}


def throughput(url: str, models: list[str], n: int, max_tokens: int) -> float:
    """Requests/s of n concurrent requests, spread over `models` in turn."""

    def one(i: int) -> None:
        body = {
            "model": models[i % len(models)],
            "messages": [{"role": "user", "content": f"Task {i}: {TURNS[i % 5]}"}],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        request = urllib.request.Request(
            url + "/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        urllib.request.urlopen(request, timeout=600).read()

    start = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        list(pool.map(one, range(n)))
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapters", default=None, help="trained adapters (genpi train --out); default: random ones")
    p.add_argument("--prompt", default="os-shell", help="the prompt of (a) (its user turns are OS tasks)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--requests", type=int, default=16, help="requests per adapter in (b)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args()

    entries = load_catalog(CATALOG)
    entry = next((e for e in entries if e.id == args.prompt), None)
    if entry is None:
        p.error(f"--prompt {args.prompt}: not in {CATALOG}")
    other = next(e for e in entries if e.id != entry.id)
    with tempfile.TemporaryDirectory() as tmp:
        adapters = Path(args.adapters) if args.adapters else random_adapters(Path(tmp) / "adapters", [entry, other])
        server, url = start_server(adapters, args.threads)
        merged_server, merged_url = start_server(
            adapters, args.threads, "--merge", entry.id
        )  # idle while the other runs
        try:
            base_name = Path(resolve_model("smollm2")).name
            systems = {
                "full": (url, base_name, entry.messages()),
                "adapter": (url, entry.id, []),
                "adapter_merged": (merged_url, entry.id, []),
            }
            for warm_up in ("Hello.", "Hi."):  # two conversations: P is then a shared prefix, its KV cache computed
                conversation(systems, args.max_tokens, [warm_up])
            a = conversation(systems, args.max_tokens, TURNS)
            n = args.requests
            together = throughput(url, [entry.id, other.id], 2 * n, args.max_tokens)
            start = time.perf_counter()
            throughput(url, [entry.id], n, args.max_tokens)
            throughput(url, [other.id], n, args.max_tokens)
            apart = 2 * n / (time.perf_counter() - start)
        finally:
            for process in (server, merged_server):
                process.terminate()
                process.wait(60)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2"))
    text = tokenizer.apply_chat_template(entry.messages(), tokenize=False)
    result = {
        "prompt": entry.id,
        "prompt_tokens": len(tokenizer(text, add_special_tokens=False)["input_ids"]),
        "adapters": "random (rank 16, all linear)" if not args.adapters else str(args.adapters),
        "a_conversation_5_turns": a,
        "a_ratios_over_full": {
            k: {"ttft": a[k]["ttft_s"] / a["full"]["ttft_s"], "total": a[k]["total_s"] / a["full"]["total_s"]}
            for k in ("adapter", "adapter_merged")
        },
        "a_ms_per_token": {k: 1000 * v["total_s"] / max(1, v["completion_tokens"]) for k, v in a.items()},
        "b_requests_per_s": {"two_adapters_together": together, "one_adapter_at_a_time": apart},
        "b_ratio_together_over_apart": together / apart,
        "max_tokens": args.max_tokens,
        "threads": args.threads,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
