"""`genpi eval os-tasks`: task success on OS-interaction tasks in AgentBench's format, each in a fresh sandbox.

A task (AgentBench's OS JSON; a .json list or object, or .jsonl):

    {"description": "...",
     "create": {"image": "(ignored)", "init": SCRIPT or [SCRIPT, ...]},     # run as root before the agent
     "start": SCRIPT,                                                     # started in the background
     "evaluation": {"match": "text" | {"answer": "...", "strip": true} | {"regex": "..."}}
                or {"check": [SCRIPT | null, ...], "example": SCRIPT}}
    SCRIPT: "bash code" | {"code": "...", "language": "bash"|"python"} | {"file": "path", "language": ...}

Script files resolve relative to the tasks file. `check` scripts run one after another with the agent's
answer and the earlier scripts' outputs as arguments ($1, $2, ...); a null entry runs `example` instead;
every one must exit 0. The agent loop, reply parsing and output truncation are AgentBench's
(src/server/tasks/os_interaction/task.py): the agent's conversation is P (for the systems with it), then
the task as the user turn; each `Act: bash` block runs in the task's shell and its output is the next
user turn; `answer(...)` or `finish` ends the task and it is judged; anything else ends it as an invalid
action; at most `rounds` replies; a command that runs past its time ends the task as a timeout.

Rows (one per task and system) go to `EVAL/os_tasks/prompt_id=ID/system=NAME/part-00000.parquet`, the
summary (success rate per system, retention = system / teacher) to `EVAL/os_tasks.json`, which keeps one
summary per prompt (`{"results": [...]}`; a rerun replaces its prompt's).
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa

from genpi import InputError
from genpi.catalog import load_catalog
from genpi.engines import ChatRequest, Completion, Sampling
from genpi.eval.metrics import ratio
from genpi.eval.report import keep_per_prompt
from genpi.eval.sandbox import CommandTimeout, Limits, Sandbox, SandboxError
from genpi.eval.serve import TEACHER, Batcher, System, load_engine, mark_served, served_as, served_notes, task_systems
from genpi.synth.store import TURN, write_table

INPUT_TEMPLATE = "Now, I will start a new problem in a new OS. My problem is:\n\n{description}"  # AgentBench's
TRUNCATED = "\n[truncated because the output is too long]"
ENDINGS = ("answered", "finished", "invalid_action", "round_limit", "timeout", "error")
LANGUAGES = ("bash", "python")
REPLAY = "replay"

OS_TASK_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("system", pa.string()),
        ("task_index", pa.int64()),
        ("description", pa.string()),
        ("success", pa.bool_()),
        ("rounds", pa.int32()),  # agent replies
        ("ended", pa.string()),  # one of ENDINGS
        ("answer", pa.string()),  # answer(...)'s text; null after finish or without an answer
        ("turns", pa.list_(TURN)),  # the task, then agent ("assistant") and OS ("user") turns; P left out
        ("seconds", pa.float64()),  # wall time of the task: sandbox, agent and judging
        ("error", pa.string()),
    ]
)


@dataclass(frozen=True)
class Script:
    language: str
    code: str


@dataclass(frozen=True)
class OSTask:
    index: int
    description: str
    init: tuple[Script, ...] = ()
    start: Script | None = None
    match: dict | None = None  # {"answer": str} or {"regex": str}, and "strip": bool
    check: tuple[Script | None, ...] = ()
    example: Script | None = None


def load_tasks(path: str | Path) -> list[OSTask]:
    """Every task of the file, validated; a malformed one is named by its index and field."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such tasks file")
    try:
        if path.suffix == ".jsonl":
            raw = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        else:
            raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON: {e}") from None
    raw = [raw] if isinstance(raw, dict) else raw
    if not isinstance(raw, list) or not raw:
        raise InputError(f"{path}: expected a task object or a non-empty list of them")
    return [_task(path, i, item) for i, item in enumerate(raw)]


