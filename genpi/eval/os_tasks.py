"""`genpi eval os-tasks`: task success on OS-interaction tasks in AgentBench's format, each in a fresh sandbox.

A task (AgentBench's OS JSON; a .json list or object, or .jsonl), read as AgentBench's loader
(src/server/tasks/os_interaction/task.py, `_load_configs`) reads it:

    {"description": "...",
     "create": {"local": "IMAGE", "init": SCRIPT or [SCRIPT, ...]},         # init runs as root before the agent
     "start": SCRIPT,                                                     # started in the background
     "evaluation": {"match": "text" | {"answer": "...", "strip": true} | {"regex": "..."}}
                or {"check": SCRIPT | [SCRIPT | null, ...], "example": SCRIPT}}
    SCRIPT: "bash code" | {"code": "...", "language": "bash"|"python"} | {"file": "path", "language": ...}

`create` may be absent, and `local` and `init` in it (AgentBench then uses its default image and no
init); a `create` that is a list is ignored, as there (its `in` tests are membership tests on a list);
`local` (AgentBench's Docker image) is kept on the task but genpi has one environment for all. `match`
wins over `check`; `example` is read from `evaluation` beside `check` only (a top-level one is ignored);
a script object's `file` wins over its `code`; other keys (`labels`, `explanation`) are ignored. Script
files resolve in the scripts folder (AgentBench's `script_dir`; `--scripts`, default the tasks file's
folder). A task AgentBench would fail on, loading or running it (no description, no match or check, a
null init or a null check without an example, a script file that cannot be read, a language other than
bash and python), is reported with its index and field and skipped; a file without one well-formed task
is an InputError.

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

Rows (one per task and system) go to `EVAL/os_tasks/prompt_id=ID/system=NAME/part-00000.parquet`, the
summary (success rate per system, retention = system / teacher) to `EVAL/os_tasks.json`, which keeps one
summary per prompt (`{"results": [...]}`; a rerun replaces its prompt's).
"""

from __future__ import annotations

import asyncio
import json
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
from genpi.engines import ChatRequest, Completion, Sampling
from genpi.eval.evaluate import Evaluation, RunSettings, evaluate_task, notes, row_schema
from genpi.eval.metrics import ratio
from genpi.eval.sandbox import CommandTimeout, Limits, Sandbox, SandboxError
from genpi.eval.systems import Batcher, Prompt, System, task_prompt
from genpi.synth.store import TURN

INPUT_TEMPLATE = "Now, I will start a new problem in a new OS. My problem is:\n\n{description}"  # AgentBench's
TRUNCATED = "\n[truncated because the output is too long]"
ENDINGS = ("answered", "finished", "invalid_action", "round_limit", "timeout", "error")
LANGUAGES = ("bash", "python")
REPLAY = "replay"

OS_TASK_SCHEMA = row_schema(
    ("task_index", pa.int64()), ("description", pa.string()), ("success", pa.bool_()),
    ("rounds", pa.int32()),  # agent replies
    ("ended", pa.string()),  # one of ENDINGS
    ("answer", pa.string()),  # answer(...)'s text; null after finish or without an answer
    ("turns", pa.list_(TURN)),  # the task, then agent ("assistant") and OS ("user") turns; P left out
    ("seconds", pa.float64()),  # wall time of the task: sandbox, agent and judging
    ("error", pa.string()),
    ("verdict", pa.string()),  # why the judge failed an answered or finished task (null when it passed or never judged)
)


@dataclass(frozen=True)
class Script:
    language: str
    code: str


@dataclass(frozen=True)
class OSTask:
    index: int  # the task's position in its file (skipped tasks keep their numbers)
    description: str
    init: tuple[Script, ...] = ()
    start: Script | None = None
    match: dict | None = None  # {"answer": str} or {"regex": str}, and "strip": bool
    check: tuple[Script | None, ...] = ()
    example: Script | None = None
    image: str = "default"  # AgentBench's `create.local`: its Docker image; genpi has one environment for all


@dataclass(frozen=True)
class TaskFile:
    path: Path
    entries: int  # tasks in the file, malformed ones included
    tasks: list[OSTask]  # the well-formed ones, in file order
    skipped: list[tuple[int, str]]  # (index, why) of each malformed task, left out of the run


class TaskProblem(ValueError):
    """One task of a file is malformed: it is reported and skipped."""


