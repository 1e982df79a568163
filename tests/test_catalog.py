import json
import re
import subprocess
import sys

import pytest
import yaml
from conftest import EXAMPLES, REPO, cli_in_process

from genpi.catalog import CatalogError, entry_from_json, load_catalog, prompt_sha256

GOOD = {
    "id": "agent.v1",
    "system": "You are an agent.",
    "shots": [
        {"role": "user", "content": "task"},
        {"role": "assistant", "content": "Act: ls"},
        {"role": "user", "content": "file.txt"},
        {"role": "assistant", "content": "Act: answer(file.txt)"},
    ],
    "actions": {"valid": "^Act: ", "final": r"answer\("},
    "max_turns": 4,
}


def write(tmp_path, entries, name="catalog.yaml"):
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    else:
        path.write_text(yaml.safe_dump(entries))
    return path


def test_good_entry_renders_prompt_and_defaults(tmp_path):
    [entry] = load_catalog(write(tmp_path, [GOOD]))
    messages = entry.messages()
    assert messages[0] == {"role": "system", "content": "You are an agent."}
    assert [m["role"] for m in messages[1:]] == ["user", "assistant", "user", "assistant"]
    assert entry.input_examples == ["task"]  # default: first user turn of each shot dialogue
    assert entry.gold_turns == 2
    assert entry.sha256 == prompt_sha256(messages) and len(entry.sha256) == 64
    assert entry_from_json(json.loads(json.dumps(entry.to_json()))) == entry


def test_yaml_and_jsonl_agree_and_hash_is_canonical(tmp_path):
    [a] = load_catalog(write(tmp_path, [GOOD]))
    [b] = load_catalog(write(tmp_path, [GOOD], "catalog.jsonl"))
    assert a == b and a.sha256 == b.sha256
    changed = dict(GOOD, system="You are an agent!")
    [c] = load_catalog(write(tmp_path, [changed], "other.yaml"))
    assert c.sha256 != a.sha256
    # max_turns or actions do not change the prompt P, so not its hash
    [d] = load_catalog(write(tmp_path, [dict(GOOD, max_turns=9)], "third.yaml"))
    assert d.sha256 == a.sha256


def test_several_shot_dialogues(tmp_path):
    shots = [GOOD["shots"], [{"role": "user", "content": "task 2"}, {"role": "assistant", "content": "Act: answer(2)"}]]
    [entry] = load_catalog(write(tmp_path, [dict(GOOD, shots=shots)]))
    assert entry.input_examples == ["task", "task 2"]
    assert entry.gold_turns == 1.5
    assert len(entry.messages()) == 1 + 6


