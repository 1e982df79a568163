"""Mind2Web step scoring as AgentBench does it: multiple-choice element selection.

    genpi eval mind2web STEPS.jsonl --catalog C --prompt ID [--adapters DIR ...] [--limit N] [--out EVAL]

STEPS.jsonl holds prepared Mind2Web steps, one JSON object a line:

    {"id": "s1",                                  optional; default: the line number
     "task": "Find one-way train tickets ...",
     "html": "<html> ... </html>",                optional: the pruned page, shown above the question
     "previous_actions": ["[link] Trains -> CLICK", ...],     the last 5 are shown
     "candidates": [{"id": "27", "html": "<input id=27 ...>"}, ...],
     "gold": ["27"],                              the right candidates' ids; [] when none was kept
     "operation": "TYPE", "value": "Hamburg"}     CLICK, TYPE or SELECT; value for TYPE and SELECT

Each system answers each step as AgentBench asks it (greedy; P before the question for the teacher only):
the candidates are shuffled (the same order for every system), then asked 5 at a time, with "A. None
of the above" first; the element a question picks goes back to the end of the pool, so rounds go on
until one candidate is left. The prediction is the last element picked with its `Action:` and `Value:`;
if the last question answered "None of the above" with nothing left, there is none. Replies are parsed
as AgentBench does (`Answer: X` with X in A-F, else A; `Action: CLICK|SELECT|TYPE`; `Value: ...`).

Scores per step, as AgentBench computes them: element right (the pick is a gold id), action F1 (token
set F1 between "OP value" predicted and gold; a CLICK's gold has no value), step success (element right
and F1 = 1). Two deviations, both for prompts that follow their own rules: a value written as "None"
counts as no value (the example catalog's web-select prompt asks for "Value: None" after CLICK), and a
step with a single candidate is asked once (AgentBench asks nothing and scores it 0). A step whose gold
list is empty, or whose question failed (an engine error, a prompt over the context), scores 0, as in
AgentBench; the error is recorded.

Per-step rows go to `EVAL/mind2web/ID/NAME/part-00000.parquet`, the summary
(element accuracy, action F1, step success per system, retention = system / teacher) to `EVAL/mind2web.json`,
which keeps one summary per prompt (`{"results": [...]}`; a rerun replaces its prompt's).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from genpi import InputError
from genpi.data.store import TURN
from genpi.engines import ChatRequest, Sampling
from genpi.eval import evaluate as skeleton
from genpi.eval.evaluate import pct, task_text
from genpi.eval.settings import Mind2WebSettings, SystemsSettings
from genpi.eval.systems import task_prompt

PER_QUESTION = 5  # candidates per question, besides "None of the above" (AgentBench's num_candidates)
PREVIOUS_SHOWN = 5  # the last previous actions shown (AgentBench's previous_k)
OPERATIONS = ("CLICK", "TYPE", "SELECT")
LAYOUTS = ("agentbench", "examples")
METRICS = ("element_accuracy", "action_f1", "step_success")

STEP_SCHEMA = skeleton.row_schema(
    ("step_id", pa.string()),
    ("task", pa.string()),
    ("gold", pa.list_(pa.string())),
    ("gold_action", pa.string()),  # "OP value" ("CLICK" alone)
    ("predicted", pa.string()),  # the candidate id picked last; null: none
    ("predicted_action", pa.string()),
    ("element_correct", pa.bool_()),
    ("action_f1", pa.float64()),
    ("success", pa.bool_()),
    ("questions", pa.int32()),
    ("turns", pa.list_(TURN)),  # each question ("user") and its reply ("assistant"), in order
    ("error", pa.string()),
)


@dataclass(frozen=True)
class Step:
    id: str
    task: str
    candidates: dict[str, str]  # id -> the element's HTML snippet, in the file's order
    gold: tuple[str, ...]
    operation: str
    value: str = ""
    html: str = ""
    previous_actions: tuple[str, ...] = ()

    @property
    def gold_action(self) -> str:
        return self.operation if self.operation == "CLICK" else f"{self.operation} {self.value}"


def read_steps(path: str | Path, limit: int | None = None) -> list[Step]:
    """The steps of a STEPS.jsonl file, validated (a bad line is named with its field)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    steps, seen = [], set()
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue

        def fail(field: str, problem: str) -> InputError:
            return InputError(f"{path}: line {lineno}: field {field!r}: {problem}")

        try:
            raw = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: line {lineno}: not valid JSON: {e.msg}") from None
        if not isinstance(raw, dict):
            raise InputError(f"{path}: line {lineno}: expected a JSON object")
        for field in ("task", "candidates", "gold", "operation"):
            if field not in raw:
                raise fail(field, "missing")
        if not isinstance(raw["task"], str) or not raw["task"].strip():
            raise fail("task", "expected a non-empty string")
        for field in ("html", "value"):
            if not isinstance(raw.get(field, ""), str):
                raise fail(field, "expected a string")
        previous = raw.get("previous_actions", [])
        if not isinstance(previous, list) or not all(isinstance(a, str) for a in previous):
            raise fail("previous_actions", "expected a list of strings")
        candidates = raw["candidates"]
        if not isinstance(candidates, list) or not candidates:
            raise fail("candidates", "expected a non-empty list of {id, html} objects")
        by_id: dict[str, str] = {}
        for i, c in enumerate(candidates):
            if not isinstance(c, dict) or not isinstance(c.get("id"), (str, int)) or not isinstance(c.get("html"), str):
                raise fail("candidates", f"item {i}: expected an object with a string 'id' and a string 'html'")
            if str(c["id"]) in by_id:
                raise fail("candidates", f"item {i}: id {c['id']!r} repeated")
            by_id[str(c["id"])] = c["html"]
        gold = raw["gold"]
        if not isinstance(gold, list) or not all(isinstance(g, (str, int)) for g in gold):
            raise fail("gold", "expected a list of candidate ids")
        unknown = [str(g) for g in gold if str(g) not in by_id]
        if unknown:
            raise fail("gold", f"{', '.join(unknown)} not among the candidates' ids")
        if raw["operation"] not in OPERATIONS:
            raise fail("operation", f"expected one of {', '.join(OPERATIONS)}, got {raw['operation']!r}")
        if raw["operation"] != "CLICK" and not raw.get("value", "").strip():
            raise fail("value", f"{raw['operation']} needs the value to type or select")
        step_id = str(raw.get("id", lineno))
        if step_id in seen:
            raise fail("id", f"{step_id!r} repeated")
        seen.add(step_id)
        steps.append(
            Step(
                step_id,
                raw["task"],
                by_id,
                tuple(map(str, gold)),
                raw["operation"],
                raw.get("value", "") if raw["operation"] != "CLICK" else "",
                raw.get("html", ""),
                tuple(previous),
            )
        )
    if not steps:
        raise InputError(f"{path}: no steps")
    return steps[:limit]


