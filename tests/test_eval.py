"""`genpi eval`: action-format rate on held-out inputs for base without P, adapter, base with P."""

import json
import re
import subprocess
import sys

import pytest
import yaml

from conftest import REPO
from genpi.catalog import load_catalog
from genpi.train.adapters import AdapterManifest, read_adapter_manifest, write_adapter
from genpi.train.qlora import LoraSettings, save_adapter
from genpi.train.recipe import TrainSettings, train_adapter
from test_recipe import row, write_calc_dialogues

CATALOG = REPO / "tests" / "data" / "tiny.yaml"
CALC, GREET = load_catalog(CATALOG)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """12 train and 4 held-out calc dialogues."""
    return write_calc_dialogues(tmp_path_factory.mktemp("data"), 16, heldout_from=12)


@pytest.fixture(scope="module")
def adapters(data, tiny_trainable_model, tmp_path_factory):
    """An SFT adapter for calc on the tiny Llama: it learns to open with an `Act: ...(...)` action."""
    settings = TrainSettings(method="sft", epochs=6, lr=1e-2, batch_size=4, micro_batch=4, max_length=512, quantize=False,
                             lora=LoraSettings(r=8, alpha=16, dropout=0.0))  # fmt: skip
    train = [row(i) for i in range(12)]
    model, metrics = train_adapter(tiny_trainable_model, CALC, train, [], settings)
    folder = tmp_path_factory.mktemp("adapters")
    manifest = AdapterManifest("calc", CALC.sha256, tiny_trainable_model, "sft", None, settings.lora.to_dict(), "test", metrics)
    write_adapter(folder / "calc", manifest, lambda tmp: save_adapter(model, tmp))
    return folder


def run_eval(data, adapters, *extra, catalog=CATALOG):
    command = [sys.executable, "-m", "genpi.cli", "eval", str(data), "--catalog", str(catalog), "--adapters", str(adapters), *extra]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_adapter_answers_in_the_action_format_where_the_base_does_not(data, adapters, tiny_trainable_model, tmp_path):
    report = tmp_path / "report.json"
    result = run_eval(data, adapters, "--base", tiny_trainable_model, "--max-new-tokens", "16", "--report", str(report))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "calc" in result.stdout and "greet" in result.stdout and "no adapter at" in result.stdout

    [calc, greet] = sorted(json.loads(report.read_text()), key=lambda r: r["prompt_id"])
    assert greet["skipped"].startswith("no adapter at")
    assert calc["inputs"] == 4 and [r["input"] for r in calc["replies"]] == [row(i)["input"] for i in range(12, 16)]
    rates = {c: m["format_rate"] for c, m in calc["conditions"].items()}
    assert rates["base"] == 0.0 and rates["adapter"] > rates["base"]
    for reply in calc["replies"]:  # every score is the regex on the stored reply
        for condition in ("base", "adapter", "base+P"):
            text = reply[condition]["text"]
            assert reply[condition]["valid"] == bool(re.search(CALC.valid_action, text.strip()))
    assert calc["conditions"]["base+P"]["prompt_tokens"] > calc["conditions"]["base"]["prompt_tokens"] + 40  # P is in front
    assert calc["conditions"]["adapter"]["prompt_tokens"] == calc["conditions"]["base"]["prompt_tokens"]

    recorded = read_adapter_manifest(adapters / "calc").eval_metrics
    assert recorded["format_rate"] == rates and recorded["format_inputs"] == 4
    assert not list((adapters / "calc").glob(".*.tmp"))


def test_bad_input_exits_2(data, adapters, tmp_path):
    changed = tmp_path / "changed.yaml"
    entries = yaml.safe_load(CATALOG.read_text())
    entries[0]["system"] += " Be brief."
    changed.write_text(yaml.safe_dump(entries))
    stale = run_eval(data, adapters, catalog=changed)
    assert stale.returncode == 2 and "stale adapter" in stale.stderr

    nothing = run_eval(data, tmp_path / "none")
    assert nothing.returncode == 2 and "nothing to evaluate" in nothing.stderr and "calc: no adapter" in nothing.stderr

    unknown = run_eval(data, adapters, "--prompts", "calc,chat")
    assert unknown.returncode == 2 and "chat not in" in unknown.stderr
    limit = run_eval(data, adapters, "--limit", "0")
    assert limit.returncode == 2 and "--limit must be at least 1" in limit.stderr
