"""The dialogue logic against a scripted engine: every branch of the role-play, deterministic."""

import asyncio
import dataclasses

from conftest import REPO

from genpi.catalog import load_catalog, render_prompt_text
from genpi.engines import ChatRequest, Completion
from genpi.synth.pipeline import (
    END,
    ENVIRONMENT_INSTRUCTION,
    ENVIRONMENT_OPEN,
    INPUT_ASK,
    INPUT_INSTRUCTION,
    INPUT_LIMIT_FACTOR,
    INPUT_LIMIT_FLOOR,
    REASON_INSTRUCTION,
    SynthSettings,
    environment_messages,
    generate_inputs,
    heldout_ids,
    input_token_limit,
    is_retryable,
    synthesize_dialogue,
)

CALC, GREET = load_catalog(REPO / "tests" / "data" / "tiny.yaml")
SAMPLE = {"sample_id": 3, "seed": 11, "split": "train", "input": "What is 4 plus 4?"}


class Scripted:
    """Answers by the persona a request is for; each persona's replies are consumed in order. Asked for
    top-k log-probabilities, it makes some up (one entry per word of the reply)."""

    model_name = "scripted"

    def __init__(self, **replies):
        self.replies = {k: list(v) for k, v in replies.items()}
        self.requests: dict[str, list[ChatRequest]] = {}

    @staticmethod
    def persona(request: ChatRequest) -> str:
        system = request.messages[0]["content"] if request.messages[0]["role"] == "system" else ""
        if system.startswith(ENVIRONMENT_INSTRUCTION):
            return "environment"
        if system.startswith(REASON_INSTRUCTION):
            return "reason"
        if system.startswith(INPUT_INSTRUCTION):
            return "input"
        return "agent" if system else "student"

    async def complete(self, request: ChatRequest) -> Completion:
        persona = self.persona(request)
        self.requests.setdefault(persona, []).append(request)
        reply = self.replies[persona].pop(0)
        if not isinstance(reply, Completion):
            reply = Completion(text=reply, prompt_tokens=10, completion_tokens=len(reply.split()), finish_reason="stop")
        k = request.sampling.logprobs
        if k and reply.error is None:
            n = len(reply.text.split())
            reply = dataclasses.replace(
                reply, token_ids=list(range(n)), topk_ids=[[i] * k for i in range(n)], topk_logprobs=[[-0.5] * k] * n
            )
        return reply


def run(entry, engine, settings=SynthSettings()):
    return asyncio.run(synthesize_dialogue(entry, SAMPLE, engine, engine, settings))


def outcome(row):
    return row["terminated_by"], row["terminated"], row["hit_max_turns"], row["truncated"]


def test_role_play_until_the_environment_ends_it():
    engine = Scripted(
        agent=["Act: compute(4+4)", "Act: answer(8)"],
        environment=["Result: 8", END],
        student=["It is eight."],
        reason=["Because the prompt asks for actions."],
    )
    row = run(CALC, engine)
    assert row["error"] is None
    assert row["turns"] == [
        {"role": "assistant", "content": "Act: compute(4+4)"},
        {"role": "user", "content": "Result: 8"},
        {"role": "assistant", "content": "Act: answer(8)"},
    ]
    assert row["turn_cut"] == [False, False, False]
    assert row["student_output_cut"] is False and row["reason_cut"] is False
    assert outcome(row) == ("environment", True, False, False) and row["n_turns"] == 2
    assert row["final_action"] == "Act: answer(8)" and row["final_action_valid"] is True
    assert row["student_output"] == "It is eight." and row["reason"].startswith("Because")
    assert row["prompt_tokens"] == 60 and row["agent_tokens"] == 4 and row["environment_tokens"] == 3
    # the teacher sees P then the input; P is marked as the cacheable prefix
    first = engine.requests["agent"][0]
    assert first.messages[: len(CALC.messages())] == CALC.messages()
    assert first.messages[-1] == {"role": "user", "content": SAMPLE["input"]}
    assert first.prefix_messages == len(CALC.messages()) and first.sampling.temperature == 0
    # the environment sees the task as its own first line and the agent's action as the user's
    env = engine.requests["environment"][0]
    assert env.messages[-3:] == [
        {"role": "user", "content": ENVIRONMENT_OPEN},
        {"role": "assistant", "content": SAMPLE["input"]},
        {"role": "user", "content": "Act: compute(4+4)"},
    ]
    # the environment answers the final action: its END is measured, not assumed
    assert engine.requests["environment"][1].messages[-1] == {"role": "user", "content": "Act: answer(8)"}
    # the student gets the input alone; the reason compares AS-IS with the first teacher turn
    assert engine.requests["student"][0].messages == [{"role": "user", "content": SAMPLE["input"]}]
    reason = engine.requests["reason"][0]
    assert "It is eight." in reason.messages[1]["content"] and "Act: compute(4+4)" in reason.messages[1]["content"]
    assert reason.sampling.temperature == 0.7 and reason.sampling.top_p == 0.9
    assert "Act: compute" in reason.messages[0]["content"]  # P is shown to the generator