def read_task_file(path: str | Path, scripts: str | Path | None = None) -> TaskFile:
    """Every task of the file, read as AgentBench's loader reads it; a malformed task is skipped with its
    index and the field at fault. `scripts` is where script `file`s resolve (AgentBench's `script_dir`;
    default: the tasks file's folder). A file that holds no task at all (not JSON, not a task object or a
    list of them, or not one well-formed task) is an InputError."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such tasks file")
    scripts = path.parent if scripts is None else Path(scripts)
    if not scripts.is_dir():
        raise InputError(f"--scripts {scripts}: no such folder")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text: {e}") from None
    skipped: list[tuple[int, str]] = []
    if path.suffix == ".jsonl":
        raw = []
        for i, line in enumerate(line for line in text.splitlines() if line.strip()):
            try:
                raw.append(json.loads(line))
            except json.JSONDecodeError as e:
                raw.append(None)
                skipped.append((i, f"not valid JSON: {e}"))
    else:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: not valid JSON: {e}") from None
        raw = [raw] if isinstance(raw, dict) else raw
    if not isinstance(raw, list) or not raw:
        raise InputError(f"{path}: expected a task object or a non-empty list of them")
    tasks = []
    for i, item in enumerate(raw):
        if any(index == i for index, _ in skipped):
            continue
        try:
            tasks.append(_task(i, item, scripts))
        except TaskProblem as e:
            skipped.append((i, str(e)))
    skipped.sort()
    if not tasks:
        shown = "; ".join(f"task {i}: {why}" for i, why in skipped[:3])
        raise InputError(f"{path}: not one well-formed task in {len(raw)} ({shown}{'; ...' if len(skipped) > 3 else ''})")
    return TaskFile(path, len(raw), tasks, skipped)


def load_tasks(path: str | Path, scripts: str | Path | None = None) -> list[OSTask]:
    """The well-formed tasks of the file (read_task_file says which were skipped and why)."""
    return read_task_file(path, scripts).tasks


def _task(index: int, item, scripts: Path) -> OSTask:
    """One task as AgentBench's `OSInteraction._load_configs` reads it. A TaskProblem for what AgentBench
    would fail on, while loading or later when the task runs (so it could never pass there either)."""

    def fail(field: str, problem: str) -> TaskProblem:
        return TaskProblem(f"field '{field}': {problem}")

    def script(field: str, obj) -> Script:  # AgentBench's load_script; its None is handled by the callers
        if isinstance(obj, str):
            return Script("bash", obj)
        if not isinstance(obj, dict):
            raise fail(field, "expected bash code or an object with 'code' or 'file'")
        language = obj.get("language", "bash")
        if language not in LANGUAGES:
            raise fail(field, f"language {language!r} is not supported (only {', '.join(LANGUAGES)})")
        if "file" in obj:  # before "code", as AgentBench looks
            if not isinstance(obj["file"], str):
                raise fail(field, "'file' must be a path")
            file = scripts / obj["file"]
            try:
                return Script(language, file.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError) as e:
                raise fail(field, f"file {obj['file']!r} cannot be read (resolved to {file}: {e})") from None
        if "code" in obj:
            if not isinstance(obj["code"], str):
                raise fail(field, "'code' must be a string")
            return Script(language, obj["code"])
        raise fail(field, "a script object needs 'code' or 'file'")

    if not isinstance(item, dict):
        raise TaskProblem("expected an object")
    if not isinstance(item.get("description"), str) or not item["description"].strip():
        raise fail("description", "missing or not a non-empty string")
    image, init = "default", []
    create = item.get("create", {})
    if isinstance(create, dict):  # `local` and `init` read only when present
        image = create.get("local", "default")
        if not isinstance(image, str):
            raise fail("create.local", "expected an image name")
        if "init" in create:
            init = create["init"] if isinstance(create["init"], list) else [create["init"]]
    elif isinstance(create, list):
        # AgentBench tests `"local" in create` and `"init" in create`, which on a list are membership tests: a list
        # (dev.json has one, a copy of its check list) gives the default image and no init script, unless it holds
        # the string "local" or "init", on which AgentBench then fails.
        if "local" in create or "init" in create:
            raise fail("create", "a list holding 'local' or 'init' (AgentBench fails on it)")
    else:
        raise fail("create", "expected an object")
    init = [script(f"create.init[{i}]", s) if s is not None else None for i, s in enumerate(init)]
    if None in init:
        raise fail(f"create.init[{init.index(None)}]", "null (AgentBench cannot run it)")
    start = script("start", item["start"]) if item.get("start") is not None else None
    evaluation = item.get("evaluation")
    if not isinstance(evaluation, dict) or not ({"match", "check"} & set(evaluation)):
        raise fail("evaluation", "expected an object with 'match' or 'check'")
    match, check, example = None, (), None
    if "match" in evaluation:  # match wins over check, as in AgentBench
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
        if not check:
            raise fail("evaluation.check", "an empty list: nothing would judge the task")
        check = tuple(None if s is None else script(f"evaluation.check[{i}]", s) for i, s in enumerate(check))
        if evaluation.get("example") is not None:  # read only beside `check`; a top-level `example` is ignored, as there
            example = script("evaluation.example", evaluation["example"])
        elif None in check:
            raise fail("evaluation.example", "a null check entry runs the example script, but there is none")
    return OSTask(index, item["description"], tuple(init), start, match, check, example, image)


def report_skipped(task_file: TaskFile) -> None:
    for index, why in task_file.skipped:
        print(f"genpi eval os-tasks: {task_file.path}: task {index} skipped: {why}", file=sys.stderr)


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


def judge(task: OSTask, sandbox: Sandbox, answer: str | None, timeout: float) -> tuple[bool, str | None]:
    """AgentBench's verdict on the answer, and why not when it fails."""
    if task.match is not None:
        if answer is None:
            return False, "no answer (the agent finished without one)"
        answer = answer.strip() if task.match.get("strip") else answer
        if "answer" in task.match:
            return answer == task.match["answer"], f"answer {_short(answer)} is not {_short(task.match['answer'])}"
        return re.search(task.match["regex"], answer) is not None, f"answer {_short(answer)} does not match /{task.match['regex']}/"
    params = [str(answer)]
    for i, script in enumerate(task.check):
        kind = "the example" if script is None else script.language
        script = script or task.example
        status, out = sandbox.run(script.code, params, script.language, timeout)
        if status != 0:
            return False, f"check {i} ({kind}) exited with status {status} on {', '.join(map(_short, params))}: {_short(out + sandbox.stderr)}"
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
    row = {"system": system.name, "task_index": task.index, "description": task.description, "success": False,
           "rounds": 0, "ended": "error", "answer": None, "turns": turns, "error": None, "verdict": None}  # fmt: skip
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
        row.update(success=False, ended="timeout" if expired else "error", error=None if expired else f"{type(e).__name__}: {e}")
    finally:
        if sandbox is not None:
            await in_pool(sandbox.close)
    row["seconds"] = time.monotonic() - started
    return row


