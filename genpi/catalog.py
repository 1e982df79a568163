"""The prompt catalog: load, validate, hash, and render the prompt P.

A catalog is a YAML file (a list of entries, or a mapping with a `prompts` list)
or a JSONL file (one entry per line). Every problem is reported before any model
loads, as one line naming the file, the entry and the field.

`shots` holds the prompt's demonstration turns. It is either one dialogue (a
list of turns) or several (a list of such lists); each dialogue starts with a
`user` turn (the task), alternates, and ends with the agent's `assistant` turn.
Environment observations are `user` turns, as in AgentBench.

Over 400 lines on purpose: the one definition of a catalog entry with every check of its fields, so what a catalog
may hold is read in one place.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from genpi import InputError
from genpi.engines import Message

ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]*")
FIELDS = {"id", "system", "shots", "input_examples", "actions", "max_turns", "environment", "checks", "train"}
DEFAULT_MAX_TURNS = 5
CHECK_KINDS = ("regex", "language", "json_schema")
FORMAT_CHECK = "format"  # the name `actions.valid` takes as a check
# Per-prompt training settings (`train`): key -> (type, lowest value, whether the lowest is allowed, highest).
TRAIN_KEYS = {
    "lam": (float, 0.0, True, 1.0),
    "grad_clip": (float, 0.0, True, None),
    "lr": (float, 0.0, False, None),
    "epochs": (int, 1, True, None),
}


class CatalogError(InputError):
    """A catalog problem, worded as `FILE: entry N (id X): field F: what is wrong`."""


@dataclass(frozen=True)
class Check:
    """A named behaviour check a reply should pass when P is in force (run by genpi.checks).

    kind `regex`: spec is the pattern; `language`: an ISO 639-1 code; `json_schema`: the schema (a dict).
    """

    name: str
    kind: str
    spec: str | dict

    def to_json(self) -> dict:
        return {"name": self.name, self.kind: self.spec}


@dataclass(frozen=True)
class PromptEntry:
    id: str
    system: str
    shots: list[list[Message]]  # shot dialogues, each a list of turns
    input_examples: list[str]
    valid_action: str | None = None  # regex every agent turn must match
    final_action: str | None = None  # regex a final agent turn matches
    max_turns: int = DEFAULT_MAX_TURNS
    environment: str = ""
    checks: tuple[Check, ...] = ()  # as the catalog names them (see all_checks)
    train: dict = field(default_factory=dict)  # per-prompt training settings (TRAIN_KEYS), over the run's defaults
    explicit_input_examples: bool = field(default=False, compare=False)

    def messages(self) -> list[Message]:
        """The prompt P as chat messages: the system turn, then every shot turn."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + [dict(turn) for dialogue in self.shots for turn in dialogue]

    def in_action_space(self, reply: str) -> bool:
        """The reply matches `actions.valid` (searched in the stripped reply, so it may be followed by more text)."""
        return bool(re.search(self.valid_action, reply.strip()))

    @property
    def all_checks(self) -> tuple[Check, ...]:
        """The catalog's checks, led by `format` (the `actions.valid` regex) unless the catalog names a check
        `format`."""
        if self.valid_action is None or any(c.name == FORMAT_CHECK for c in self.checks):
            return self.checks
        return (Check(FORMAT_CHECK, "regex", self.valid_action),) + self.checks

    @property
    def sha256(self) -> str:
        return prompt_sha256(self.messages())

    @property
    def gold_turns(self) -> float:
        """Average number of agent turns in the shot dialogues."""
        if not self.shots:
            return 0.0
        return sum(sum(t["role"] == "assistant" for t in d) for d in self.shots) / len(self.shots)

    def to_json(self) -> dict:
        """The catalog form of this entry (loads back to an equal entry)."""
        entry = {"id": self.id, "system": self.system, "shots": self.shots, "max_turns": self.max_turns}
        if self.explicit_input_examples:
            entry["input_examples"] = self.input_examples
        actions = {k: v for k, v in (("valid", self.valid_action), ("final", self.final_action)) if v}
        if actions:
            entry["actions"] = actions
        if self.environment:
            entry["environment"] = self.environment
        if self.checks:
            entry["checks"] = [c.to_json() for c in self.checks]
        if self.train:
            entry["train"] = dict(self.train)
        return entry


