"""Quality statistics and read-only SQL over a hand-built synthesis run (no models)."""

from __future__ import annotations

import json
import time

import pytest

from genpi import InputError
from genpi.catalog import entry_from_json
from genpi.cli import main
from genpi.data import store
from genpi.data.dialogues import open_dialogues
from genpi.data.manifest import write_manifest
from genpi.data.store import DIALOGUE_SCHEMA, shard_path
from genpi.synth.stats import format_rows, format_stats, quality_stats, run_sql

ENTRIES = {
    "alpha": {
        "id": "alpha",
        "system": "You are a shell agent.",
        "shots": [
            [
                {"role": "user", "content": "task"},
                {"role": "assistant", "content": "Act: ls"},
                {"role": "user", "content": "a.txt"},
                {"role": "assistant", "content": "Act: answer(a.txt)"},
            ],
            [{"role": "user", "content": "task 2"}, {"role": "assistant", "content": "Act: answer(2)"}],
        ],
        "actions": {"valid": "^Act: "},
        "max_turns": 3,
    },
    "beta.v2": {
        "id": "beta.v2",
        "shots": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        "max_turns": 2,
    },
    "gamma": {"id": "gamma", "system": "Only a system prompt.", "input_examples": ["x"]},  # no rows yet
}


def row(prompt_id, sample_id, split, input, turns=None, error=None, tokens=(0, 0, 0, 0), **outcome):
    """A dialogue row; agent turns alternate with environment turns in `turns` (a list of strings)."""
    base = {
        "prompt_id": prompt_id,
        "prompt_sha256": entry_from_json(ENTRIES[prompt_id]).sha256,
        "sample_id": sample_id,
        "seed": 1000 + sample_id,
        "split": split,
        "input": input,
        "generator_model": "gen",
        "target_model": "tgt",
        "prompt_tokens": 100,
        "error": error,
    }
    base.update(zip(("agent_tokens", "environment_tokens", "student_tokens", "reason_tokens"), tokens))
    if turns is not None:
        base["turns"] = [{"role": "assistant" if i % 2 == 0 else "user", "content": t} for i, t in enumerate(turns)]
        base["n_turns"] = (len(turns) + 1) // 2
        base["final_action"] = turns[-1] if len(turns) % 2 else turns[-2]
        base.setdefault("hit_max_turns", False)
        base.setdefault("truncated", False)
    base.update(outcome)
    return base


# `terminated` is measured (the environment is asked once more after the last turn); a dialogue ends on the end
# marker ("environment") or at the limit ("max_turns", not terminated), as the reference role-plays.
ALPHA = [
    row(
        "alpha",
        0,
        "train",
        "list files",
        ["ls", "a b", "exit"],
        terminated=True,
        terminated_by="environment",
        final_action_valid=True,
        student_output="student one",
        reason="because",
        tokens=(5, 3, 4, 6),
    ),
    row(
        "alpha",
        1,
        "train",
        "list files",
        ["ls -l"],
        terminated=True,
        terminated_by="environment",
        final_action_valid=False,
        student_output="s2",
        reason="r2",
        tokens=(1, 0, 1, 1),
    ),
    row(
        "alpha",
        2,
        "heldout",
        "count lines",
        ["wc", "x", "wc -l", "y", "cat"],
        terminated=False,
        hit_max_turns=True,
        terminated_by="max_turns",
        final_action_valid=True,
        student_output="abc",
        reason="abcd",
        tokens=(2, 2, 2, 2),
    ),
    # failed rows: outcome columns null
    row(
        "alpha", 3, "train", "huge", error="agent turn 1: context overflow", terminated_by="error", tokens=(7, 0, 0, 0)
    ),
    row(
        "alpha",
        4,
        "heldout",
        "huge 2",
        error="agent turn 1: context overflow",
        terminated_by="error",
        tokens=(None, None, None, None),
    ),
]

