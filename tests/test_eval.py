"""`genpi eval fidelity`: first turn, whole episode and teacher-forced fidelity on held-out inputs."""

import json
import re
import subprocess
import sys

import duckdb
import pytest
import yaml
from conftest import REPO, cli_in_process, copy_into
from test_recipe import row, write_calc_dialogues

from genpi.catalog import load_catalog
from genpi.data.adapters import AdapterManifest, read_adapter_manifest, write_adapter
from genpi.train.qlora import LoraSettings, save_adapter
from genpi.train.recipe import TrainSettings, train_adapter

CATALOG = REPO / "tests" / "data" / "tiny.yaml"
CALC, GREET = load_catalog(CATALOG)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """12 train and 4 held-out calc dialogues."""
    return write_calc_dialogues(tmp_path_factory.mktemp("data"), 16, heldout_from=12)


def train_sft(base, folder, lambdas=None):
    settings = TrainSettings(
        method="sft",
        epochs=6,
        lr=1e-2,
        batch_size=4,
        micro_batch=4,
        max_length=512,
        quantize=False,
        lora=LoraSettings(r=8, alpha=16, dropout=0.0),
    )
    model, metrics = train_adapter(base, CALC, [row(i) for i in range(12)], [], settings)
    manifest = AdapterManifest(
        "calc", CALC.sha256, base, "sft", None, settings.lora.to_dict(), "test", metrics, settings={"lambdas": lambdas}
    )
    write_adapter(folder / "calc", manifest, lambda tmp: save_adapter(model, tmp))
    return folder


@pytest.fixture
def adapters(calc_sft_adapters, tmp_path):
    """The session's SFT adapter for calc (conftest), copied: an evaluation records its metrics in its genpi.json."""
    return copy_into(calc_sft_adapters, tmp_path)