def _task(path: Path, index: int, item) -> OSTask:
    def fail(field: str, problem: str) -> InputError:
        return InputError(f"{path}: task {index}: field '{field}': {problem}")

    def script(field: str, obj) -> Script:
        if isinstance(obj, str):
            return Script("bash", obj)
        if not isinstance(obj, dict):
            raise fail(field, "expected bash code or an object with 'code' or 'file'")
        language = obj.get("language", "bash")
        if language not in LANGUAGES:
            raise fail(field, f"language {language!r} is not supported (only {', '.join(LANGUAGES)})")
        if isinstance(obj.get("code"), str):
            return Script(language, obj["code"])
        if isinstance(obj.get("file"), str):
            file = path.parent / obj["file"]
            if not file.is_file():
                raise fail(field, f"file {obj['file']!r} not found (resolved to {file})")
            return Script(language, file.read_text(encoding="utf-8"))
        raise fail(field, "a script object needs a string 'code' or 'file'")

    if not isinstance(item, dict):
        raise InputError(f"{path}: task {index}: expected an object")
    if not isinstance(item.get("description"), str) or not item["description"].strip():
        raise fail("description", "missing or not a non-empty string")
    create = item.get("create", {})
    if not isinstance(create, dict):
        raise fail("create", "expected an object")
    init = create.get("init", [])
    init = init if isinstance(init, list) else [init]
    start = script("start", item["start"]) if item.get("start") is not None else None
    evaluation = item.get("evaluation")
    if not isinstance(evaluation, dict) or not ({"match", "check"} & set(evaluation)):
        raise fail("evaluation", "expected an object with 'match' or 'check'")
    match, check, example = None, (), None
    if "match" in evaluation:
        match = evaluation["match"]
        match = {"answer": match, "strip": True} if isinstance(match, str) else match
        if not isinstance(match, dict) or not any(isinstance(match.get(k), str) for k in ("answer", "regex")):
            raise fail("evaluation.match", "expected a string, or an object with a string 'answer' or 'regex'")
        if "answer" not in match:
            try:
                re.compile(match["regex"])
            except re.error as e:
                raise fail("evaluation.match.regex", f"not a valid regular expression: {e}") from None
    else:
        check = evaluation["check"] if isinstance(evaluation["check"], list) else [evaluation["check"]]
        check = tuple(None if s is None else script(f"evaluation.check[{i}]", s) for i, s in enumerate(check))
        if evaluation.get("example") is not None:
            example = script("evaluation.example", evaluation["example"])
        elif None in check:
            raise fail("evaluation.example", "a null check entry runs the example script, but there is none")
    return OSTask(index, item["description"], tuple(script(f"create.init[{i}]", s) for i, s in enumerate(init)),
                  start, match, check, example)  # fmt: skip


def load_replay(spec: str, n_tasks: int) -> dict[int, list[str]]:
    """`replay:FILE`: a JSON object, task index -> the agent's replies in order."""
    if not spec.startswith(f"{REPLAY}:"):
        raise InputError(f"--agent {spec}: expected replay:FILE")
    path = Path(spec.removeprefix(f"{REPLAY}:"))
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"--agent {spec}: cannot read a JSON object from {path}: {e}") from None
    if not isinstance(raw, dict):
        raise InputError(f"--agent {spec}: expected a JSON object (task index -> list of replies)")
    replies = {}
    for key, value in raw.items():
        if not key.isdigit() or int(key) >= n_tasks:
            raise InputError(f"--agent {spec}: key {key!r} is not the index of a task (0..{n_tasks - 1})")
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InputError(f"--agent {spec}: task {key}: expected a list of reply strings")
        replies[int(key)] = value
    return replies


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


def judge(task: OSTask, sandbox: Sandbox, answer: str | None, timeout: float) -> bool:
    if task.match is not None:
        if answer is None:
            return False
        answer = answer.strip() if task.match.get("strip") else answer
        return answer == task.match["answer"] if "answer" in task.match else re.search(task.match["regex"], answer) is not None
    params = [str(answer)]
    for script in task.check:
        script = script or task.example
        status, out = sandbox.run(script.code, params, script.language, timeout)
        if status != 0:
            return False
        params.append(out)
    return True


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
    row = {"system": system.name, "task_index": task.index, "description": task.description, "success": False,
           "rounds": 0, "ended": "error", "answer": None, "turns": turns, "error": None}  # fmt: skip
    sandbox = None
    try:
        sandbox = await in_pool(Sandbox, settings.limits)
        for i, script in enumerate(task.init):
            status, out = await in_pool(sandbox.run, script.code, [], script.language, settings.command_timeout)
            if status != 0:
                raise RuntimeError(f"init script {i} exited with status {status}: {out[-500:]}")
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
            row["success"] = await in_pool(judge, task, sandbox, answer, settings.command_timeout)
        row.update(ended="timeout" if sandbox.expired else ended, answer=answer)
        row["success"] = row["success"] and not sandbox.expired
    except Exception as e:  # recorded on the row: one broken task never takes the others down
        expired = sandbox is not None and sandbox.expired
        row.update(success=False, ended="timeout" if expired else "error", error=None if expired else f"{type(e).__name__}: {e}")
    finally:
        if sandbox is not None:
            await in_pool(sandbox.close)
    row["seconds"] = time.monotonic() - started
    return row


def replay_agent(replies: dict[int, list[str]]):
    """Known replies in order; `{output}` becomes the previous command's output, stripped. A task
    without replies left gets an empty reply (an invalid action)."""

    async def agent(index: int, round_: int, messages: list[dict], output: str) -> Completion:
        texts = replies.get(index, [])
        return Completion(text=texts[round_].replace("{output}", output.strip()) if round_ < len(texts) else "")

    return agent


def model_agent(batcher: Batcher, system: System, max_new_tokens: int, prefix_messages: int):
    view = batcher.view(system)

    async def agent(index: int, round_: int, messages: list[dict], output: str) -> Completion:
        return await view.complete(ChatRequest(messages, Sampling(max_tokens=max_new_tokens), prefix_messages=prefix_messages))

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