def test_final_action_without_the_environment_ending_it_goes_on_to_the_limit():
    engine = Scripted(agent=["Act: answer(8)"], environment=["Result: ok"], student=["x"], reason=["y"])
    row = run(CALC, engine, SynthSettings(max_turns=1))
    assert outcome(row) == ("max_turns", False, True, False) and row["final_action_valid"] is True
    assert [t["role"] for t in row["turns"]] == ["assistant"]  # the last ask's reply is not a turn


def test_environment_termination_marker_and_max_turns():
    no_final = dataclasses.replace(CALC, final_action=None)
    engine = Scripted(agent=["Act: compute(1)"], environment=[f"{END}"], student=["x"], reason=["y"])
    row = run(no_final, engine)
    assert outcome(row) == ("environment", True, False, False) and row["n_turns"] == 1
    assert row["final_action_valid"] is True  # no actions.final: actions.valid decides

    engine = Scripted(
        agent=["Act: compute(1)", "Act: compute(2)", "I give up"],
        environment=["Result: 1", "Result: 2", "Result: 3"],
        student=["x"],
        reason=["y"],
    )
    row = run(CALC, engine)
    assert outcome(row) == ("max_turns", False, True, False) and row["n_turns"] == 3
    assert row["final_action"] == "I give up" and row["final_action_valid"] is False
    assert len(engine.requests["environment"]) == 3  # asked once more after the last allowed turn

    # the environment ends it on the last ask: the end marker, not the limit, ended it
    engine = Scripted(
        agent=["Act: compute(1)", "Act: compute(2)"], environment=["Result: 1", END], student=["x"], reason=["y"]
    )
    row = run(CALC, engine, SynthSettings(max_turns=2))  # the run's cap is below the catalog's 3
    assert outcome(row) == ("environment", True, False, False) and row["n_turns"] == 2 and not engine.replies["agent"]
    # a valid action that is not a final one is not a valid final action
    assert row["final_action"] == "Act: compute(2)" and row["final_action_valid"] is False


def test_single_turn_prompt():
    engine = Scripted(agent=["Answer: hello"], environment=[END], student=["Hi! How can I help?"], reason=["z"])
    row = run(GREET, engine)
    assert row["n_turns"] == 1 and outcome(row) == ("environment", True, False, False)


def overflow(prompt_tokens, max_tokens=384, limit=1024):
    error = f"context_length: {prompt_tokens} prompt tokens + {max_tokens} max tokens > {limit}"
    return Completion(finish_reason="error", error=error)


