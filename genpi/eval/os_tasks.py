"""`genpi eval os-tasks`: task success on OS-interaction tasks in AgentBench's format, each in a fresh sandbox.

The tasks file is read by genpi.eval.os_task_file (AgentBench's format, as its loader reads it).

`check` scripts run one after another with the agent's answer and the earlier scripts' outputs as
arguments ($1, $2, ...); a null entry runs `example` instead; every one must exit 0. The agent loop,
reply parsing and output truncation are AgentBench's (text-action version): the agent's conversation is
P (for the systems with it), then the task as the user turn; each `Act: bash` block runs in the task's
shell and its output is the next user turn; `answer(...)` or `finish` ends the task and it is judged;
anything else ends it as an invalid action; at most `rounds` replies; a command that runs past its time
ends the task as a timeout.

`--replay-examples` (replay_examples) plays each task's own solution through the same path (a match
task's answer; a check task's `example` run in the shell, its output answered) and a wrong answer given
without doing anything: AgentBench's Docker environment passes the first by construction, and no sound
judge passes the second.

Rows (one per task and system) go to `EVAL/os_tasks/ID/NAME/part-00000.parquet`, the
summary (success rate per system, retention = system / teacher) to `EVAL/os_tasks.json`, which keeps one
summary per prompt (`{"results": [...]}`; a rerun replaces its prompt's).

Over 400 lines on purpose: one evaluation, AgentBench's OS protocol (the agent loop, the judge, the replay that
checks both, the summary), so that what the loop does and what the replay checks are read side by side.
"""

from __future__ import annotations

import asyncio
import re
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa

from genpi import InputError
from genpi.catalog import load_catalog
from genpi.data.store import TURN
from genpi.engines import ChatRequest, Completion, Sampling
from genpi.eval.evaluate import Evaluation, RunSettings, evaluate_task, notes, row_schema
from genpi.eval.metrics import ratio
from genpi.eval.os_task_file import REPLAY, OSTask, load_replay, read_task_file, report_skipped
from genpi.eval.sandbox import CommandTimeout, Limits, Sandbox, SandboxError
from genpi.eval.settings import OSTaskSettings, SystemsSettings
from genpi.eval.systems import Batcher, Prompt, System, prompt_of, task_prompt

INPUT_TEMPLATE = "Now, I will start a new problem in a new OS. My problem is:\n\n{description}"  # AgentBench's
TRUNCATED = "\n[truncated because the output is too long]"
ENDINGS = ("answered", "finished", "invalid_action", "round_limit", "timeout", "error")

OS_TASK_SCHEMA = row_schema(
    ("task_index", pa.int64()),
    ("description", pa.string()),
    ("success", pa.bool_()),
    ("rounds", pa.int32()),  # agent replies
    ("ended", pa.string()),  # one of ENDINGS
    ("answer", pa.string()),  # answer(...)'s text; null after finish or without an answer
    ("turns", pa.list_(TURN)),  # the task, then agent ("assistant") and OS ("user") turns; P left out
    ("seconds", pa.float64()),  # wall time of the task: sandbox, agent and judging
    ("error", pa.string()),
    ("verdict", pa.string()),  # why the judge failed an answered or finished task (null when it passed or never judged)
)


def parse_reply(text: str) -> tuple[str | None, str | None]:
    """AgentBench's reading of a reply: the last `Act:` line that is bash, finish or answer(...) decides.
    ("bash", the first ```bash block), ("answer", the text between the first "(" and the last ")"),
    ("finish", None), or (None, None): an invalid action."""
    for act in reversed(re.findall(r"Act:\s*(.+)", text)):
        kind = act.lower()
        if kind.startswith("bash"):
            blocks = re.findall(r"```bash\n(.*?)\n```", text, re.DOTALL)
            return "bash", blocks[0] if blocks else ""
        if kind.startswith("finish"):
            return "finish", None
        if kind.startswith("answer"):
            content = act[6:].strip()
            left, right = content.find("("), content.rfind(")")
            if left != -1 and right != -1:
                return "answer", content[left + 1 : right]
    return None, None


