"""The paper's Table 1 through `genpi run` (docs/table1.md): every row a method or a system of the table1 presets, a
methods entry NAME=METHOD trained into its own folder with its own flags, and the report's Table 1 from a small fake
run (rows in the paper's order, a row that did not run said so)."""

import dataclasses
import json
import re

import pytest
import yaml
from conftest import REPO

from genpi import InputError
from genpi.data.adapters import AdapterManifest
from genpi.eval.compressed import parse_compressed
from genpi.eval.report_table1 import ROWS, table1_section
from genpi.eval.run import build_parser as eval_parser
from genpi.run import build_parser, main, method_names, run_config, stage_commands
from genpi.runconfig import PRESET_DIR, PRESETS, read_config
from genpi.train.run import build_parser as train_parser
from genpi.train.run import settings_from_args

AGENTS = REPO / "examples" / "agents.yaml"
CATALOG = REPO / "tests" / "data" / "tiny.yaml"
TRAINED = ("genpi", "sft", "prepend-100", "prepend-50", "icae", "kld", "seqkd", "seqkd+kld")  # every trained row
RATES = {"lingua-0.9": 0.9, "lingua-0.7": 0.7, "lingua-0.3": 0.3}  # LLMLingua-2's rows


def table1_stages(config, *extra, out="/tmp/t1"):
    args = build_parser().parse_args([str(AGENTS), "--out", out, "--config", str(config), *extra])
    preset, _ = run_config(args)  # every section's flag checked, the variants' too
    return dict(stage_commands(args, preset, ["bakery-fr", "os-shell"]))


def trained(argv: list[str]):
    """A train stage's settings as genpi train reads its argv, and its --out."""
    args = train_parser().parse_args(argv)
    return settings_from_args(args)[0], args


@pytest.mark.parametrize("config", [PRESET_DIR / "table1-cpu.yaml", REPO / "cluster" / "table1-run.yaml"])
def test_the_table1_presets_run_every_row(config):
    stages = table1_stages(config)
    assert [n for n in stages if n.startswith("train ")] == [f"train {m}" for m in TRAINED]
    settings = {name: trained(stages[f"train {name}"]) for name in TRAINED}
    for name, (s, args) in settings.items():
        assert args.out == f"/tmp/t1/adapters/{name}"  # each row its own folder
    assert {name: s.method for name, (s, _) in settings.items()} == {
        **{m: m for m in TRAINED},
        "prepend-100": "prepend",
        "prepend-50": "prepend",
    }
    assert settings["prepend-100"][0].prepend_ratio == 1.0 and settings["prepend-50"][0].prepend_ratio == 0.5
    assert settings["icae"][0].memory_tokens == 128  # the paper's k
    full = {name for name, (s, _) in settings.items() if s.full_finetune}
    assert full == {"kld", "seqkd", "seqkd+kld"}  # the distillation rows in full, SFT-only and GenPI as LoRA

    fidelity = eval_parser().parse_args(stages["eval fidelity"])
    assert fidelity.adapters == [f"{m}=/tmp/t1/adapters/{m}" for m in TRAINED]
    assert {c.name: c.rate for c in parse_compressed(fidelity.compressed)} == RATES  # the compression rows
    efficiency = [n for n in stages if n.startswith("eval efficiency")]
    assert efficiency and all(eval_parser().parse_args(stages[n]).compressed == fidelity.compressed for n in efficiency)
    if config.parent == PRESET_DIR:  # the CPU table: one prompt, every method on the same small budget
        assert PRESETS["table1-cpu"].prompts == "bakery-fr" and len(efficiency) == 1
        assert {s.max_steps for s, _ in settings.values()} == {48}
        assert {(s.batch_size, s.lr) for n, (s, _) in settings.items() if n in full} == {(1, 1e-4)}
        assert settings["icae"][0].pretrain_steps < 100  # a small pretraining
    else:  # the paper's full-fine-tune sizes, each trial over 4 GPUs
        assert {(s.batch_size, s.lr, s.epochs) for n, (s, _) in settings.items() if n in full} == {(64, 1e-5, 10)}
        assert {trained(stages[f"train {n}"])[1].gpus_per_trial for n in full} == {4}
        assert (settings["genpi"][0].batch_size, settings["genpi"][0].lr) == (32, 1e-4)