def test_overflow_truncates_later_turns_and_fails_the_first():
    engine = Scripted(agent=["Act: compute(1)", overflow(1020)], environment=["Result: 1"], student=["x"], reason=["y"])
    row = run(CALC, engine)
    assert row["error"] is None and row["n_turns"] == 1 and outcome(row) == ("truncated", False, False, True)

    # the environment's last ask overflows after the last allowed turn: the limit ended it, termination unmeasured
    engine = Scripted(agent=["Act: answer(8)"], environment=[overflow(1020)], student=["x"], reason=["y"])
    row = run(CALC, engine, SynthSettings(max_turns=1))
    assert row["error"] is None and outcome(row) == ("max_turns", False, True, False)
    # before the limit, after a final action too, it is a truncation (the dialogue would have gone on)
    engine = Scripted(agent=["Act: answer(8)"], environment=[overflow(1020)], student=["x"], reason=["y"])
    row = run(CALC, engine)
    assert row["error"] is None and outcome(row) == ("truncated", False, False, True)

    engine = Scripted(agent=[overflow(1020)])
    row = run(CALC, engine)
    assert row["error"].startswith("agent turn 1: context_length") and row["turns"] == []
    assert row["sample_id"] == 3 and row["input"] == SAMPLE["input"] and row["terminated_by"] == "error"


def test_overflow_is_retried_with_the_room_left():
    engine = Scripted(agent=[overflow(900), "Act: answer(8)"], environment=[END], student=["x"], reason=["y"])
    row = run(CALC, engine)
    assert row["error"] is None and row["turns"][0]["content"] == "Act: answer(8)"
    assert [r.sampling.max_tokens for r in engine.requests["agent"]] == [384, 124]

    engine = Scripted(agent=[overflow(900), overflow(1015, 124)])  # the room shrank below what is worth asking
    row = run(CALC, engine)
    assert row["error"].startswith("agent turn 1: context_length") and len(engine.requests["agent"]) == 2


def test_engine_errors_are_retried_then_recorded():
    broken = Completion(finish_reason="error", error="engine: RuntimeError: boom")
    engine = Scripted(agent=[broken, "Answer: hello"], environment=[END], student=["x"], reason=["y"])
    row = run(GREET, engine)
    assert row["error"] is None and row["n_turns"] == 1

    engine = Scripted(agent=["Answer: hello"], environment=[END], student=["x"], reason=[broken] * 3)
    row = run(GREET, engine)
    assert row["error"] == "reason: engine: RuntimeError: boom" and is_retryable(row["error"])
    assert row["turns"] and row["student_output"] == "x"  # what was done stays on the row

    class Crashing(Scripted):
        async def complete(self, request):
            raise ConnectionError("actor gone")

    row = run(GREET, Crashing())
    assert row["error"] == "internal: ConnectionError: actor gone" and is_retryable(row["error"])
    assert not is_retryable(run(CALC, Scripted(agent=[overflow(1020)]))["error"])  # final: a rerun meets it again


def test_cut_texts_are_flagged():
    def cut(text):
        return Completion(text=text, prompt_tokens=10, completion_tokens=3, finish_reason="length")

    engine = Scripted(
        agent=[cut("Act: compute(1+"), "Act: answer(8)"],
        environment=[cut("Result: 12345"), END],
        student=[cut("It is")],
        reason=["fine"],
    )
    row = run(CALC, engine)
    assert row["turn_cut"] == [True, True, False]
    assert row["student_output_cut"] is True and row["reason_cut"] is False


