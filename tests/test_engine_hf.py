import pytest

from genpi.engines import ChatRequest, Sampling
from genpi.engines.hf import TransformersEngine

PROMPT = [
    {"role": "system", "content": "You are a careful shell agent. " * 30},
    {"role": "user", "content": "List the files."},
    {"role": "assistant", "content": "Act: bash\nls"},
]


@pytest.fixture(scope="module")
def engine(tiny_model):
    return TransformersEngine(tiny_model, max_batch=4)


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
    engine = TransformersEngine(tiny_model, max_model_len=256)
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
