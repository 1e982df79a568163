"""End to end with the bundled SmolLM2-135M-Instruct: the README's first command, run once for the module.

The run is the demo preset (genpi/presets/demo.yaml) with its first method only, without what the internalization
check does not need (SIZES). `genpi` trains in 4 of the demo's 11 minutes and is trained end to end on the tiny
model by tests/test_run.py, while `topk-kl` is the method the demo's internalization target is measured on. Both
tests read the same run: one the dialogues through `genpi stats` and `genpi sql`, one every stage's output."""

import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import EXAMPLES, REPO

from genpi.catalog import load_catalog

pytestmark = [pytest.mark.slow, pytest.mark.alone]  # end to end, on both cores (conftest)

DEMO = REPO / "genpi" / "presets" / "demo.yaml"
PROMPT = "bakery-fr"  # the demo's prompt
# The demo as it is, less what its internalization check does not need: the on-policy reverse KL (tested on the tiny
# model, tests/test_gap.py) and a second efficiency turn (tests/test_efficiency.py). Not fewer rows or steps: about
# two thirds of bakery-fr's teacher turns loop (skipped in training, left out of the KL gap), and at 40 dialogues
# (24 train, 16 held out) the adapter learnt from 8 rows and its gap's interval reached below 0 ([-27%, 59%]); at 32
# (8 held out) the gap rested on one held-out dialogue in 1 of 5 runs.
SIZES = {"eval": {"onpolicy_samples": 0}, "efficiency": {"turns": 1}}


def genpi(*args, timeout=900):
    env = dict(os.environ, RAY_ADDRESS="local")
    return subprocess.run(
        [sys.executable, "-m", "genpi.cli", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The README's command with the demo preset and SIZES, `--methods topk-kl`: (run folder, the finished process)."""
    folder = tmp_path_factory.mktemp("e2e")
    config = yaml.safe_load(DEMO.read_text())
    for section, sizes in SIZES.items():
        config[section].update(sizes)
    (folder / "demo.yaml").write_text(yaml.safe_dump(config))
    run = folder / "run"
    command = ["run", str(EXAMPLES), "--out", str(run), "--config", str(folder / "demo.yaml"), "--methods", "topk-kl"]
    command.append("--no-progress")
    done = genpi(*command, timeout=2400)
    assert done.returncode == 0, done.stderr[-3000:]
    return run, done


def test_the_demos_dialogues_through_stats_and_sql(demo_run):
    run, _ = demo_run
    data = run / "data"
    # SmolLM2 often rambles past the input token limit, and cut inputs are dropped: how many of the 48 asked for
    # survive depends on the CPU's rounding, so the test takes the count the manifest records and checks the rest
    n = json.loads((data / "manifest.json").read_text())["prompts"][PROMPT]["inputs"]
    assert n >= 36 and PROMPT in (data / "stats.txt").read_text()  # the quality table is written

    stats = genpi("stats", str(data), "--json")
    assert stats.returncode == 0, stats.stderr
    [row] = json.loads(stats.stdout)
    assert row["prompt_id"] == PROMPT and row["rows"] == n and row["failed"] == 0
    assert row["gold_turns"] == 1 and 1 <= row["avg_turns"] <= row["max_turns"] == 2  # one-turn shots, 2 allowed

    query = (
        "SELECT sample_id, prompt_sha256, input, turns, student_output, reason, target_model "
        "FROM dialogues ORDER BY sample_id"
    )
    sql = genpi("sql", str(data), query, "--json")
    assert sql.returncode == 0, sql.stderr
    rows = json.loads(sql.stdout)
    [entry] = [e for e in load_catalog(EXAMPLES) if e.id == PROMPT]
    assert [r["sample_id"] for r in rows] == list(range(n))
    for r in rows:
        assert r["prompt_sha256"] == entry.sha256 and r["target_model"] == "SmolLM2-135M-Instruct"
        assert r["input"].strip() and r["input"] not in entry.input_examples
        assert r["turns"][0]["role"] == "assistant" and r["turns"][0]["content"].strip()
        assert r["student_output"].strip() and r["reason"].strip()


def test_the_demo_from_catalog_to_report(demo_run):
    """Every stage with the bundled model, ending in an adapter that acts like the teacher without P."""
    run, done = demo_run
    stages = json.loads((run / "run.json").read_text())["stages"]
    assert list(stages) == ["synth", "stats", "train topk-kl", "eval fidelity", f"eval efficiency {PROMPT}", "report"]
    assert all(s["status"] == "done" for s in stages.values())
    n = json.loads((run / "data" / "manifest.json").read_text())["prompts"][PROMPT]["inputs"]
    heldout = round(n * 0.25)  # the preset holds out a quarter
    manifest = json.loads((run / "adapters" / "topk-kl" / PROMPT / "genpi.json").read_text())
    assert manifest["method"] == "topk-kl" and manifest["train_metrics"]["data_rows"] == n - heldout
    assert manifest["train_metrics"]["steps"] == 72 and manifest["eval_metrics"]["fidelity"]["inputs"] == heldout
    systems = json.loads((run / "eval" / "fidelity.json").read_text())["results"][0]["systems"]
    assert set(systems) == {"teacher", "base", "topk-kl"} and systems["topk-kl"]["reverse_kl"] is None  # SIZES
    # internalization, not a copy of the base: the teacher answers in French, the base does not, the demo's adapter
    # without P does most of the time and closes part of the KL gap (the base: 0, the teacher: 1). Measured over
    # runs of this test (each synthesizes its own data): 11 or 12 of 12 French first replies; 43%, 45%, 49%, 54%,
    # 42% and 24% of the gap. The gap rests on the held-out dialogues whose teacher turns do not loop (4 or 5 of 12),
    # so its interval is wide and once reached below 0 ([-14%, 52%]): the test asks for the estimate only.
    french = {name: m["checks"]["french"]["first_turn"] for name, m in systems.items()}
    assert french["teacher"] >= 0.5 and french["base"] <= 0.25 and french["topk-kl"] >= 0.5 * french["teacher"], french
    topk = systems["topk-kl"]
    lo, hi = topk["kl_gap_closed_ci"]
    assert topk["kl_gap_closed"] >= 0.15 and lo <= topk["kl_gap_closed"] <= hi, topk
    [efficiency] = json.loads((run / "eval" / "efficiency.json").read_text())["results"]
    assert efficiency["prompt_id"] == PROMPT and efficiency["latency"]["repeats"] == 1  # the demo's repeats
    assert efficiency["conversation"].startswith(f"held-out dialogues of {run / 'data'}: 1 agent turns")  # SIZES
    report = run / "report" / "report.md"
    text = report.read_text()
    assert f"report: {report}" in done.stderr and "without the prompt, the `" in text.split("## Synthesis")[0]
    plots = list(report.parent.glob("*.png"))
    assert plots and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)
