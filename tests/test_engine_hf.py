import time

import pytest

from genpi.engines import ChatRequest, Sampling, hf
from genpi.engines.hf import TransformersEngine

PROMPT = [
    {"role": "system", "content": "You are a careful shell agent. " * 30},
    {"role": "user", "content": "List the files."},
    {"role": "assistant", "content": "Act: bash\nls"},
]


@pytest.fixture(scope="module")
def engine(tiny_model):
    return TransformersEngine(tiny_model, dtype="float32", max_batch=4)


def requests(n, max_tokens=10, prefix=True, sampling=None):
    return [
        ChatRequest(
            PROMPT + [{"role": "user", "content": f"task number {i} " * (i + 1)}],
            sampling or Sampling(max_tokens=max_tokens),
            seed=i,
            prefix_messages=len(PROMPT) if prefix else 0,
        )
        for i in range(n)
    ]


def test_prefix_cache_gives_the_same_greedy_outputs_and_is_reused(engine):
    # 6 requests over max_batch 4: two batches, both behind the same cached prefix
    misses = engine.prefix_misses
    cached = engine.generate(requests(6))
    assert engine.prefix_misses == misses + 1
    assert engine.prefix_hits >= 1
    plain = engine.generate(requests(6, prefix=False))
    alone = [engine.generate([r])[0] for r in requests(6, prefix=False)]
    assert [c.text for c in cached] == [c.text for c in plain] == [c.text for c in alone]
    assert len({c.text for c in cached}) > 1  # the tiny model's outputs depend on the input
    for c in cached:
        assert c.error is None and c.completion_tokens == 10 and c.finish_reason == "length"
        assert c.prompt_tokens > 100


def test_count_tokens_matches_prompt_tokens(engine):
    [request] = requests(1)
    [completion] = engine.generate([request])
    assert engine.count_tokens(request.messages) == completion.prompt_tokens


def test_stop_strings_cut_the_text(engine):
    [free] = engine.generate(requests(1, max_tokens=12))
    stop = free.text[3:6]
    assert stop.strip()
    [cut] = engine.generate(requests(1, sampling=Sampling(max_tokens=12, stop=(stop,))))
    assert stop not in cut.text and free.text.startswith(cut.text) and cut.finish_reason == "stop"
    assert cut.completion_tokens < 12


def test_sampling_is_reproducible_per_seed(engine):
    sampling = Sampling(temperature=1.0, top_p=0.9, max_tokens=12)
    a = engine.generate(requests(2, sampling=sampling))
    b = engine.generate(requests(2, sampling=sampling))
    assert [c.text for c in a] == [c.text for c in b]
    greedy = engine.generate(requests(2, max_tokens=12))
    assert [c.text for c in a] != [c.text for c in greedy]


def test_over_long_request_fails_alone(tiny_model):
    engine = TransformersEngine(tiny_model, dtype="float32", max_model_len=256)
    long = ChatRequest([{"role": "user", "content": "word " * 400}], Sampling(max_tokens=8))
    short = ChatRequest([{"role": "user", "content": "hello"}], Sampling(max_tokens=8))
    fits_barely = ChatRequest([{"role": "user", "content": "hello"}], Sampling(max_tokens=250))
    malformed = ChatRequest([{"role": "user", "content": None}], Sampling(max_tokens=8))
    results = engine.generate([short, long, fits_barely, malformed, short])
    assert results[1].error.startswith("context_length:") and results[1].finish_reason == "error"
    assert results[2].error.startswith("context_length:")
    assert results[3].error.startswith("engine: ")
    assert results[0].error is None and results[0].text and results[0].text == results[4].text


