"""genpi eval os-tasks on the hand-written tasks of examples/os-tasks, driven by replay agents.

The tasks cover `match` (exact and regex), a `check` script file, a null check with an `example`
script and a Python check, `init` code and an init file, and `start`; examples/os-tasks/solutions.json
holds correct replies.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import duckdb
import pytest

from genpi.eval.os_task_file import Script, load_tasks, read_task_file
from genpi.eval.os_tasks import OS_TASK_SCHEMA, LoopSettings, evaluate_os_tasks, format_replay, observation, parse_reply
from genpi.eval.report import build_report
from genpi.eval.run import main
from genpi.eval.sandbox import Limits
from genpi.eval.settings import OSTaskSettings, SystemsSettings
from genpi.run import main as run_main

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "examples" / "os-tasks" / "tasks.json"
SOLUTIONS = REPO / "examples" / "os-tasks" / "solutions.json"
CATALOG = REPO / "examples" / "agents.yaml"
needs_sandbox = pytest.mark.skipif(
    not all(map(shutil.which, ("unshare", "nsenter", "prlimit"))), reason="needs util-linux"
)


def bash(command: str) -> str:
    return f"Think: run it.\n\nAct: bash\n\n```bash\n{command}\n```"


def evaluate(tmp_path, replies: dict, tasks=TASKS, loop=None, **kwargs) -> dict:
    path = tmp_path / "replies.json"
    path.write_text(json.dumps(replies))
    settings = OSTaskSettings("os-shell", agent=f"replay:{path}", out=str(tmp_path / "eval"), **kwargs)
    return evaluate_os_tasks(tasks, SystemsSettings(str(CATALOG)), settings, loop=loop)


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
    assert (
        observation("x" * 801)
        == "The output of the OS:\n\n" + "x" * 780 + "\n[truncated because the output is too long]"
    )


INT_CHECK = {"language": "python", "file": "check/integer-match.py"}
# Every shape AgentBench's own OS task files (data/os_interaction/data/dev.json, data/1..7/*.json) use
SHAPES = [
    {
        "description": "What number is in /root/n?",
        "create": {"local": "default", "init": {"code": "echo 1 > /root/n"}},
        "start": "sleep 100 &",
        "evaluation": {"match": "1"},
        "labels": ["file", "process"],
    },
    {
        "description": "How many entries has /?",
        "create": [None, INT_CHECK],  # dev.json task 10: a list, ignored
        "evaluation": {"check": [None, INT_CHECK], "example": {"code": "ls / | wc -l"}},
        "labels": ["file"],
    },
    {"description": "Say two.", "evaluation": {"check": [None, INT_CHECK], "example": "echo 2"}},  # no create
    {
        "description": "How many files in /root/files?",
        "create": {"init": {"file": "init/files.sh"}},
        "evaluation": {"check": [None, INT_CHECK], "example": {"code": "ls /root/files | wc -l"}},
    },
    {
        "description": "Make /root/done.",
        "create": {"local": "packages"},
        "evaluation": {"check": {"file": "check/done.sh"}, "example": {"file": "example/done.sh"}},
    },
    {
        "description": "What is in /root/x?",
        "create": {"init": ["echo x > /root/x", {"file": "init/files.sh"}]},
        "evaluation": {"match": "x"},
        "example": {"code": "cat /root/x"},
        "explanation": "a top-level example is ignored",
    },
    {
        "description": "Make /root/done again.",
        "create": {"local": "default", "init": "echo 3 > /root/n"},  # 'file' wins over 'code'
        "evaluation": {"check": [{"file": "check/done.sh", "code": "exit 1"}], "example": "touch /root/done"},
    },
]


def agentbench_tree(tmp_path, tasks: list) -> tuple[Path, Path]:
    """AgentBench's layout: the tasks under data/, their scripts in a folder of their own (its script_dir)."""
    scripts = tmp_path / "scripts" / "dev"
    for folder in ("check", "example", "init"):
        (scripts / folder).mkdir(parents=True)
    (scripts / "check" / "integer-match.py").write_text("import sys\nsys.exit(int(sys.argv[1]) != int(sys.argv[2]))\n")
    (scripts / "check" / "done.sh").write_text("test -f /root/done\n")
    (scripts / "example" / "done.sh").write_text("touch /root/done\n")
    (scripts / "init" / "files.sh").write_text("mkdir -p /root/files && touch /root/files/a /root/files/b\n")
    (tmp_path / "data").mkdir()
    path = tmp_path / "data" / "dev.json"
    path.write_text(json.dumps(tasks))
    return path, scripts


