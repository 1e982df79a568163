"""`genpi eval efficiency`: the analytic count against torch's FLOP counter, the shared-prefix saving, the command
end to end on the tiny Llama (rows, summary, plot, report section) and its bad-input refusals. Timings are not
asserted."""

import json
import re
import subprocess
import sys

import duckdb
import pytest
import torch
from conftest import EXAMPLES, REPO, cli_in_process
from test_eval_report import numbers
from test_recipe import write_calc_dialogues

from genpi.catalog import load_catalog
from genpi.eval.cost import LORA, MERGED, REGIMES, WITH_P, Conversation, decode_macs, dims_of, prefill_macs, read_config
from genpi.eval.cost_measure import _flop_counter, counted_flops, replay, tokenize

CATALOG = REPO / "tests" / "data" / "tiny.yaml"
CALC = load_catalog(CATALOG)[0]
PAIRS = [
    ("List the files.", "Think: look.\nAct: bash\n\n```bash\nls\n```"),
    ("The output of the OS:\na b", "Think: done.\nAct: answer(2)"),
]


def run_cli(*args):
    command = [sys.executable, "-m", "genpi.cli", "eval", "efficiency", *map(str, args)]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)


def analytic_eager(dims, conv: Conversation, regime: str) -> list[int]:
    """FLOPs per turn as eager attention computes them (each prefill block's masked scores included)."""
    return [
        2 * (prefill_macs(dims, t, conv.lora_macs, eager=True) + decode_macs(dims, t, conv.lora_macs))
        for t in conv.turns(regime)
    ]


def counted(model, conv: Conversation, regime: str) -> list[int]:
    ids = torch.tensor([conv.ids], device=next(model.parameters()).device)
    return [int(p + d) for p, d, _ in replay(model, ids, conv.turns(regime), _flop_counter)]