def test_topk_logprobs_match_a_teacher_forced_forward(tiny_model):
    """The top-k of every generated token equals a direct forward pass over prompt + generated tokens."""
    import torch

    from genpi.engines import ChatRequest, Sampling
    from genpi.engines.hf import TransformersEngine

    engine = TransformersEngine(tiny_model, dtype="float32")
    prompt = [{"role": "system", "content": "You are terse."}]
    requests = [
        ChatRequest(prompt + [{"role": "user", "content": text}], Sampling(max_tokens=6, logprobs=5), prefix_messages=1)
        for text in ("hello", "a much longer question about shells and files")
    ]
    for request, completion in zip(requests, engine.generate(requests)):
        assert completion.token_ids and len(completion.topk_ids) == len(completion.token_ids)
        ids = engine.encode(request.messages)
        with torch.no_grad():
            logits = engine.model(torch.tensor([ids + completion.token_ids])).logits[0].log_softmax(-1)
        for step, token in enumerate(completion.token_ids):
            values, indices = logits[len(ids) + step - 1].topk(5)
            assert completion.topk_ids[step][0] == token  # greedy: the chosen token is the most likely
            assert completion.topk_ids[step] == indices.tolist()
            assert torch.allclose(torch.tensor(completion.topk_logprobs[step]), values, atol=1e-4)


# ---------------------------------------------------------------- continuous batching across prefixes

OTHER_PROMPT = [{"role": "system", "content": "You answer in French, briefly. " * 12}]


def mixed_requests(max_tokens=(12, 3, 20, 7, 16, 1)):
    """Rows of three prefixes (two prompts and none), of very different prompt and output lengths."""
    made = []
    for i, n in enumerate(max_tokens):
        prompt = (PROMPT, OTHER_PROMPT, [])[i % 3]
        user = [{"role": "user", "content": f"question {i} " + "and more " * (5 * i)}]
        made.append(ChatRequest(prompt + user, Sampling(max_tokens=n), seed=i, prefix_messages=len(prompt)))
    return made


def one_by_one(engine, requests):
    return [engine.generate([r])[0] for r in requests]


def test_rows_of_different_prefixes_share_decode_steps_and_answer_as_alone(tiny_model):
    engine = TransformersEngine(tiny_model, dtype="float32", max_batch=8)
    requests = mixed_requests()
    together = engine.generate(requests)
    assert max(rows for rows, _ in engine.steps) >= 4  # the prefixes did share steps
    alone = one_by_one(TransformersEngine(tiny_model, dtype="float32"), requests)
    assert [c.text for c in together] == [c.text for c in alone]
    assert [c.completion_tokens for c in together] == [
        min(r.sampling.max_tokens, c.completion_tokens) for r, c in zip(requests, alone)
    ]
    assert [c.completion_tokens for c in together] == [12, 3, 20, 7, 16, 1]  # max_tokens holds per row
    assert len({c.text for c in together}) == len(requests)


def test_a_request_joins_a_running_batch_and_leaves_before_the_slow_rows(tiny_model):
    engine = TransformersEngine(tiny_model, dtype="float32", max_batch=8)
    slow = [
        ChatRequest(r.messages, Sampling(max_tokens=60), prefix_messages=r.prefix_messages)
        for r in mixed_requests()[:2]
    ]
    quick = mixed_requests()[2:4]
    slow_futures = [engine.submit(r) for r in slow]
    while not engine.steps:  # the slow rows are decoding
        time.sleep(0.005)
    quick_futures = [engine.submit(r) for r in quick]
    quick_results = [f.result() for f in quick_futures]
    assert not any(f.done() for f in slow_futures)  # the quick rows did not wait for the slow ones
    assert any(rows == 4 for rows, _ in engine.steps)  # they joined the running batch
    slow_results = [f.result() for f in slow_futures]
    alone = one_by_one(TransformersEngine(tiny_model, dtype="float32"), slow + quick)
    assert [c.text for c in slow_results + quick_results] == [c.text for c in alone]


def test_sampling_is_reproducible_per_request_whatever_its_batch(tiny_model):
    engine = TransformersEngine(tiny_model, dtype="float32", max_batch=8)
    sampling = Sampling(temperature=1.0, top_p=0.9, max_tokens=12)
    requests = [
        ChatRequest(r.messages, sampling, seed=r.seed, prefix_messages=r.prefix_messages) for r in mixed_requests()
    ]
    together = [c.text for c in engine.generate(requests)]
    assert together == [c.text for c in one_by_one(engine, requests)]
    assert together != [
        c.text for c in engine.generate([ChatRequest(r.messages, sampling, seed=r.seed + 100) for r in requests])
    ]