def observation(output: str) -> str:
    """The user turn after a command, as AgentBench words and truncates it."""
    if len(output) > 800:
        output = output[:780] + TRUNCATED
    return f"The output of the OS:\n\n{output}" if output else "The output of the OS is empty."


def check_sandbox() -> None:
    """This machine can run the sandbox (an InputError says why not)."""
    try:
        Sandbox(Limits(wall_s=60)).close()
    except SandboxError as e:
        raise InputError(str(e)) from None


def judge(task: OSTask, sandbox: Sandbox, answer: str | None, timeout: float) -> tuple[bool, str | None]:
    """AgentBench's verdict on the answer, and why not when it fails."""
    if task.match is not None:
        if answer is None:
            return False, "no answer (the agent finished without one)"
        answer = answer.strip() if task.match.get("strip") else answer
        if "answer" in task.match:
            return answer == task.match["answer"], f"answer {_short(answer)} is not {_short(task.match['answer'])}"
        return re.search(
            task.match["regex"], answer
        ) is not None, f"answer {_short(answer)} does not match /{task.match['regex']}/"
    params = [str(answer)]
    for i, script in enumerate(task.check):
        kind = "the example" if script is None else script.language
        script = script or task.example
        status, out = sandbox.run(script.code, params, script.language, timeout)
        if status != 0:
            return (
                False,
                f"check {i} ({kind}) exited with status {status} on {', '.join(map(_short, params))}: "
                f"{_short(out + sandbox.stderr)}",
            )
        params.append(out)
    return True, None


def _short(text: str, n: int = 120) -> str:
    return repr(text if len(text) <= n else text[: n - 20] + " ... " + text[-15:])


@dataclass(frozen=True)
class LoopSettings:
    rounds: int = 8
    command_timeout: float = 30.0
    max_new_tokens: int = 512
    input_template: str = INPUT_TEMPLATE
    limits: Limits = Limits()


async def play(task: OSTask, system: System, prefix: list[dict], agent, settings: LoopSettings, pool) -> dict:
    """One task for one system in a fresh sandbox; failures are recorded on the row, never raised."""
    loop = asyncio.get_running_loop()
    in_pool = lambda f, *a: loop.run_in_executor(pool, f, *a)  # noqa: E731 (the sandbox's calls block)
    started = time.monotonic()
    turns = [{"role": "user", "content": settings.input_template.replace("{description}", task.description)}]
    row = {
        "system": system.name,
        "task_index": task.index,
        "description": task.description,
        "success": False,
        "rounds": 0,
        "ended": "error",
        "answer": None,
        "turns": turns,
        "error": None,
        "verdict": None,
    }
    sandbox = None
    try:
        sandbox = await in_pool(Sandbox, settings.limits)
        for i, script in enumerate(task.init):
            status, out = await in_pool(sandbox.run, script.code, [], script.language, settings.command_timeout)
            if status != 0:
                raise RuntimeError(f"init script {i} exited with status {status}: {(sandbox.stderr or out)[-500:]}")
        if task.start:
            sandbox.start(task.start.code, task.start.language)
        output, ended, answer = "", "round_limit", None
        for round_ in range(settings.rounds):
            reply: Completion = await agent(task.index, round_, prefix + turns, output)
            if reply.error:
                raise RuntimeError(f"agent: {reply.error}")
            turns.append({"role": "assistant", "content": reply.text})
            row["rounds"] += 1
            action, content = parse_reply(reply.text)
            if action is None:
                ended = "invalid_action"
                break
            if action != "bash":
                ended, answer = ("answered", content) if action == "answer" else ("finished", None)
                break
            try:
                output = await in_pool(sandbox.execute, content, settings.command_timeout)
            except CommandTimeout:
                ended = "timeout"
                break
            if sandbox.expired:
                break
            turns.append({"role": "user", "content": observation(output)})
        if ended in ("answered", "finished") and not sandbox.expired:
            row["success"], verdict = await in_pool(judge, task, sandbox, answer, settings.command_timeout)
            row["verdict"] = None if row["success"] else verdict
        row.update(ended="timeout" if sandbox.expired else ended, answer=answer)
        row["success"] = row["success"] and not sandbox.expired
    except Exception as e:  # recorded on the row: one broken task never takes the others down
        expired = sandbox is not None and sandbox.expired
        row.update(
            success=False,
            ended="timeout" if expired else "error",
            error=None if expired else f"{type(e).__name__}: {e}",
        )
    finally:
        if sandbox is not None:
            await in_pool(sandbox.close)
    row["seconds"] = time.monotonic() - started
    return row


