"""The OpenAI-compatible engine against `genpi serve` running here (a real server), and against a flaky front
(real HTTP too) that rate-limits, fails and stalls before it passes requests on."""

import asyncio
import json
import time

import pytest
import torch
from test_serve import CATALOG, KEY, Server, chat, make_adapters, start

from genpi.engines import CONTEXT_LENGTH_ERROR, ChatRequest, Sampling
from genpi.engines.openai import OpenAIEngine, split_spec


@pytest.fixture(scope="module")
def served(tiny_finishing_model, tmp_path_factory):
    server, scheduler, base_name = start(
        tiny_finishing_model, make_adapters(tiny_finishing_model, tmp_path_factory.mktemp("adapters"))
    )
    yield server.url, base_name
    server.close()
    scheduler.close()


@pytest.fixture(scope="module")
def direct(tiny_finishing_model, served):
    from genpi.engines.hf import TransformersEngine

    return TransformersEngine(tiny_finishing_model, dtype="float32")


def test_the_spec_names_a_server_and_a_model():
    assert split_spec("openai:http://127.0.0.1:8000/v1/calc") == ("http://127.0.0.1:8000/v1", "calc")
    assert split_spec("https://api.example.com/v1/meta-llama/Llama-3.3-70B") == (
        "https://api.example.com/v1",
        "meta-llama/Llama-3.3-70B",
    )
    assert split_spec("http://host:9/calc") == ("http://host:9", "calc")
    for bad in ("openai:calc", "openai:http://host:9/v1/", "ftp://host/v1/x"):
        with pytest.raises(ValueError, match="BASE_URL/MODEL"):
            split_spec(bad)


def test_completions_equal_the_engine_and_bad_rows_fail_alone(served, direct):
    url, base_name = served
    engine = OpenAIEngine.from_spec(f"openai:{url}/{base_name}", api_key=KEY)
    requests = [
        ChatRequest(chat("What is 7 times 6?"), Sampling(max_tokens=12)),
        ChatRequest(chat("Hello, friend."), Sampling(max_tokens=12, stop=(" ",))),
        ChatRequest(chat("tell me about it " * 300), Sampling(max_tokens=12)),
        ChatRequest(chat("Hey!"), Sampling(max_tokens=12, logprobs=3)),
    ]
    got = engine.generate(requests)
    expected = [direct.generate([r])[0] for r in requests]
    for g, e in zip(got[:2], expected[:2]):
        assert g.error is None and (g.text, g.prompt_tokens, g.completion_tokens, g.finish_reason) == (
            e.text,
            e.prompt_tokens,
            e.completion_tokens,
            e.finish_reason,
        )
    assert got[2].finish_reason == "error" and got[2].error.startswith(
        f"{CONTEXT_LENGTH_ERROR}: "
    )  # final, never retried
    assert "context_length_exceeded" in got[2].error
    topk, e = got[3], expected[3]  # top-k log-probabilities by token id (what synthesis stores for the teacher)
    assert topk.text == e.text and topk.token_ids == e.token_ids and topk.topk_ids == e.topk_ids
    # float32, but batched on the server beside the other rows: the sums run in another order (measured up to 4e-5
    # apart; the same on the commit before this change)
    assert torch.allclose(torch.tensor(topk.topk_logprobs), torch.tensor(e.topk_logprobs), atol=1e-4)
    assert engine.count_tokens(chat("What is 7 times 6?")) == direct.count_tokens(chat("What is 7 times 6?"))

    for spec, key, text in ((f"{url}/nope", KEY, "HTTP 404"), (f"{url}/calc", "wrong", "HTTP 401")):
        [failed] = OpenAIEngine.from_spec(spec, api_key=key, backoff_s=10).generate(requests[:1])  # 4xx: no retry
        assert failed.finish_reason == "error" and text in failed.error, failed.error


def test_the_api_key_comes_from_the_environment(served, monkeypatch):
    url, base_name = served
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("GENPI_OPENAI_API_KEY", KEY)
    [ok] = OpenAIEngine.from_spec(f"{url}/calc").generate([ChatRequest(chat("Hey!"), Sampling(max_tokens=2))])
    assert ok.error is None and ok.completion_tokens > 0


