"""The dialogue logic against a scripted engine: every branch of the role-play, deterministic."""

import asyncio
import dataclasses

from genpi.catalog import load_catalog
from genpi.engines import ChatRequest, Completion
from genpi.synth.pipeline import (
    END,
    ENVIRONMENT_INSTRUCTION,
    INPUT_ASK,
    INPUT_INSTRUCTION,
    REASON_INSTRUCTION,
    SynthSettings,
    environment_messages,
    generate_inputs,
    heldout_ids,
    synthesize_dialogue,
)
from conftest import REPO

CALC, GREET = load_catalog(REPO / "tests" / "data" / "tiny.yaml")
SAMPLE = {"sample_id": 3, "seed": 11, "split": "train", "input": "What is 4 plus 4?"}


class Scripted:
    """Answers by the persona a request is for; each persona's replies are consumed in order."""

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
        if isinstance(reply, Completion):
            return reply
        return Completion(text=reply, prompt_tokens=10, completion_tokens=len(reply.split()), finish_reason="stop")


def run(entry, engine, settings=SynthSettings()):
    return asyncio.run(synthesize_dialogue(entry, SAMPLE, engine, engine, settings))


def test_role_play_until_final_action():
    engine = Scripted(
        agent=["Act: compute(4+4)", "Act: answer(8)"],
        environment=["Result: 8"],
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
    assert (row["n_turns"], row["terminated"], row["hit_max_turns"], row["truncated"]) == (2, True, False, False)
    assert row["final_action"] == "Act: answer(8)" and row["final_action_valid"] is True
    assert row["student_output"] == "It is eight." and row["reason"].startswith("Because")
    assert row["prompt_tokens"] == 50 and row["agent_tokens"] == 4 and row["environment_tokens"] == 2
    # the teacher sees P then the input; P is marked as the cacheable prefix
    first = engine.requests["agent"][0]
    assert first.messages[: len(CALC.messages())] == CALC.messages()
    assert first.messages[-1] == {"role": "user", "content": SAMPLE["input"]}
    assert first.prefix_messages == len(CALC.messages()) and first.sampling.temperature == 0
    # the environment sees the task as its own first line and the agent's action as the user's
    env = engine.requests["environment"][0]
    assert env.messages[-2:] == [
        {"role": "assistant", "content": SAMPLE["input"]},
        {"role": "user", "content": "Act: compute(4+4)"},
    ]
    # the student gets the input alone; the reason compares AS-IS with the first teacher turn
    assert engine.requests["student"][0].messages == [{"role": "user", "content": SAMPLE["input"]}]
    reason = engine.requests["reason"][0]
    assert "It is eight." in reason.messages[1]["content"] and "Act: compute(4+4)" in reason.messages[1]["content"]
    assert reason.sampling.temperature == 0.7 and reason.sampling.top_p == 0.9
    assert "Act: compute" in reason.messages[0]["content"]  # P is shown to the generator


def test_environment_termination_marker_and_max_turns():
    no_final = dataclasses.replace(CALC, final_action=None)
    engine = Scripted(agent=["Act: compute(1)"], environment=[f"{END}"], student=["x"], reason=["y"])
    row = run(no_final, engine)
    assert row["terminated"] and row["n_turns"] == 1 and not row["hit_max_turns"]

    engine = Scripted(
        agent=["Act: compute(1)", "Act: compute(2)", "I give up"],
        environment=["Result: 1", "Result: 2"],
        student=["x"],
        reason=["y"],
    )
    row = run(CALC, engine)
    assert row["hit_max_turns"] and not row["terminated"] and row["n_turns"] == 3
    assert row["final_action"] == "I give up" and row["final_action_valid"] is False

    engine = Scripted(agent=["Act: compute(1)", "Act: compute(2)"], environment=["Result: 1"], student=["x"], reason=["y"])
    row = run(CALC, engine, SynthSettings(max_turns=2))  # the run's cap is below the catalog's 3
    assert row["hit_max_turns"] and row["n_turns"] == 2 and not engine.replies["agent"]


def test_single_turn_prompt():
    engine = Scripted(agent=["Answer: hello"], student=["Hi! How can I help?"], reason=["z"])
    row = run(GREET, engine)
    assert row["n_turns"] == 1 and row["terminated"] and "environment" not in engine.requests


def overflow(prompt_tokens, max_tokens=384, limit=1024):
    error = f"context_length: {prompt_tokens} prompt tokens + {max_tokens} max tokens > {limit}"
    return Completion(finish_reason="error", error=error)


def test_overflow_truncates_later_turns_and_fails_the_first():
    engine = Scripted(agent=["Act: compute(1)", overflow(1020)], environment=["Result: 1"], student=["x"], reason=["y"])
    row = run(CALC, engine)
    assert row["error"] is None and row["truncated"] and row["n_turns"] == 1 and not row["terminated"]

    engine = Scripted(agent=[overflow(1020)])
    row = run(CALC, engine)
    assert row["error"].startswith("agent turn 1: context_length") and row["turns"] == []
    assert row["sample_id"] == 3 and row["input"] == SAMPLE["input"]


def test_overflow_is_retried_with_the_room_left():
    engine = Scripted(agent=[overflow(900), "Act: answer(8)"], student=["x"], reason=["y"])
    row = run(CALC, engine)
    assert row["error"] is None and row["turns"][0]["content"] == "Act: answer(8)"
    assert [r.sampling.max_tokens for r in engine.requests["agent"]] == [384, 124]

    engine = Scripted(agent=[overflow(900), overflow(1015, 124)])  # the room shrank below what is worth asking
    row = run(CALC, engine)
    assert row["error"].startswith("agent turn 1: context_length") and len(engine.requests["agent"]) == 2


def test_engine_errors_are_retried_then_recorded():
    broken = Completion(finish_reason="error", error="engine: RuntimeError: boom")
    engine = Scripted(agent=[broken, "Answer: hello"], student=["x"], reason=["y"])
    row = run(GREET, engine)
    assert row["error"] is None and row["n_turns"] == 1

    engine = Scripted(agent=["Answer: hello"], student=["x"], reason=[broken] * 3)
    row = run(GREET, engine)
    assert row["error"] == "reason: engine: RuntimeError: boom"
    assert row["turns"] and row["student_output"] == "x"  # what was done stays on the row

    class Crashing(Scripted):
        async def complete(self, request):
            raise ConnectionError("actor gone")

    row = run(GREET, Crashing())
    assert row["error"] == "internal: ConnectionError: actor gone"


def test_inputs_are_distinct_and_use_five_demonstrations():
    generator = Scripted(input=["What is 1 plus 1?", "what is 1 plus  1?", "What is 7 times 6?", " What is 2 plus 2? "] + [f"Q{i}" for i in range(20)])
    settings = SynthSettings(samples=4)
    inputs, errors = asyncio.run(generate_inputs(CALC, generator, settings))
    # case/space duplicates and copies of the catalog's examples are dropped
    assert inputs == ["What is 1 plus 1?", "What is 2 plus 2?", "Q0", "Q1"]
    first = generator.requests["input"][0]
    # the five demonstrations are the generator's own earlier replies, each answering the same ask
    assert [m["role"] for m in first.messages] == ["system"] + ["user", "assistant"] * 5 + ["user"]
    demos = [m["content"] for m in first.messages if m["role"] == "assistant"]
    assert len(set(demos)) == 5 and set(demos) <= set(CALC.input_examples)
    assert {m["content"] for m in first.messages if m["role"] == "user"} == {INPUT_ASK}
    assert first.sampling.temperature == 1.0 and first.sampling.top_p == 0.9
    assert errors == []


def test_environment_persona_swaps_roles_and_marks_the_end():
    messages = environment_messages(CALC)
    assert messages[0]["role"] == "system" and CALC.system in messages[0]["content"]
    assert [m["role"] for m in messages[1:]] == ["assistant", "user", "assistant", "user", "assistant"]
    assert messages[-1]["content"] == END and messages[1]["content"] == "What is 2 plus 3?"


def test_heldout_split_is_stable_and_sized():
    settings = SynthSettings(heldout=0.2)
    a = heldout_ids("calc", 50, settings)
    assert a == heldout_ids("calc", 50, settings) and len(a) == 10
    assert heldout_ids("greet", 50, settings) != a
    assert len(heldout_ids("calc", 3, settings)) == 1