def test_every_shape_of_agentbench_files_loads_as_agentbench_reads_it(tmp_path):
    path, scripts = agentbench_tree(tmp_path, SHAPES)
    task_file = read_task_file(path, scripts)
    assert (task_file.entries, task_file.skipped, [t.index for t in task_file.tasks]) == (7, [], list(range(7)))
    t = task_file.tasks
    files, done, integer = (
        (scripts / "init" / "files.sh").read_text(),
        (scripts / "check" / "done.sh").read_text(),
        Script("python", (scripts / "check" / "integer-match.py").read_text()),
    )
    assert (t[0].image, t[0].init, t[0].start, t[0].match) == (
        "default",
        (Script("bash", "echo 1 > /root/n"),),
        Script("bash", "sleep 100 &"),
        {"answer": "1", "strip": True},
    )
    assert (t[1].image, t[1].init, t[1].check, t[1].example) == (
        "default",
        (),
        (None, integer),
        Script("bash", "ls / | wc -l"),
    )
    assert (t[2].init, t[2].example) == ((), Script("bash", "echo 2"))
    assert t[3].init == (Script("bash", files),)
    assert (t[4].image, t[4].check, t[4].example) == (
        "packages",
        (Script("bash", done),),
        Script("bash", (scripts / "example" / "done.sh").read_text()),
    )
    assert (t[5].init, t[5].match, t[5].example, t[5].check) == (
        (Script("bash", "echo x > /root/x"), Script("bash", files)),
        {"answer": "x", "strip": True},
        None,
        (),
    )
    assert t[6].check == (Script("bash", done),)
    # .jsonl and a single object: the same tasks
    lines = tmp_path / "data" / "dev.jsonl"
    lines.write_text("\n".join(json.dumps(task) for task in SHAPES) + "\n\n")
    assert load_tasks(lines, scripts) == task_file.tasks
    one = tmp_path / "data" / "one.json"
    one.write_text(json.dumps(SHAPES[1]))
    assert load_tasks(one, scripts) == [replace(t[1], index=0)]
    # without --scripts, files resolve in the tasks file's folder, as before: here they are not found
    assert [i for i, _ in read_task_file(path).skipped] == [1, 2, 3, 4, 5, 6] and "(resolved to " in read_task_file(
        path
    ).skipped[0][1]


@pytest.mark.parametrize(
    "task, problem",
    [
        ({"evaluation": {"match": "1"}}, "field 'description'"),
        ({"description": "d"}, "field 'evaluation'"),
        ({"description": "d", "evaluation": ["match"]}, "field 'evaluation'"),
        ({"description": "d", "evaluation": {"match": {"strip": True}}}, "field 'evaluation.match'"),
        ({"description": "d", "evaluation": {"match": {"regex": "("}}}, "field 'evaluation.match.regex'"),
        ({"description": "d", "evaluation": {"check": [None]}}, "field 'evaluation.example'"),
        ({"description": "d", "evaluation": {"check": []}}, "field 'evaluation.check': an empty list"),
        (
            {"description": "d", "evaluation": {"check": [{"file": "nope.sh"}]}},
            "field 'evaluation.check[0]': file 'nope.sh' cannot be read",
        ),
        (
            {"description": "d", "evaluation": {"check": [{"language": "bash"}]}},
            "field 'evaluation.check[0]': a script object needs 'code' or 'file'",
        ),
        (
            {"description": "d", "create": {"init": [{"language": "c++", "code": "x"}]}, "evaluation": {"match": "1"}},
            "field 'create.init[0]': language 'c++'",
        ),
        ({"description": "d", "create": {"init": None}, "evaluation": {"match": "1"}}, "field 'create.init[0]': null"),
        (
            {"description": "d", "create": ["init"], "evaluation": {"match": "1"}},
            "field 'create': a list holding 'local' or 'init'",
        ),
        ({"description": "d", "create": None, "evaluation": {"match": "1"}}, "field 'create': expected an object"),
        ({"description": "d", "create": {"local": 3}, "evaluation": {"match": "1"}}, "field 'create.local'"),
        ({"description": "d", "start": 5, "evaluation": {"match": "1"}}, "field 'start'"),
        ("a task", "expected an object"),
    ],
)
def test_a_malformed_task_is_reported_and_skipped(tmp_path, task, problem):
    path = tmp_path / "tasks.json"
    path.write_text(
        json.dumps(
            [
                {"description": "fine", "evaluation": {"match": "1"}},
                task,
                {"description": "also fine", "evaluation": {"match": "2"}},
            ]
        )
    )
    task_file = read_task_file(path)
    assert [t.index for t in task_file.tasks] == [0, 2] and task_file.entries == 3
    [(index, why)] = task_file.skipped
    assert index == 1 and problem in why, why
    summary = {
        "tasks": 2,
        "entries": 3,
        "tasks_file": str(path),
        "skipped": [{"index": index, "problem": why}],
        "examples": {"passed": 2, "failures": []},
        "wrong_answers": {"passed": 0, "passes": []},
    }
    assert f"skipped task 1: {why}" in format_replay(summary)


