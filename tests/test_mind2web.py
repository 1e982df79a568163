"""`genpi eval mind2web`: AgentBench's multiple-choice step scoring, checked with scripted agents whose
scores are known exactly, and end to end on a tiny model (teacher, base and an adapter)."""

import asyncio
import json
import re
import subprocess
import sys

import duckdb
import pytest
from conftest import EXAMPLES, REPO, cli_in_process

from genpi import InputError
from genpi.catalog import load_catalog
from genpi.engines import Completion, Sampling
from genpi.eval.evaluate import play_every
from genpi.eval.markdown import cell
from genpi.eval.mind2web import PER_QUESTION, action_f1, answer_step, parse_reply, read_steps, score
from genpi.eval.report import build_report
from genpi.eval.systems import System

STEPS = REPO / "examples" / "mind2web" / "steps.jsonl"
WEB_SELECT = next(e for e in load_catalog(EXAMPLES) if e.id == "web-select")


class Scripted:
    """An AsyncEngine whose reply is a function of the question (the last user turn)."""

    model_name = "scripted"

    def __init__(self, reply):
        self.reply, self.requests = reply, []

    async def complete(self, request):
        self.requests.append(request)
        return Completion(text=self.reply(request.messages[-1]["content"]), finish_reason="stop")


def choices(question: str) -> dict[str, str]:
    """letter -> the element's text, as the question lists them."""
    return dict(re.findall(r"^([A-F])\. (.*)$", question, re.MULTILINE))


def oracle(steps, wrong=False):
    """Knows each step's gold; `wrong`: picks a non-gold element with the gold action instead."""
    by_task = {}
    for s in steps:
        by_task.setdefault(s.task, []).append(s)

    def reply(question):
        [step] = [
            s
            for s in by_task[re.search(r"^Task: (.*)$", question, re.MULTILINE).group(1)]
            if all(text == "None of the above" or text in s.candidates.values() for text in choices(question).values())
        ]
        gold = {step.candidates[g] for g in step.gold}
        picks = [letter for letter, text in choices(question).items() if letter != "A" and (text in gold) != wrong]
        value = step.value if step.operation != "CLICK" else "None"
        return (
            f"Answer: {picks[0] if picks else 'A'}\nAction: {step.operation}\nValue: {value}" if picks else "Answer: A"
        )

    return reply


def run(steps, agent, layout="agentbench", with_prompt=False):
    system = System("teacher" if with_prompt else "base", None, with_prompt)
    sampling = Sampling(max_tokens=32)
    rows = play_every(
        steps,
        {system.name: (system, agent)},
        WEB_SELECT,
        lambda step, agent, prefix: answer_step(step, agent, prefix, sampling, layout),
    )
    return rows[system.name]


def test_parse_reply_and_f1_follow_agentbench():
    assert parse_reply("Answer: C\nAction: TYPE\nValue: Hamburg") == ("C", "TYPE Hamburg")
    assert parse_reply("Thought: the search box.\nAnswer: D.\nAction: CLICK") == ("D", "CLICK")
    assert parse_reply("Answer: B\nAction: CLICK\nValue: None") == ("B", "CLICK")  # the web-select prompt's CLICK
    assert parse_reply("I would click the button") == ("A", "")  # no answer: A, no action
    assert parse_reply("Answer: G\nAction: DRAG") == ("A", "")  # past F and an unknown operation: not parsed
    assert action_f1("TYPE Hamburg", "TYPE Hamburg") == 1.0
    assert action_f1("TYPE Munich", "TYPE Hamburg") == 0.5
    assert action_f1("SELECT Price: low to high", "SELECT Price: high to low") == 1.0  # token sets, as AgentBench
    assert action_f1("", "CLICK") == 0.0 and action_f1("", "") == 1.0
    assert action_f1("TYPE sam lee", "TYPE sam") == pytest.approx(0.8)


def test_hand_written_steps_are_valid():
    steps = read_steps(STEPS)
    assert len(steps) == 10 and {s.operation for s in steps} == {"CLICK", "TYPE", "SELECT"}
    assert max(len(s.candidates) for s in steps) == 2 * PER_QUESTION  # a step asked in three rounds
    assert len(read_steps(STEPS, limit=3)) == 3