def test_the_paper_preset_takes_every_row_on_the_command_line():
    methods = "genpi,sft,prepend-100=prepend,prepend-50=prepend,icae,kld,seqkd,seqkd+kld"
    compressed = [f"{name}=llmlingua2:{rate}" for name, rate in RATES.items()]
    args = build_parser().parse_args(
        [str(AGENTS), "--out", "R", "--preset", "paper", "--methods", methods]
        + [flag for spec in compressed for flag in ("--compressed", spec)]
    )
    preset, _ = run_config(args)
    stages = dict(stage_commands(args, preset, ["bakery-fr"]))
    assert [n for n in stages if n.startswith("train ")] == [f"train {m}" for m in TRAINED]
    assert trained(stages["train prepend-100"])[0].prepend_ratio == 1.0  # the paper preset's variants
    assert trained(stages["train seqkd"])[0].full_finetune and not trained(stages["train sft"])[0].full_finetune
    assert eval_parser().parse_args(stages["eval fidelity"]).compressed == compressed
    # comma-separated in one flag: the same; the flag replaces the config's list
    one = build_parser().parse_args(
        [str(AGENTS), "--out", "R", "--config", str(PRESET_DIR / "table1-cpu.yaml"), "--compressed", "z=llmlingua2:0.5"]
    )
    assert eval_parser().parse_args(
        dict(stage_commands(one, run_config(one)[0], ["x"]))["eval fidelity"]
    ).compressed == ["z=llmlingua2:0.5"]


