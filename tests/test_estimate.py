"""--dry-run's cost estimate (genpi.synth.estimate, genpi.estimate): its arithmetic against the role-play it mirrors,
and its tokens against a real small synthesis on the tiny Llama (within 25%)."""

import asyncio

import pytest
from conftest import REPO

from genpi import InputError
from genpi.catalog import load_catalog
from genpi.engines import Completion
from genpi.synth.estimate import (
    Cost,
    Counter,
    Episode,
    Load,
    Throughput,
    counter,
    episode_load,
    format_costs,
    parse_throughput,
    synth_costs,
)
from genpi.synth.pipeline import (
    END,
    ENVIRONMENT_INSTRUCTION,
    INPUT_INSTRUCTION,
    REASON_INSTRUCTION,
    SynthSettings,
    blank_row,
    generate_inputs,
    role_play,
    synthesize_dialogue,
)

TINY = REPO / "tests" / "data" / "tiny.yaml"
CALC, GREET = load_catalog(TINY)


def persona(request) -> str:
    system = request.messages[0]["content"] if request.messages[0]["role"] == "system" else ""
    for name, instruction in (
        ("environment", ENVIRONMENT_INSTRUCTION),
        ("reason", REASON_INSTRUCTION),
        ("input", INPUT_INSTRUCTION),
    ):
        if system.startswith(instruction):
            return name
    return "agent" if system else "student"


class Tally:
    """An AsyncEngine that adds up each persona's calls and tokens around another engine."""

    def __init__(self, engine):
        self.engine, self.model_name = engine, "tally"
        self.load: dict[str, Load] = {}

    async def complete(self, request):
        result = await self.engine(request)
        who = persona(request)
        self.load[who] = self.load.get(who, Load()) + Load(1, result.prompt_tokens, result.completion_tokens)
        return result


def test_load_adds_and_scales():
    assert Load(1, 10, 5) + Load(2, 3, 4) == Load(3, 13, 9)
    assert Load(1, 10, 5) * 3 == Load(3, 30, 15)


def test_throughput_flags_are_read_and_bad_ones_refused():
    assert parse_throughput("250") == {"generator": 250.0, "target": 250.0}
    assert parse_throughput("generator=20,target=1e3") == {"generator": 20.0, "target": 1000.0}
    assert parse_throughput(None) is None
    for bad, what in (
        ("gpu=3", "not a model role"),
        ("fast", "not a number"),
        ("0", "above 0"),
        ("generator=5", "no throughput for target"),
    ):
        with pytest.raises(InputError, match=what):
            parse_throughput(bad)


def test_time_is_tokens_over_throughput_per_role():
    rate = Throughput({"generator": 10.0, "target": 100.0}, {"generator": 100.0, "target": 1000.0}, "given")
    slow = Cost("synth inputs", "generator", "g", Load(4, 1000, 50), Load(8, 2000, 100))
    fast = Cost("synth agent", "target", "t", Load(4, 1000, 50), Load(8, 2000, 100))
    assert rate.seconds(slow, slow.expected) == pytest.approx(50 / 10 + 1000 / 100)
    assert rate.seconds(fast, fast.most) == pytest.approx(100 / 100 + 2000 / 1000)
    table = format_costs([slow, fast], rate)
    assert "about 16 s (at most 33 s)" in table  # 15 + 1.5 expected, 30 + 3 at most
    assert "time" not in format_costs([slow], None).splitlines()[0]


def test_episode_arithmetic_matches_the_role_play_it_mirrors():
    """The agent's and the environment's prompt tokens, call by call, as role_play sends them: exact with a
    counter whose texts add up (4 characters a token, 4 tokens around each message)."""
    count = Counter("approx")
    replies = {"agent": ["Act: compute(7*6)xxx", "Act: answer(42)x"], "environment": ["Result: 42xx", END]}

    async def engine(request):
        text = replies[persona(request)].pop(0)
        return Completion(text, count.chat(request.messages), count.text(text), finish_reason="stop")

    tally = Tally(engine)
    settings = SynthSettings(teacher_topk=0)
    sample = {"sample_id": 0, "seed": 1, "split": "train", "input": "What is 7 times 6?"}
    row = blank_row(CALC, sample, settings, "g", "t")
    asyncio.run(role_play(CALC, row, tally, settings))
    assert row["terminated_by"] == "environment" and row["n_turns"] == 2
    episode = Episode(count.text(row["input"]), (5, 4), (3, count.text(END)))
    agent, environment = episode_load(CALC, count, episode)
    assert agent == tally.load["agent"] and environment == tally.load["environment"]
    without, _ = episode_load(CALC, count, episode, with_prompt=False)  # the student's episode: no P in either call
    user = [{"role": "user", "content": ""}]
    assert without.prompt_tokens == agent.prompt_tokens - 2 * (count.chat(CALC.messages() + user) - count.chat(user))