def evaluate_os_tasks(tasks_path, catalog, prompt_id: str, adapters: list[str] = (), base: str = "smollm2",
                      agent: str | None = None, limit: int | None = None, parallel: int = 4, out: str | Path = "eval",
                      settings: LoopSettings = LoopSettings(), max_batch: int = 32, command: list[str] | None = None,
                      served: list[str] = ()) -> dict:  # fmt: skip
    """Play every task with every system (the replay agent, or teacher, base, adapters and served systems); returns
    and writes the summary."""
    if agent and (adapters or served):
        raise InputError("--adapters/--served: the replay agent (--agent) plays no model; leave them out")
    if "{description}" not in settings.input_template:
        raise InputError("--input-template must contain {description}")
    tasks = load_tasks(tasks_path)[:limit]
    entry = load_catalog(catalog, [prompt_id])[0]
    batcher = Batcher(None)  # the replay agent's: nothing to close
    check_sandbox()  # before any model loads
    out = Path(out)
    missing, form, base_path = [], None, None
    if agent:
        replies = load_replay(agent, len(tasks))
        systems = [System(REPLAY)]
        agents = {REPLAY: replay_agent(replies)}
    else:
        entry, systems, missing, base_path = task_systems(catalog, prompt_id, list(adapters), base, served)
        engine = load_engine(base_path, systems, max_batch)
        form = served_as(engine, systems)
        batcher = Batcher(engine)
        n_prefix = len(entry.messages())
        agents = {s.name: model_agent(batcher, s, settings.max_new_tokens, n_prefix if s.with_prompt else 0) for s in systems}
    prefixes = {s.name: entry.messages() if s.with_prompt else [] for s in systems}
    print(f"genpi eval os-tasks: {len(tasks)} tasks, systems {', '.join(s.name for s in systems)}", file=sys.stderr)

    async def play_all() -> list[dict]:
        gate = asyncio.Semaphore(parallel)
        with ThreadPoolExecutor(max_workers=parallel) as pool:

            async def one(task: OSTask, system: System) -> dict:
                async with gate:
                    row = await play(task, system, prefixes[system.name], agents[system.name], settings, pool)
                print(f"  {system.name} task {task.index}: {'success' if row['success'] else 'failure'} ({row['ended']}, "
                      f"{row['rounds']} rounds, {row['seconds']:.1f} s)", file=sys.stderr)  # fmt: skip
                return row

            return await asyncio.gather(*(one(t, s) for s in systems for t in tasks))

    started = time.monotonic()
    rows = batcher.run(play_all())
    wall = time.monotonic() - started
    metrics = {}
    for system in systems:
        records = [dict(r, prompt_id=entry.id) for r in rows if r["system"] == system.name]
        write_table(out / "os_tasks" / f"prompt_id={entry.id}" / f"system={system.name}" / "part-00000.parquet", records, OS_TASK_SCHEMA)
        metrics[system.name] = summarize(records)
    mark_served(metrics, systems)
    teacher = metrics.get(TEACHER)
    summary = {
        "command": command, "tasks_file": str(tasks_path), "catalog": str(catalog), "prompt_id": entry.id,
        "agent": agent or "model", "base": base_path, "served_as": form, "tasks": len(tasks), "parallel": parallel,
        "wall_seconds": wall, "settings": asdict(settings), "missing": missing, "systems": metrics,
        "retention": {name: ratio(m["success_rate"], teacher["success_rate"]) for name, m in metrics.items() if name != TEACHER} if teacher else {},
        "adapters": {s.name: str(s.folder) for s in systems if s.adapter},
    }  # fmt: skip
    keep_per_prompt(out / "os_tasks.json", summary)
    return summary


def format_summary(summary: dict) -> str:
    lines = [f"os-tasks: {summary['tasks']} tasks from {summary['tasks_file']} (agent: {summary['agent']}; {summary['settings']['rounds']} rounds)"]
    lines.append(f"{'system':<16}{'success':>9}{'rate':>8}{'retention':>11}{'rounds':>8}{'s/task':>8}   ended")
    for name, m in summary["systems"].items():
        kept = summary["retention"].get(name)
        rate = "-" if m["success_rate"] is None else f"{100 * m['success_rate']:.1f}%"
        lines.append(f"{name:<16}{m['successes']:>5}/{m['tasks']:<3}{rate:>8}{'-' if kept is None else f'{100 * kept:.1f}%':>11}"
                     f"{m['mean_rounds'] or 0:>8.2f}{m['mean_seconds'] or 0:>8.1f}   " + ", ".join(f"{k}:{v}" for k, v in m["ended"].items()))  # fmt: skip
    lines += served_notes(summary["systems"]) + [f"missing: {m}" for m in summary["missing"]]
    return "\n".join(lines)