BETA = [
    row(
        "beta.v2",
        0,
        "train",
        "q1",
        ["hello!!"],
        terminated=True,
        terminated_by="environment",
        final_action_valid=None,
        student_output="x",
        reason="yy",
        tokens=(1, 1, 1, 1),
    ),
    row(
        "beta.v2",
        1,
        "heldout",
        "q2",
        ["hi"],
        terminated=False,
        truncated=True,
        terminated_by="truncated",
        final_action_valid=None,
        student_output="xy",
        reason="y",
        tokens=(2, 0, 1, 1),
    ),
    row(
        "beta.v2",
        2,
        "train",
        "q3",
        ["abc", "o", "defg"],
        terminated=False,
        hit_max_turns=True,
        terminated_by="max_turns",
        final_action_valid=None,
        student_output="xyz",
        reason="yyy",
        tokens=(10, 5, 1, 1),
    ),
    row("beta.v2", 3, "train", "q4", error="reason: timeout", terminated_by="error", tokens=(3, None, None, None)),
    row("beta.v2", 4, "train", "q5", error="student: boom", terminated_by="error"),
    row("beta.v2", 5, "heldout", "q6", error="reason: timeout", terminated_by="error"),
]

EXPECTED = {
    "alpha": {
        "prompt_id": "alpha",
        "gold_turns": 1.5,
        "max_turns": 3,
        "samples": 5,
        "rows": 5,
        "failed": 2,
        "train": 2,
        "heldout": 1,
        "avg_turns": 2.0,
        "pct_hit_max_turns": 33.3,
        "pct_no_termination": 33.3,
        "pct_invalid_final_action": 33.3,
        "pct_truncated": 0.0,
        "terminated_by": {"environment": 2, "max_turns": 1, "truncated": 0, "error": 2},
        "mean_input_chars": 10.3,  # (10 + 10 + 11) / 3
        "mean_agent_turn_chars": 3.5,  # (2 + 4 + 5 + 2 + 5 + 3) / 6
        "mean_student_chars": 5.3,
        "mean_reason_chars": 4.3,
        "duplicate_input_rate": 0.333,
        "generated_tokens": 36,  # 18 + 3 + 8 + 7
        "pct_degenerate_turns": 0.0,
        "pct_degenerate_rows": 0.0,
        "pct_inputs_already_passing": 0.0,  # no student output matches actions.valid
        "top_errors": [{"error": "agent turn 1: context overflow", "count": 2}],
    },
    "beta.v2": {
        "prompt_id": "beta.v2",
        "gold_turns": 1.0,
        "max_turns": 2,
        "samples": 6,
        "rows": 6,
        "failed": 3,
        "train": 2,
        "heldout": 1,
        "avg_turns": 1.33,
        "pct_hit_max_turns": 33.3,
        "pct_no_termination": 66.7,
        "pct_invalid_final_action": None,  # the catalog gives no action space
        "pct_truncated": 33.3,
        "terminated_by": {"environment": 1, "max_turns": 1, "truncated": 1, "error": 3},
        "mean_input_chars": 2.0,
        "mean_agent_turn_chars": 4.0,  # (7 + 2 + 3 + 4) / 4
        "mean_student_chars": 2.0,
        "mean_reason_chars": 2.0,
        "duplicate_input_rate": 0.0,
        "generated_tokens": 28,  # 4 + 4 + 17 + 3 (failed rows count too)
        "pct_degenerate_turns": 0.0,
        "pct_degenerate_rows": 0.0,
        "pct_inputs_already_passing": None,  # no actions.valid to check against
        "top_errors": [{"error": "reason: timeout", "count": 2}, {"error": "student: boom", "count": 1}],
    },
    "gamma": {
        "prompt_id": "gamma",
        "gold_turns": 0.0,
        "max_turns": 5,
        "samples": 4,
        "rows": 0,
        "failed": 0,
        "train": 0,
        "heldout": 0,
        "avg_turns": None,
        "pct_hit_max_turns": None,
        "pct_no_termination": None,
        "pct_invalid_final_action": None,
        "pct_truncated": None,
        "terminated_by": {"environment": 0, "max_turns": 0, "truncated": 0, "error": 0},
        "mean_input_chars": None,
        "mean_agent_turn_chars": None,
        "mean_student_chars": None,
        "mean_reason_chars": None,
        "duplicate_input_rate": None,
        "generated_tokens": 0,
        "pct_degenerate_turns": None,
        "pct_degenerate_rows": None,
        "pct_inputs_already_passing": None,
        "top_errors": [],
    },
}