@pytest.mark.parametrize("layout", ["agentbench", "examples"])
def test_scripted_agents_score_exactly(layout):
    steps = read_steps(STEPS)
    right, wrong = Scripted(oracle(steps)), Scripted(oracle(steps, wrong=True))
    metrics, kept = score({"teacher": run(steps, right, layout, with_prompt=True), "base": run(steps, wrong, layout)})
    assert metrics["teacher"] | {"mean_questions": None} == {
        "steps": 10,
        "errors": 0,
        "element_accuracy": 1.0,
        "action_f1": 1.0,
        "step_success": 1.0,
        "mean_questions": None,
    }
    assert metrics["base"]["element_accuracy"] == 0.0 and metrics["base"]["step_success"] == 0.0
    assert metrics["base"]["action_f1"] == 1.0  # the right action on the wrong element is no step success
    assert kept == {"base": {"element_accuracy": 0.0, "action_f1": 1.0, "step_success": 0.0}}
    for request in right.requests:  # P only for the teacher; at most 5 candidates and "None of the above" per question
        assert request.messages[:-1] == WEB_SELECT.messages() and request.prefix_messages == len(WEB_SELECT.messages())
        assert 2 <= len(choices(request.messages[-1]["content"])) <= PER_QUESTION + 1
        assert ("Choices:\nA. None of the above" in request.messages[-1]["content"]) == (layout == "examples")
    assert all(len(r.messages) == 1 for r in wrong.requests)


def test_rounds_eliminate_and_every_system_sees_one_order():
    [step] = [s for s in read_steps(STEPS) if len(s.candidates) == 10]
    agent = Scripted(oracle([step]))
    row = asyncio.run(answer_step(step, agent, [], Sampling()))
    # 10 candidates: 5, then the other 5 (with the gold, or with the gold picked before and put back): two questions
    assert row["questions"] == 2 and row["success"] and row["predicted"] == step.gold[0]
    # picking something every time: 5, then 5 (the first pick back at the end), then the last 2 picks
    wrong = asyncio.run(answer_step(step, Scripted(oracle([step], wrong=True)), [], Sampling()))
    assert wrong["questions"] == 3 and wrong["predicted"] not in step.gold and not wrong["success"]
    again = Scripted(oracle([step]))
    asyncio.run(answer_step(step, again, [], Sampling()))
    assert [r.messages for r in agent.requests] == [r.messages for r in again.requests]
    # "None of the above" every time: nothing is picked, and the step fails
    none = asyncio.run(answer_step(step, Scripted(lambda q: "Answer: A"), [], Sampling()))
    assert (
        none["predicted"] is None
        and not none["element_correct"]
        and none["action_f1"] == 0.0
        and none["questions"] == 2
    )  # 5, then 5


def test_a_failed_question_fails_the_step_and_is_recorded():
    class Failing(Scripted):
        async def complete(self, request):
            return Completion.failure("context_length: 9000 tokens")

    steps = read_steps(STEPS, limit=2)
    rows = run(steps, Failing(None))
    assert [r["error"] for r in rows] == ["context_length: 9000 tokens"] * 2 and not any(r["success"] for r in rows)
    assert score({"base": rows})[0]["base"]["errors"] == 2


@pytest.mark.parametrize(
    "line, message",
    [
        ("not json", "line 1: not valid JSON"),
        ('{"task": "t", "candidates": [], "gold": [], "operation": "CLICK"}', "line 1: field 'candidates'"),
        (
            '{"task": "t", "candidates": [{"id": "1", "html": "<a>"}], "gold": ["2"], "operation": "CLICK"}',
            "field 'gold': 2 not among",
        ),
        (
            '{"task": "t", "candidates": [{"id": "1", "html": "<a>"}], "gold": ["1"], "operation": "HOVER"}',
            "field 'operation'",
        ),
        (
            '{"task": "t", "candidates": [{"id": "1", "html": "<a>"}], "gold": ["1"], "operation": "TYPE"}',
            "field 'value'",
        ),
        ('{"candidates": [{"id": "1", "html": "<a>"}], "gold": ["1"], "operation": "CLICK"}', "field 'task': missing"),
    ],
)
def test_bad_steps_are_named(tmp_path, line, message):
    path = tmp_path / "steps.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(InputError, match=re.escape(message)):
        read_steps(path)