class Front:
    """A real HTTP server before genpi serve: the first `failures` calls get these statuses, calls to
    /slow stall; it counts calls and the most in flight at once."""

    def __init__(self, upstream: str, failures: list[int]):
        import aiohttp
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse, Response
        from starlette.routing import Route

        self.calls, self.in_flight, self.most = 0, 0, 0

        async def chat_completions(request):
            self.calls += 1
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
            try:
                if self.calls <= len(failures):
                    status = failures[self.calls - 1]
                    return JSONResponse({"error": {"message": f"front says {status}"}}, status, {"Retry-After": "0"})
                if request.path_params.get("slow"):
                    await asyncio.sleep(3)
                async with aiohttp.ClientSession() as session:
                    async with session.post(
                        upstream + "/chat/completions",
                        data=await request.body(),
                        headers={"Authorization": request.headers["authorization"]},
                    ) as reply:
                        return Response(await reply.read(), reply.status, media_type="application/json")
            finally:
                self.in_flight -= 1

        routes = [
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/{slow}/v1/chat/completions", chat_completions, methods=["POST"]),
        ]
        self.server = Server(Starlette(routes=routes))
        self.url = self.server.url


def test_rate_limits_and_server_errors_are_retried_with_bounded_concurrency(served):
    url, base_name = served
    front = Front(url, [429, 503, 500])
    engine = OpenAIEngine(front.url, "calc", api_key=KEY, max_concurrency=3, backoff_s=0.05)
    results = engine.generate([ChatRequest(chat(f"What is {i} plus 1?"), Sampling(max_tokens=4)) for i in range(10)])
    assert all(r.error is None and r.completion_tokens > 0 for r in results)
    assert front.calls == 13 and front.most == 3
    front.server.close()


def test_retries_run_out_and_timeouts_end_in_the_error_text(served):
    url, _ = served
    front = Front(url, [502] * 3)
    [failed] = OpenAIEngine(front.url, "calc", api_key=KEY, retries=2, backoff_s=0.01).generate(
        [ChatRequest(chat("hi"))]
    )
    assert front.calls == 3 and failed.finish_reason == "error"
    assert failed.error.startswith("engine: calc at ") and "HTTP 502: front says 502 (after 3 tries)" in failed.error
    slow = OpenAIEngine(
        front.url.replace("/v1", "/slow/v1"), "calc", api_key=KEY, retries=1, backoff_s=0.01, timeout_s=0.5
    )
    started = time.perf_counter()
    [late] = slow.generate([ChatRequest(chat("hi"))])
    assert "TimeoutError" in late.error and "(after 2 tries)" in late.error and time.perf_counter() - started < 3
    front.server.close()


@pytest.mark.slow
def test_synthesis_with_generator_and_target_served_by_genpi_serve(served, tmp_path, monkeypatch):
    """`genpi synth --generator openai:... --target openai:...` on real Ray actors, teacher top-k included."""
    import pyarrow.parquet as pq
    import ray

    from genpi.synth.run import main as synth_main

    url, base_name = served
    monkeypatch.setenv("GENPI_OPENAI_API_KEY", KEY)  # Ray's workers start with this environment
    ray.init(address="local", num_cpus=2, log_to_driver=False, include_dashboard=False)
    try:
        out = tmp_path / "out"
        status = synth_main(
            [
                str(CATALOG),
                "--out",
                str(out),
                "--generator",
                f"openai:{url}/{base_name}",
                "--target",
                f"openai:{url}/{base_name}",
                "--samples",
                "3",
                "--max-new-tokens",
                "12",
                "--max-input-tokens",
                "24",
                "--teacher-topk",
                "3",
                "--no-progress",
                "--no-stats",
            ]
        )
    finally:
        ray.shutdown()
    rows = [r for path in sorted(out.glob("dialogues/*/*.parquet")) for r in pq.read_table(path).to_pylist()]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"]["kind"] == "openai" and manifest["target"]["model"] == f"{url}/{base_name}"
    assert status == 0 and len(rows) == 6 and all(r["error"] is None for r in rows)
    for r in rows:
        assert r["target_model"] == r["generator_model"] == base_name
        assert len(r["teacher_topk"]) == sum(t["role"] == "assistant" for t in r["turns"])
        assert all(len(step) == 3 for turn in r["teacher_topk"] for step in turn["topk_ids"])