def test_the_expected_dialogue_follows_the_shots_and_the_most_runs_to_the_limits():
    count = Counter("approx")
    settings = SynthSettings(samples=10, max_turns=3, teacher_topk=0, max_input_tokens=64)
    costs = {c.stage: c for c in synth_costs([CALC], settings, count, count)}
    assert set(costs) == {"synth inputs", "synth agent", "synth environment", "synth student", "synth reason"}
    agent = costs["synth agent"]
    assert agent.expected.calls == 2 * 10  # the shot: two agent turns, under the turn limit of 3
    assert agent.most.calls == 3 * 10 and agent.most.generated_tokens == 3 * 10 * settings.max_agent_tokens
    shot_replies = [t["content"] for t in CALC.shots[0] if t["role"] == "assistant"]
    assert agent.expected.generated_tokens == 10 * sum(count.text(t) for t in shot_replies)
    inputs = costs["synth inputs"]
    assert inputs.expected.calls == 20 and inputs.most.calls == 20 * settings.input_rounds  # 2N asked per round
    assert costs["synth reason"].role == "generator" and costs["synth student"].role == "target"
    for c in costs.values():
        assert (
            c.expected.prompt_tokens <= c.most.prompt_tokens and c.expected.generated_tokens <= c.most.generated_tokens
        )


@pytest.mark.slow
def test_the_estimate_is_within_25_percent_of_a_real_small_synthesis(tiny_model):
    """Input generation and six dialogues of calc on the tiny random Llama in this process (the transformers engine,
    no Ray): a random model runs every reply to its token limit and never says the end marker, so the real run
    is the estimate's "at most" one; calls exactly, prompt and generated tokens within 25% (the replies' random
    tokens re-encode into other counts in the next call's history)."""
    from genpi.engines.hf import TransformersEngine

    engine = TransformersEngine(tiny_model, dtype="float32")
    try:
        tally = Tally(lambda request: asyncio.wrap_future(engine.submit(request)))
        settings = SynthSettings(
            samples=len(CALC.input_examples),
            max_turns=2,
            teacher_topk=0,
            input_rounds=2,
            max_input_tokens=8,
            max_agent_tokens=8,
            max_environment_tokens=8,
            max_student_tokens=8,
            max_reason_tokens=8,
        )

        async def run():
            got = await generate_inputs(CALC, tally, settings, settings.max_input_tokens)
            samples = [
                {"sample_id": i, "seed": i, "split": "train", "input": text}
                for i, text in enumerate(CALC.input_examples)
            ]
            rows = await asyncio.gather(*(synthesize_dialogue(CALC, s, tally, tally, settings) for s in samples))
            return got, rows

        got, rows = asyncio.run(run())
    finally:
        engine.close()
    assert not got.inputs and got.rounds == settings.input_rounds  # every input cut by the limit: every round asked
    assert all(r["error"] is None and r["terminated_by"] == "max_turns" for r in rows)
    count = counter(tiny_model)
    costs = {c.stage.removeprefix("synth "): c.most for c in synth_costs([CALC], settings, count, count)}
    assert costs["agent"].calls == tally.load["agent"].calls == 2 * len(rows)
    for who in ("input", "agent", "environment", "student", "reason"):
        real, estimate = tally.load[who], costs["inputs" if who == "input" else who]
        assert estimate.calls == real.calls, who
        for field in ("prompt_tokens", "generated_tokens"):
            assert getattr(estimate, field) == pytest.approx(getattr(real, field), rel=0.25), (who, field)
    # and the rows record the dialogue's tokens as the tally counted them
    assert sum(r["prompt_tokens"] for r in rows) == sum(
        tally.load[w].prompt_tokens for w in ("agent", "environment", "student", "reason")
    )


def test_synth_dry_run_prints_the_table_and_writes_nothing(tiny_model, tmp_path, capsys):
    from genpi.synth.run import main

    out = tmp_path / "out"
    argv = [str(TINY), "--out", str(out), "--generator", tiny_model, "--target", tiny_model, "--samples", "4"]
    assert main(argv + ["--dry-run", "--throughput", "generator=5,target=50"]) == 0
    printed = capsys.readouterr().out
    assert not out.exists()
    for stage in ("synth input limit", "synth inputs", "synth agent", "synth environment", "synth student"):
        assert stage in printed
    assert "2 prompts, 4 dialogues each" in printed and "GPU-hours" in printed
    assert main(argv + ["--dry-run", "--throughput", "gpu=5"]) == 2  # bad input: exit 2


def test_run_dry_run_estimates_every_stage_from_its_command(tiny_model, tmp_path, capsys):
    from genpi.run import main

    out = tmp_path / "run"
    argv = [str(TINY), "--out", str(out), "--base", tiny_model, "--generator", tiny_model, "--prompts", "calc"]
    assert main(argv + ["--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert not out.exists()
    for line in ("synth agent", "eval fidelity episodes", "eval fidelity scoring", "train topk-kl:", "train genpi:"):
        assert line in printed
    assert "not estimated (a few calls per task or turn): eval efficiency calc" in printed
    # the paper's sizes: 1,000 dialogues, and the time in GPU-hours at a stated throughput
    paper = argv + ["--config", str(REPO / "genpi" / "presets" / "paper.yaml"), "--dry-run", "--throughput", "2000"]
    assert main(paper) == 0
    printed = capsys.readouterr().out
    assert "1000 dialogues each" in printed and "GPU-hours when that is one GPU's throughput" in printed