def question(step: Step, choices: list[str], layout: str = "agentbench") -> str:
    """The question about `choices` (candidate ids): AgentBench's text, or the example catalog's layout."""
    previous = "\n".join(step.previous_actions[-PREVIOUS_SHOWN:]) or "None"
    letters = "A. None of the above\n" + "".join(
        f"{chr(66 + i)}. {step.candidates[c]}\n" for i, c in enumerate(choices)
    )
    if layout == "examples":  # "Task / Previous actions / Choices", as examples/agents.yaml's web-select describes
        return f"Task: {step.task}\nPrevious actions:\n{previous}\nChoices:\n{letters}"
    page = f"'''\n{step.html}\n'''\n\n" if step.html else ""
    return (
        f"{page}Based on the HTML webpage above, try to complete the following task:\nTask: {step.task}\n"
        f"Previous actions:\n{previous}\nWhat should be the next action? Please select from the following choices "
        f"(If the correct action is not in the page above, please select A. 'None of the above'):\n\n{letters}"
    )


def parse_reply(text: str) -> tuple[str, str]:
    """(letter, "OP value") of a reply, by AgentBench's rules; a value "None" counts as no value."""
    text = text.strip()
    letter = re.search(r"Answer: ([A-F])", text)
    op = re.search(r"Action: (CLICK|SELECT|TYPE)", text)
    value = re.search(r"Value: (.*)$", text, re.MULTILINE)
    value = value.group(1).strip() if value else ""
    return (
        letter.group(1) if letter else "A"
    ), f"{op.group(1) if op else ''} {'' if value == 'None' else value}".strip()