def prompt_sha256(messages: list[Message]) -> str:
    canonical = json.dumps(
        [{"role": m["role"], "content": m["content"]} for m in messages],
        ensure_ascii=False,
        separators=(",", ":"),
        sort_keys=True,
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def render_prompt_text(entry: PromptEntry) -> str:
    """P as plain text, for models that read it inside a message (reasons, PG examples)."""
    return "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in entry.messages())


def load_catalog(path: str | Path, only: list[str] | None = None) -> list[PromptEntry]:
    """The catalog's entries, validated; `only` keeps the named ones (the CLIs' --prompts)."""
    path = Path(path)
    if not path.exists():
        raise CatalogError(f"{path}: no such file")
    if path.is_dir():
        raise CatalogError(f"{path}: a folder, not a catalog file (.yaml, .yml or .jsonl)")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise CatalogError(
            f"{path}: not UTF-8 text (byte {e.start}); a catalog is a .yaml or .jsonl text file"
        ) from None
    except OSError as e:
        raise CatalogError(f"{path}: cannot be read: {e.strerror or e}") from None
    if path.suffix in (".jsonl", ".ndjson"):
        raw = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                raw.append(json.loads(line, object_pairs_hook=_unique_keys))
            except json.JSONDecodeError as e:
                raise CatalogError(f"{path}: line {lineno}: not valid JSON: {e.msg}") from None
            except ValueError as e:  # a duplicate key
                raise CatalogError(f"{path}: line {lineno}: {e}") from None
    elif path.suffix in (".yaml", ".yml"):
        try:
            raw = yaml.load(text, Loader=_UniqueKeyLoader)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = " ".join(
                str(getattr(e, "problem", None) or e).split()
            )  # one line (a binary file's reader error has two)
            raise CatalogError(f"{path}: not valid YAML{where}: {problem}") from None
        if isinstance(raw, dict) and set(raw) == {"prompts"}:
            raw = raw["prompts"]
    else:
        raise CatalogError(f"{path}: unknown catalog format {path.suffix!r}: expected .yaml, .yml or .jsonl")
    if not isinstance(raw, list) or not raw:
        raise CatalogError(f"{path}: expected a non-empty list of prompt entries")
    entries = [_parse_entry(path, i, item) for i, item in enumerate(raw, 1)]
    seen: dict[str, int] = {}
    for i, entry in enumerate(entries, 1):
        if entry.id in seen:
            raise CatalogError(f"{path}: entry {i} (id {entry.id!r}): field 'id': duplicate of entry {seen[entry.id]}")
        seen[entry.id] = i
    if only:
        unknown = sorted(set(only) - set(seen))
        if unknown:
            raise InputError(f"--prompts: {', '.join(unknown)} not in {path} (it has {', '.join(seen)})")
        entries = [e for e in entries if e.id in only]
    return entries


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (safe_load keeps the last silently); keys a
    merge (<<) brings in may still be overridden, as YAML means them to be."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.setdefault(key, key_node.start_mark)
            except TypeError:  # an unhashable key: the base class says what is wrong with it
                continue
            if first is not key_node.start_mark:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first given at line {first.line + 1})", key_node.start_mark
                )
        return super().construct_mapping(node, deep)


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object's pairs as a dict; ValueError for a key given twice."""
    data = {}
    for key, value in pairs:
        if key in data:
            raise ValueError(f"duplicate key {key!r}")
        data[key] = value
    return data