def test_a_named_variant_trains_into_its_own_folder_with_its_own_flags(tmp_path):
    config = yaml.safe_load((PRESET_DIR / "demo.yaml").read_text())
    config["methods"] = "p100=prepend,p50=prepend,prepend,sft"
    config["train"]["prepend_ratio"] = 0.2  # every method's; a variant's own flag wins
    config["variants"] = {"p100": {"prepend_ratio": 1.0, "seed": 3}, "sft": {"max_steps": 5}, "unused": {"seed": 9}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    stages = table1_stages(path, "--train-args", "--seed 4", out=str(tmp_path / "run"))
    assert [n for n in stages if n.startswith("train ")] == ["train p100", "train p50", "train prepend", "train sft"]
    got = {n: trained(stages[f"train {n}"]) for n in ("p100", "p50", "prepend", "sft")}
    assert {n: (s.method, s.prepend_ratio, a.out) for n, (s, a) in got.items()} == {
        "p100": ("prepend", 1.0, str(tmp_path / "run" / "adapters" / "p100")),
        "p50": ("prepend", 0.2, str(tmp_path / "run" / "adapters" / "p50")),
        "prepend": ("prepend", 0.2, str(tmp_path / "run" / "adapters" / "prepend")),
        "sft": ("sft", 0.2, str(tmp_path / "run" / "adapters" / "sft")),
    }
    assert got["sft"][0].max_steps == 5 and got["p50"][0].max_steps == 72  # the preset's steps but for sft's own
    assert {s.seed for s, _ in got.values()} == {4}  # the deprecated --train-args string still wins over all
    fidelity = eval_parser().parse_args(stages["eval fidelity"])
    assert [a.split("=")[0] for a in fidelity.adapters] == ["p100", "p50", "prepend", "sft"]
    assert eval_parser().parse_args(stages["eval efficiency bakery-fr"]).adapters.endswith("/adapters/p100")


def test_method_names():
    assert method_names("genpi, p=prepend ,sft") == {"genpi": "genpi", "p": "prepend", "sft": "sft"}
    for text, words in (
        ("sft,bogus", "unknown method(s) bogus"),
        ("x=nope", "unknown method(s) nope"),
        ("", "unknown method(s)"),
        ("sft,sft=sft", "name 'sft' is repeated"),
        ("teacher=sft", "reserved"),
        ("a/b=sft", "not [A-Za-z0-9._+-]"),
    ):
        with pytest.raises(InputError, match=re.escape(words)):
            method_names(text)


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--methods", "p=bogus"], "unknown method(s) bogus"),
        (["--methods", "sft,sft"], "name 'sft' is repeated"),
        (["--methods", "sft", "--full-finetune", "nope"], "--full-finetune: unknown method(s) nope"),
        (["--methods", "genpi", "--compressed", "genpi=llmlingua2:0.5"], "system name 'genpi' is reserved, repeated"),
        (["--methods", "genpi", "--compressed", "z=llmlingua2:2"], "--compressed"),
        (["--config", "VARIANT_METHOD"], "variants.p.method: name the method in methods, as p=METHOD"),
        (["--config", "VARIANT_FLAG"], "variants.p.no_such: genpi train has no flag --no-such"),
        (["--config", "VARIANT_LIST"], "variants: expected a section of method names"),
    ],
)
def test_bad_rows_exit_2_before_any_work(tmp_path, capsys, extra, words):
    config = yaml.safe_load((PRESET_DIR / "demo.yaml").read_text())
    if extra[-1].startswith("VARIANT"):
        config["variants"] = {
            "VARIANT_METHOD": {"p": {"method": "prepend"}},
            "VARIANT_FLAG": {"p": {"no_such": 1}},
            "VARIANT_LIST": ["p"],
        }[extra[-1]]
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(config))
        extra = ["--config", str(path)]
    out = tmp_path / "run"
    assert main([str(CATALOG), "--out", str(out), "--prompts", "calc", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("genpi: error: ") and words in err, err
    assert not out.exists()


def test_the_variants_key_reads_as_each_names_train_flags(tmp_path):
    path = tmp_path / "c.yaml"
    config = yaml.safe_load((PRESET_DIR / "demo.yaml").read_text())
    config["variants"] = {"p100": {"prepend_ratio": 1.0, "keep_degenerate": True, "seed": None}}
    config["compressed"] = ["a=llmlingua2:0.5", "b=llmlingua2:0.3"]
    path.write_text(yaml.safe_dump(config, sort_keys=False))  # a section's flags in the file's order
    preset = read_config(path)
    assert preset.variant_flags == {"p100": ("--prepend-ratio", "1.0", "--keep-degenerate")}
    assert preset.compressed == "a=llmlingua2:0.5,b=llmlingua2:0.3"
    assert PRESETS["demo"].variant_flags == {} and PRESETS["demo"].compressed == ""  # the demo as it was


# the report's Table 1, from a fake run's files


def manifest(folder, method, kind="adapter", **settings):
    folder.mkdir(parents=True)
    m = AdapterManifest(
        prompt_id="bakery-fr",
        prompt_sha256="0" * 64,
        base_model="smollm2",
        method=method,
        lam=0.5 if method == "genpi" else None,
        lora={},
        data_fingerprint="x",
        train_metrics={"steps": 48},
        settings={"batch_size": 1, "lr": 1e-3, "prepend_ratio": 0.5, "memory_tokens": 128, **settings},
        kind=kind,
    )
    (folder / "genpi.json").write_text(json.dumps(dataclasses.asdict(m)))
    return str(folder)


def system(gap, french, **extra):
    return {
        "kl_gap_closed": gap,
        "kl_gap_closed_ci": [gap - 0.1, gap + 0.1],
        "kl": 1.0 - gap,
        "reverse_kl": 0.5,
        "collateral_kl": 0.1,
        "format_rate": None,
        "checks": {"french": {"first_turn": french, "first_turn_ci": [french - 0.2, french], "all_turns": french}},
        **extra,
    }


def compressed(rate, achieved):
    return {
        "compressed": {
            "rate": rate,
            "achieved_rate": achieved,
            "compressor": "llmlingua causal LM",
            "original_tokens": 200,
            "compressed_tokens": int(200 * achieved),
        }
    }


def fake_run(tmp_path, names) -> tuple[dict, object]:
    """A fidelity summary of bakery-fr with the systems `names` of: teacher, base, genpi, sft, prepend-100, a full
    kld, a LoRA kld, topk-kl, lingua-0.3, lingua-0.5; and efficiency's prefix tokens."""
    adapters = tmp_path / "adapters"
    folders = {
        "genpi": lambda: manifest(adapters / "genpi" / "bakery-fr", "genpi"),
        "sft": lambda: manifest(adapters / "sft" / "bakery-fr", "sft"),
        "prepend-100": lambda: manifest(adapters / "p100" / "bakery-fr", "prepend", prepend_ratio=1.0),
        "kld": lambda: manifest(adapters / "kld" / "bakery-fr", "kld", "model", full_finetune=True, lr=1e-4),
        "kld-lora": lambda: manifest(adapters / "kld-lora" / "bakery-fr", "kld"),
        "topk-kl": lambda: manifest(adapters / "topk" / "bakery-fr", "topk-kl"),
    }
    every = {
        "teacher": system(1.0, 1.0),
        "base": system(0.0, 0.08),
        "genpi": system(0.2, 0.9),
        "sft": system(0.1, 1.0),
        "prepend-100": system(0.3, 1.0),
        "kld": system(0.4, 0.8),
        "kld-lora": system(0.45, 0.8),
        "topk-kl": system(0.5, 1.0),
        "lingua-0.3": system(0.6, 0.7, **compressed(0.3, 0.32)),
        "lingua-0.5": system(0.7, 0.7, **compressed(0.5, 0.5)),
    }
    result = {
        "prompt_id": "bakery-fr",
        "inputs": 12,
        "first_turn_actions": "skipped: the prompt has no actions.valid regex",
        "systems": {n: every[n] for n in names},
        "adapters": {n: folders[n]() for n in names if n in folders},
        "retention": {n: {} for n in names},
        "missing": [],
        "heldout_used_for_lambda": {},
    }
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir(parents=True)
    prefix = {"with-P": 300, "internalized-merged": 40, "internalized-lora": 40, "lingua-0.3": 120}
    efficiency = {
        "prompt_id": "bakery-fr",
        "tokenizer": "smollm2",
        "systems": {k: {"prefix_tokens": v} for k, v in prefix.items()},
    }
    (eval_dir / "efficiency.json").write_text(json.dumps({"results": [efficiency]}))
    fidelity = {"command": ["genpi", "eval", "fidelity", "D", "--base", "smollm2"], "results": [result]}
    return fidelity, eval_dir


def table_rows(md: list[str]) -> list[list[str]]:
    return [
        [c.strip() for c in line.strip("|").split("|")] for line in md if line.startswith("| ") and "---" not in line
    ]


def test_the_report_shows_table1_in_the_papers_order_with_missing_rows_said(tmp_path):
    names = ["teacher", "base", "genpi", "sft", "prepend-100", "kld", "kld-lora", "topk-kl", "lingua-0.3", "lingua-0.5"]
    fidelity, eval_dir = fake_run(tmp_path, names)
    md = table1_section(fidelity, eval_dir, {"settings": {"samples": 48, "heldout": 0.25}})
    assert md[0] == "## Table 1" and "base `smollm2`, 48 synthesized dialogues per prompt (0.25 held out)" in md[2]
    assert "bakery-fr 12" in md[2]  # the scale
    header, *rows = table_rows(md)
    assert header[:5] == ["Table 1 row", "system", "how it was made", "KL gap closed", "95% interval"]
    assert header[5:] == [
        "french (first reply)",
        "95% interval",
        "prompt tokens per request",
    ]
    assert [r[0] for r in rows] == [row for row, _ in ROWS]  # every row, in the paper's order
    by_row = {r[0]: r for r in rows}
    ran = {
        "Upper bound (P in the prompt)": ("teacher", "100%", "300"),
        "LLMLingua-2 ×0.3": ("lingua-0.3", "60%", "120"),
        "Full fine-tune KLD": ("kld", "40%", "40"),
        "Prompt prepending 100%": ("prepend-100", "30%", "40"),
        "SFT-only": ("sft", "10%", "40"),
        "GenPI": ("genpi", "20%", "40"),
    }
    for row, (name, gap, tokens) in ran.items():
        assert (by_row[row][1], by_row[row][3], by_row[row][-1]) == (name, gap, tokens), by_row[row]
    assert "full fine-tune" in by_row["Full fine-tune KLD"][2] and "lr 1.00e-04" in by_row["Full fine-tune KLD"][2]
    assert "llmlingua causal LM, rate 0.32 achieved" == by_row["LLMLingua-2 ×0.3"][2]
    assert by_row["GenPI"][2].startswith("LoRA, λ 0.5, 48 steps")
    for row in set(by_row) - set(ran):  # a row that did not run says so, with no number
        assert by_row[row][1] == "not run" and set(by_row[row][3:]) == {"–"}, by_row[row]
    assert "Also evaluated, no row of Table 1: `kld-lora`, `topk-kl`, `lingua-0.5`." in md


def test_no_table1_for_a_run_of_few_rows_and_tokens_unmeasured_say_so(tmp_path):
    fidelity, eval_dir = fake_run(tmp_path, ["teacher", "base", "genpi", "sft", "topk-kl"])
    assert table1_section(fidelity, eval_dir) == []  # two rows besides the upper bound: its tables are below
    fidelity, eval_dir = fake_run(tmp_path / "b", ["teacher", "base", "genpi", "sft", "prepend-100"])
    (eval_dir / "efficiency.json").unlink()
    md = table1_section(fidelity, eval_dir)
    assert [r[-1] for r in table_rows(md)[1:]] == ["–"] * len(ROWS)
    assert any("not measured (no genpi eval efficiency of this prompt)" in line for line in md)


def test_the_report_puts_table1_first(tmp_path):
    from genpi.eval.report import build_report

    names = ["teacher", "base", "genpi", "sft", "prepend-100", "lingua-0.3"]
    fidelity, eval_dir = fake_run(tmp_path, names)
    fidelity.update(served_as="transformers", teacher_forced="yes", episode_settings={"max_turns": 2})
    (eval_dir / "efficiency.json").unlink()  # the report's own efficiency section reads a whole result
    (eval_dir / "fidelity.json").write_text(json.dumps(fidelity))
    run = tmp_path / "data"
    run.mkdir()
    (tmp_path / "report").mkdir()
    text, _ = build_report(run, eval_dir, tmp_path / "report" / "report.md")
    sections = [line for line in text.splitlines() if line.startswith("## ")]
    assert sections[0] == "## Table 1" and "## Fidelity without the prompt" in sections
    assert "| LLMLingua-2 ×0.9 | not run |" in text


@pytest.mark.slow
def test_a_tiny_table1_run_trains_each_name_in_its_folder_and_reports_table1(tiny_run_resumed):
    """genpi run end to end on the tiny Llama (conftest's run, killed once and resumed): a variant of prepend at ratio
    1.0, sft, genpi and a compressed system; the report opens with Table 1 and marks the rest not run."""
    from genpi.data.adapters import read_adapter_manifest

    out, (*_, result) = tiny_run_resumed
    assert result.returncode == 0, result.stderr[-3000:]
    p100, sft = (
        read_adapter_manifest(out / "adapters" / "p100" / "calc"),
        read_adapter_manifest(out / "adapters" / "sft" / "calc"),
    )
    assert (p100.method, p100.settings["prepend_ratio"]) == ("prepend", 1.0) and sft.method == "sft"
    fidelity = json.loads((out / "eval" / "fidelity.json").read_text())
    assert {"teacher", "base", "p100", "sft", "short"} <= set(fidelity["results"][0]["systems"])
    [efficiency] = json.loads((out / "eval" / "efficiency.json").read_text())["results"]
    assert "short" in efficiency["systems"]
    text = (out / "report" / "report.md").read_text()
    assert text.index("## Table 1") < text.index("## Synthesis")
    for line in (
        "| Prompt prepending 100% | p100 |",
        "| SFT-only | sft |",
        "| GenPI | genpi |",
        "| LLMLingua-2 ×0.3 | short |",
        "| ICAE | not run |",
    ):
        assert line in text, line