def test_analytic_count_equals_the_flop_counter_on_the_tiny_llama(tiny_model):
    """Real weights, eager attention, the base and an unmerged LoRA, every regime with its own decode forwards:
    within 5% (in fact exact, as the counter counts matmuls only); the command's count (a weightless meta copy,
    decode forwards counted once for all regimes, from the first two of each turn) gives the same counts."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config, source = read_config(tiny_model)
    dims = dims_of(config, source)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    targets = ["q_proj", "v_proj", "down_proj"]
    for conv in (tokenize(tokenizer, WITH_P, CALC.messages(), PAIRS), tokenize(tokenizer, LORA, [], PAIRS)):
        model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="eager").eval()
        if conv.system == LORA:
            conv.lora, conv.lora_macs = (4, targets), dims.lora_macs(4, targets)
            model = get_peft_model(model, LoraConfig(r=4, target_modules=targets)).eval()
        assert conv.prefix > 0 and all(g > 3 for g in conv.generated)  # decode counted from 2 of 3+
        # what the command counts: a meta copy, each turn's decode forwards counted once for all regimes, from the
        # first two (affine in the cache's length), equal to counting every forward on the real weights
        meta = counted_flops(config, conv)
        for regime in REGIMES:
            real, expected = counted(model, conv, regime), analytic_eager(dims, conv, regime)
            assert all(abs(r - e) <= 0.05 * e for r, e in zip(real, expected)), (conv.system, regime, real, expected)
            assert [p + d for p, d in meta[regime]] == real
    # the LoRA term is r·(in + out) per adapted layer and token: q 64→64, v 64→32, down 128→64 in 2 layers
    assert dims.lora_macs(4, targets) == 2 * 4 * ((64 + 64) + (64 + 32) + (128 + 64))


@pytest.mark.slow
def test_analytic_count_equals_the_flop_counter_on_smollm2():
    """SmolLM2 (meta copy, eager attention) with the os-shell prompt and two short turns, counted as the command
    counts: every regime within 5%."""
    from transformers import AutoTokenizer

    from genpi.models import resolve_model

    path = resolve_model("smollm2")
    config, source = read_config(path)
    dims = dims_of(config, source)
    assert (dims.layers, dims.hidden, dims.kv_dim, dims.intermediate, dims.vocab) == (30, 576, 192, 1536, 49152)
    conv = tokenize(
        AutoTokenizer.from_pretrained(path), WITH_P, load_catalog(EXAMPLES, ["os-shell"])[0].messages(), PAIRS
    )
    command = counted_flops(config, conv)  # the command's count (the tiny Llama's test: the same as every forward's)
    for regime in REGIMES:
        got = [p + d for p, d in command[regime]]
        expected = analytic_eager(dims, conv, regime)
        assert all(abs(g - e) <= 0.05 * e for g, e in zip(got, expected)), (regime, got, expected)


def test_shared_prefix_saving_is_exactly_the_attention_over_p(tiny_model):
    """Regime (iii): with-P minus internalized = 2·L·d MACs per query token per key of P the internalized
    system does not have; regime (ii) adds P's prefill; regime (i) re-reads P every turn."""
    from transformers import AutoTokenizer

    from genpi.eval.cost import summarize

    config, source = read_config(tiny_model)
    dims = dims_of(config, source)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    convs = [tokenize(tokenizer, WITH_P, CALC.messages(), PAIRS), tokenize(tokenizer, MERGED, [], PAIRS)]
    extra = convs[0].prefix - convs[1].prefix  # P's keys beyond the template's default system turn
    assert extra > 0 and [c - extra for c in convs[0].contexts] == convs[1].contexts
    result = summarize("calc", dims, convs, concurrent=3)
    with_p, merged = (result["systems"][s]["regimes"] for s in (WITH_P, MERGED))
    per_key = 2 * config["num_hidden_layers"] * config["hidden_size"]
    for t_p, t_m in zip(with_p["shared-prefix"]["turns"], merged["shared-prefix"]["turns"]):
        queries = t_m["prefill_tokens"] + t_m["generated_tokens"] - 1
        assert t_p["prefill_tokens"] == t_m["prefill_tokens"]
        assert (
            t_p["prefill_macs"] + t_p["decode_macs"] - t_m["prefill_macs"] - t_m["decode_macs"]
            == per_key * extra * queries
        )
        # P's KV is held once per server, not per conversation
        assert t_p["kv_bytes"] == t_m["kv_bytes"]
        assert (
            t_p["kv_bytes_concurrent"] - t_m["kv_bytes_concurrent"] == extra * 2 * dims.layers * dims.kv_dim * 4
        )  # float32 config
    assert (
        with_p["conversation-cache"]["total"]["prefill_tokens"]
        - merged["conversation-cache"]["total"]["prefill_tokens"]
        == extra
    )
    assert with_p["no-cache"]["total"]["prefill_tokens"] - merged["no-cache"]["total"]["prefill_tokens"] == extra * len(
        PAIRS
    )
    ratios = result["ratios"][MERGED]
    assert ratios["no-cache"]["macs"] < ratios["conversation-cache"]["macs"] < ratios["shared-prefix"]["macs"] < 1


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory):
    """An untrained LoRA for calc with the adapter contract (the cost does not depend on the weights)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from genpi.data.adapters import AdapterManifest, write_adapter
    from genpi.train.qlora import save_adapter

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model), LoraConfig(r=4, target_modules=["q_proj", "o_proj"])
    )
    folder = tmp_path_factory.mktemp("adapters")
    manifest = AdapterManifest("calc", CALC.sha256, tiny_model, "sft", None, {"r": 4}, "test")
    write_adapter(folder / "calc", manifest, lambda tmp: save_adapter(model, tmp))
    return folder


@pytest.mark.slow
def test_efficiency_end_to_end(tiny_model, adapters, tmp_path):
    from genpi.eval.report import build_report

    data = write_calc_dialogues(tmp_path / "run", 6, heldout_from=3)
    compressed = tmp_path / "short.txt"
    compressed.write_text("Calculator: reply Act: compute(EXPR), then Act: answer(VALUE).")
    out = tmp_path / "eval"
    result = run_cli(
        "--catalog",
        CATALOG,
        "--prompt",
        "calc",
        "--data",
        data,
        "--adapters",
        adapters,
        "--turns",
        "3",
        "--base",
        tiny_model,
        "--compressed-prompt",
        compressed,
        "--concurrent",
        "4",
        "--repeats",
        "2",
        "--out",
        out,
        "--json",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["counter_check"]["agree"] and set(summary["counter_check"]["max_relative_difference"]) == set(
        REGIMES
    )
    assert (
        "held-out dialogues" in summary["conversation"]
        and summary["lora"]["rank"] == 4
        and "2·L·d_q per attended key" in summary["formula"]
    )
    assert set(summary["systems"]) == {WITH_P, MERGED, LORA, "compressed-P"}
    assert summary["systems"][LORA]["lora_macs_per_token"] == 2 * 4 * ((64 + 64) + (64 + 64))
    assert summary["systems"]["compressed-P"]["prefix_tokens"] < summary["systems"][WITH_P]["prefix_tokens"]
    rows = (
        duckdb.connect()
        .execute(
            "SELECT system, regime, turn, prefill_s, decode_s, kv_bytes_measured, "
            "cached_tokens + prefill_tokens + generated_tokens - 1 "
            "FROM read_parquet(?, hive_partitioning = true)",
            [str(out / "efficiency" / "*" / "*" / "*.parquet")],
        )
        .fetchall()
    )
    assert len(rows) == 4 * 3 * 3
    dims = dims_of(*read_config(tiny_model))
    for system, regime, turn, prefill_s, decode_s, measured, held in rows:
        assert prefill_s > 0 and decode_s >= 0
        assert (
            measured == held * 2 * dims.layers * dims.kv_dim * 4
        )  # the engine's float32 cache holds what the count says
    saved = json.loads((out / "efficiency.json").read_text())["results"]
    assert [r["prompt_id"] for r in saved] == ["calc"] and (out / "efficiency-calc.png").stat().st_size > 0
    (tmp_path / "report").mkdir()
    text, figures = build_report(tmp_path / "run", out, tmp_path / "report" / "report.md")
    assert "## Efficiency" in text and "efficiency:" not in text.split("## Missing")[1]
    section = text.split("## Efficiency")[1].split("## Training")[0]
    allowed = numbers(json.loads((out / "efficiency.json").read_text()), set())
    cells = [v for line in section.splitlines() if line.startswith("| ") for v in line.strip("| ").split(" | ")[1:]]
    assert len([v for v in cells if re.fullmatch(r"-?\d+(\.\d+)?", v)]) > 30
    assert all(v in allowed for v in cells if re.fullmatch(r"-?\d+(\.\d+)?", v))  # every number from efficiency.json
    assert any(f.name == "report-efficiency-calc.png" and f.exists() for f in figures)
    text, _ = build_report(tmp_path / "run", tmp_path / "no-eval", tmp_path / "report" / "report2.md")
    assert "efficiency.json not found (run genpi eval efficiency)" in text


@pytest.mark.slow
def test_model_config_alone_and_bad_input(tmp_path, capsys):
    """--model-config: analytic only, no model loaded; Llama-3-8B's shipped config; refusals exit 2."""
    ok = run_cli(
        "--catalog",
        EXAMPLES,
        "--prompt",
        "os-shell",
        "--model-config",
        "llama-3-8b",
        "--prompt-tokens",
        "1000",
        "--json",
    )
    assert ok.returncode == 0, ok.stderr[-3000:]
    summary = json.loads(ok.stdout)
    assert summary["dims"]["hidden"] == 4096 and summary["counter_check"] is None and summary["latency"] is None
    assert summary["systems"][WITH_P]["prefix_tokens"] - summary["systems"][MERGED]["prefix_tokens"] == 1000
    long = tmp_path / "long.txt"
    long.write_text(CALC.system * 20)
    broken = tmp_path / "config.json"
    broken.write_text('{"hidden_size": 64}')
    for args, message in [
        (("--prompt", "nope"), "--prompt nope: not in"),
        (("--prompt", "calc", "--turns", "0"), "--turns must be at least 1"),
        (("--prompt", "calc", "--turns", "3"), "hold only 2 agent turns"),
        (
            ("--prompt", "calc", "--turns", "2", "--compressed-prompt", long, "--model-config", "llama-3-8b"),
            "longer than P",
        ),
        (("--prompt", "calc", "--model-config", tmp_path / "missing.json"), "no such config file"),
        (("--prompt", "calc", "--model-config", broken), "lacks num_hidden_layers"),
    ]:  # in process; the command's exit status: below
        code, err = cli_in_process(capsys, "eval", "efficiency", "--catalog", CATALOG, *args)
        assert code == 2 and message in err, (args, err[-2000:])
    result = run_cli("--catalog", CATALOG, "--prompt", "nope")
    assert result.returncode == 2 and "--prompt nope: not in" in result.stderr, result.stderr[-2000:]


def test_shipped_model_configs_are_package_data():
    """`--model-config llama-3-8b` reads a config inside the package, declared as package data, so an installed
    wheel (no examples/ folder beside it) finds it too."""
    import tomllib
    from fnmatch import fnmatch
    from pathlib import Path

    import genpi.eval

    _, source = read_config("llama-3-8b")
    package = Path(genpi.eval.__file__).parent
    assert Path(source).parent.parent == package and Path(source).is_file()
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["genpi.eval"]
    assert any(fnmatch(str(Path(source).relative_to(package)), pattern) for pattern in declared)
