"""Issue 26 §1: the folders genpi writes open in every common reader (pandas, pyarrow.dataset, polars, DuckDB, Hugging
Face `datasets`), a run written by a genpi before issue 26 (hive folders `prompt_id=ID/`) still opens in genpi and is
moved to the plain folders by a resumed synthesis, and `genpi export` gives a chat dataset with a dataset card.

The runs are written by the real writer (genpi.synth.run.Synthesis, driven by an in-process fake engine, no model)
and the evaluation rows by genpi.data.store.write_results."""

from __future__ import annotations

import json
import shutil

import duckdb
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.dataset as ds
import pytest
import yaml
from conftest import REPO
from test_synth_run import OPTIONS, SETTINGS, Fake
from test_synth_run import synth as synth_run_with

from genpi import InputError
from genpi.catalog import load_catalog
from genpi.cli import main as genpi
from genpi.data import store
from genpi.data.dialogues import open_dialogues, prompt_rows
from genpi.data.manifest import read_manifest, write_manifest
from genpi.eval.evaluate import row_schema
from genpi.synth import run as synth_run
from genpi.synth.export import dialogue_messages, export
from genpi.synth.stats import quality_stats, run_sql

# `007`: an id that a reader inferring a partition's type would turn into the number 7
CATALOG_TEXT = (REPO / "tests" / "data" / "tiny.yaml").read_text() + (
    "- id: '007'\n"
    "  system: 'Reply to every request with \"Answer: done\".'\n"
    "  shots:\n"
    "    - {role: user, content: 'Do it.'}\n"
    "    - {role: assistant, content: 'Answer: done'}\n"
    "  actions: {valid: '^Answer: ', final: '^Answer: '}\n"
    "  max_turns: 1\n"
)
IDS = {"007", "calc", "greet"}


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    path = tmp_path_factory.mktemp("catalog") / "catalog.yaml"
    path.write_text(CATALOG_TEXT)
    return path


def synth(out, catalog, engine):
    return synth_run_with(out, engine, load_catalog(catalog), catalog=catalog)


@pytest.fixture(scope="module")
def run(tmp_path_factory, catalog):
    """A run with failed rows (greet's second shard met an engine failure), and an evaluation's rows."""
    root = tmp_path_factory.mktemp("readers")
    out = root / "out"
    synth(out, catalog, Fake(multi_turn=True))
    inputs = {r["sample_id"]: r["input"] for r in store.read_rows(store.inputs_path(out, "greet"))}
    shutil.rmtree(out)
    synth(out, catalog, Fake(multi_turn=True, broken={inputs[2], inputs[3]}))
    schema = row_schema(("sample_id", pa.int64()), ("score", pa.float64()))
    for prompt_id in ("007", "calc"):
        for system in ("teacher", "base"):
            rows = [{"prompt_id": prompt_id, "system": system, "sample_id": i, "score": i / 2} for i in range(3)]
            store.write_results(root / "eval", "toy", prompt_id, system, rows, schema)
    return out


def folders(out):
    """(folder, rows, prompt ids) of each table genpi writes."""
    return {
        "dialogues": (out / "dialogues", 15, IDS),
        "inputs": (out / "inputs", 15, IDS),
        "eval": (out.parent / "eval" / "toy", 12, {"007", "calc"}),
    }


def read_pandas(folder, cache):
    return pd.read_parquet(folder)


def read_arrow(folder, cache):
    return ds.dataset(folder, format="parquet").to_table().to_pandas()


def read_arrow_hive(folder, cache):  # what pandas asks of pyarrow: hive partitioning, which must find none
    return ds.dataset(folder, format="parquet", partitioning="hive").to_table().to_pandas()


def read_polars(folder, cache):
    return pl.read_parquet(folder).to_pandas()


def read_polars_glob(folder, cache):
    return pl.read_parquet(f"{folder}/**/*.parquet").to_pandas()


def read_duckdb(folder, cache):
    return duckdb.sql(f"SELECT * FROM read_parquet('{folder}/**/*.parquet')").df()