async def play_tasks(
    runs: list[tuple[OSTask, System, list[dict], object]], settings: LoopSettings, parallel: int, report
) -> list[dict]:
    """`play` each (task, system, prefix, agent), `parallel` at once, each in its own sandbox; `report(task, row)` as
    each ends."""
    gate = asyncio.Semaphore(parallel)
    with ThreadPoolExecutor(max_workers=parallel) as pool:

        async def one(task: OSTask, system: System, prefix: list[dict], agent) -> dict:
            async with gate:
                row = await play(task, system, prefix, agent, settings, pool)
            report(task, row)
            return row

        return await asyncio.gather(*(one(*run) for run in runs))


def replay_agent(replies: dict[int, list[str]]):
    """Known replies in order; `{output}` becomes the previous command's output, stripped. A task
    without replies left gets an empty reply (an invalid action)."""

    async def agent(index: int, round_: int, messages: list[dict], output: str) -> Completion:
        texts = replies.get(index, [])
        return Completion(text=texts[round_].replace("{output}", output.strip()) if round_ < len(texts) else "")

    return agent


def example_replies(task: OSTask) -> list[str] | None:
    """The replies of an agent that carries out the task's own solution: a `match` task's answer; for a
    `check` task, its `example` run in the task's shell, then that output (stripped) as the answer, the
    value a null check entry compares with the judge's own run of the example. None: no known solution
    (a regex match, or checks without an example)."""
    if task.match is not None:
        return (
            [f"Think: the task's own answer.\n\nAct: answer({task.match['answer']})"]
            if "answer" in task.match
            else None
        )
    if task.example is None:
        return None
    code = task.example.code if task.example.language == "bash" else f"python3 -c {shlex.quote(task.example.code)}"
    return [
        f"Think: the task's example solution.\n\nAct: bash\n\n```bash\n{code}\n```",
        "Think: its output.\n\nAct: answer({output})",
    ]


def wrong_answer(task: OSTask) -> str:
    """An answer that no sound judge accepts: a `match` task's integer plus one, otherwise a word no task's
    solution holds."""
    expected = (task.match or {}).get("answer", "")
    return str(int(expected) + 1) if re.fullmatch(r"\s*-?\d+\s*", expected) else "genpi-wrong-answer"


def _reason(row: dict) -> str:
    """Why a played task failed, in one line."""
    if row["error"]:
        return row["error"]
    if row["ended"] not in ("answered", "finished"):
        last = next((t["content"] for t in reversed(row["turns"]) if t["role"] == "assistant"), "")
        return f"ended as {row['ended']} after {row['rounds']} replies (last reply: {_short(last, 200)})"
    return row["verdict"] or "failed"