def action_f1(predicted: str, gold: str) -> float:
    """F1 between the sets of whitespace tokens (AgentBench's calculate_f1)."""
    p, g = set(predicted.split()), set(gold.split())
    if not p and not g:
        return 1.0
    tp = len(p & g)
    if tp == 0:
        return 0.0
    precision, recall = tp / len(p), tp / len(g)
    return 2 * precision * recall / (precision + recall)


async def answer_step(step: Step, agent, prefix: list[dict], sampling: Sampling, layout: str = "agentbench") -> dict:
    """One system's answer to one step, asked in rounds; `agent` is an AsyncEngine (`complete(request)`)."""
    pool = list(step.candidates)
    random.Random(step.id).shuffle(pool)  # seeded by the step: every system sees the same order
    prediction, turns, error = None, [], None
    while True:  # AgentBench loops while more than one candidate is left; this asks a single one once
        choices, pool = pool[:PER_QUESTION], pool[PER_QUESTION:]
        text = question(step, choices, layout)
        reply = await agent.complete(
            ChatRequest(prefix + [{"role": "user", "content": text}], sampling, prefix_messages=len(prefix))
        )
        turns += [{"role": "user", "content": text}, {"role": "assistant", "content": reply.text}]
        if reply.error:
            prediction, error = None, reply.error
            break
        letter, act = parse_reply(reply.text)
        index = ord(letter) - 66
        if 0 <= index < len(choices):  # "A" or a letter past the choices: nothing picked this round
            pool.append(choices[index])
            prediction = (choices[index], act)
        if len(pool) <= 1:
            break
    if not pool:  # the last question found none of its choices right
        prediction = None
    element_correct = prediction is not None and prediction[0] in step.gold
    f1 = action_f1(prediction[1], step.gold_action) if prediction is not None and step.gold else 0.0
    return {
        "step_id": step.id,
        "task": step.task,
        "gold": list(step.gold),
        "gold_action": step.gold_action,
        "predicted": prediction[0] if prediction else None,
        "predicted_action": prediction[1] if prediction else None,
        "element_correct": element_correct,
        "action_f1": f1,
        "success": element_correct and f1 >= 1.0,
        "questions": len(turns) // 2,
        "turns": turns,
        "error": error,
    }


def summarize(rows: list[dict]) -> dict:
    n = len(rows)
    mean = lambda key: sum(float(r[key]) for r in rows) / n if n else None  # noqa: E731
    return {
        "steps": n,
        "errors": sum(r["error"] is not None for r in rows),
        "element_accuracy": mean("element_correct"),
        "action_f1": mean("action_f1"),
        "step_success": mean("success"),
        "mean_questions": mean("questions"),
    }


def score(rows: dict[str, list[dict]]) -> tuple[dict, dict]:
    """(metrics per system, retention per system: system / teacher per metric)."""
    metrics = {name: summarize(rs) for name, rs in rows.items()}
    return metrics, skeleton.retained(metrics, skeleton.per_metric(METRICS))


def evaluate(
    steps_path, systems: SystemsSettings, settings: Mind2WebSettings, command: list[str] | None = None
) -> dict:
    task, base_path = task_prompt(systems, settings.prompt)
    steps = read_steps(steps_path, settings.limit)  # every check before the model loads

    sampling = Sampling(max_tokens=settings.max_new_tokens)
    play = skeleton.ask_every(
        "mind2web",
        steps,
        "steps",
        lambda step, agent, prefix: answer_step(step, agent, prefix, sampling, settings.layout),
    )
    source, counts = {"steps_file": str(steps_path)}, {"steps": len(steps)}
    describe = skeleton.describe_web(command, source, systems.catalog, base_path, settings, counts)
    mind2web = skeleton.Evaluation("mind2web", STEP_SCHEMA, play, summarize, describe, skeleton.per_metric(METRICS))
    run = skeleton.RunSettings(base_path, Path(settings.out), systems.max_batch)
    return skeleton.evaluate_task(mind2web, task, run)


def format_summary(summary: dict) -> str:
    title = f"\n{summary['prompt_id']}: {summary['steps']} Mind2Web steps ({summary['layout']} layout)"
    header = f"{'system':<14}{'element acc':>12}{'action F1':>12}{'step SR':>12}{'errors':>8}"
    rows = [
        f"{name:<14}" + "".join(f"{pct(m[k]):>12}" for k in METRICS) + f"{m['errors']:>8}"
        for name, m in summary["systems"].items()
    ]
    return task_text(summary, title, header, rows, 12)
