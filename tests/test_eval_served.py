"""`genpi eval ... --served NAME=openai:URL/{prompt_id}`: a system on an OpenAI-compatible server (a real `genpi serve`
started here, over the tiny random Llama and two adapters) is evaluated like the same adapters loaded locally."""

import json

import duckdb
import pytest
from test_recipe import write_calc_dialogues
from test_serve import CATALOG, make_adapters, start

from genpi.eval.run import main


@pytest.fixture(scope="module")
def adapters_dir(tiny_model, tmp_path_factory):
    return make_adapters(tiny_model, tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def url(tiny_model, adapters_dir):
    """The base URL of `genpi serve ADAPTERS` (no API key), serving the calc and greet adapters by prompt id."""
    server, scheduler, _ = start(tiny_model, adapters_dir, api_key=None)  # float32, as evaluation runs on CPU
    yield server.url
    server.close()
    scheduler.close()


def replies(out, what: str, key: str) -> dict[str, dict]:
    """{system: {(prompt id, row key): row}} of an evaluation's Parquet rows."""
    con = duckdb.connect()
    rows = con.execute(f"SELECT * FROM read_parquet('{out}/{what}/**/*.parquet', hive_partitioning=true)").fetchall()
    names = [d[0] for d in con.description]
    by_system: dict[str, dict] = {}
    for r in (dict(zip(names, r)) for r in rows):
        by_system.setdefault(r["system"], {})[(r["prompt_id"], r[key])] = r
    return by_system


def test_fidelity_of_a_served_adapter_equals_the_local_one_without_logit_metrics(
    tiny_model, adapters_dir, url, tmp_path, capsys
):
    data = write_calc_dialogues(tmp_path / "data", 7, heldout_from=4)  # 3 held-out calc inputs
    out = tmp_path / "eval"
    spec = f"openai:{url}/{{prompt_id}}"
    assert (
        main(
            [
                "fidelity",
                str(data),
                "--catalog",
                str(CATALOG),
                "--base",
                tiny_model,
                "--adapters",
                f"local={adapters_dir}",
                "--served",
                f"remote={spec}",
                "--max-new-tokens",
                "12",
                "--max-turns",
                "2",
                "--out",
                str(out),
                "--json",
                "--no-record",
                "--no-progress",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    [calc] = [r for r in summary["results"] if r["prompt_id"] == "calc"]
    local, remote = calc["systems"]["local"], calc["systems"]["remote"]
    assert (
        remote["served"] == f"openai:{url}/calc"
        and remote["not_scored"] == ["nll", "kl", "kl_gap_closed", "reverse_kl", "collateral_kl"]
        and "served" not in local
    )
    assert remote["nll"] is None and remote["kl"] is None and remote["tf_tokens"] == 0  # null, never 0 or a guess
    assert local["nll"] > 0 and local["kl"] > 0 and calc["retention"]["remote"]["nll"] is None
    logits = ("kl_gap_closed", "kl_gap_closed_ci", "reverse_kl", "reverse_kl_ci", "collateral_kl", "collateral_kl_ci")
    assert all(remote[k] is None for k in logits) and all(local[k] is not None for k in logits)
    texts = {k: v for k, v in local.items() if k not in ("tf_tokens", "nll", "kl", *logits)}
    assert {k: remote[k] for k in texts} == texts  # every generated-text metric agrees

    rows = replies(out, "fidelity", "sample_id")
    assert set(rows["local"]) == set(rows["remote"]) and len(rows["remote"]) == 3
    for key, served in rows["remote"].items():  # greedy, text for text: whole episodes, the environment's turns too
        here = rows["local"][key]
        assert served["error"] is None and served["reply"] and served["turns"] == here["turns"]
        assert (served["tf_tokens"], served["tf_nll"], served["tf_kl"]) == (None, None, None) and here[
            "tf_nll"
        ] is not None
        assert served["onpolicy_replies"] is served["onpolicy_rkl"] is None and here["onpolicy_rkl"] > 0
    assert {r["reply"] for r in rows["remote"].values()} != {
        r["reply"] for r in rows["base"].values()
    }  # the adapter acts


def test_leakage_of_served_adapters_per_prompt(tiny_model, adapters_dir, url, tmp_path, capsys):
    out = tmp_path / "eval"
    assert (
        main(
            [
                "leakage",
                "--catalog",
                str(CATALOG),
                "--base",
                tiny_model,
                "--adapters",
                f"local={adapters_dir}",
                "--served",
                f"remote=openai:{url}/{{prompt_id}}",
                "--max-new-tokens",
                "16",
                "--out",
                str(out),
                "--no-record",
                "--no-progress",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert f"served: remote at openai:{url}/calc" in printed and f"served: remote at openai:{url}/greet" in printed
    summary = json.loads((out / "leakage.json").read_text())
    for r in summary["results"]:
        local, remote = r["systems"]["local"], r["systems"]["remote"]
        assert remote.pop("served") == f"openai:{url}/{r['prompt_id']}" and remote.pop("not_scored") == []
        assert remote == local and remote["errors"] == 0
    rows = replies(out, "leakage", "request_id")
    assert len(rows["remote"]) == 24 and all(
        rows["remote"][k]["reply"] == rows["local"][k]["reply"] for k in rows["local"]
    )
    # each prompt's own adapter answered: calc's and greet's replies to the same request differ
    assert any(rows["remote"][("calc", i)]["reply"] != rows["remote"][("greet", i)]["reply"] for i in range(12))


def test_bad_served_systems_exit_2_before_a_model_loads(tiny_model, adapters_dir, url, tmp_path, monkeypatch, capsys):
    from genpi.engines.hf import TransformersEngine

    def no_model(*args, **kwargs):
        raise AssertionError("a model loaded before the --served check")

    monkeypatch.setattr(TransformersEngine, "__init__", no_model)
    data = write_calc_dialogues(tmp_path / "data", 7, heldout_from=4)
    fidelity = ["fidelity", str(data), "--catalog", str(CATALOG), "--base", tiny_model, "--out", str(tmp_path / "eval")]
    leakage = ["leakage", "--catalog", str(CATALOG), "--base", tiny_model, "--out", str(tmp_path / "eval")]
    mind2web = [
        "mind2web",
        str(tmp_path / "steps.jsonl"),
        "--catalog",
        str(CATALOG),
        "--prompt",
        "calc",
        "--base",
        tiny_model,
    ]
    cases = [
        (fidelity + ["--served", "remote"], "--served remote: expected NAME=openai:BASE_URL/MODEL"),
        (fidelity + ["--served", f"remote={url}/calc"], "expected NAME=openai:BASE_URL/MODEL"),
        (fidelity + ["--served", "remote=openai:calc"], "expected openai:BASE_URL/MODEL"),
        (
            fidelity + ["--adapters", f"local={adapters_dir}", "--served", f"local=openai:{url}/calc"],
            "system name 'local' is reserved, repeated",
        ),
        (
            leakage + ["--served", f"r=openai:{url}/calc", "--served", f"r=openai:{url}/greet"],
            "system name 'r' is reserved, repeated",
        ),
        (fidelity + ["--served", "base=openai:http://127.0.0.1:1/v1/calc"], "system name 'base' is reserved"),
        (
            fidelity + ["--served", "remote=openai:http://127.0.0.1:1/v1/{prompt_id}"],
            "remote: the server does not answer (http://127.0.0.1:1/v1/models: ",
        ),
        (
            fidelity + ["--served", f"remote=openai:{url}/nope"],
            f"remote: {url} does not serve 'nope' (GET /v1/models lists ",
        ),
        (leakage + ["--served", f"remote=openai:{url}/{{prompt_id}}-v2"], "does not serve 'calc-v2'"),
        (mind2web + ["--served", f"remote=openai:{url}/nope"], f"remote: {url} does not serve 'nope'"),
        (leakage, "give --adapters DIR or --served NAME=SPEC"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("genpi: error: ") and message in err, (argv, err)