def _parse_entry(path: Path, index: int, item: object) -> PromptEntry:
    where = f"{path}: entry {index}"

    def fail(field_name: str, problem: str) -> CatalogError:
        return CatalogError(f"{where}: field {field_name!r}: {problem}")

    if not isinstance(item, dict):
        raise CatalogError(f"{where}: expected a mapping of fields, got {type(item).__name__}")
    unknown = sorted(set(item) - FIELDS)
    if unknown:
        raise fail(unknown[0], f"unknown field (known: {', '.join(sorted(FIELDS))})")
    prompt_id = item.get("id")
    if not isinstance(prompt_id, str) or not ID_PATTERN.fullmatch(prompt_id):
        raise fail("id", f"must match [a-z0-9][a-z0-9._-]*, got {prompt_id!r}")
    where = f"{where} (id {prompt_id!r})"

    system = item.get("system", "")
    if system is None:
        system = ""
    if not isinstance(system, str):
        raise fail("system", "must be a string")

    shots = item.get("shots", [])
    if not isinstance(shots, list):
        raise fail("shots", "must be a list of turns or a list of dialogues")
    if shots and all(isinstance(t, dict) for t in shots):
        shots = [shots]
    dialogues: list[list[Message]] = []
    for d, dialogue in enumerate(shots):
        if not isinstance(dialogue, list) or not dialogue:
            raise fail(f"shots[{d}]", "must be a non-empty list of {role, content} turns")
        turns = []
        for t, turn in enumerate(dialogue):
            name = f"shots[{d}][{t}]" if len(shots) > 1 else f"shots[{t}]"
            if not isinstance(turn, dict) or set(turn) != {"role", "content"}:
                raise fail(name, "must be a mapping with exactly the keys role and content")
            if turn["role"] not in ("user", "assistant"):
                raise fail(f"{name}.role", f"must be 'user' or 'assistant', got {turn['role']!r}")
            if not isinstance(turn["content"], str) or not turn["content"].strip():
                raise fail(f"{name}.content", "must be a non-empty string")
            expected = "user" if t % 2 == 0 else "assistant"
            if turn["role"] != expected:
                raise fail(
                    f"{name}.role", f"wrong role order: expected {expected!r} (dialogues alternate, starting with user)"
                )
            turns.append({"role": turn["role"], "content": turn["content"]})
        if turns[-1]["role"] != "assistant":
            raise fail(f"shots[{d}]", "a shot dialogue must end with the agent's assistant turn")
        dialogues.append(turns)
    if not system.strip() and not dialogues:
        raise fail("system", "empty prompt: give a system text, shots, or both")

    explicit = "input_examples" in item
    examples = item.get("input_examples")
    if explicit:
        if (
            not isinstance(examples, list)
            or not examples
            or not all(isinstance(e, str) and e.strip() for e in examples)
        ):
            raise fail("input_examples", "must be a non-empty list of non-empty strings")
    else:
        examples = [d[0]["content"] for d in dialogues]
        if not examples:
            raise fail("input_examples", "needed when the prompt has no shots (they supply the default examples)")

    actions = item.get("actions") or {}
    if not isinstance(actions, dict) or set(actions) - {"valid", "final"}:
        raise fail("actions", "must be a mapping with optional keys valid and final")
    for key in ("valid", "final"):
        pattern = actions.get(key)
        if pattern is None:
            continue
        if not isinstance(pattern, str):
            raise fail(f"actions.{key}", "must be a regular expression string")
        try:
            re.compile(pattern)
        except re.error as e:
            raise fail(f"actions.{key}", f"bad regular expression: {e}") from None

    max_turns = item.get("max_turns", DEFAULT_MAX_TURNS)
    if not isinstance(max_turns, int) or isinstance(max_turns, bool) or not 1 <= max_turns <= 100:
        raise fail("max_turns", f"must be an integer from 1 to 100, got {max_turns!r}")

    environment = item.get("environment", "") or ""
    if not isinstance(environment, str):
        raise fail("environment", "must be a string")

    checks = _parse_checks(item.get("checks"), fail)
    train = _parse_train(item.get("train"), fail)

    return PromptEntry(
        id=prompt_id,
        system=system,
        shots=dialogues,
        input_examples=list(examples),
        valid_action=actions.get("valid"),
        final_action=actions.get("final"),
        max_turns=max_turns,
        environment=environment,
        checks=checks,
        train=train,
        explicit_input_examples=explicit,
    )