@pytest.fixture(scope="module")
def adapters(tiny_long_model, tmp_path_factory):
    """An untrained web-select adapter with random B matrices (so it changes the base's replies)."""
    import torch
    from transformers import AutoModelForCausalLM

    from genpi.data.adapters import AdapterManifest, write_adapter
    from genpi.train.qlora import LoraSettings, add_lora, save_adapter

    torch.manual_seed(0)
    settings = LoraSettings(r=4, alpha=8, dropout=0.0)
    model = add_lora(AutoModelForCausalLM.from_pretrained(tiny_long_model), settings)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    folder = tmp_path_factory.mktemp("adapters")
    manifest = AdapterManifest(
        "web-select", WEB_SELECT.sha256, tiny_long_model, "sft", None, settings.to_dict(), "test"
    )
    write_adapter(folder / "web-select", manifest, lambda tmp: save_adapter(model, tmp))
    return folder


def run_cli(*args):
    command = [sys.executable, "-m", "genpi.cli", "eval", *map(str, args)]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_cli_teacher_base_and_adapter(tiny_long_model, adapters, tmp_path):
    out = tmp_path / "eval"
    result = run_cli(
        "mind2web",
        STEPS,
        "--catalog",
        EXAMPLES,
        "--prompt",
        "web-select",
        "--adapters",
        f"rand={adapters}",
        "--base",
        tiny_long_model,
        "--limit",
        "3",
        "--max-new-tokens",
        "6",
        "--out",
        out,
        "--json",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert json.loads((out / "mind2web.json").read_text()) == {"results": [summary]}
    assert set(summary["systems"]) == {"teacher", "base", "rand"} and summary["steps"] == 3
    assert "unmerged LoRA" in summary["served_as"] and summary["adapters"] == {"rand": str(adapters / "web-select")}

    con = duckdb.connect()
    rows = con.execute(
        f"SELECT * FROM read_parquet('{out}/mind2web/**/*.parquet', hive_partitioning=true) ORDER BY system, step_id"
    ).fetchall()
    rows = [dict(zip([d[0] for d in con.description], r)) for r in rows]
    assert len(rows) == 9
    for r in rows:  # every stored score follows from the stored replies
        replies = [t["content"] for t in r["turns"] if t["role"] == "assistant"]
        assert len(replies) == r["questions"] >= 1 and r["error"] is None
        assert r["element_correct"] == (r["predicted"] in r["gold"])
        if r["predicted"] is not None:
            assert r["action_f1"] == action_f1(r["predicted_action"], r["gold_action"])
        assert r["success"] == (r["element_correct"] and r["action_f1"] == 1.0)
    by_system = {name: [r for r in rows if r["system"] == name] for name in ("teacher", "base", "rand")}
    for name, m in summary["systems"].items():
        assert m["step_success"] == sum(r["success"] for r in by_system[name]) / 3
    assert [r["turns"][0] for r in by_system["base"]] == [r["turns"][0] for r in by_system["rand"]]  # same questions
    assert [r["turns"][1] for r in by_system["base"]] != [
        r["turns"][1] for r in by_system["rand"]
    ]  # the adapter is used

    text, _ = build_report(tmp_path, out)  # genpi report: the section with the summary's numbers, WebShop missing
    assert "### Mind2Web steps: web-select" in text and "webshop.json not found (run genpi eval webshop)" in text
    m = summary["systems"]["rand"]
    assert f"| rand | {cell(m['element_accuracy'])} | {cell(m['action_f1'])} | {cell(m['step_success'])} | 0 |" in text


def test_cli_bad_input_exits_2(tmp_path, capsys):
    result = run_cli("mind2web", STEPS, "--catalog", EXAMPLES, "--prompt", "nope")
    assert result.returncode == 2 and "--prompt nope: not in" in result.stderr
    bad = tmp_path / "steps.jsonl"
    bad.write_text('{"task": "t"}\n')
    code, err = cli_in_process(capsys, "eval", "mind2web", bad, "--catalog", EXAMPLES, "--prompt", "web-select")
    assert code == 2 and "line 1: field 'candidates': missing" in err  # in process: the exit status is above