def test_stop_strings_hold_per_row_in_a_shared_batch(tiny_model):
    engine = TransformersEngine(tiny_model, dtype="float32", max_batch=8)
    free = engine.generate(mixed_requests((16,) * 6))
    stops = [c.text[4:7] for c in free]
    assert all(s.strip() for s in stops)
    requests = [
        ChatRequest(r.messages, Sampling(max_tokens=16, stop=(s,) if i % 2 else ()), prefix_messages=r.prefix_messages)
        for i, (r, s) in enumerate(zip(mixed_requests(), stops))
    ]
    for i, (c, f, s) in enumerate(zip(engine.generate(requests), free, stops)):
        if i % 2:
            assert (
                c.finish_reason == "stop" and s not in c.text and f.text.startswith(c.text) and c.completion_tokens < 16
            )
        else:
            assert c.text == f.text and c.completion_tokens == 16


def test_a_failing_request_fails_alone_while_others_decode(tiny_model):
    engine = TransformersEngine(tiny_model, dtype="float32", max_model_len=512)
    running = engine.submit(mixed_requests()[0])
    bad = [
        engine.submit(ChatRequest([{"role": "user", "content": None}])),
        engine.submit(ChatRequest([{"role": "user", "content": "word " * 600}], Sampling(max_tokens=4))),
    ]
    assert bad[0].result().error.startswith("engine: ") and bad[1].result().error.startswith("context_length:")
    assert running.result().error is None and running.result().completion_tokens == 12


def test_an_idle_worker_exits_and_the_next_request_starts_another(tiny_model):
    """An idle worker's OpenMP pool slows every other pool of the process (measured ~10% on another engine)."""
    from genpi.engines import hf

    engine = TransformersEngine(tiny_model, dtype="float32")
    first = engine.generate(mixed_requests((6,)))
    worker = engine._worker  # it waits IDLE_EXIT_S (1 s) for more work before it exits
    deadline = time.monotonic() + 30
    while worker.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not worker.is_alive() and engine._worker is None and engine not in hf._running
    assert engine.generate(mixed_requests((6,))) == first  # a new worker, the same answers
    engine.close()
    assert engine._worker is None


class SlowStream:
    """Slows its row's decoding down (10 ms a token), so that it is still running when the test acts."""

    cancelled = False

    def on_token(self, token_id):
        time.sleep(0.01)


def test_an_abandoning_close_fails_what_runs_at_once(tiny_model):
    engine = TransformersEngine(tiny_model, dtype="float32")
    long = engine.submit(
        ChatRequest([{"role": "user", "content": "go on"}], Sampling(max_tokens=400)), stream=SlowStream()
    )
    while not engine.steps:
        time.sleep(0.005)
    engine.close(abandon=True)
    assert long.result().error == "cancelled" and engine._worker is None


def test_a_worker_that_fails_outside_a_row_fails_what_it_holds_and_the_next_request_starts_afresh(
    tiny_model, monkeypatch
):
    """An error outside the per-row handling (here: joining prefilled rows to the running batch, as an out of
    memory there would) fails the running, the admitted and the queued rows with it, never leaves them hanging."""
    engine = TransformersEngine(tiny_model, dtype="float32", max_batch=8)
    [expected] = engine.generate(mixed_requests((6,)))
    engine.steps.clear()
    running = engine.submit(
        ChatRequest([{"role": "user", "content": "go on"}], Sampling(max_tokens=400)), stream=SlowStream()
    )
    while not engine.steps:  # it decodes in the running batch
        time.sleep(0.005)
    worker, join, queued, joined = engine._worker, engine._join, [], []

    def failing_join(prefilled):
        if joined:
            return join(prefilled)
        joined.extend(row for rows, *_ in prefilled for row in rows)
        queued.append(engine.submit(mixed_requests((6,))[0]))  # arrives while the worker fails: still queued
        raise RuntimeError("CUDA out of memory (injected)")

    monkeypatch.setattr(engine, "_join", failing_join)
    admitted = engine.submit(mixed_requests((12, 9))[1])
    results = [f.result(timeout=60) for f in (running, admitted)]  # the old worker died with them: a hang
    results += [f.result(timeout=60) for f in queued]  # submitted before the admitted row failed
    assert len(joined) == 1 and joined[0].future is admitted and len(queued) == 1
    assert [r.error for r in results] == ["engine: RuntimeError: CUDA out of memory (injected)"] * 3
    worker.join(timeout=30)
    assert not worker.is_alive() and engine._worker is None and engine not in hf._running
    assert engine.generate(mixed_requests((6,))) == [expected]  # a fresh worker on an empty batch
    engine.close()