def test_teacher_topk_is_stored_per_agent_turn():
    engine = Scripted(
        agent=["Act: compute(4+4)", "Act: answer(8)"], environment=["Result: 8", END], student=["x"], reason=["y"]
    )
    row = run(CALC, engine, SynthSettings(teacher_topk=3))
    assert [r.sampling.logprobs for r in engine.requests["agent"]] == [3, 3]
    assert {r.sampling.logprobs for r in engine.requests["environment"] + engine.requests["student"]} == {0}
    assert row["teacher_topk"] == [
        {"token_ids": [0, 1], "topk_ids": [[0] * 3, [1] * 3], "topk_logprobs": [[-0.5] * 3] * 2},
        {"token_ids": [0, 1], "topk_ids": [[0] * 3, [1] * 3], "topk_logprobs": [[-0.5] * 3] * 2},
    ]
    row = run(
        CALC,
        Scripted(agent=["Act: answer(8)"], environment=[END], student=["x"], reason=["y"]),
        SynthSettings(teacher_topk=0),
    )
    assert row["teacher_topk"] is None

    class NoTopk(Scripted):  # an engine that ignores the request is a failure, not a silent gap
        async def complete(self, request):
            return dataclasses.replace(await super().complete(request), topk_ids=None)

    row = run(CALC, NoTopk(agent=["Act: answer(8)"]))
    assert row["error"] == "agent turn 1: the engine returned no top-k log-probabilities"


def test_inputs_are_distinct_and_use_five_demonstrations():
    generator = Scripted(
        input=["What is 1 plus 1?", "what is 1 plus  1?", "What is 7 times 6?", " What is 2 plus 2? "]
        + [f"Q{i}" for i in range(20)]
    )
    settings = SynthSettings(samples=4)
    got = asyncio.run(generate_inputs(CALC, generator, settings, 256))
    # case/space duplicates and copies of the catalog's examples are dropped
    assert got.inputs == ["What is 1 plus 1?", "What is 2 plus 2?", "Q0", "Q1"] and got.duplicates == 2
    first = generator.requests["input"][0]
    # the five demonstrations are the generator's own earlier replies, each answering the same ask
    assert [m["role"] for m in first.messages] == ["system"] + ["user", "assistant"] * 5 + ["user"]
    demos = [m["content"] for m in first.messages if m["role"] == "assistant"]
    assert len(set(demos)) == 5 and set(demos) <= set(CALC.input_examples)
    assert {m["content"] for m in first.messages if m["role"] == "user"} == {INPUT_ASK}
    assert first.sampling.temperature == 1.0 and first.sampling.top_p == 0.9
    assert got.errors == [] and got.cut == 0 and first.sampling.max_tokens == 256


def test_inputs_generator_sees_the_prompt_over_asks_and_drops_cut_inputs():
    cut = Completion(text="What is 3 times", prompt_tokens=10, completion_tokens=4, finish_reason="length")
    replies = ["A?", cut, "A?", "B?", "C?", "D?", "E?", "F?", "G?", "H?", "I?", "J?"]
    generator = Scripted(input=replies)
    got = asyncio.run(generate_inputs(CALC, generator, SynthSettings(samples=3), 256))
    # one round asks 2 x 3 = 6 and keeps the first 3 distinct of them, in ask order; the cut one is dropped
    assert got.inputs == ["A?", "B?", "C?"] and got.cut == 1 and len(generator.requests["input"]) == 6
    assert render_prompt_text(CALC) in generator.requests["input"][0].messages[0]["content"]

    # too few distinct in the first round: the next asks 2 x the missing ones
    generator = Scripted(input=["A?"] * 6 + ["B?", "C?", "D?", "E?"])
    got = asyncio.run(generate_inputs(CALC, generator, SynthSettings(samples=3), 256))
    assert got.inputs == ["A?", "B?", "C?"] and len(generator.requests["input"]) == 10 and got.rounds == 2


class Writer:
    """A generator of pseudo inputs whose replies follow `script`, one kind per call, then "new": "long" an
    input of 300 tokens, cut (finish "length") when the request's max_tokens is below that, as an engine does;
    "same" the same question every time; "new" a question of its own."""

    model_name = "writer"

    def __init__(self, script):
        self.script = list(script)
        self.requests: list[ChatRequest] = []

    async def complete(self, request):
        self.requests.append(request)
        k = len(self.requests)
        kind = self.script[k - 1] if k <= len(self.script) else "new"
        if kind == "long":
            words = [f"<html id={k}>"] + ["<td>"] * 299
            n = min(len(words), request.sampling.max_tokens)
            return Completion(
                text=" ".join(words[:n]), completion_tokens=n, finish_reason="length" if n < len(words) else "stop"
            )
        text = "Same question?" if kind == "same" else f"Question {k}?"
        return Completion(text=text, completion_tokens=2, finish_reason="stop")