def replay_examples(
    tasks_path,
    scripts: str | Path | None = None,
    limit: int | None = None,
    parallel: int = 4,
    settings: LoopSettings = LoopSettings(),
) -> dict:
    """Play every task of the file twice through the evaluation path (sandbox, init, start, shell, judge):
    once carrying out its own example solution (example_replies), which AgentBench's environment passes by
    construction, and once answering wrongly without doing anything (wrong_answer), which must pass none.
    Returns the counts and, for each failure, why."""
    task_file = read_task_file(tasks_path, scripts)
    report_skipped(task_file)
    tasks = task_file.tasks[:limit]
    check_sandbox()
    known = {t.index: example_replies(t) for t in tasks}
    agents = {
        "example": replay_agent({i: r for i, r in known.items() if r is not None}),
        "wrong": replay_agent({t.index: [f"Think: a guess.\n\nAct: answer({wrong_answer(t)})"] for t in tasks}),
    }
    runs = [(t, name) for name in agents for t in tasks if name == "wrong" or known[t.index] is not None]

    def report(task: OSTask, row: dict) -> None:
        print(
            f"  {row['system']} task {task.index}: {'pass' if row['success'] else 'fail'} ({row['seconds']:.1f} s)",
            file=sys.stderr,
        )

    print(f"genpi eval os-tasks --replay-examples: {len(tasks)} tasks of {task_file.path}", file=sys.stderr)
    started = time.monotonic()
    played = asyncio.run(
        play_tasks([(t, System(name), [], agents[name]) for t, name in runs], settings, parallel, report)
    )
    rows = {(r["system"], r["task_index"]): r for r in played}
    failures, passes = [], []
    for t in tasks:
        row = rows.get(("example", t.index))
        if row is None:
            failures.append(
                {
                    "index": t.index,
                    "description": t.description,
                    "reason": "no example solution (a regex match, or checks without an example)",
                }
            )
        elif not row["success"]:
            failures.append({"index": t.index, "description": t.description, "reason": _reason(row)})
        if rows[("wrong", t.index)]["success"]:
            passes.append({"index": t.index, "description": t.description, "answer": wrong_answer(t)})
    return {
        "tasks_file": str(task_file.path),
        "scripts": None if scripts is None else str(scripts),
        "entries": task_file.entries,
        "tasks": len(tasks),
        "skipped": [{"index": i, "problem": why} for i, why in task_file.skipped],
        "examples": {"passed": len(tasks) - len(failures), "failures": failures},
        "wrong_answers": {"passed": len(passes), "passes": passes},
        "wall_seconds": time.monotonic() - started,
    }


def format_replay(summary: dict) -> str:
    n, ex, wrong = summary["tasks"], summary["examples"], summary["wrong_answers"]
    lines = [
        f"os-tasks replay: {n} tasks from {summary['tasks_file']} "
        f"({len(summary['skipped'])} of {summary['entries']} skipped as malformed)"
    ]
    lines += [f"  skipped task {s['index']}: {s['problem']}" for s in summary["skipped"]]
    lines.append(f"example solutions: passed {ex['passed']} of {n}")
    lines += [f"  task {f['index']} ({f['description'][:60]}): {f['reason']}" for f in ex["failures"]]
    lines.append(
        f"wrong answers: passed {wrong['passed']} of {n}"
        + (" (a judge that accepts a wrong answer)" if wrong["passed"] else "")
    )
    lines += [f"  task {p['index']} ({p['description'][:60]}) accepted {p['answer']!r}" for p in wrong["passes"]]
    return "\n".join(lines)


def model_agent(batcher: Batcher, system: System, max_new_tokens: int, prefix_messages: int):
    view = batcher.view(system)

    async def agent(index: int, round_: int, messages: list[dict], output: str) -> Completion:
        return await view.complete(
            ChatRequest(messages, Sampling(max_tokens=max_new_tokens), prefix_messages=prefix_messages)
        )

    return agent


def summarize(rows: list[dict]) -> dict:
    n = len(rows)
    ended = {e: sum(r["ended"] == e for r in rows) for e in ENDINGS}
    return {
        "tasks": n,
        "successes": sum(r["success"] for r in rows),
        "success_rate": sum(r["success"] for r in rows) / n if n else None,
        "errors": ended["error"],
        "mean_rounds": sum(r["rounds"] for r in rows) / n if n else None,
        "mean_seconds": sum(r["seconds"] for r in rows) / n if n else None,
        "ended": {e: k for e, k in ended.items() if k},
    }


def loop_settings(settings: OSTaskSettings) -> LoopSettings:
    """The agent loop of `genpi eval os-tasks`' flags."""
    return LoopSettings(
        settings.rounds,
        max_new_tokens=settings.max_new_tokens,
        input_template=settings.input_template or INPUT_TEMPLATE,
        limits=Limits(wall_s=settings.task_timeout),
    )