def test_a_file_that_holds_no_task_exits_2(tmp_path, capsys):
    cases = {
        "text.json": ("not json", "not valid JSON"),
        "number.json": ("7", "expected a task object or a non-empty list"),
        "empty.json": ("[]", "expected a task object or a non-empty list"),
        # the shape of AgentBench's raw collections (scripts/6/collected.json): entries, but not one task
        "collected.json": (
            json.dumps([{"description": "d", "evaluation": {"type": "command", "checking": "x"}}] * 4),
            "not one well-formed task in 4 (task 0: field 'evaluation'",
        ),
    }
    for name, (text, problem) in cases.items():
        (tmp_path / name).write_text(text)
        assert main(["os-tasks", str(tmp_path / name), "--replay-examples"]) == 2
        assert problem in capsys.readouterr().err, name
    assert main(["os-tasks", str(TASKS), "--replay-examples", "--scripts", str(tmp_path / "nope")]) == 2
    assert "--scripts" in capsys.readouterr().err
    assert main(["os-tasks", str(TASKS)]) == 2  # neither a catalog and prompt nor --replay-examples
    assert "needs --catalog and --prompt" in capsys.readouterr().err
    assert main(["os-tasks", str(TASKS), "--replay-examples", "--agent", f"replay:{SOLUTIONS}"]) == 2


def test_genpi_run_checks_tasks_with_the_scripts_folder_of_task_args(tmp_path, capsys):
    path, scripts = agentbench_tree(tmp_path, SHAPES[3:5])  # both need files from the scripts folder
    argv = [
        str(REPO / "tests" / "data" / "tiny.yaml"),
        "--out",
        str(tmp_path / "run"),
        "--prompts",
        "calc",
        "--tasks",
        f"calc={path}",
        "--mind2web",
        f"calc={tmp_path / 'missing.jsonl'}",
    ]  # stops the run right after the tasks are checked
    assert run_main(argv) == 2
    assert "not one well-formed task" in capsys.readouterr().err
    assert run_main(argv + ["--task-args", f"--scripts {scripts} --rounds 4"]) == 2
    err = capsys.readouterr().err
    assert "missing.jsonl" in err and "well-formed" not in err, err


def test_bad_replay_file_and_flags_exit_2(tmp_path, capsys):
    replies = tmp_path / "r.json"
    replies.write_text(json.dumps({"9": ["Act: finish"]}))
    assert (
        main(
            ["os-tasks", str(TASKS), "--catalog", str(CATALOG), "--prompt", "os-shell", "--agent", f"replay:{replies}"]
        )
        == 2
    )
    assert "key '9' is not the index of a task (0..4)" in capsys.readouterr().err
    assert main(["os-tasks", str(TASKS), "--catalog", str(CATALOG), "--prompt", "os-shell", "--agent", "gpt"]) == 2
    assert (
        main(["os-tasks", str(TASKS), "--catalog", str(CATALOG), "--prompt", "nope", "--agent", f"replay:{SOLUTIONS}"])
        == 2
    )
    assert (
        main(
            [
                "os-tasks",
                str(TASKS),
                "--catalog",
                str(CATALOG),
                "--prompt",
                "os-shell",
                "--agent",
                f"replay:{SOLUTIONS}",
                "--parallel",
                "0",
            ]
        )
        == 2
    )