def manifest() -> dict:
    entries = {pid: entry_from_json(e) for pid, e in ENTRIES.items()}
    samples = {"alpha": 5, "beta.v2": 6, "gamma": 4}
    return {
        "version": 1,
        "catalog": {"path": "catalog.yaml", "prompts": {pid: e.to_json() for pid, e in entries.items()}},
        "prompts": {
            pid: {
                "prompt_sha256": e.sha256,
                "gold_turns": e.gold_turns,
                "max_turns": e.max_turns,
                "samples": samples[pid],
                "inputs": None,
                "input_errors": [],
                "shards": {},
            }
            for pid, e in entries.items()
        },
    }


@pytest.fixture
def run(tmp_path):
    out = tmp_path / "run"
    store.write_table(shard_path(out, "alpha", 0), ALPHA[:3], DIALOGUE_SCHEMA)
    store.write_table(shard_path(out, "alpha", 1), ALPHA[3:], DIALOGUE_SCHEMA)
    store.write_table(shard_path(out, "beta.v2", 0), BETA, DIALOGUE_SCHEMA)
    (shard_path(out, "alpha", 0).parent / ".part-00002.parquet.99.tmp").write_bytes(b"half a file")
    write_manifest(out, manifest())
    return out


def test_quality_stats_exact(run):
    stats = quality_stats(run)
    assert [s["prompt_id"] for s in stats] == ["alpha", "beta.v2", "gamma"]
    for s in stats:
        assert s == EXPECTED[s["prompt_id"]]


def test_gold_turns_null_without_manifest(run):
    (run / "manifest.json").unlink()
    stats = quality_stats(run)
    assert [s["prompt_id"] for s in stats] == ["alpha", "beta.v2"]
    assert all(s["gold_turns"] is None and s["max_turns"] is None and s["samples"] is None for s in stats)
    assert stats[0]["rows"] == 5 and stats[0]["avg_turns"] == 2.0


def test_hive_prompt_id_is_one_string_column(tmp_path):
    out = tmp_path / "run"
    ENTRIES["007"] = {"id": "007", "system": "s", "input_examples": ["x"]}
    try:
        store.write_table(
            shard_path(out, "007", 0), [row("007", 0, "train", "in", ["a"], terminated=True)], DIALOGUE_SCHEMA
        )
    finally:
        del ENTRIES["007"]
    con = open_dialogues(out)
    try:
        described = con.execute("DESCRIBE dialogues").fetchall()
    finally:
        con.close()
    names = [d[0] for d in described]
    assert names.count("prompt_id") == 1 and set(names) == set(DIALOGUE_SCHEMA.names)
    assert dict((d[0], d[1]) for d in described)["prompt_id"] == "VARCHAR"
    assert sql_rows(out, "SELECT prompt_id FROM dialogues") == (["prompt_id"], [("007",)])


def test_format_stats(run):
    text = format_stats(quality_stats(run))
    lines = text.splitlines()
    header = lines[0]
    assert header.index("gold turns") < header.index("avg turns") < header.index("% max turns") < header.index("rows")
    alpha = next(line for line in lines if line.startswith("alpha "))
    for figure in ("1.50", "2.00", "33.3", "0.333"):
        assert figure in alpha
    beta = next(line for line in lines if line.startswith("beta.v2 "))
    assert "66.7" in beta and "1.33" in beta
    assert "ended env/max/trunc/err" in header and "2/1/0/2" in alpha and "1/1/1/3" in beta
    assert any(line.startswith("gamma ") for line in lines)
    assert len({len(line) for line in lines[:5]}) <= 2  # fixed width (trailing blanks stripped)
    errors = text[text.index("most common errors") :]
    assert "context overflow" in errors and "reason: timeout" in errors and "student: boom" in errors
    assert errors.index("reason: timeout") < errors.index("student: boom")