def test_a_malformed_openai_spec_is_bad_input(tmp_path, capsys):
    from genpi.synth.run import main as synth_main

    assert synth_main([str(CATALOG), "--out", str(tmp_path / "out"), "--target", "openai:calc"]) == 2
    assert "--target openai:calc: expected openai:BASE_URL/MODEL" in capsys.readouterr().err


class Scripted:
    """A plain HTTP server (stdlib, a thread of its own) that answers POSTs with the next of `replies`
    ((status, headers), then a completion), counting the calls."""

    def __init__(self, replies: list[tuple[int, dict]]):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        scripted = self
        self.calls = 0

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                scripted.calls += 1
                status, headers = replies[scripted.calls - 1] if scripted.calls <= len(replies) else (200, {})
                body = json.dumps(
                    {"error": {"message": "slow down"}}
                    if status != 200
                    else {
                        "choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 3, "completion_tokens": 1},
                    }
                ).encode()
                self.send_response(status)
                for name, value in {
                    **headers,
                    "Content-Type": "application/json",
                    "Content-Length": str(len(body)),
                }.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_a_huge_retry_after_is_capped(monkeypatch):
    from genpi.engines.openai import MAX_RETRY_WAIT_S

    slept = []
    sleep = asyncio.sleep

    async def recorded(delay, *args, **kwargs):
        slept.append(delay)
        return await sleep(0, *args, **kwargs)

    monkeypatch.setattr(asyncio, "sleep", recorded)
    server = Scripted([(429, {"Retry-After": "100000"}), (503, {"Retry-After": "100000"})])
    try:
        [ok] = OpenAIEngine(server.url, "m", api_key=KEY, backoff_s=0.01).generate([ChatRequest(chat("hi"))])
    finally:
        server.close()
    assert ok.error is None and ok.text == "ok" and server.calls == 3
    assert [d for d in slept if d > 1] == [MAX_RETRY_WAIT_S] * 2 and MAX_RETRY_WAIT_S <= 60


def silent_url():
    """A server that never answers: it listens, so connections open and requests go out, but never accepts."""
    import socket

    silent = socket.create_server(("127.0.0.1", 0))
    return silent, f"http://127.0.0.1:{silent.getsockname()[1]}/v1"


def test_a_server_that_never_answers_hits_the_request_time_limit():
    silent, url = silent_url()
    engine = OpenAIEngine(url, "m", api_key=KEY, retries=5, backoff_s=0.2, timeout_s=600, request_timeout_s=1.5)
    started = time.perf_counter()
    [late] = engine.generate([ChatRequest(chat("hi"))])
    took = time.perf_counter() - started
    silent.close()
    assert late.finish_reason == "error" and took < 5, (took, late.error)
    assert late.error.startswith(
        f"engine: m at {url}/chat/completions: no answer within 1.5 s, the limit for one request"
    )
    assert "(1 tries, the last: " in late.error and "Timeout" in late.error  # the deadline cut the first try short
    with pytest.raises(ValueError, match="request_timeout_s"):
        OpenAIEngine(url, "m", request_timeout_s=0)


def test_served_evaluation_bounds_each_request(monkeypatch):
    """`--served` systems (genpi.eval.systems: all requests at once, and the episodes' Batcher) give their requests an
    overall time limit: a server that stops answering ends in failed rows, not a stalled evaluation."""
    from genpi.eval import systems

    assert systems.SERVED_REQUEST_TIMEOUT_S <= 3600
    monkeypatch.setattr(systems, "SERVED_REQUEST_TIMEOUT_S", 1.0)
    silent, url = silent_url()
    system = systems.System("remote", served=f"openai:{url}/m")
    started = time.perf_counter()
    [at_once] = systems.generate(None, system, [ChatRequest(chat("hi"))])
    batcher = systems.Batcher(None)
    episode = batcher.run(batcher.view(system).complete(ChatRequest(chat("hi"))))
    silent.close()
    assert time.perf_counter() - started < 8
    for failed in (at_once, episode):
        assert failed.finish_reason == "error" and "no answer within 1 s" in failed.error, failed.error