@pytest.mark.parametrize(
    "change, field, words",
    [
        ({"id": "Bad Id"}, "id", "must match"),
        ({"colour": "red"}, "colour", "unknown field"),
        ({"actions": {"valid": "("}}, "actions.valid", "bad regular expression"),
        ({"actions": {"final": "[a-"}}, "actions.final", "bad regular expression"),
        ({"system": "", "shots": []}, "system", "empty prompt"),
        ({"shots": [{"role": "assistant", "content": "hi"}]}, "shots[0].role", "wrong role order"),
        (
            {"shots": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
            "shots[1].role",
            "wrong role order",
        ),
        ({"shots": [{"role": "user", "content": "a"}]}, "shots[0]", "must end with the agent"),
        ({"shots": [{"role": "system", "content": "a"}]}, "shots[0].role", "must be 'user' or 'assistant'"),
        ({"shots": [{"role": "user", "content": ""}]}, "shots[0].content", "non-empty"),
        ({"max_turns": 0}, "max_turns", "integer from 1 to 100"),
        ({"input_examples": []}, "input_examples", "non-empty list"),
        ({"checks": {"name": "fr", "language": "fr"}}, "checks", "must be a list"),
        ({"checks": ["fr"]}, "checks[0]", "must be a mapping"),
        (
            {"checks": [{"name": "a", "regex": "x"}, {"name": "b", "regex": "(("}]},
            "checks[1].regex",
            "bad regular expression",
        ),
        ({"checks": [{"name": "a", "regex": 3}]}, "checks[0].regex", "regular expression string"),
        (
            {"checks": [{"name": "a", "regex": "x", "language": "fr"}]},
            "checks[0]",
            "exactly one of regex, language, json_schema, got regex, language",
        ),
        ({"checks": [{"name": "a"}]}, "checks[0]", "exactly one of regex, language, json_schema, got none"),
        ({"checks": [{"name": "a", "regex": "x", "flags": "i"}]}, "checks[0].flags", "unknown key"),
        ({"checks": [{"regex": "x"}]}, "checks[0].name", "must match"),
        ({"checks": [{"name": "Bad Name", "regex": "x"}]}, "checks[0].name", "must match"),
        (
            {"checks": [{"name": "a", "regex": "x"}, {"name": "a", "language": "fr"}]},
            "checks[1].name",
            "duplicate of checks[0]",
        ),
        ({"checks": [{"name": "a", "language": "xx"}]}, "checks[0].language", "ISO 639-1 code"),
        ({"checks": [{"name": "a", "language": "french"}]}, "checks[0].language", "ISO 639-1 code"),
        ({"checks": [{"name": "a", "language": "FR"}]}, "checks[0].language", "ISO 639-1 code"),
        (
            {"checks": [{"name": "a", "json_schema": {"type": "objekt"}}]},
            "checks[0].json_schema",
            "invalid JSON schema",
        ),
        (
            {"checks": [{"name": "a", "json_schema": {"properties": {"x": {"minLength": -1}}}}]},
            "checks[0].json_schema",
            "invalid JSON schema at properties/x/minLength",
        ),
        ({"checks": [{"name": "a", "json_schema": "object"}]}, "checks[0].json_schema", "must be a JSON schema"),
        ({"train": [0.3]}, "train", "must be a mapping"),
        ({"train": {"lambda": 0.3}}, "train.lambda", "unknown key"),
        ({"train": {"lam": 1.5}}, "train.lam", "in [0.0, 1.0]"),
        ({"train": {"lam": "high"}}, "train.lam", "must be a number"),
        ({"train": {"lam": True}}, "train.lam", "must be a number"),
        ({"train": {"grad_clip": -1}}, "train.grad_clip", ">= 0.0"),
        ({"train": {"lr": 0}}, "train.lr", "> 0.0"),
        ({"train": {"lr": float("nan")}}, "train.lr", "must be a number"),
        ({"train": {"epochs": 0}}, "train.epochs", ">= 1"),
        ({"train": {"epochs": 2.5}}, "train.epochs", "must be an integer"),
    ],
)
def test_invalid_entries_name_file_entry_and_field(tmp_path, change, field, words):
    entry = dict(GOOD, **change)
    path = write(tmp_path, [GOOD | {"id": "first"}, entry])
    with pytest.raises(CatalogError) as error:
        load_catalog(path)
    message = str(error.value)
    assert str(path) in message and "entry 2" in message
    assert f"field {field!r}" in message and words in message
    assert "\n" not in message


CHECKS = [
    {"name": "french", "language": "fr"},
    {"name": "json", "json_schema": {"type": "object", "required": ["act"], "properties": {"act": {"type": "string"}}}},
    {"name": "polite", "regex": "(?i)please"},
]


def test_checks_and_train_settings_load_and_round_trip(tmp_path):
    from genpi.catalog import Check

    [entry] = load_catalog(
        write(tmp_path, [dict(GOOD, checks=CHECKS, train={"lam": 0.3, "grad_clip": 1, "lr": "3e-4", "epochs": 2})])
    )
    assert entry.checks == (
        Check("french", "language", "fr"),
        Check("json", "json_schema", CHECKS[1]["json_schema"]),
        Check("polite", "regex", "(?i)please"),
    )
    assert [c.name for c in entry.all_checks] == [
        "format",
        "french",
        "json",
        "polite",
    ]  # actions.valid leads as `format`
    assert entry.all_checks[0] == Check("format", "regex", GOOD["actions"]["valid"])
    assert entry.train == {
        "lam": 0.3,
        "grad_clip": 1.0,
        "lr": 3e-4,
        "epochs": 2,
    }  # YAML's "3e-4" string read as the number
    assert type(entry.train["epochs"]) is int and type(entry.train["grad_clip"]) is float
    data = json.loads(json.dumps(entry.to_json()))
    assert data["checks"] == CHECKS and data["train"] == entry.train
    assert entry_from_json(data) == entry
    [plain] = load_catalog(write(tmp_path, [GOOD], "plain.yaml"))
    assert plain.sha256 == entry.sha256  # checks and train settings are not part of P
    assert (
        plain.checks == () and plain.train == {} and "checks" not in plain.to_json() and "train" not in plain.to_json()
    )
    assert [c.name for c in plain.all_checks] == ["format"]

    own = [{"name": "format", "regex": "^Act: answer"}]  # the catalog's own `format` replaces actions.valid's
    [entry] = load_catalog(write(tmp_path, [dict(GOOD, checks=own)], "own.yaml"))
    assert (
        entry.all_checks == (Check("format", "regex", "^Act: answer"),)
        and entry.valid_action == GOOD["actions"]["valid"]
    )
    no_actions = {k: v for k, v in GOOD.items() if k != "actions"}
    [entry] = load_catalog(write(tmp_path, [no_actions], "none.yaml"))
    assert entry.all_checks == ()


def test_cli_refuses_a_bad_check_with_status_2(tmp_path):
    path = write(tmp_path, [GOOD | {"id": "first"}, dict(GOOD, checks=[{"name": "lang", "language": "zz"}])])
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "genpi.cli", "synth", str(path), "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert (
        str(path) in line
        and "entry 2 (id 'agent.v1')" in line
        and "field 'checks[0].language'" in line
        and "'zz'" in line
    )
    assert not out.exists()


