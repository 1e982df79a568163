"""AgentBench's OS-interaction task files, read as AgentBench's loader reads them (genpi eval os-tasks plays them).

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
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from genpi import InputError

LANGUAGES = ("bash", "python")
REPLAY = "replay"


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
        raise InputError(
            f"{path}: not one well-formed task in {len(raw)} ({shown}{'; ...' if len(skipped) > 3 else ''})"
        )
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
        if (
            evaluation.get("example") is not None
        ):  # read only beside `check`; a top-level `example` is ignored, as there
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