def read_datasets(folder, cache):
    from datasets import load_dataset

    return load_dataset("parquet", data_dir=str(folder), cache_dir=str(cache), split="train").to_pandas()


READERS = [read_pandas, read_arrow, read_arrow_hive, read_polars, read_polars_glob, read_duckdb, read_datasets]


@pytest.mark.parametrize("what", ["dialogues", "inputs", "eval"])
@pytest.mark.parametrize("reader", READERS, ids=lambda r: r.__name__.removeprefix("read_"))
def test_every_folder_reads_as_one_table_in_every_reader(run, what, reader, tmp_path):
    folder, n, ids = folders(run)[what]
    frame = reader(folder, tmp_path / "hf")
    assert len(frame) == n
    assert set(frame["prompt_id"]) == ids  # strings: `007` stays `007`
    assert list(frame.columns).count("prompt_id") == 1
    if what == "dialogues":
        assert set(frame.columns) == set(store.DIALOGUE_COLUMNS)
        calc = frame[frame["prompt_id"] == "calc"]
        assert sorted(calc["sample_id"]) == list(range(5)) and calc["error"].isna().all()
        assert frame["error"].notna().sum() == 2  # greet's failed rows are kept, as written
    if what == "eval":
        assert set(frame["system"]) == {"teacher", "base"}


def test_the_files_hold_their_keys_and_the_folders_are_plain(run):
    folder = run / "dialogues"
    assert sorted(p.name for p in folder.iterdir()) == sorted(IDS)
    assert not [p for p in run.parent.rglob("*") if "=" in p.name]
    one = store.read_rows(store.inputs_path(run, "007"))
    assert {r["prompt_id"] for r in one} == {"007"}  # a file copied alone still says its prompt


def legacy_copy(run, tmp_path):
    """The run as a genpi before issue 26 laid it out: hive folders over files that hold the column."""
    old = tmp_path / "old"
    shutil.copytree(run, old)
    for folder in (old / "dialogues").iterdir():
        folder.rename(folder.with_name(f"prompt_id={folder.name}"))
    manifest = read_manifest(old)
    manifest["prompts"]["calc"]["write_errors"] = {"dialogues/prompt_id=calc/part-00009.parquet": "OSError: full"}
    write_manifest(old, manifest)
    return old


def test_the_legacy_layout_is_what_pandas_refused(run, tmp_path):
    old = legacy_copy(run, tmp_path)
    with pytest.raises(Exception, match="prompt_id"):
        pd.read_parquet(old / "dialogues")


def test_a_legacy_run_still_opens_in_sql_stats_training_reads_and_export(run, catalog, tmp_path):
    old = legacy_copy(run, tmp_path)
    result = run_sql(old, "SELECT prompt_id, count(*) AS n FROM dialogues GROUP BY ALL ORDER BY 1")
    assert result.rows == [("007", 5), ("calc", 5), ("greet", 5)]
    assert [s["rows"] for s in quality_stats(old)] == [s["rows"] for s in quality_stats(run)] == [5, 5, 5]
    calc = next(e for e in load_catalog(catalog) if e.id == "calc")
    assert prompt_rows(old, calc) == prompt_rows(run, calc)
    front = export(old, tmp_path / "export")
    assert front["num_rows"] == export(run, tmp_path / "export-new")["num_rows"]


def test_a_resumed_legacy_run_moves_to_plain_folders_and_redoes_nothing(run, catalog, tmp_path, monkeypatch):
    old = legacy_copy(run, tmp_path)

    class Stop(Exception):
        pass

    def stop(**kwargs):
        raise Stop

    # the real synthesize, up to the engines' start (Ray): its checks, the lock, the manifest and the layout
    monkeypatch.setattr(synth_run, "init_ray", stop)
    with pytest.raises(Stop):
        synth_run.synthesize(catalog, old, SETTINGS, options=OPTIONS)
    assert sorted(p.name for p in (old / "dialogues").iterdir()) == sorted(IDS)
    calc = read_manifest(old)["prompts"]["calc"]
    assert calc["write_errors"] == {"dialogues/calc/part-00009.parquet": "OSError: full"}
    engine = Fake(multi_turn=True)
    synth(old, catalog, engine)  # the resume goes on: only greet's failed samples are redone
    assert len(engine.agent_inputs) == 2
    assert len(pd.read_parquet(old / "dialogues")) == 15


