"""`genpi report`: Markdown and PNG plots from a small real run: hand-written dialogue shards (the real schema),
an adapter from `genpi train` (2 λ values), `genpi eval fidelity` and `genpi eval leakage` on the tiny Llama."""

import json
import re
import subprocess
import sys

import duckdb
import pytest
from conftest import REPO, copy_into
from PIL import Image

from genpi.eval.markdown import Rate, cell
from genpi.synth.stats import quality_stats

CATALOG = REPO / "tests" / "data" / "tiny.yaml"


def genpi(*args):
    """`genpi ARGS` in this process: a subprocess each costs seconds of imports, and the report is the point here (the
    commands' exit statuses: test_eval.py, test_report_of_a_missing_run_exits_2)."""
    from genpi.cli import main

    assert main([str(a) for a in args]) == 0


def numbers(value, found: set[str]) -> set[str]:
    """Every number in a JSON value (dict keys too), printed as the report prints numbers."""
    if isinstance(value, dict):
        for k, v in value.items():
            try:
                found.add(cell(float(k)))
            except ValueError:
                pass
            numbers(v, found)
    elif isinstance(value, list):
        for v in value:
            numbers(v, found)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        found |= {cell(value), cell(Rate(value))}
    return found


@pytest.mark.slow
def test_report_from_a_small_real_run(calc_dialogues, calc_genpi_trained, tiny_trainable_model, tmp_path):
    from genpi.catalog import load_catalog
    from genpi.data.manifest import new_manifest, write_manifest
    from genpi.engines import EngineConfig
    from genpi.synth.pipeline import SynthSettings, instruction_texts

    # the session's 10 calc dialogues and their `genpi train` adapter (λ 0.3 and 0.7; conftest), copied: the evaluations
    # and the report write into them
    trained, result = calc_genpi_trained
    assert result.returncode == 0, result.stderr[-3000:]
    run, adapters = copy_into(calc_dialogues, tmp_path, "run"), copy_into(trained, tmp_path, "adapters-genpi")
    engine = EngineConfig(model=tiny_trainable_model)
    write_manifest(
        run,
        new_manifest(
            CATALOG,
            load_catalog(CATALOG),
            engine,
            engine,
            SynthSettings(samples=10, heldout=0.2),
            32,
            instruction_texts(),
        ),
    )
    genpi(
        "eval",
        "fidelity",
        run,
        "--catalog",
        CATALOG,
        "--adapters",
        f"genpi={adapters}",
        "--base",
        tiny_trainable_model,
        "--max-new-tokens",
        "6",
        "--max-turns",
        "2",
    )
    genpi(
        "eval",
        "leakage",
        "--catalog",
        CATALOG,
        "--adapters",
        f"genpi={adapters}",
        "--base",
        tiny_trainable_model,
        "--max-new-tokens",
        "8",
        "--out",
        run / "eval",
    )
    out = tmp_path / "report" / "report.md"
    genpi("report", run, "--out", out)
    text = out.read_text()

    pngs = sorted(out.parent.glob("*.png"))
    assert {p.name for p in pngs} == set(re.findall(r"!\[[^]]*\]\(([^)]+)\)", text))
    assert {p.name for p in pngs} == {
        "report-retention.png",
        "report-per-turn.png",
        "report-leakage.png",
        "report-training.png",
    }
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(png) as image:
            image.verify()
        with Image.open(png) as image:
            assert image.format == "PNG" and image.size[0] > 100

    # every number in a table comes from the run's files
    eval_dir = run / "eval"
    allowed = numbers(json.loads((eval_dir / "fidelity.json").read_text()), set())
    numbers(json.loads((eval_dir / "leakage.json").read_text()), allowed)
    numbers(json.loads((adapters / "calc" / "genpi.json").read_text()), allowed)
    numbers(quality_stats(run), allowed)
    allowed |= {
        cell(Rate(v / 100)) for s in quality_stats(run) for v in s.values() if isinstance(v, float)
    }  # its percentages
    per_turn = (
        duckdb.connect()
        .execute(
            f"SELECT system, k, avg(turns_valid[k]::DOUBLE) "
            f"FROM read_parquet('{eval_dir}/fidelity/**/*.parquet', hive_partitioning=true), "
            "range(1, 3) t(k) WHERE len(turns_valid) >= k GROUP BY ALL"
        )
        .fetchall()
    )
    allowed |= {cell(Rate(rate)) for _, _, rate in per_turn}
    lines = text.splitlines()
    table_rows = [
        line
        for i, line in enumerate(lines)
        if line.startswith("| ") and not (i + 1 < len(lines) and lines[i + 1].startswith("|---"))
    ]
    checked = 0
    for line in table_rows:
        for value in line.strip("| ").split(" | ")[1:]:
            if re.fullmatch(r"-?\d+(\.\d+)?%?", value):
                assert value in allowed, f"{value} in {line!r} is not in the run's files"
                checked += 1
    assert checked > 50

    opening = text.split("## Synthesis")[0]  # the verdict comes first
    assert (
        "without the prompt, the `genpi` adapter" in opening
        and "of the KL gap to the teacher (95% interval [" in opening
    )
    for heading in (
        "## Synthesis",
        "## Fidelity without the prompt",
        "### calc (2 held-out inputs)",
        "## Prompt leakage",
        "## Training",
    ):
        assert heading in text
    assert (
        "Held-out teacher KL (which chose λ) and loss per λ, genpi/calc" in text
        and "λ of genpi was chosen by the teacher KL on these held-out rows" in text
    )
    assert "samples 10, heldout 0.2" in text and "synthesis settings" not in text.split("## Missing")[1]
    assert "loss per step" not in text.split("## Missing")[1]  # genpi train recorded the curve
    assert "| calc | 2.000 |" in text  # gold turns, from the manifest
    assert "fidelity of greet: no held-out rows" in text and "leakage of greet: no adapter" in text


def test_report_of_a_missing_run_exits_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "genpi.cli", "report", str(tmp_path / "none")], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 2 and "no such run folder" in result.stderr and not (tmp_path / "none").exists()