def evaluate_os_tasks(
    tasks_path,
    systems: SystemsSettings,
    settings: OSTaskSettings,
    command: list[str] | None = None,
    loop: LoopSettings | None = None,
) -> dict:
    """Play every task with every system (the replay agent, or teacher, base, adapters and served systems); returns
    and writes the summary. `loop`: the agent loop (default: `loop_settings(settings)`)."""
    catalog, prompt_id, agent, limit = systems.catalog, settings.prompt, settings.agent, settings.limit
    parallel, scripts, out = settings.parallel, settings.scripts, settings.out
    settings = loop or loop_settings(settings)  # from here on the agent loop's
    if agent and (systems.adapters or systems.served or systems.compressed):
        raise InputError("--adapters/--served/--compressed: the replay agent (--agent) plays no model; leave them out")
    if "{description}" not in settings.input_template:
        raise InputError("--input-template must contain {description}")
    task_file = read_task_file(tasks_path, scripts)
    report_skipped(task_file)
    tasks = task_file.tasks[:limit]
    entry = load_catalog(catalog, [prompt_id])[0]
    check_sandbox()  # before any model loads
    if agent:
        replies = load_replay(agent, task_file.entries)
        task, base_path = Prompt(entry, [System(REPLAY)]), None
    else:
        task, base_path = task_prompt(systems, prompt_id)
    wall: list[float] = []

    def play(p: Prompt, engine) -> dict[str, list[dict]]:
        batcher = Batcher(engine)  # the replay agent's (no engine): nothing to close
        if agent:
            agents = {REPLAY: replay_agent(replies)}
        else:
            agents = {
                s.name: model_agent(batcher, s, settings.max_new_tokens, len(prompt_of(p.entry, s))) for s in p.systems
            }
        prefixes = {s.name: prompt_of(p.entry, s) for s in p.systems}
        print(
            f"genpi eval os-tasks: {len(tasks)} tasks, systems {', '.join(s.name for s in p.systems)}", file=sys.stderr
        )

        def report(task: OSTask, row: dict) -> None:
            print(
                f"  {row['system']} task {task.index}: {'success' if row['success'] else 'failure'} ({row['ended']}, "
                f"{row['rounds']} rounds, {row['seconds']:.1f} s)",
                file=sys.stderr,
            )

        started = time.monotonic()
        rows = batcher.run(
            play_tasks(
                [(t, s, prefixes[s.name], agents[s.name]) for s in p.systems for t in tasks], settings, parallel, report
            )
        )
        wall.append(time.monotonic() - started)
        return {s.name: [dict(r, prompt_id=p.entry.id) for r in rows if r["system"] == s.name] for s in p.systems}

    def describe(p: Prompt, form: str | None) -> dict:
        return {
            "command": command,
            "tasks_file": str(tasks_path),
            "catalog": str(catalog),
            "prompt_id": p.entry.id,
            "agent": agent or "model",
            "base": base_path,
            "served_as": form,
            "tasks": len(tasks),
            "parallel": parallel,
            "scripts": None if scripts is None else str(scripts),
            "skipped": [{"index": i, "problem": why} for i, why in task_file.skipped],
            "wall_seconds": wall[0],
            "settings": asdict(settings),
        }

    os_tasks = Evaluation(
        "os_tasks",
        OS_TASK_SCHEMA,
        play,
        summarize,
        describe,
        lambda m, teacher: ratio(m["success_rate"], teacher["success_rate"]),
    )
    return evaluate_task(os_tasks, task, RunSettings(base_path, Path(out), systems.max_batch, model=not agent))


def format_summary(summary: dict) -> str:
    lines = [
        f"os-tasks: {summary['tasks']} tasks from {summary['tasks_file']} "
        f"(agent: {summary['agent']}; {summary['settings']['rounds']} rounds)"
    ]
    lines.append(f"{'system':<16}{'success':>9}{'rate':>8}{'retention':>11}{'rounds':>8}{'s/task':>8}   ended")
    for name, m in summary["systems"].items():
        kept = summary["retention"].get(name)
        rate = "-" if m["success_rate"] is None else f"{100 * m['success_rate']:.1f}%"
        lines.append(
            f"{name:<16}{m['successes']:>5}/{m['tasks']:<3}{rate:>8}{'-' if kept is None else f'{100 * kept:.1f}%':>11}"
            f"{m['mean_rounds'] or 0:>8.2f}{m['mean_seconds'] or 0:>8.1f}   "
            + ", ".join(f"{k}:{v}" for k, v in m["ended"].items())
        )
    lines += notes(summary)
    lines += [f"skipped (malformed): task {s['index']}: {s['problem']}" for s in summary.get("skipped", [])]
    return "\n".join(lines)