def test_inputs_over_generate_in_bounded_rounds_past_duplicates_and_over_long_ones():
    settings = SynthSettings(samples=4, input_rounds=4)
    # round 1 asks 2 x 4 = 8: four inputs over the 256-token limit (cut), "Same question?" kept once, then 3 copies;
    # round 2 asks 2 x 3 = 6: one more cut, one more copy, then three new ones (the 6th ask is surplus)
    script = ["long", "same"] * 4 + ["long", "same"]
    generator = Writer(script)
    got = asyncio.run(generate_inputs(CALC, generator, settings, 256))
    assert got.inputs == ["Same question?", "Question 11?", "Question 12?", "Question 13?"]
    assert (got.cut, got.duplicates, got.empty, got.errors, got.rounds, got.asked) == (5, 4, 0, [], 2, 8 + 6)
    assert {r.sampling.max_tokens for r in generator.requests} == {256}
    # under a limit above the long inputs' length they fit and are kept, in ask order; one round is enough
    got = asyncio.run(generate_inputs(CALC, Writer(script), settings, 600))
    assert got.cut == 0 and got.rounds == 1 and len(got.inputs) == 4 and got.inputs[1] == "Same question?"
    assert got.inputs[0].startswith("<html id=1>") and got.inputs[3].startswith("<html id=5>")

    # a generator that never writes anything new: stops after settings.input_rounds rounds, says why
    class Stuck:
        model_name = "stuck"
        calls = 0

        async def complete(self, request):
            Stuck.calls += 1
            return Completion(text="What is 7 times 6?", finish_reason="stop")  # a copy of a catalog example

    got = asyncio.run(generate_inputs(CALC, Stuck(), settings, 256))
    assert got.inputs == [] and got.rounds == 4 and Stuck.calls == got.asked == 4 * 8 and got.duplicates == 32
    assert got.why_short() == "32 duplicates"
    got.cut, got.errors = 13, ["engine: boom"]
    assert got.why_short() == "13 generated inputs over the 256-token input limit, 32 duplicates, 1 generator error"


class Counter:
    """A target that counts a text's tokens as its words, plus 3 for its chat template."""

    model_name = "counter"

    def __init__(self, context=10_000):
        self.context = context
        self.requests: list[ChatRequest] = []

    async def complete(self, request):
        self.requests.append(request)
        n = 3 + sum(len(m["content"].split()) for m in request.messages)
        if n + request.sampling.max_tokens > self.context:
            return Completion.failure(
                f"context_length: {n} prompt tokens + {request.sampling.max_tokens} max tokens > {self.context}"
            )
        return Completion(text="x", prompt_tokens=n, completion_tokens=1, finish_reason="length")


def test_the_input_limit_is_derived_from_the_prompts_example_inputs_unless_given():
    page = "<div> " * 400  # a Mind2Web-like input: an HTML page of 400 tokens
    web = dataclasses.replace(CALC, id="web", input_examples=["Click the cart. " + page, "Find shoes."])
    limit = asyncio.run(input_token_limit(web, Counter(), SynthSettings()))
    assert (limit.tokens, limit.source, limit.longest_example) == (INPUT_LIMIT_FACTOR * 403, "examples", 403)
    # short examples: the floor; none: the floor; the flag wins over both
    limit = asyncio.run(input_token_limit(CALC, Counter(), SynthSettings()))
    assert (limit.tokens, limit.source, limit.longest_example) == (
        INPUT_LIMIT_FLOOR,
        "floor",
        6,
    )  # "What is 12 divided by 3?"
    none = dataclasses.replace(CALC, input_examples=[])
    assert asyncio.run(input_token_limit(none, Counter(), SynthSettings())).source == "floor"
    assert asyncio.run(input_token_limit(web, Counter(), SynthSettings(max_input_tokens=64))).tokens == 64
    # an example longer than the target's context is still measured (its count is in the overflow error)
    limit = asyncio.run(input_token_limit(web, Counter(context=300), SynthSettings()))
    assert limit.tokens == INPUT_LIMIT_FACTOR * 403


