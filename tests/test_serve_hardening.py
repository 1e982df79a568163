"""`genpi serve` under hostile or unlucky requests: bounded requests and queue, OpenAI-shaped errors that keep
internals in the log, /health, and the vLLM child (its key, its signals) run as a fake vLLM."""

import http.client
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import Future
from pathlib import Path

import pytest
from conftest import REPO, cli_in_process
from test_serve import AUTH, CATALOG, KEY, Server, chat, get, post

SHAPE = {"message", "type", "param", "code"}


def assert_error(status_reply, status: int, param=None) -> dict:
    got, reply = status_reply
    assert got == status, reply
    assert set(reply) == {"error"} and set(reply["error"]) == SHAPE and reply["error"]["message"], reply
    assert reply["error"]["param"] == param, reply
    return reply["error"]


def post_raw(url: str, data: bytes, headers=AUTH, path: str = "/chat/completions", method: str = "POST"):
    """(status, headers, body bytes) of any request, error or not."""
    request = urllib.request.Request(
        url + path, data=data, method=method, headers={"Content-Type": "application/json", **headers}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def test_health_answers_probes_without_a_key(served):
    url = served[0].removesuffix("/v1")
    for headers in ({}, AUTH):
        assert get(url, "/health", headers) == (200, {"status": "ok"})
    assert get(served[0], "/models", {})[0] == 401  # the key still guards the API


def test_max_completion_tokens_null_falls_back_to_max_tokens(served):
    url = served[0]
    body = {"model": "calc", "messages": chat("What is 2 plus 2?"), "temperature": 0}
    for limits in (
        {"max_completion_tokens": None, "max_tokens": 3},
        {"max_tokens": 3},
        {"max_completion_tokens": 3, "max_tokens": 9},
    ):
        status, reply = post(url, {**body, **limits})
        assert status == 200 and reply["usage"]["completion_tokens"] == 3, (limits, reply)
    assert_error(post(url, {**body, "max_completion_tokens": 0, "max_tokens": 3}), 400, "max_completion_tokens")
    assert_error(post(url, {**body, "max_completion_tokens": None, "max_tokens": "3"}), 400, "max_tokens")


def test_malformed_json_and_unknown_routes_get_the_openai_error_shape(served):
    url, scheduler, _ = served
    nested = b'{"model": "calc", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"  # RecursionError in json
    digits = b'{"model": "calc", "messages": [{"role": "user", "content": "hi"}], "max_tokens": ' + b"7" * 5000 + b"}"
    for data in (nested, b"[" * 100_000, digits, b"\xff\xfe{", b'{"model": NaN'):
        status, _, body = post_raw(url, data)
        assert_error((status, json.loads(body)), 400)
    nan = {"model": "calc", "messages": chat("hi"), "temperature": float("nan")}
    assert_error(post(url, json.dumps(nan).encode()), 400, "temperature")
    for path, method in (("/nope", "GET"), ("/chat/completions", "GET"), ("/models", "POST")):
        status, headers, body = post_raw(url, b"{}" if method == "POST" else None, path=path, method=method)
        assert status in (404, 405) and headers["content-type"] == "application/json"
        assert_error((status, json.loads(body)), status)
    assert post(url, {"model": "calc", "messages": chat("hi"), "max_tokens": 2})[0] == 200  # and it still serves


def test_request_sizes_are_bounded(served, tiny_model):
    from transformers import AutoTokenizer

    from genpi.serve.app import build_app
    from genpi.serve.protocol import Limits

    _, scheduler, base_name = served
    limits = Limits(max_body_bytes=20_000, max_messages=3, max_message_chars=500, max_stop_chars=8, body_timeout_s=1)
    server = Server(
        build_app(scheduler, AutoTokenizer.from_pretrained(tiny_model), base_name, [], KEY, 8, limits=limits)
    )
    try:
        ok = {"model": base_name, "messages": chat("hi"), "max_tokens": 2}
        assert post(server.url, ok)[0] == 200
        error = assert_error(post(server.url, {**ok, "messages": chat("x" * 30_000)}), 413)
        assert error["code"] == "request_too_large" and "20000 bytes" in error["message"]
        # without a Content-Length (chunked), the body is cut off as it arrives
        chunks = iter([json.dumps({**ok, "messages": chat("x" * 12_000)}).encode()] * 2)
        status, _, body = post_raw(server.url, chunks)  # urllib sends an iterable body chunked
        assert_error((status, json.loads(body)), 413)
        assert_error(post(server.url, {**ok, "messages": chat("a") * 4}), 400, "messages")
        assert post(server.url, {**ok, "messages": chat("a") * 3})[0] == 200
        assert_error(post(server.url, {**ok, "messages": [*chat("a"), *chat("b" * 501)]}), 400, "messages[1].content")
        parts = [{"type": "text", "text": "c" * 300}] * 2  # content parts count as one message's text
        assert_error(
            post(server.url, {**ok, "messages": [{"role": "user", "content": parts}]}), 400, "messages[0].content"
        )
        assert_error(post(server.url, {**ok, "stop": ["123456789"]}), 400, "stop")
        assert post(server.url, {**ok, "stop": ["12345678"]})[0] == 200
        # a client that trickles its body holds its place for body_timeout_s, then gets 408
        host, port = server.url.removeprefix("http://").split("/")[0].split(":")
        with socket.create_connection((host, int(port)), timeout=30) as client:
            client.sendall(
                f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{".encode()
            )
            started = time.time()
            response = http.client.HTTPResponse(client)
            response.begin()
            assert response.status == 408 and time.time() - started < 10
            assert json.loads(response.read())["error"]["code"] == "request_timeout"
    finally:
        server.close()


def test_a_prompt_over_the_context_is_tokenized_off_the_engine_and_never_reaches_it(served):
    """A million characters (about 235k tokens, a second of tokenizing) against a 1,024-token context: refused
    before the engine's worker, which decodes the running rows, ever sees it."""
    url, scheduler, _ = served
    before = len(scheduler.served)
    error = assert_error(post(url, {"model": "calc", "messages": chat("tell me about it " * 58_000)}), 400, "messages")
    assert error["code"] == "context_length_exceeded" and "prompt tokens" in error["message"]
    assert len(scheduler.served) == before  # the engine never got it


class HeldEngine:
    """An engine whose completions the test hands out: what a request gets, and when."""

    max_batch, max_model_len, model_name = 1, 1024, "held"

    def __init__(self):
        self.jobs: list[tuple[object, Future]] = []  # (stream, future) per submit
        self.fail_submit: Exception | None = None

    def submit(self, request, adapter, stream) -> Future:
        if self.fail_submit is not None:
            raise self.fail_submit
        future = Future()
        self.jobs.append((stream, future))
        return future

    def close(self):
        pass

    def wait_for(self, n: int) -> None:
        deadline = time.time() + 30
        while len(self.jobs) < n:
            assert time.time() < deadline, len(self.jobs)
            time.sleep(0.02)


@pytest.fixture
def held(tiny_model):
    """A server over a HeldEngine: one running row and one waiting request at most."""
    from transformers import AutoTokenizer

    from genpi.serve.app import build_app
    from genpi.serve.protocol import Limits
    from genpi.serve.scheduler import Scheduler

    engine = HeldEngine()
    server = Server(
        build_app(
            Scheduler(engine),
            AutoTokenizer.from_pretrained(tiny_model),
            "held",
            [],
            KEY,
            8,
            limits=Limits(max_waiting=1),
        )
    )
    yield server.url, engine
    server.close()


def test_a_full_server_answers_503_and_takes_requests_again_once_they_end(held):
    from genpi.engines import Completion

    url, engine = held
    body = {"model": "held", "messages": chat("hi")}
    for _ in range(3):  # refused requests hold no place
        assert_error(post(url, {**body, "max_tokens": 0}), 400, "max_tokens")
    replies = []
    threads = [threading.Thread(target=lambda: replies.append(post(url, body))) for _ in range(2)]
    for thread in threads:
        thread.start()
    engine.wait_for(2)  # one running, one waiting: full
    status, headers, reply = post_raw(url, json.dumps(body).encode())
    error = assert_error((status, json.loads(reply)), 503)
    assert error["type"] == "server_error" and error["code"] == "server_overloaded" and headers["Retry-After"] == "1"
    assert len(engine.jobs) == 2  # the refused one never reached the engine
    for _, future in engine.jobs:
        future.set_result(Completion("hello", 1, 1, "stop"))
    for thread in threads:
        thread.join(30)
    assert [status for status, _ in replies] == [200, 200]
    threading.Thread(
        target=lambda: (engine.wait_for(3), engine.jobs[2][1].set_result(Completion("again", 1, 1, "stop")))
    ).start()
    status, reply = post(url, body)
    assert status == 200 and reply["choices"][0]["message"]["content"] == "again"


def test_internal_errors_reach_the_log_not_the_client(held, caplog):
    from genpi.engines import Completion

    url, engine = held
    body = {"model": "held", "messages": chat("hi")}
    secret = "engine: RuntimeError: CUDA out of memory at /home/alice/private/weights"
    caplog.set_level(logging.ERROR, logger="genpi.serve")

    threading.Thread(
        target=lambda: (engine.wait_for(1), engine.jobs[0][1].set_result(Completion.failure(secret)))
    ).start()
    error = assert_error(post(url, body), 500)
    assert error["type"] == "server_error" and "alice" not in error["message"] and "CUDA" not in error["message"]

    engine.fail_submit = RuntimeError("/home/alice/private: permission denied")  # an exception in the handler
    status, headers, reply = post_raw(url, json.dumps(body).encode())
    assert headers["content-type"] == "application/json"
    assert "alice" not in assert_error((status, json.loads(reply)), 500)["message"]
    engine.fail_submit = None

    def fail_mid_stream():  # two tokens, then the engine fails: the status is sent, the error is an event
        engine.wait_for(2)
        stream, future = engine.jobs[1]
        for token in (42, 43):
            stream.on_token(token)
        time.sleep(0.3)
        future.set_result(Completion.failure(secret))

    threading.Thread(target=fail_mid_stream).start()
    status, _, events = post_raw(url, json.dumps({**body, "stream": True}).encode())
    data = [line.removeprefix(b"data: ") for line in events.splitlines() if line.startswith(b"data: ")]
    assert status == 200 and data[-1] == b"[DONE]"
    error = json.loads(data[-2])
    assert set(error) == {"error"} and set(error["error"]) == SHAPE and b"alice" not in events
    logged = caplog.text
    assert "/home/alice/private/weights" in logged and "permission denied" in logged  # the operator sees both


# ---------------------------------------------------------------- the vLLM child, played by a shell script


def fake_vllm(folder: Path) -> Path:
    """A 'Python' that records its arguments and $VLLM_API_KEY, and on SIGTERM takes a second to shut down."""
    script = folder / "python"
    script.write_text(f"""#!/bin/bash
echo $$ > {folder}/pid
printf '%s\\n' "$@" > {folder}/args
printf '%s' "${{VLLM_API_KEY-}}" > {folder}/key
trap 'sleep 1; echo stopped > {folder}/stopped; exit 0' TERM
touch {folder}/ready
while :; do sleep 0.1; done
""")
    script.chmod(0o755)
    return script


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def start_vllm(adapters: Path, folder: Path, key: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "GENPI_API_KEY": key}
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
        "--vllm-python",
        str(fake_vllm(folder)),
        "--port",
        "8123",
    ]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (folder / "ready").exists():
        if process.poll() is not None:
            pytest.fail(f"genpi serve exited {process.returncode}: {process.stderr.read().decode()[-2000:]}")
        assert time.time() < deadline, "no fake vLLM started in 120 s"
        time.sleep(0.05)
    time.sleep(0.2)  # the trap is set before ready
    return process


@pytest.mark.slow
def test_vllm_gets_its_key_in_the_environment_and_sigterm_waits_for_its_shutdown(adapters_dir, tmp_path):
    key = "s3cret-key-do-not-show"
    process = start_vllm(adapters_dir, tmp_path, key)
    child = int((tmp_path / "pid").read_text())
    try:
        assert (tmp_path / "key").read_text() == key
        args = (tmp_path / "args").read_text()
        assert key not in args and "--api-key" not in args and "--enable-lora" in args
        for pid in (process.pid, child):  # what ps shows
            assert key.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0  # the child's status, once it has shut down
        assert (tmp_path / "stopped").exists() and not alive(child)  # SIGTERM reached it, and genpi waited a second
    finally:
        process.kill()
        if alive(child):
            os.kill(child, signal.SIGKILL)


@pytest.mark.slow
def test_vllm_dies_with_a_killed_genpi(adapters_dir, tmp_path):
    process = start_vllm(adapters_dir, tmp_path, "another-key")
    child = int((tmp_path / "pid").read_text())
    try:
        process.kill()  # SIGKILL: genpi passes nothing on; the kernel sends the child SIGTERM (PR_SET_PDEATHSIG)
        process.wait(30)
        deadline = time.time() + 30
        while alive(child):
            assert time.time() < deadline, "the vLLM child outlived genpi"
            time.sleep(0.1)
        assert (tmp_path / "stopped").exists()  # it shut down as on SIGTERM
    finally:
        if alive(child):
            os.kill(child, signal.SIGKILL)


def serve_refused(capsys, monkeypatch, *args) -> tuple[int, str]:
    """`genpi serve ARGS` in this process, for its refusals (a subprocess each costs seconds of imports): (exit
    status, stderr). Neither server may start: one that did would serve on, so starting fails the test."""
    import uvicorn

    from genpi.serve import cli

    def started(*_, **__):
        raise AssertionError("a server was started")

    monkeypatch.setattr(uvicorn, "run", started)
    monkeypatch.setattr(cli, "run_vllm", started)
    return cli_in_process(capsys, "serve", *args)


@pytest.mark.parametrize("engine", ["transformers", "vllm"])
def test_an_empty_api_key_is_refused_by_both_engines(adapters_dir, tmp_path, engine, capsys, monkeypatch):
    fake = fake_vllm(tmp_path)
    try:
        for how in (["--api-key", ""], ["--api-key", "  "]):  # in process; the command's exit status: below
            code, err = serve_refused(
                capsys, monkeypatch, adapters_dir, "--catalog", CATALOG, "--engine", engine, "--vllm-python", fake, *how
            )
            assert code == 2 and "API key" in err and "empty" in err, err
        env = {**os.environ, "PYTHONPATH": str(REPO), "GENPI_API_KEY": ""}
        command = [
            sys.executable,
            "-m",
            "genpi.cli",
            "serve",
            str(adapters_dir),
            "--catalog",
            str(CATALOG),
            "--engine",
            engine,
            "--vllm-python",
            str(fake),
        ]
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and "empty" in result.stderr
        assert not (tmp_path / "ready").exists()  # no vLLM was started
    finally:  # one that was started (by a server that took the empty key) goes
        if (tmp_path / "pid").exists() and alive(child := int((tmp_path / "pid").read_text())):
            os.kill(child, signal.SIGKILL)


def test_limit_flags_are_checked(adapters_dir, capsys, monkeypatch):
    for flags, says in (
        (["--max-body-bytes", "0"], "--max-body-bytes"),
        (["--max-waiting", "-1"], "--max-waiting"),
        (["--body-timeout", "nan"], "--body-timeout"),
    ):  # in process: the command's exit status on bad input is test_serve's and the API key test's
        code, err = serve_refused(capsys, monkeypatch, adapters_dir, "--catalog", CATALOG, *flags)
        assert code == 2 and f"{says} must be" in err, err
