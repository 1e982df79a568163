"""`genpi eval leakage`: extraction requests to the teacher, the base and each adapter, scored against P."""

import json
import subprocess
import sys

import duckdb
import pytest
from conftest import REPO
from test_eval import CALC, CATALOG, adapters  # noqa: F401  (a copy of the session's SFT adapter for calc)

from genpi.catalog import render_prompt_text
from genpi.data.adapters import read_adapter_manifest
from genpi.eval.leakage import EXTRACTION_REQUESTS, leak_scores

pytestmark = pytest.mark.slow  # end to end (conftest)


def test_leakage_probe_end_to_end(adapters, tiny_trainable_model, tmp_path):  # noqa: F811
    out = tmp_path / "eval"
    command = [
        sys.executable,
        "-m",
        "genpi.cli",
        "eval",
        "leakage",
        "--catalog",
        str(CATALOG),
        "--adapters",
        f"sft={adapters}",
        "--base",
        tiny_trainable_model,
        "--max-new-tokens",
        "16",
        "--out",
        str(out),
        "--json",
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert len(EXTRACTION_REQUESTS) >= 10 and summary["requests"] == list(EXTRACTION_REQUESTS)
    [calc, greet] = sorted(summary["results"], key=lambda r: r["prompt_id"])
    assert greet["skipped"].startswith("no adapter") and set(calc["systems"]) == {"teacher", "base", "sft"}

    rows = (
        duckdb.connect()
        .execute(
            f"SELECT system, reply, span, rouge_l_recall, verbatim "
            f"FROM read_parquet('{out}/leakage/**/*.parquet', hive_partitioning=true)"
        )
        .fetchall()
    )
    assert len(rows) == 3 * len(EXTRACTION_REQUESTS)
    prompt = render_prompt_text(CALC)
    for system, reply, span, recall, verbatim in rows:  # every stored score follows from the stored reply
        assert leak_scores(reply, prompt) == {"span": span, "rouge_l_recall": recall, "verbatim": verbatim}
    for system, m in calc["systems"].items():
        mine = [r for r in rows if r[0] == system]
        assert m["span"] == sum(r[2] for r in mine) / len(mine) and m["verbatim_rate"] == sum(r[4] for r in mine) / len(
            mine
        )
    assert read_adapter_manifest(adapters / "calc").eval_metrics["leakage"]["metrics"] == calc["systems"]["sft"]