def run_eval(*args):
    command = [sys.executable, "-m", "genpi.cli", "eval", *map(str, args)]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_fidelity_against_the_teacher(data, adapters, tiny_trainable_model, tmp_path):
    out = tmp_path / "eval"
    result = run_eval(
        "fidelity",
        data,
        "--catalog",
        CATALOG,
        "--adapters",
        f"sft={adapters}",
        "--base",
        tiny_trainable_model,
        "--max-new-tokens",
        "12",
        "--max-turns",
        "2",
        "--out",
        out,
        "--json",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    [calc, greet] = sorted(summary["results"], key=lambda r: r["prompt_id"])
    assert greet["skipped"].startswith("no held-out rows")
    assert "unmerged LoRA on the unquantized base, float32 on cpu" in summary["served_as"]
    assert calc["inputs"] == 4 and set(calc["systems"]) == {"teacher", "base", "sft"}
    assert calc["heldout_used_for_lambda"] == {"sft": True}  # λ chosen among 2 values on these rows

    con = duckdb.connect()
    rows = con.execute(
        f"SELECT * FROM read_parquet('{out}/fidelity/**/*.parquet', hive_partitioning=true) ORDER BY system, sample_id"
    ).fetchall()
    names = [d[0] for d in con.description]
    rows = [dict(zip(names, r)) for r in rows]
    assert len(rows) == 12 and {r["sample_id"] for r in rows} == {12, 13, 14, 15}
    teacher = {r["sample_id"]: r for r in rows if r["system"] == "teacher"}
    for r in rows:  # every stored score follows from the stored texts
        assert r["in_action_space"] == bool(re.search(CALC.valid_action, r["reply"].strip()))
        assert r["turns"][0]["content"] == r["reply"] and 1 <= r["n_turns"] <= 2
        assert r["turns_valid"] == [
            bool(re.search(CALC.valid_action, t["content"].strip())) for t in r["turns"] if t["role"] == "assistant"
        ]
        last = [t["content"] for t in r["turns"] if t["role"] == "assistant"][-1]
        assert r["ended_final"] == bool(re.search(CALC.final_action, last.strip()))  # the last agent turn is final
        assert r["tf_tokens"] > 0 and r["error"] is None
        assert r["checks"] == [
            {"name": "format", "passed": r["in_action_space"]}
        ]  # actions.valid is the check `format`
        assert [[c["passed"] for c in turn] for turn in r["turn_checks"]] == [[v] for v in r["turns_valid"]]
        if r["system"] == "teacher":
            assert r["tf_kl"] == 0.0 and r["rouge_l"] == 1.0
        else:
            assert r["tf_kl"] > 0
        if teacher[r["sample_id"]]["in_action_space"]:
            assert r["same_kind"] == (r["kind"] == teacher[r["sample_id"]]["kind"])
    m = calc["systems"]
    assert m["base"]["format_rate"] == 0.0 and m["sft"]["format_rate"] > 0.0
    assert m["sft"]["nll"] < m["base"]["nll"]  # the adapter learned the teacher's turns
    assert m["teacher"]["kl"] == 0.0 and m["sft"]["kl"] > 0
    assert calc["checks"] == [{"name": "format", "regex": CALC.valid_action}]
    for name, metrics in m.items():
        assert metrics["checks"]["format"]["first_turn"] == metrics["format_rate"]
        assert metrics["checks"]["format"]["all_turns"] == metrics["action_space_rate"]
        assert calc["retention"][name]["checks.format"] == calc["retention"][name]["format_rate"]
    assert calc["retention"]["teacher"]["rouge_l"] == 1.0 and calc["retention"]["teacher"]["nll"] == 1.0
    assert summary == json.loads((out / "fidelity.json").read_text())

    recorded = read_adapter_manifest(adapters / "calc").eval_metrics["fidelity"]
    assert (
        recorded["metrics"] == m["sft"] and recorded["teacher"] == m["teacher"] and recorded["heldout_used_for_lambda"]
    )
    assert not list((adapters / "calc").glob(".*.tmp"))

    table = run_eval(
        data,
        "--catalog",
        CATALOG,
        "--adapters",
        adapters,
        "--base",
        tiny_trainable_model,
        "--max-new-tokens",
        "4",
        "--max-turns",
        "1",
        "--limit",
        "1",
        "--out",
        tmp_path / "e2",
        "--no-record",
    )  # `genpi eval DATA`: the same
    assert table.returncode == 0, table.stderr[-3000:]
    assert (
        "retention" in table.stdout
        and "λ was chosen on these held-out rows" in table.stdout
        and "greet: skipped" in table.stdout
    )
    assert "check format: pass rate" in table.stdout


@pytest.mark.slow
def test_bad_input_exits_2(data, adapters, tiny_trainable_model, tiny_model, tmp_path, capsys):
    def refused(*args):  # in process; the command's exit status: `missing` below
        return cli_in_process(capsys, "eval", *args)

    base = ("--base", tiny_trainable_model)
    changed = tmp_path / "changed.yaml"
    entries = yaml.safe_load(CATALOG.read_text())
    entries[0]["system"] += " Be brief."
    changed.write_text(yaml.safe_dump(entries))
    code, err = refused("fidelity", data, "--catalog", changed, "--adapters", adapters, *base)
    assert code == 2 and "stale adapter" in err

    code, err = refused("fidelity", data, "--catalog", CATALOG, "--adapters", adapters, "--base", tiny_model)
    assert code == 2 and "trained on base model" in err

    empty = tmp_path / "empty"
    (empty / "calc").mkdir(parents=True)
    code, err = refused("fidelity", data, "--catalog", CATALOG, "--adapters", empty, *base)
    assert code == 2 and "no genpi.json" in err

    code, err = refused("fidelity", data, "--catalog", CATALOG, "--adapters", tmp_path, *base)
    assert code == 2 and "nothing to evaluate" in err and "calc: no adapter" in err

    no_heldout = write_calc_dialogues(tmp_path / "all-train", 4, heldout_from=4)
    code, err = refused("fidelity", no_heldout, "--catalog", CATALOG, "--adapters", adapters, *base)
    assert code == 2 and "no held-out rows" in err

    missing = run_eval("fidelity", data, "--catalog", CATALOG, "--adapters", tmp_path / "none", *base)
    assert missing.returncode == 2 and "no such folder" in missing.stderr
    code, err = refused(data, "--catalog", CATALOG, "--adapters", adapters, "--prompts", "calc,chat")
    assert code == 2 and "chat not in" in err
    code, err = refused(data, "--catalog", CATALOG, "--adapters", adapters, "--limit", "0")
    assert code == 2 and "--limit must be at least 1" in err


@pytest.mark.slow
def test_a_prompt_without_actions_skips_the_action_metrics_only(data, adapters, tiny_trainable_model, tmp_path):
    catalog = tmp_path / "no-actions.yaml"
    entries = yaml.safe_load(CATALOG.read_text())
    del entries[0]["actions"]  # the prompt itself (and its sha256) is unchanged
    entries[0]["checks"] = [{"name": "english", "language": "en"}, {"name": "json", "json_schema": {"type": "object"}}]
    catalog.write_text(yaml.safe_dump(entries))
    result = run_eval(
        "fidelity",
        data,
        "--catalog",
        catalog,
        "--adapters",
        adapters,
        "--base",
        tiny_trainable_model,
        "--prompts",
        "calc",
        "--max-new-tokens",
        "4",
        "--max-turns",
        "1",
        "--limit",
        "2",
        "--out",
        tmp_path / "eval",
        "--no-record",
        "--json",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [calc] = json.loads(result.stdout)["results"]
    assert calc["first_turn_actions"] == "skipped: the prompt has no actions.valid regex"
    for m in calc["systems"].values():
        assert (
            m["format_rate"] is m["kind_agreement"] is m["action_space_rate"] is m["final_rate"] is None
            and m["kinds"] == {}
        )
        assert m["nll"] > 0 and m["tf_tokens"] > 0 and m["rouge_l"] is not None  # teacher-forced and ROUGE-L still run
    assert calc["systems"]["teacher"]["kl"] == 0.0

    from genpi.checks import run_checks

    [entry] = load_catalog(catalog, ["calc"])
    con = duckdb.connect()
    rows = con.execute(
        f"SELECT system, reply, checks "
        f"FROM read_parquet('{tmp_path}/eval/fidelity/**/*.parquet', hive_partitioning=true)"
    ).fetchall()
    assert len(rows) == 6
    for system, reply, checks in rows:  # the checks the catalog names, no `format` without actions.valid
        assert {c["name"]: c["passed"] for c in checks} == run_checks(entry, reply)
        assert [c["name"] for c in checks] == ["english", "json"]
    for name, m in calc["systems"].items():
        replies = [reply for system, reply, _ in rows if system == name]
        assert m["checks"]["english"]["first_turn"] == sum(run_checks(entry, r)["english"] for r in replies) / 2


def test_a_corrupt_adapter_manifest_exits_2_naming_the_file(data, tiny_trainable_model, tmp_path, capsys):
    from genpi.eval.run import main

    adapters = tmp_path / "adapters"
    (adapters / "calc").mkdir(parents=True)
    (adapters / "calc" / "genpi.json").write_text('{"prompt_id": "calc", "prompt_sha256": ')
    assert (
        main(
            [
                "fidelity",
                str(data),
                "--catalog",
                str(CATALOG),
                "--adapters",
                str(adapters),
                "--base",
                tiny_trainable_model,
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert (
        err.startswith(f"genpi: error: {adapters / 'calc' / 'genpi.json'}: not a valid genpi adapter manifest")
        and err.count("\n") == 1
    )