STRICT_TEMPLATE = (  # Mistral's rule: after an optional system message, user and assistant alternate from user
    "{%- if messages[0]['role'] == 'system' %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}"
    "{{- '[' + message['role'] + '] ' + message['content'] + '\\n' }}"
    "{%- endfor %}"
)


def test_every_request_renders_with_a_template_that_requires_alternating_roles():
    from transformers import AutoTokenizer

    from genpi.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2"))
    tokenizer.chat_template = STRICT_TEMPLATE

    class Strict(Scripted):
        async def complete(self, request):
            tokenizer.apply_chat_template(request.messages, tokenize=False, add_generation_prompt=True)
            return await super().complete(request)

    engine = Strict(
        agent=["Act: compute(4+4)", "Act: compute(8)", "Act: answer(8)"],
        environment=["Result: 8", "Result: 8", END],
        student=["x"],
        reason=["y"],
        input=[f"Q{i}?" for i in range(4)],
    )
    row = run(CALC, engine)
    assert row["error"] is None and row["n_turns"] == 3 and len(engine.requests["environment"]) == 3
    asyncio.run(generate_inputs(CALC, engine, SynthSettings(samples=2), 256))
    two_shots = dataclasses.replace(CALC, shots=CALC.shots * 2)
    tokenizer.apply_chat_template(environment_messages(two_shots), tokenize=False)


def test_environment_persona_swaps_roles_and_marks_the_end():
    messages = environment_messages(CALC)
    assert messages[0]["role"] == "system" and CALC.system in messages[0]["content"]
    assert [m["role"] for m in messages[1:]] == ["user", "assistant", "user", "assistant", "user", "assistant"]
    assert messages[1]["content"] == ENVIRONMENT_OPEN and messages[2]["content"] == "What is 2 plus 3?"
    assert messages[-1]["content"] == END


def test_heldout_split_is_stable_and_sized():
    settings = SynthSettings(heldout=0.2)
    a = heldout_ids("calc", 50, settings)
    assert a == heldout_ids("calc", 50, settings) and len(a) == 10
    assert heldout_ids("greet", 50, settings) != a
    assert len(heldout_ids("calc", 3, settings)) == 1


def test_the_input_limit_counts_the_examples_in_the_target_engines_tokens(tiny_model):
    from transformers import AutoTokenizer

    from genpi.engines.hf import TransformersEngine

    class Local:  # the engine in this process, as an AsyncEngine
        model_name = "tiny"

        def __init__(self, engine):
            self.engine = engine

        async def complete(self, request):
            return await asyncio.wrap_future(self.engine.submit(request))

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    page = "Buy the red shoes. <html><body>" + "<div class='item'>Shoe</div>" * 40 + "</body></html>"
    web = dataclasses.replace(CALC, id="web", input_examples=[page, "Find shoes."])
    n = len(tokenizer(page, add_special_tokens=False)["input_ids"])
    assert n > INPUT_LIMIT_FLOOR // INPUT_LIMIT_FACTOR
    for max_model_len in (None, 128):  # 128: the page is over the context; its count comes from the overflow error
        engine = TransformersEngine(tiny_model, dtype="float32", max_model_len=max_model_len)
        limit = asyncio.run(input_token_limit(web, Local(engine), SynthSettings()))
        assert (limit.tokens, limit.source, limit.longest_example) == (INPUT_LIMIT_FACTOR * n, "examples", n), (
            max_model_len
        )
