"""The layout of genpi.eval: one skeleton (genpi.eval.evaluate) that every evaluation runs through, one dispatch
table for `genpi eval`, and no import cycle among the evaluation modules."""

import ast
import json
from pathlib import Path

import duckdb
import pyarrow as pa
from conftest import REPO

import genpi.eval
from genpi.catalog import load_catalog
from genpi.eval.evaluate import Evaluation, RunSettings, evaluate, evaluate_task, per_metric, row_schema
from genpi.eval.run import COMMANDS, build_parser
from genpi.eval.systems import BASE, TEACHER, Prompt, System

ENTRY = load_catalog(REPO / "tests" / "data" / "tiny.yaml")[0]
SCHEMA = row_schema(("item", pa.int32()), ("correct", pa.bool_()), ("error", pa.string()))


def scripted(right: dict[str, list[bool]]):
    """A `play` whose systems answer as scripted (no model): a row per item, right or not."""

    def play(prompt: Prompt, engine) -> dict[str, list[dict]]:
        assert engine is None  # RunSettings(model=False): nothing loads
        return {
            s.name: [
                {"prompt_id": prompt.entry.id, "system": s.name, "item": i, "correct": r, "error": None}
                for i, r in enumerate(right[s.name])
            ]
            for s in prompt.systems
        }

    return play


def summarize(rows: list[dict]) -> dict:
    return {"items": len(rows), "accuracy": sum(r["correct"] for r in rows) / len(rows)}


def test_the_skeleton_writes_rows_scores_and_retention(tmp_path):
    served = System("remote", served="openai:http://127.0.0.1:9/v1/calc")
    systems = [System(TEACHER, None, True), System(BASE), served]
    prompt = Prompt(ENTRY, systems, ["other: no adapter at X/calc"])
    right = {TEACHER: [True, True, True, False], BASE: [False, False, True, False], "remote": [True, True, True, False]}
    task = Evaluation(
        "toy",
        SCHEMA,
        scripted(right),
        summarize,
        lambda p, form: {"prompt_id": p.entry.id, "served_as": form},
        per_metric(("accuracy",)),
        not_scored=("nll",),
    )
    result = evaluate_task(task, prompt, RunSettings(None, tmp_path, model=False))

    assert list(result) == ["prompt_id", "served_as", "missing", "systems", "retention", "adapters"]
    assert result["systems"][TEACHER] == {"items": 4, "accuracy": 0.75}
    assert result["systems"]["remote"]["served"] == served.served and result["systems"]["remote"]["not_scored"] == [
        "nll"
    ]
    assert "served" not in result["systems"][BASE]
    # system / teacher: the copy of the teacher keeps all of it, the base a third; no row for the teacher itself
    assert result["retention"] == {BASE: {"accuracy": 1 / 3}, "remote": {"accuracy": 1.0}}
    assert json.loads((tmp_path / "toy.json").read_text()) == {"results": [result]}
    rows = (
        duckdb.connect()
        .execute(
            f"SELECT system, count(*), sum(correct::int) FROM read_parquet('{tmp_path}/toy/*/*/*.parquet', "
            "hive_partitioning = true) GROUP BY system ORDER BY system"
        )
        .fetchall()
    )
    assert rows == [(BASE, 4, 1), ("remote", 4, 3), (TEACHER, 4, 3)]


def test_the_teachers_own_retention_when_asked_and_none_without_a_teacher(tmp_path):
    right = {TEACHER: [True, False], BASE: [False, False], "replay": [True, True]}
    with_teacher = Evaluation(
        "toy",
        SCHEMA,
        scripted(right),
        summarize,
        lambda p, form: {"prompt_id": p.entry.id},
        lambda m, t: m["accuracy"] / t["accuracy"],
        teacher_retention=True,
    )
    _, [result] = evaluate(
        with_teacher,
        [Prompt(ENTRY, [System(TEACHER, None, True), System(BASE)])],
        RunSettings(None, tmp_path, model=False),
    )
    assert result["retention"] == {TEACHER: 1.0, BASE: 0.0}
    _, [alone] = evaluate(with_teacher, [Prompt(ENTRY, [System("replay")])], RunSettings(None, tmp_path, model=False))
    assert alone["retention"] == {}  # a replay agent has no teacher to compare with


def test_genpi_eval_dispatches_every_subcommand_from_one_table():
    subcommands = next(a for a in build_parser()._actions if a.dest == "what").choices
    assert list(COMMANDS) == list(subcommands)


def test_no_import_cycle_among_the_evaluation_modules():
    """Every `import genpi.eval.X` (at the top or inside a function) of genpi/eval/*.py; no module reaches itself."""
    folder = Path(genpi.eval.__file__).parent
    graph = {}
    for path in folder.glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("genpi.eval."):
                names.add(node.module.split(".")[2])
            elif isinstance(node, ast.ImportFrom) and node.module == "genpi.eval":
                names.update(a.name for a in node.names)
        graph[path.stem] = names - {path.stem}

    def reaches(start: str, seen: set) -> set:
        for name in graph.get(start, ()):
            if name not in seen:
                seen.add(name)
                reaches(name, seen)
        return seen

    cycles = sorted(m for m in graph if m in reaches(m, set()))
    assert not cycles, f"import cycles through {cycles}"