@needs_sandbox
def test_correct_replies_score_100_percent(tmp_path, capsys):
    out = tmp_path / "eval"
    assert (
        main(
            [
                "os-tasks",
                str(TASKS),
                "--catalog",
                str(CATALOG),
                "--prompt",
                "os-shell",
                "--agent",
                f"replay:{SOLUTIONS}",
                "--parallel",
                "5",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "replay" in capsys.readouterr().out
    [summary] = json.loads((out / "os_tasks.json").read_text())["results"]
    m = summary["systems"]["replay"]
    assert (m["tasks"], m["successes"], m["success_rate"], m["errors"]) == (5, 5, 1.0, 0)
    assert m["ended"] == {"answered": 4, "finished": 1} and m["mean_rounds"] == 2.0
    rows = duckdb.sql(
        f"SELECT * FROM read_parquet('{out}/os_tasks/*/*/*.parquet', hive_partitioning=true) ORDER BY task_index"
    ).fetchall()
    names = duckdb.sql(f"SELECT * FROM read_parquet('{out}/os_tasks/*/*/*.parquet', hive_partitioning=true)").columns
    assert set(OS_TASK_SCHEMA.names) <= set(names) and len(rows) == 5
    row = dict(zip(names, rows[4]))  # the start task: the background process's PID came back as the answer
    assert (
        row["success"]
        and row["answer"].isdigit()
        and row["turns"][2]["content"] == f"The output of the OS:\n\n{row['answer']}\n"
    )
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
    verdicts = duckdb.sql(
        f"SELECT task_index, verdict FROM read_parquet('{tmp_path}/eval/os_tasks/*/*/*.parquet') ORDER BY 1"
    ).fetchall()
    assert verdicts[0] == (0, "answer 'hello' is not 'genpi'") and verdicts[1] == (
        1,
        r"answer '14' does not match /^\s*6\s*$/",
    )
    assert (
        verdicts[2][1]
        == "check 0 (bash) exited with status 2 on 'None': 'grep: /root/backup/notes.txt: No such file or directory\\n'"
        and verdicts[3] == (3, None)
    )  # never judged
    assert verdicts[4][1].startswith(
        "check 1 (python) exited with status 1 on '1', '"
    )  # the example's PID, then the check's output
    limit = evaluate(tmp_path, {"0": [bash("true")] * 3}, loop=LoopSettings(rounds=3))
    assert limit["systems"]["replay"]["ended"] == {
        "round_limit": 1,
        "invalid_action": 4,
    }  # tasks 1-4: no replies at all
    assert limit["systems"]["replay"]["success_rate"] == 0.0


@needs_sandbox
def test_state_persists_within_a_task_and_never_between_tasks(tmp_path):
    tasks = tmp_path / "tasks.json"
    tasks.write_text(
        json.dumps(
            [{"description": "state", "evaluation": {"match": "/tmp 1 mark"}}] * 2
            + [{"description": "fresh", "evaluation": {"match": "/root unset none"}}]
        )
    )
    first = [
        bash("cd /tmp; export GENPI_X=1; touch /root/mark"),
        bash('echo "$PWD $GENPI_X $(ls /root)"'),
        "Act: answer({output})",
    ]
    fresh = [bash('echo "$PWD ${GENPI_X:-unset} $(ls /root || true)none"'), "Act: answer({output})"]
    summary = evaluate(tmp_path, {"0": first, "1": first, "2": fresh}, tasks=tasks, parallel=1)
    assert summary["systems"]["replay"]["successes"] == 3


@needs_sandbox
def test_a_broken_init_is_recorded_not_raised(tmp_path):
    tasks = tmp_path / "tasks.json"
    tasks.write_text(
        json.dumps(
            [
                {"description": "d", "create": {"init": "exit 7"}, "evaluation": {"match": "x"}},
                {"description": "d", "evaluation": {"match": "x"}},
            ]
        )
    )
    summary = evaluate(tmp_path, {"0": ["Act: answer(x)"], "1": ["Act: answer(x)"]}, tasks=tasks)
    m = summary["systems"]["replay"]
    assert (m["successes"], m["errors"], m["ended"]) == (1, 1, {"answered": 1, "error": 1})
    error = duckdb.sql(
        f"SELECT error FROM read_parquet('{tmp_path}/eval/os_tasks/*/*/*.parquet') WHERE error IS NOT NULL"
    ).fetchall()[0][0]
    assert "init script 0 exited with status 7" in error


def test_report_lists_os_tasks_as_missing_without_them(tmp_path):
    text, _ = build_report(tmp_path, tmp_path / "eval", tmp_path / "report.md")
    assert "OS task success: " in text.split("## Missing")[1] and "genpi eval os-tasks" in text


@needs_sandbox
def test_task_timeout_and_command_timeout_end_the_task_as_timeout(tmp_path):
    tasks = tmp_path / "tasks.json"
    tasks.write_text(json.dumps([{"description": "slow", "evaluation": {"match": "x"}}] * 2))
    replies = {"0": [bash("sleep 5"), "Act: answer(x)"], "1": [bash("true"), bash("sleep 5"), "Act: answer(x)"]}
    wall = evaluate(tmp_path, {"0": replies["0"]}, tasks=tasks, loop=LoopSettings(limits=Limits(wall_s=2)))
    command = evaluate(tmp_path, {"1": replies["1"]}, tasks=tasks, loop=LoopSettings(command_timeout=2))
    assert wall["systems"]["replay"]["ended"] == {"timeout": 1, "invalid_action": 1}
    assert command["systems"]["replay"]["ended"] == {"timeout": 1, "invalid_action": 1}
    assert wall["systems"]["replay"]["errors"] == command["systems"]["replay"]["errors"] == 0


@needs_sandbox
def test_replay_examples_plays_each_tasks_own_solution_and_a_wrong_answer(tmp_path, capsys):
    failing = [
        {
            "description": "Anything with a letter.",
            "evaluation": {"match": {"regex": "[a-z]"}},
        },  # no known answer; a lax judge
        {"description": "Broken setup.", "create": {"init": "echo setup failed; exit 3"}, "evaluation": {"match": "x"}},
        {
            "description": "Say five.",
            "evaluation": {
                "check": [None, INT_CHECK, {"code": "exit 1"}],
                "example": {"language": "python", "code": "print('5')"},
            },
        },
        {"description": "A list holding init.", "create": ["init"], "evaluation": {"match": "x"}},  # malformed: skipped
    ]
    path, scripts = agentbench_tree(tmp_path, SHAPES + failing)
    assert main(["os-tasks", str(path), "--scripts", str(scripts), "--replay-examples", "--parallel", "4"]) == 0
    out = capsys.readouterr().out
    assert (
        "10 tasks from" in out and "(1 of 11 skipped as malformed)" in out and "skipped task 10: field 'create'" in out
    )
    assert "example solutions: passed 7 of 10" in out, out
    assert "  task 7 (Anything with a letter.): no example solution" in out
    assert "  task 8 (Broken setup.): RuntimeError: init script 0 exited with status 3: setup failed" in out
    assert "  task 9 (Say five.): check 2 (bash) exited with status 1 on '5', '5\\n', ''" in out
    assert (
        "wrong answers: passed 1 of 10" in out
        and "  task 7 (Anything with a letter.) accepted 'genpi-wrong-answer'" in out
    )
    assert (
        len(re.findall(r"^  task \d+", out, re.MULTILINE)) == 4
    )  # the three failures and the one wrong answer that passed


@needs_sandbox
def test_replay_passes_tasks_that_rely_on_agentbenchs_container(tmp_path, capsys):
    """Shapes of AgentBench's dev tasks that its container passes: an init that writes relative to its working
    directory (/root) and an answer counted from `.`; an init that leaves a process in the background; an
    example that also writes to stderr (the checks get stdout alone)."""
    tasks = [
        {
            "description": "How many .helloworld files are there?",
            "create": {"init": {"code": "mkdir -p d && touch a.helloworld d/b.helloworld"}},
            "evaluation": {"check": [None, INT_CHECK], "example": {"code": 'find . -name "*.helloworld" | wc -l'}},
        },
        {
            "description": "Is the server up?",
            "create": {"init": {"code": "sleep 60 & echo started"}},
            "evaluation": {"check": [None, INT_CHECK], "example": {"code": "pgrep -xc sleep"}},
        },
        {
            "description": "Say seven.",
            "evaluation": {"check": [{"code": "echo 7; echo a warning >&2"}, INT_CHECK], "example": {"code": "echo 7"}},
        },
    ]
    path, scripts = agentbench_tree(tmp_path, tasks)
    assert main(["os-tasks", str(path), "--scripts", str(scripts), "--replay-examples"]) == 0
    out = capsys.readouterr().out
    assert "example solutions: passed 3 of 3" in out and "wrong answers: passed 0 of 3" in out, out