async def play_tasks(runs: list[tuple[OSTask, System, list[dict], object]], settings: LoopSettings, parallel: int, report) -> list[dict]:
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
        return [f"Think: the task's own answer.\n\nAct: answer({task.match['answer']})"] if "answer" in task.match else None
    if task.example is None:
        return None
    code = task.example.code if task.example.language == "bash" else f"python3 -c {shlex.quote(task.example.code)}"
    return [f"Think: the task's example solution.\n\nAct: bash\n\n```bash\n{code}\n```", "Think: its output.\n\nAct: answer({output})"]


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


def replay_examples(tasks_path, scripts: str | Path | None = None, limit: int | None = None, parallel: int = 4,
                    settings: LoopSettings = LoopSettings()) -> dict:  # fmt: skip
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
        print(f"  {row['system']} task {task.index}: {'pass' if row['success'] else 'fail'} ({row['seconds']:.1f} s)", file=sys.stderr)

    print(f"genpi eval os-tasks --replay-examples: {len(tasks)} tasks of {task_file.path}", file=sys.stderr)
    started = time.monotonic()
    played = asyncio.run(play_tasks([(t, System(name), [], agents[name]) for t, name in runs], settings, parallel, report))
    rows = {(r["system"], r["task_index"]): r for r in played}
    failures, passes = [], []
    for t in tasks:
        row = rows.get(("example", t.index))
        if row is None:
            failures.append({"index": t.index, "description": t.description, "reason": "no example solution (a regex match, or checks without an example)"})
        elif not row["success"]:
            failures.append({"index": t.index, "description": t.description, "reason": _reason(row)})
        if rows[("wrong", t.index)]["success"]:
            passes.append({"index": t.index, "description": t.description, "answer": wrong_answer(t)})
    return {
        "tasks_file": str(task_file.path), "scripts": None if scripts is None else str(scripts), "entries": task_file.entries,
        "tasks": len(tasks), "skipped": [{"index": i, "problem": why} for i, why in task_file.skipped],
        "examples": {"passed": len(tasks) - len(failures), "failures": failures},
        "wrong_answers": {"passed": len(passes), "passes": passes}, "wall_seconds": time.monotonic() - started,
    }  # fmt: skip