def test_duplicate_ids(tmp_path):
    path = write(tmp_path, [GOOD, GOOD])
    with pytest.raises(CatalogError, match=r"entry 2 \(id 'agent.v1'\): field 'id': duplicate of entry 1"):
        load_catalog(path)


def test_unreadable_files(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("- id: a\n  system: [unclosed\n")
    with pytest.raises(CatalogError, match="not valid YAML at line"):
        load_catalog(bad_yaml)
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text(json.dumps(GOOD) + "\n{oops\n")
    with pytest.raises(CatalogError, match="line 2: not valid JSON"):
        load_catalog(bad_jsonl)
    with pytest.raises(CatalogError, match="no such file"):
        load_catalog(tmp_path / "missing.yaml")
    with pytest.raises(CatalogError, match="unknown catalog format"):
        load_catalog(bad_yaml.rename(tmp_path / "catalog.txt"))


def test_a_folder_a_binary_or_a_non_utf8_catalog_is_refused_naming_it(tmp_path, capsys):
    from genpi.cli import main

    folder = tmp_path / "catalog.yaml"
    folder.mkdir()
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(
        yaml.safe_dump([dict(GOOD, system="Réponds en français.")], allow_unicode=True)
        .encode("utf-8")
        .replace("é".encode(), b"\xe9")
    )
    binary = tmp_path / "model.jsonl"
    binary.write_bytes(bytes(range(256)) * 4)
    nuls = tmp_path / "nuls.yaml"
    nuls.write_bytes(b"- id: a\x00\x00\n")
    for path, words in (
        (folder, "a folder, not a catalog file"),
        (latin1, "not UTF-8 text (byte"),
        (binary, "not UTF-8 text"),
        (nuls, "not valid YAML"),
    ):
        with pytest.raises(CatalogError, match=re.escape(f"{path}: {words}")):
            load_catalog(path)
        for command in (
            ["synth", str(path), "--out", str(tmp_path / "out")],
            ["run", str(path), "--out", str(tmp_path / "run")],
            ["serve", str(tmp_path), "--catalog", str(path)],
        ):
            assert main(command) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"genpi: error: {path}: ") and err.count("\n") == 1, (command, err)
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()