LOOP = "No, no, no, no, no, no, no, no, no, no, no, no"
HELP = "I can help. I can help. I can help. I can help. I can help."


def test_degenerate_turns_and_inputs_already_in_format(tmp_path):
    """4 good alpha rows, 7 agent turns, 2 of them loops in 2 rows; 1 of 4 student outputs is already in the
    action format (^Act: ); a failed row's loop does not count."""
    out = tmp_path / "run"
    rows = [
        row("alpha", 0, "train", "a", [LOOP], terminated=True, student_output="Act: ls", reason="r"),
        row(
            "alpha",
            1,
            "train",
            "b",
            ["Act: ls", "a.txt", HELP, "ok", "Act: answer(a)"],
            terminated=True,
            student_output="I would list the files.",
            reason="r",
        ),
        row(
            "alpha",
            2,
            "heldout",
            "c",
            ["Act: cat a.txt | sort | uniq -c", "x", "Act: answer(x)"],
            terminated=True,
            student_output="cat it",
            reason="r",
        ),
        row("alpha", 3, "train", "d", ["Act: echo hi; echo hi"], terminated=True, student_output="Act? no", reason="r"),
        row("alpha", 4, "train", "e", [LOOP], error="boom", student_output="Act: x"),
        row(
            "beta.v2",
            0,
            "train",
            "q",
            ["hello, how can I help you today?"],
            terminated=True,
            student_output="Act: x",
            reason="r",
        ),
    ]
    store.write_table(shard_path(out, "alpha", 0), rows[:5], DIALOGUE_SCHEMA)
    store.write_table(shard_path(out, "beta.v2", 0), rows[5:], DIALOGUE_SCHEMA)
    write_manifest(out, manifest())
    alpha, beta, gamma = quality_stats(out)
    assert (alpha["pct_degenerate_turns"], alpha["pct_degenerate_rows"], alpha["pct_inputs_already_passing"]) == (
        28.6,
        50.0,
        25.0,
    )
    assert (beta["pct_degenerate_turns"], beta["pct_degenerate_rows"], beta["pct_inputs_already_passing"]) == (
        0.0,
        0.0,
        None,
    )
    assert gamma["pct_degenerate_turns"] is None and gamma["pct_inputs_already_passing"] is None
    # a check passed in (the hook for the catalog's behaviour checks) replaces actions.valid
    [alpha, beta, _] = quality_stats(out, check=lambda entry: lambda reply: "files" in reply)
    assert alpha["pct_inputs_already_passing"] == 25.0 and beta["pct_inputs_already_passing"] == 0.0
    lines = format_stats(quality_stats(out)).splitlines()
    header, line = lines[0], next(line for line in lines if line.startswith("alpha "))
    assert "% degen turns" in header and "% degen rows" in header and "% input passes" in header
    assert "28.6" in line and "50.0" in line and "25.0" in line
    (out / "manifest.json").unlink()  # no manifest: no catalog, no check
    assert (
        quality_stats(out)[0]["pct_inputs_already_passing"] is None
        and quality_stats(out)[0]["pct_degenerate_rows"] == 50.0
    )


