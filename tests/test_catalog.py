import json
import subprocess
import sys

import pytest
import yaml

from conftest import EXAMPLES, REPO
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
        ({"shots": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "shots[1].role", "wrong role order"),
        ({"shots": [{"role": "user", "content": "a"}]}, "shots[0]", "must end with the agent"),
        ({"shots": [{"role": "system", "content": "a"}]}, "shots[0].role", "must be 'user' or 'assistant'"),
        ({"shots": [{"role": "user", "content": ""}]}, "shots[0].content", "non-empty"),
        ({"max_turns": 0}, "max_turns", "integer from 1 to 100"),
        ({"input_examples": []}, "input_examples", "non-empty list"),
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


def test_cli_rejects_bad_catalog_with_status_2_and_writes_nothing(tmp_path):
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

    result = subprocess.run(
        [sys.executable, "-m", "genpi.synth", str(write(tmp_path, [GOOD])), "--out", str(out), "--max-turns", "0"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2 and "--max-turns must be at least 1" in result.stderr and not out.exists()


def test_example_catalog_is_valid_and_long():
    from transformers import AutoTokenizer

    from genpi.models import resolve_model

    entries = load_catalog(EXAMPLES)
    assert {e.id for e in entries} == {"os-shell", "web-select", "web-shop"}
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2"))
    for entry in entries:
        text = tokenizer.apply_chat_template(entry.messages(), tokenize=False)
        assert len(tokenizer(text)["input_ids"]) >= 400, entry.id
        import re

        agent_turns = [t["content"] for d in entry.shots for t in d if t["role"] == "assistant"]
        assert all(re.search(entry.valid_action, t) for t in agent_turns), entry.id
        assert all(re.search(entry.final_action, d[-1]["content"]) for d in entry.shots), entry.id