def _parse_checks(raw: object, fail) -> tuple[Check, ...]:
    """`checks`: a list of {name, ONE of regex | language | json_schema}, each checked as far as it can be before a
    reply exists."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise fail("checks", f"must be a list of {{name, {' | '.join(CHECK_KINDS)}}} mappings")
    checks: list[Check] = []
    for i, item in enumerate(raw):
        name = f"checks[{i}]"
        if not isinstance(item, dict):
            raise fail(name, f"must be a mapping with a name and one of {', '.join(CHECK_KINDS)}")
        unknown = sorted(set(item) - {"name", *CHECK_KINDS}, key=str)
        if unknown:
            raise fail(f"{name}.{unknown[0]}", f"unknown key (known: name, {', '.join(CHECK_KINDS)})")
        check_name = item.get("name")
        if not isinstance(check_name, str) or not ID_PATTERN.fullmatch(check_name):
            raise fail(f"{name}.name", f"must match [a-z0-9][a-z0-9._-]*, got {check_name!r}")
        earlier = [j for j, c in enumerate(checks) if c.name == check_name]
        if earlier:
            raise fail(f"{name}.name", f"duplicate of checks[{earlier[0]}] ({check_name!r})")
        kinds = [k for k in CHECK_KINDS if k in item]
        if len(kinds) != 1:
            raise fail(name, f"needs exactly one of {', '.join(CHECK_KINDS)}, got {', '.join(kinds) or 'none'}")
        kind, spec = kinds[0], item[kinds[0]]
        where = f"{name}.{kind}"
        if kind == "regex":
            if not isinstance(spec, str):
                raise fail(where, "must be a regular expression string")
            try:
                re.compile(spec)
            except re.error as e:
                raise fail(where, f"bad regular expression: {e}") from None
        elif kind == "language":
            if not isinstance(spec, str) or not supported_language(spec):
                raise fail(
                    where,
                    f"must be an ISO 639-1 code of a language the detector knows (e.g. en, fr, es, de), got {spec!r}",
                )
        else:
            from jsonschema.exceptions import SchemaError
            from jsonschema.validators import validator_for

            if not isinstance(spec, dict):
                raise fail(where, "must be a JSON schema (a mapping)")
            try:
                validator_for(spec).check_schema(spec)
            except SchemaError as e:
                at = "/".join(map(str, e.path)) or "top level"
                raise fail(where, f"invalid JSON schema at {at}: {' '.join(e.message.split())}") from None
        checks.append(Check(check_name, kind, spec))
    return tuple(checks)


def _parse_train(raw: object, fail) -> dict:
    """`train`: per-prompt training settings (TRAIN_KEYS), each within its range."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise fail("train", f"must be a mapping with optional keys {', '.join(TRAIN_KEYS)}")
    train = {}
    for key, value in raw.items():
        if key not in TRAIN_KEYS:
            raise fail(f"train.{key}", f"unknown key (known: {', '.join(TRAIN_KEYS)})")
        kind, low, low_ok, high = TRAIN_KEYS[key]
        if isinstance(value, str) and kind is float:
            try:  # PyYAML reads 3e-4 (no dot) as a string
                value = float(value)
            except ValueError:
                pass
        numeric = (int, float) if kind is float else (int,)
        if isinstance(value, bool) or not isinstance(value, numeric) or not math.isfinite(value):
            raise fail(f"train.{key}", f"must be {'a number' if kind is float else 'an integer'}, got {value!r}")
        if value < low or (value == low and not low_ok) or (high is not None and value > high):
            bound = f"in [{low}, {high}]" if high is not None else f"{'>=' if low_ok else '>'} {low}"
            raise fail(f"train.{key}", f"must be {bound}, got {value!r}")
        train[key] = kind(value)
    return train


def entry_from_json(data: dict) -> PromptEntry:
    """Rebuild an entry from `PromptEntry.to_json()` (as stored in a run manifest)."""
    return _parse_entry(Path("<manifest>"), 1, data)


def supported_language(code: str):
    """The lingua Language of an ISO 639-1 code (lower case), None if lingua does not know it. Here, not in
    genpi.checks (which runs the checks and imports this module): a catalog refuses an unknown code as it loads."""
    from lingua import IsoCode639_1, Language

    if not isinstance(code, str) or code != code.lower():
        return None
    try:
        return Language.from_iso_code_639_1(IsoCode639_1.from_str(code))
    except ValueError:
        return None