def format_replay(summary: dict) -> str:
    n, ex, wrong = summary["tasks"], summary["examples"], summary["wrong_answers"]
    lines = [f"os-tasks replay: {n} tasks from {summary['tasks_file']} ({len(summary['skipped'])} of {summary['entries']} skipped as malformed)"]
    lines += [f"  skipped task {s['index']}: {s['problem']}" for s in summary["skipped"]]
    lines.append(f"example solutions: passed {ex['passed']} of {n}")
    lines += [f"  task {f['index']} ({f['description'][:60]}): {f['reason']}" for f in ex["failures"]]
    lines.append(f"wrong answers: passed {wrong['passed']} of {n}" + (" (a judge that accepts a wrong answer)" if wrong["passed"] else ""))
    lines += [f"  task {p['index']} ({p['description'][:60]}) accepted {p['answer']!r}" for p in wrong["passes"]]
    return "\n".join(lines)


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


def evaluate_os_tasks(tasks_path, catalog, prompt_id: str, adapters: list[str] = (), base: str = "smollm2", *,
                      agent: str | None = None, limit: int | None = None, parallel: int = 4, out: str | Path = "eval",
                      settings: LoopSettings = LoopSettings(), max_batch: int = 32, command: list[str] | None = None,
                      served: list[str] = (), scripts: str | Path | None = None) -> dict:  # fmt: skip
    """Play every task with every system (the replay agent, or teacher, base, adapters and served systems); returns
    and writes the summary."""
    if agent and (adapters or served):
        raise InputError("--adapters/--served: the replay agent (--agent) plays no model; leave them out")
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
        task, base_path = task_prompt(catalog, prompt_id, list(adapters), base, served)
    wall: list[float] = []

    def play(p: Prompt, engine) -> dict[str, list[dict]]:
        batcher = Batcher(engine)  # the replay agent's (no engine): nothing to close
        if agent:
            agents = {REPLAY: replay_agent(replies)}
        else:
            n_prefix = len(p.entry.messages())
            agents = {s.name: model_agent(batcher, s, settings.max_new_tokens, n_prefix if s.with_prompt else 0) for s in p.systems}
        prefixes = {s.name: p.entry.messages() if s.with_prompt else [] for s in p.systems}
        print(f"genpi eval os-tasks: {len(tasks)} tasks, systems {', '.join(s.name for s in p.systems)}", file=sys.stderr)

        def report(task: OSTask, row: dict) -> None:
            print(f"  {row['system']} task {task.index}: {'success' if row['success'] else 'failure'} ({row['ended']}, "
                  f"{row['rounds']} rounds, {row['seconds']:.1f} s)", file=sys.stderr)  # fmt: skip

        started = time.monotonic()
        rows = batcher.run(play_tasks([(t, s, prefixes[s.name], agents[s.name]) for s in p.systems for t in tasks], settings, parallel, report))
        wall.append(time.monotonic() - started)
        return {s.name: [dict(r, prompt_id=p.entry.id) for r in rows if r["system"] == s.name] for s in p.systems}

    def describe(p: Prompt, form: str | None) -> dict:
        return {"command": command, "tasks_file": str(tasks_path), "catalog": str(catalog), "prompt_id": p.entry.id,
                "agent": agent or "model", "base": base_path, "served_as": form, "tasks": len(tasks), "parallel": parallel,
                "scripts": None if scripts is None else str(scripts), "skipped": [{"index": i, "problem": why} for i, why in task_file.skipped],
                "wall_seconds": wall[0], "settings": asdict(settings)}  # fmt: skip

    os_tasks = Evaluation("os_tasks", OS_TASK_SCHEMA, play, summarize, describe, lambda m, teacher: ratio(m["success_rate"], teacher["success_rate"]))
    return evaluate_task(os_tasks, task, RunSettings(base_path, Path(out), max_batch, model=not agent))


def format_summary(summary: dict) -> str:
    lines = [f"os-tasks: {summary['tasks']} tasks from {summary['tasks_file']} (agent: {summary['agent']}; {summary['settings']['rounds']} rounds)"]
    lines.append(f"{'system':<16}{'success':>9}{'rate':>8}{'retention':>11}{'rounds':>8}{'s/task':>8}   ended")
    for name, m in summary["systems"].items():
        kept = summary["retention"].get(name)
        rate = "-" if m["success_rate"] is None else f"{100 * m['success_rate']:.1f}%"
        lines.append(f"{name:<16}{m['successes']:>5}/{m['tasks']:<3}{rate:>8}{'-' if kept is None else f'{100 * kept:.1f}%':>11}"
                     f"{m['mean_rounds'] or 0:>8.2f}{m['mean_seconds'] or 0:>8.1f}   " + ", ".join(f"{k}:{v}" for k, v in m["ended"].items()))  # fmt: skip
    lines += notes(summary)
    lines += [f"skipped (malformed): task {s['index']}: {s['problem']}" for s in summary.get("skipped", [])]
    return "\n".join(lines)