def test_stats_cli(run, capsys):
    assert main(["stats", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [EXPECTED[k] for k in ("alpha", "beta.v2", "gamma")]
    assert main(["stats", str(run)]) == 0
    assert "beta.v2" in capsys.readouterr().out


def sql_rows(out, query, **limits):
    result = run_sql(out, query, **limits)
    return result.columns, result.rows


def test_sql(run, capsys):
    query = "SELECT prompt_id, count(*) AS n FROM dialogues GROUP BY prompt_id ORDER BY prompt_id"
    assert sql_rows(run, query) == (["prompt_id", "n"], [("alpha", 5), ("beta.v2", 6)])
    assert main(["sql", str(run), query, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"prompt_id": "alpha", "n": 5}, {"prompt_id": "beta.v2", "n": 6}]
    assert (
        main(["sql", str(run), "SELECT input, turns FROM dialogues WHERE sample_id = 2 AND prompt_id = 'alpha'"]) == 0
    )
    text = capsys.readouterr().out
    assert "count lines" in text and "(1 row)" in text


def test_sql_with_glob_characters_in_out(run, tmp_path):
    odd = tmp_path / "runs [1] *?"
    run.rename(odd)
    assert sql_rows(odd, "SELECT count(*) FROM dialogues") == (["count_star()"], [(11,)])
    assert [s["rows"] for s in quality_stats(odd)] == [5, 6, 0]


def test_sql_limits_are_set_and_locked(run, capsys):
    con = open_dialogues(run, memory_limit="300MB", threads=1)
    try:
        assert con.execute("SELECT current_setting('threads')").fetchone() == (1,)
        assert "286" in con.execute("SELECT current_setting('memory_limit')").fetchone()[0]  # 300 MB in MiB
        with pytest.raises(Exception, match="lock"):
            con.execute("SET threads = 2")
    finally:
        con.close()
    slow = "SELECT sum(hash(i)) FROM range(100000000000) t(i)"
    started = time.monotonic()
    assert main(["sql", str(run), slow, "--timeout", "0.5", "--threads", "1"]) == 2
    assert time.monotonic() - started < 30
    assert "time limit of 0.5 s" in capsys.readouterr().err
    assert main(["sql", str(run), "SELECT 1", "--memory-limit", "lots"]) == 2
    assert "memory" in capsys.readouterr().err


def test_sql_caps_the_rows_and_says_so(run, capsys):
    query = "SELECT i FROM range(25) t(i) ORDER BY i"
    result = run_sql(run, query, max_rows=10)
    assert result.rows == [(i,) for i in range(10)] and result.cut
    assert not run_sql(run, query, max_rows=25).cut and len(run_sql(run, query).rows) == 25  # default cap 10,000
    assert main(["sql", str(run), query, "--max-rows", "10"]) == 0
    captured = capsys.readouterr()
    assert "(10 rows)" in captured.out and "cut at 10 rows (--max-rows)" in captured.err
    assert main(["sql", str(run), query, "--max-rows", "3", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == [{"i": 0}, {"i": 1}, {"i": 2}] and "cut at 3 rows" in captured.err
    assert main(["sql", str(run), query, "--max-rows", "25"]) == 0
    assert capsys.readouterr().err == ""
    assert main(["sql", str(run), query, "--max-rows", "0"]) == 2
    assert "--max-rows must be at least 1" in capsys.readouterr().err


def test_sql_spills_inside_the_run_folder_and_within_its_bound(run, capsys, tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # DuckDB's own default spills to .tmp in the working directory
    con = open_dialogues(run, max_temp="1MB")
    try:
        folder = con.execute("SELECT current_setting('temp_directory')").fetchone()[0]
        assert folder.startswith(str(run.resolve()) + "/.duckdb-spill-")
        assert con.execute("SELECT current_setting('max_temp_directory_size')").fetchone()[0] == "976.5 KiB"  # 1 MB
    finally:
        con.close()
    big_sort = (
        "SELECT count(*) FROM (SELECT md5(i::VARCHAR) || md5((i + 1)::VARCHAR) AS m "
        "FROM range(3000000) t(i) ORDER BY m)"
    )
    assert main(["sql", str(run), big_sort, "--memory-limit", "40MB", "--max-temp", "2MB", "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("genpi: error: query failed") and err.count("\n") == 1 and "Out of Memory" in err
    assert not any(cwd.iterdir()) and not list(run.glob(".duckdb-spill-*"))  # nothing left behind, no .tmp here


def test_sql_time_limit_covers_converting_and_printing_the_rows(run, capsys, monkeypatch):
    import genpi.synth.stats as stats

    slow_cell = stats._cell

    def cell(value, width=stats.MAX_CELL):
        time.sleep(0.05)
        return slow_cell(value, width)

    monkeypatch.setattr(stats, "_cell", cell)  # a result that is quick to compute and slow to render
    started = time.monotonic()
    assert main(["sql", str(run), "SELECT i FROM range(200) t(i)", "--timeout", "0.5"]) == 2
    assert time.monotonic() - started < 5  # not the 10 s that rendering all 200 rows takes
    captured = capsys.readouterr()
    assert captured.out == "" and "time limit of 0.5 s" in captured.err

    def slow_dumps(*args, **kwargs):
        time.sleep(0.05)
        return json.dumps(*args, **kwargs)

    monkeypatch.setattr(stats, "json", type("slow_json", (), {"dumps": staticmethod(slow_dumps)}))
    assert main(["sql", str(run), "SELECT i FROM range(200) t(i)", "--timeout", "0.5", "--json"]) == 2
    assert "time limit of 0.5 s" in capsys.readouterr().err


def test_format_rows_truncates_and_counts():
    text = format_rows(["id", "text"], [(1, "x" * 200), (22, None), (3, "two\nlines")])
    lines = text.splitlines()
    assert len(lines) == 2 + 3 + 1 and lines[-1] == "(3 rows)"
    assert max(len(line) for line in lines) < 80 and "…" in lines[2]
    assert "NULL" in lines[3] and "two\\nlines" in lines[4]


@pytest.mark.parametrize(
    "query, words",
    [
        ("COPY (SELECT * FROM dialogues) TO '{out}/leak.csv'", ["COPY"]),
        ("CREATE TABLE t AS SELECT * FROM dialogues", ["CREATE"]),
        ("INSERT INTO dialogues SELECT * FROM dialogues", ["INSERT"]),
        ("DROP VIEW dialogues", ["DROP"]),
        ("ATTACH '{out}/x.db'", ["ATTACH"]),
        ("SELECT 1; SELECT 2", ["one SELECT", "2 statements"]),
        ("SELECT no_such_column FROM dialogues", ["no_such_column"]),
        ("SELEC 1", ["syntax error"]),
        ("SELECT * FROM read_csv('/etc/passwd')", ["/etc/passwd"]),
        ("", ["empty query"]),
    ],
)
def test_sql_rejects(run, capsys, query, words):
    query = query.format(out=run)
    assert main(["sql", str(run), query]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("genpi: error: ") and captured.err.count("\n") == 1
    for word in words:
        assert word in captured.err
    assert not (run / "leak.csv").exists() and not (run / "x.db").exists()
    with pytest.raises(InputError):
        run_sql(run, query)


@pytest.mark.parametrize("make", ["missing", "empty", "no_shards"])
def test_stats_without_data(tmp_path, capsys, make):
    out = tmp_path / "run"
    if make != "missing":
        out.mkdir()
    if make == "no_shards":
        write_manifest(out, manifest())
        shard_path(out, "alpha", 0).parent.mkdir(parents=True)
    assert main(["stats", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("genpi: error: ") and err.count("\n") == 1
    assert str(out) in err and "genpi synth" in err
    assert ("no such run folder" if make == "missing" else "no dialogue shards") in err
    assert main(["sql", str(out), "SELECT 1"]) == 2


def test_a_corrupt_manifest_exits_2_naming_it(run, capsys):
    (run / "manifest.json").write_text('{"prompts": {"alpha": ')
    assert main(["stats", str(run)]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(f"genpi: error: {run / 'manifest.json'}: not a readable run manifest") and err.count("\n") == 1
    )
