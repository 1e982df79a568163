"""genpi eval os-tasks on the hand-written tasks of examples/os-tasks, driven by replay agents.

The tasks cover `match` (exact and regex), a `check` script file, a null check with an `example`
script and a Python check, `init` code and an init file, and `start`; examples/os-tasks/solutions.json
holds correct replies.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import duckdb
import pytest

from genpi import InputError
from genpi.eval.os_tasks import OS_TASK_SCHEMA, LoopSettings, evaluate_os_tasks, load_tasks, observation, parse_reply
from genpi.eval.report import build_report
from genpi.eval.sandbox import Limits
from genpi.eval.run import main

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "examples" / "os-tasks" / "tasks.json"
SOLUTIONS = REPO / "examples" / "os-tasks" / "solutions.json"
CATALOG = REPO / "examples" / "agents.yaml"
needs_sandbox = pytest.mark.skipif(not all(map(shutil.which, ("unshare", "nsenter", "prlimit"))), reason="needs util-linux")


def bash(command: str) -> str:
    return f"Think: run it.\n\nAct: bash\n\n```bash\n{command}\n```"


def evaluate(tmp_path, replies: dict, tasks=TASKS, **kwargs) -> dict:
    path = tmp_path / "replies.json"
    path.write_text(json.dumps(replies))
    return evaluate_os_tasks(tasks, CATALOG, "os-shell", agent=f"replay:{path}", out=tmp_path / "eval", **kwargs)


def test_parse_reply_follows_agentbench():
    assert parse_reply("Think: x\nAct: bash\n```bash\nls\n```\n```bash\npwd\n```") == ("bash", "ls")  # the first block
    assert parse_reply("Think: x\nAct: answer(f(1) = 2)") == ("answer", "f(1) = 2")  # first "(" to last ")"
    assert parse_reply("Act: answer(7)\nThink: no\nAct: finish") == ("finish", None)  # the last Act decides
    assert parse_reply("Act: finish\nAct: answer without parentheses") == ("finish", None)  # ... when it parses
    assert parse_reply("Act: bash\nno block") == ("bash", "")
    assert parse_reply("The answer is 7.") == (None, None)
    assert parse_reply("Act: dance") == (None, None)


def test_observation_truncates_as_agentbench():
    assert observation("") == "The output of the OS is empty."
    assert observation("x" * 800) == "The output of the OS:\n\n" + "x" * 800
    assert observation("x" * 801) == "The output of the OS:\n\n" + "x" * 780 + "\n[truncated because the output is too long]"


@pytest.mark.parametrize(
    "task, problem",
    [
        ({"evaluation": {"match": "1"}}, "task 1: field 'description'"),
        ({"description": "d"}, "task 1: field 'evaluation'"),
        ({"description": "d", "evaluation": {"match": {"strip": True}}}, "task 1: field 'evaluation.match'"),
        ({"description": "d", "evaluation": {"match": {"regex": "("}}}, "task 1: field 'evaluation.match.regex'"),
        ({"description": "d", "evaluation": {"check": [None]}}, "task 1: field 'evaluation.example'"),
        ({"description": "d", "evaluation": {"check": [{"file": "nope.sh"}]}}, "task 1: field 'evaluation.check[0]': file 'nope.sh' not found"),
        ({"description": "d", "create": {"init": [{"language": "c++", "code": "x"}]}, "evaluation": {"match": "1"}},
         "task 1: field 'create.init[0]': language 'c++'"),
        ({"description": "d", "start": 5, "evaluation": {"match": "1"}}, "task 1: field 'start'"),
    ],
)  # fmt: skip
def test_malformed_tasks_are_named_by_index_and_field(tmp_path, task, problem, capsys):
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps([{"description": "fine", "evaluation": {"match": "1"}}, task]))
    with pytest.raises(InputError, match=re.escape(problem)):
        load_tasks(path)
    assert main(["os-tasks", str(path), "--catalog", str(CATALOG), "--prompt", "os-shell", "--agent", "replay:x.json"]) == 2
    assert problem in capsys.readouterr().err


def test_bad_replay_file_and_flags_exit_2(tmp_path, capsys):
    replies = tmp_path / "r.json"
    replies.write_text(json.dumps({"9": ["Act: finish"]}))
    assert main(["os-tasks", str(TASKS), "--catalog", str(CATALOG), "--prompt", "os-shell", "--agent", f"replay:{replies}"]) == 2
    assert "key '9' is not the index of a task (0..4)" in capsys.readouterr().err
    assert main(["os-tasks", str(TASKS), "--catalog", str(CATALOG), "--prompt", "os-shell", "--agent", "gpt"]) == 2
    assert main(["os-tasks", str(TASKS), "--catalog", str(CATALOG), "--prompt", "nope", "--agent", f"replay:{SOLUTIONS}"]) == 2
    assert main(["os-tasks", str(TASKS), "--catalog", str(CATALOG), "--prompt", "os-shell", "--agent", f"replay:{SOLUTIONS}", "--parallel", "0"]) == 2


@needs_sandbox
def test_correct_replies_score_100_percent(tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["os-tasks", str(TASKS), "--catalog", str(CATALOG), "--prompt", "os-shell", "--agent", f"replay:{SOLUTIONS}",
                 "--parallel", "5", "--out", str(out)]) == 0  # fmt: skip
    assert "replay" in capsys.readouterr().out
    [summary] = json.loads((out / "os_tasks.json").read_text())["results"]
    m = summary["systems"]["replay"]
    assert (m["tasks"], m["successes"], m["success_rate"], m["errors"]) == (5, 5, 1.0, 0)
    assert m["ended"] == {"answered": 4, "finished": 1} and m["mean_rounds"] == 2.0
    rows = duckdb.sql(f"SELECT * FROM read_parquet('{out}/os_tasks/*/*/*.parquet', hive_partitioning=true) ORDER BY task_index").fetchall()
    names = duckdb.sql(f"SELECT * FROM read_parquet('{out}/os_tasks/*/*/*.parquet', hive_partitioning=true)").columns
    assert set(OS_TASK_SCHEMA.names) <= set(names) and len(rows) == 5
    row = dict(zip(names, rows[4]))  # the start task: the background process's PID came back as the answer
    assert row["success"] and row["answer"].isdigit() and row["turns"][2]["content"] == f"The output of the OS:\n\n{row['answer']}\n"
    text, _ = build_report(tmp_path, out, tmp_path / "report.md")
    assert "## OS task success" in text and "| replay | 5 | 5 | 100% | – | 2.000 |" in text


@needs_sandbox
def test_wrong_and_invalid_replies_score_0_percent(tmp_path):
    wrong = {
        "0": [bash("cat /root/hello.txt"), "Think: x\nAct: answer(hello)"],  # wrong answer (exact match)
        "1": [bash("grep -c INFO /root/access.log"), "Act: answer({output})"],  # 14, not 6 (regex)
        "2": [bash("mkdir -p /root/backup"), "Act: finish"],  # finished without notes.txt (check script)
        "3": ["I think there are 6 files."],  # no Act: an invalid action
        "4": [bash("sleep 1; pgrep -x genpi-worker"), "Act: answer(1)"],  # not its PID (null check + example)
    }
    summary = evaluate(tmp_path, wrong, parallel=5)
    m = summary["systems"]["replay"]
    assert (m["successes"], m["success_rate"], m["errors"]) == (0, 0.0, 0)
    assert m["ended"] == {"answered": 3, "finished": 1, "invalid_action": 1}
    limit = evaluate(tmp_path, {"0": [bash("true")] * 3}, settings=LoopSettings(rounds=3))
    assert limit["systems"]["replay"]["ended"] == {"round_limit": 1, "invalid_action": 4}  # tasks 1-4: no replies at all
    assert limit["systems"]["replay"]["success_rate"] == 0.0


@needs_sandbox
def test_state_persists_within_a_task_and_never_between_tasks(tmp_path):
    tasks = tmp_path / "tasks.json"
    tasks.write_text(json.dumps([{"description": "state", "evaluation": {"match": "/tmp 1 mark"}}] * 2 +
                                [{"description": "fresh", "evaluation": {"match": "/ unset none"}}]))  # fmt: skip
    first = [bash("cd /tmp; export GENPI_X=1; touch /root/mark"), bash('echo "$PWD $GENPI_X $(ls /root)"'), "Act: answer({output})"]
    fresh = [bash('echo "$PWD ${GENPI_X:-unset} $(ls /root || true)none"'), "Act: answer({output})"]
    summary = evaluate(tmp_path, {"0": first, "1": first, "2": fresh}, tasks=tasks, parallel=1)
    assert summary["systems"]["replay"]["successes"] == 3


@needs_sandbox
def test_a_broken_init_is_recorded_not_raised(tmp_path):
    tasks = tmp_path / "tasks.json"
    tasks.write_text(json.dumps([{"description": "d", "create": {"init": "exit 7"}, "evaluation": {"match": "x"}},
                                 {"description": "d", "evaluation": {"match": "x"}}]))  # fmt: skip
    summary = evaluate(tmp_path, {"0": ["Act: answer(x)"], "1": ["Act: answer(x)"]}, tasks=tasks)
    m = summary["systems"]["replay"]
    assert (m["successes"], m["errors"], m["ended"]) == (1, 1, {"answered": 1, "error": 1})
    error = duckdb.sql(f"SELECT error FROM read_parquet('{tmp_path}/eval/os_tasks/*/*/*.parquet') WHERE error IS NOT NULL").fetchall()[0][0]
    assert "init script 0 exited with status 7" in error


def test_report_lists_os_tasks_as_missing_without_them(tmp_path):
    text, _ = build_report(tmp_path, tmp_path / "eval", tmp_path / "report.md")
    assert "OS task success: " in text.split("## Missing")[1] and "genpi eval os-tasks" in text


@needs_sandbox
def test_task_timeout_and_command_timeout_end_the_task_as_timeout(tmp_path):
    tasks = tmp_path / "tasks.json"
    tasks.write_text(json.dumps([{"description": "slow", "evaluation": {"match": "x"}}] * 2))
    replies = {"0": [bash("sleep 5"), "Act: answer(x)"], "1": [bash("true"), bash("sleep 5"), "Act: answer(x)"]}
    wall = evaluate(tmp_path, {"0": replies["0"]}, tasks=tasks, settings=LoopSettings(limits=Limits(wall_s=2)))
    command = evaluate(tmp_path, {"1": replies["1"]}, tasks=tasks, settings=LoopSettings(command_timeout=2))
    assert wall["systems"]["replay"]["ended"] == {"timeout": 1, "invalid_action": 1}
    assert command["systems"]["replay"]["ended"] == {"timeout": 1, "invalid_action": 1}
    assert wall["systems"]["replay"]["errors"] == command["systems"]["replay"]["errors"] == 0