def test_a_prompt_in_both_layouts_is_refused(run, tmp_path):
    old = legacy_copy(run, tmp_path)
    shutil.copytree(old / "dialogues" / "prompt_id=calc", old / "dialogues" / "calc")
    with pytest.raises(InputError, match="twice"):
        store.upgrade_layout(old)


def test_an_evaluation_rewritten_over_legacy_rows_does_not_count_them_twice(tmp_path):
    schema = row_schema(("score", pa.float64()))
    legacy = store.legacy_results_path(tmp_path, "toy", "calc", "base")
    store.write_table(legacy, [{"prompt_id": "calc", "system": "base", "score": 0.0}], schema)
    store.write_table(
        store.legacy_results_path(tmp_path, "toy", "calc", "teacher"),
        [{"prompt_id": "calc", "system": "teacher", "score": 1.0}],
        schema,
    )
    assert len(store.results_files(tmp_path, "toy", "calc")) == 2  # legacy files are found
    store.write_results(
        tmp_path, "toy", "calc", "base", [{"prompt_id": "calc", "system": "base", "score": 0.5}], schema
    )
    assert not legacy.exists() and not legacy.parent.exists()
    files = store.results_files(tmp_path, "toy", "calc")
    rows = duckdb.execute("SELECT system, score FROM read_parquet(?) ORDER BY 1", [[str(f) for f in files]]).fetchall()
    assert rows == [("base", 0.5), ("teacher", 1.0)]


# --- genpi export ---


def front_matter(folder):
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    head, body = text.removeprefix("---\n").split("\n---\n", 1)
    return yaml.safe_load(head), body


def assert_chat(messages, prompt=()):
    """TRL's conversational form: optional system first, then user/assistant alternating from user, ending on the
    assistant."""
    assert [dict(m) for m in messages[: len(prompt)]] == list(prompt)
    roles = [m["role"] for m in messages[len(prompt) :]]
    if prompt and prompt[0]["role"] == "system":
        roles = [m["role"] for m in messages[1:]]
    assert roles and roles[0] == "user" and roles[-1] == "assistant"
    assert all(a != b for a, b in zip(roles, roles[1:])) and set(roles) == {"user", "assistant"}


def test_the_messages_of_a_row_alternate_and_end_on_the_teacher():
    row = {
        "prompt_id": "calc",
        "sample_id": 0,
        "input": "x",
        "turns": [
            {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "o1"},
            {"role": "assistant", "content": "a2"},
            {"role": "user", "content": "o2"},  # after the last agent turn: dropped
        ],
    }
    assert [m["content"] for m in dialogue_messages(row)] == ["x", "a1", "o1", "a2"]
    with pytest.raises(ValueError, match="no teacher turn"):
        dialogue_messages(dict(row, turns=[]))