def test_a_cancelled_future_frees_its_row_and_the_worker_goes_on(tiny_model):
    """An awaiting asyncio task that is cancelled cancels the future it wraps (asyncio.wrap_future): its row stops,
    and its completion, which the future can no longer take, must not kill the worker."""
    engine = TransformersEngine(tiny_model, dtype="float32", max_batch=8)
    doomed = engine.submit(
        ChatRequest([{"role": "user", "content": "go on"}], Sampling(max_tokens=900)), stream=SlowStream()
    )
    while not engine.steps:
        time.sleep(0.005)
    assert doomed.cancel()
    deadline = time.monotonic() + 5  # uncancelled, the row would decode for 9 s more
    while any(engine._rows) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(engine._rows)
    [after] = [f.result(timeout=60) for f in [engine.submit(mixed_requests((6,))[0])]]
    assert after.error is None and after.completion_tokens == 6
    engine.close()


def test_a_process_that_never_closes_its_engine_exits_cleanly(tiny_model):
    """Its worker, alive at exit, is stopped by an exit hook: torch's thread pool torn down under a running
    worker used to abort the process (status 134, 'terminate called without an active exception')."""
    import subprocess
    import sys

    from conftest import REPO

    code = (
        "import time\n"
        "from genpi.engines import ChatRequest, Sampling\n"
        "from genpi.engines.hf import TransformersEngine\n"
        f"engine = TransformersEngine({tiny_model!r}, dtype='float32')\n"
        "class Slow:\n    cancelled = False\n    def on_token(self, token_id):\n        time.sleep(0.01)\n"
        "engine.submit(ChatRequest([{'role': 'user', 'content': 'go on'}], Sampling(max_tokens=400)), stream=Slow())\n"
        "engine.generate([ChatRequest([{'role': 'user', 'content': 'hi'}], Sampling(max_tokens=2))])\n"
    )  # exits while the long request decodes
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "terminate called" not in done.stderr, done.stderr[-2000:]


def test_smollm2_cross_prefix_and_continuous_batches_answer_as_alone():
    from genpi.models import resolve_model

    engine = TransformersEngine(resolve_model("smollm2"), dtype="float32", max_batch=8)
    requests = mixed_requests((10, 4, 14, 6))
    first = [engine.submit(r) for r in requests[:2]]
    while not engine.steps:
        time.sleep(0.005)
    late = [engine.submit(r) for r in requests[2:]]  # arrive while the first rows decode
    together = [f.result().text for f in first + late]
    assert max(rows for rows, _ in engine.steps) >= 3
    assert together == [c.text for c in one_by_one(engine, requests)]


def test_the_attention_kernels_agree_with_sdpa_and_a_query_that_sees_nothing_gives_zero():
    """The fused CPU kernel (CPU) and the matmul path (CUDA) give SDPA's output and the log-sum-exp of the scores."""
    import torch

    from genpi.engines.hf import _attend, _attend_math

    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 16, generator=generator) for _ in range(3))
    mask = torch.zeros(2, 1, 5, 5)
    mask[0, :, :, :2] = float("-inf")  # padding columns
    mask[1, :, 0, :] = float("-inf")  # a padding query: sees nothing
    reference = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = (q @ k.transpose(2, 3)) / 4 + mask
    for out, lse in (_attend(q, k, v, mask, 0.25), _attend_math(q, k, v, mask, 0.25)):
        assert torch.allclose(out[0], reference[0], atol=1e-5) and torch.allclose(
            out[1, :, 1:], reference[1, :, 1:], atol=1e-5
        )
        assert torch.allclose(lse[0], torch.logsumexp(scores[0], -1), atol=1e-5)
        assert torch.equal(out[1, :, 0], torch.zeros_like(out[1, :, 0]))