def test_a_key_given_twice_is_refused(tmp_path):
    twice = tmp_path / "twice.yaml"
    twice.write_text("- id: agent.v1\n  system: Answer briefly.\n  max_turns: 3\n  system: Answer at length.\n")
    with pytest.raises(
        CatalogError,
        match=re.escape(f"{twice}: not valid YAML at line 4, column 3: duplicate key 'system' (first given at line 2)"),
    ):
        load_catalog(twice)
    nested = tmp_path / "nested.yaml"
    nested.write_text(
        yaml.safe_dump([dict(GOOD, actions={"valid": "^Act: "})]).replace(
            "valid: '^Act: '", "valid: '^Act: '\n    valid: x"
        )
    )
    with pytest.raises(CatalogError, match="duplicate key 'valid'"):
        load_catalog(nested)
    jsonl = tmp_path / "twice.jsonl"
    jsonl.write_text(json.dumps(GOOD)[:-1] + ', "max_turns": 9}\n')
    with pytest.raises(CatalogError, match=re.escape(f"{jsonl}: line 1: duplicate key 'max_turns'")):
        load_catalog(jsonl)
    merged = tmp_path / "merged.yaml"  # a merge key's values may be overridden: YAML means them to be
    merged.write_text(
        "- &base {id: one, system: Be brief., max_turns: 3, input_examples: [hi]}\n- <<: *base\n  id: two\n"
    )
    assert [(e.id, e.max_turns) for e in load_catalog(merged)] == [("one", 3), ("two", 3)]


def test_cli_rejects_bad_catalog_with_status_2_and_writes_nothing(tmp_path, capsys):
    path = write(tmp_path, [dict(GOOD, actions={"valid": "(("})])
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "genpi.synth", str(path), "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "field 'actions.valid'" in lines[0] and "entry 1" in lines[0]
    assert not out.exists()

    code, err = cli_in_process(capsys, "synth", write(tmp_path, [GOOD]), "--out", out, "--max-turns", "0")
    assert code == 2 and "--max-turns must be at least 1" in err and not out.exists()  # in process: status above


def test_example_catalog_is_valid_and_long():
    import re

    from transformers import AutoTokenizer

    from genpi.checks import run_checks
    from genpi.models import resolve_model

    entries = {e.id: e for e in load_catalog(EXAMPLES)}
    assert set(entries) == {"os-shell", "web-select", "web-shop", "bakery-fr", "hotel-fr"}
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2"))
    for entry in (
        entries[i] for i in ("os-shell", "web-select", "web-shop")
    ):  # the agent prompts: long, in their format
        text = tokenizer.apply_chat_template(entry.messages(), tokenize=False)
        assert len(tokenizer(text)["input_ids"]) >= 400, entry.id
        agent_turns = [t["content"] for d in entry.shots for t in d if t["role"] == "assistant"]
        assert all(re.search(entry.valid_action, t) for t in agent_turns), entry.id
        assert all(re.search(entry.final_action, d[-1]["content"]) for d in entry.shots), entry.id
        assert entry.train["lam"] == (0.7 if entry.id == "web-select" else 0.3), entry.id  # the reference's per-task λ
    for entry in (entries["bakery-fr"], entries["hotel-fr"]):  # the personas: their own shots pass their checks
        for dialogue in entry.shots:
            assert all(run_checks(entry, dialogue[-1]["content"]).values()), (entry.id, dialogue[-1])
        # the base's kind of English reply fails them (a very short one may not: "Hi! Do you have croissants today?"
        # reads as French)
        assert not any(
            run_checks(entry, "Yes, we have that in stock this morning. How many would you like?").values()
        ), entry.id