def test_export_messages_is_a_chat_dataset_datasets_loads_with_a_card(run, catalog, tmp_path):
    from datasets import load_dataset

    to = tmp_path / "export"
    assert genpi(["export", str(run), "--to", str(to)]) == 0
    data = load_dataset(str(to), cache_dir=str(tmp_path / "hf"))
    front, body = front_matter(to)
    assert set(data) == {"train", "test"} and len(data["train"]) + len(data["test"]) == 13  # 2 failed rows left out
    assert {s: len(data[s]) for s in data} == front["num_rows"]
    assert set(data["test"]["split"]) == {"heldout"} and set(data["train"]["split"]) == {"train"}
    for row in data["train"]:
        assert_chat(row["messages"])
        assert row["messages"][0]["content"] == row["input"] and "turns" not in row and "error" not in row
    calc = [r for r in data["train"] if r["prompt_id"] == "calc"]
    assert [m["content"] for m in calc[0]["messages"]] == [
        calc[0]["input"],
        "Act: compute(1+1)",
        "Result: 2",
        "Act: answer(2)",
    ]
    by_dir = load_dataset("parquet", data_dir=str(to), cache_dir=str(tmp_path / "hf2"))
    assert {s: len(by_dir[s]) for s in by_dir} == front["num_rows"]

    entries = {e.id: e for e in load_catalog(catalog)}
    assert [(p["id"], p["sha256"]) for p in front["prompts"]] == [(i, entries[i].sha256) for i in sorted(IDS)]
    greet = next(p for p in front["prompts"] if p["id"] == "greet")
    assert greet["failed"] == 2 and greet["train"] + greet["test"] == 3
    assert front["generator_model"] == front["target_model"] == "fake"
    assert front["license"] == "other" and front["format"] == "messages" and front["with_prompt"] is False
    assert front["size_categories"] == ["n<1K"] and "text-generation" in front["task_categories"]
    assert {f["split"] for f in front["configs"][0]["data_files"]} == {"train", "test"}
    assert "% max turns" in body and "% invalid final" in body  # genpi stats' quality table
    assert entries["calc"].sha256 in body and "## How it was made" in body


def test_export_with_prompt_leads_each_dialogue_with_p(run, catalog, tmp_path):
    from datasets import load_dataset

    to = tmp_path / "export"
    front = export(run, to, "messages", with_prompt=True, prompts=["calc"], license="cc-by-4.0")
    assert front_matter(to)[0]["license"] == "cc-by-4.0" and [p["id"] for p in front["prompts"]] == ["calc"]
    p = next(e for e in load_catalog(catalog) if e.id == "calc").messages()
    data = load_dataset(str(to), cache_dir=str(tmp_path / "hf"))
    for row in [*data["train"], *data["test"]]:
        assert row["messages"][0] == {"role": "system", "content": p[0]["content"]}
        assert_chat(row["messages"], p)
        assert row["messages"][len(p)] == {"role": "user", "content": row["input"]}


def test_export_jsonl_and_parquet(run, tmp_path):
    from datasets import load_dataset

    export(run, tmp_path / "jsonl", "jsonl")
    lines = [json.loads(x) for x in (tmp_path / "jsonl" / "data" / "train.jsonl").read_text().splitlines()]
    assert lines and all(set(r) >= {"messages", "prompt_id", "sample_id", "input"} for r in lines)
    for r in lines:
        assert_chat(r["messages"])
    data = load_dataset(str(tmp_path / "jsonl"), cache_dir=str(tmp_path / "hf"))
    assert len(data["train"]) == len(lines)

    export(run, tmp_path / "raw", "parquet")
    raw = pd.read_parquet(tmp_path / "raw" / "data")
    assert set(raw.columns) == set(store.DIALOGUE_COLUMNS) and len(raw) == 13 and raw["error"].isna().all()


def test_export_refuses_bad_input_with_exit_2(run, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert genpi(["export", str(run), "--to", str(tmp_path / "full")]) == 2
    assert "is not an empty folder" in capsys.readouterr().err
    assert genpi(["export", str(run), "--to", str(tmp_path / "e"), "--prompts", "nope"]) == 2
    assert "no dialogues of nope" in capsys.readouterr().err
    assert genpi(["export", str(tmp_path / "missing"), "--to", str(tmp_path / "e")]) == 2
    assert not (tmp_path / "e").exists()
    with pytest.raises(InputError, match="--format"):
        export(run, tmp_path / "e", "csv")


def test_a_genpi_run_folder_exports_its_data(run, tmp_path):
    shutil.copytree(run, tmp_path / "RUN" / "data")
    front = export(tmp_path / "RUN", tmp_path / "export")
    assert sum(front["num_rows"].values()) == 13


def test_open_dialogues_reads_the_column_not_a_path(run):
    con = open_dialogues(run)
    assert con.execute("SELECT DISTINCT typeof(prompt_id) FROM dialogues").fetchall() == [("VARCHAR",)]
    assert sorted(r[0] for r in con.execute("SELECT DISTINCT prompt_id FROM dialogues").fetchall()) == sorted(IDS)
