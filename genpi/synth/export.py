"""`genpi export OUT --to DIR`: a synthesis run's teacher dialogues as a chat dataset, with a dataset card.

    DIR/README.md                           dataset card: YAML front matter (prompts with their SHA-256, models,
                                            sizes, licence, the splits' files) and how the data was made, with
                                            the quality table of `genpi stats`
    DIR/data/train-00000-of-00001.parquet   the train rows (`--format jsonl`: DIR/data/train.jsonl)
    DIR/data/test-00000-of-00001.parquet    the held-out rows (split `heldout`; `test` is the split name the
                                            Hugging Face tools look for)

Formats (`--format`):
    messages  (default) Parquet: `messages`, the dialogue as alternating chat turns, which TRL's SFTTrainer and
              most fine-tuning tools take as-is, then the row's metadata (META) in columns of their own
    jsonl     the same rows as JSON Lines
    parquet   the good dialogue rows as genpi wrote them (DIALOGUE_SCHEMA: `turns`, `teacher_topk`, ...), no
              `messages`: for tools of one's own

`messages` is what training learns from (genpi.train.examples.build_sft): the pseudo input as the user turn, then
the teacher's turns (assistant) and the environment's (user), alternating, ending on the teacher's last turn (an
environment turn after it teaches nothing and is dropped). Without P by default: internalization data is the
teacher's behaviour with P, learnt from the inputs without P. `--with-prompt` puts P (its system turn and shots,
PromptEntry.messages()) before each dialogue: the teacher's own view, for distillation with P in context or for
reading. Only good rows (error null) are exported; the card says how many failed.

DIR must not exist or be empty; the export is built beside it and renamed into place, so DIR is whole or absent.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from genpi import InputError, __version__
from genpi.catalog import CatalogError, entry_from_json
from genpi.data.dialogues import first_line, open_dialogues
from genpi.data.manifest import read_manifest
from genpi.data.model_card import front_matter
from genpi.data.store import DIALOGUE_SCHEMA, TURN

FORMATS = ("messages", "jsonl", "parquet")
# genpi's split -> the split name (and file name) of the export
SPLITS = {"train": "train", "heldout": "test"}
# the row's metadata beside `messages`: every dialogue column but the turns (they are the messages), the teacher's
# top-k (large; in --format parquet) and the error (null: only good rows are exported)
META = tuple(n for n in DIALOGUE_SCHEMA.names if n not in ("turns", "turn_cut", "teacher_topk", "error"))
MESSAGES_SCHEMA = pa.schema([("messages", pa.list_(TURN)), *(DIALOGUE_SCHEMA.field(n) for n in META)])


def dialogue_messages(row: dict, prompt: list[dict] | None = None) -> list[dict]:
    """A dialogue row as chat messages: (P's messages,) user: input, assistant: turn 1, user: observation 1, ...,
    ending on the teacher's last turn. ValueError for a row without a teacher turn."""
    turns = [{"role": t["role"], "content": t["content"]} for t in row["turns"] or []]
    while turns and turns[-1]["role"] != "assistant":
        turns.pop()
    if not turns:
        raise ValueError(f"{row['prompt_id']} sample {row['sample_id']}: no teacher turn")
    return [*(prompt or []), {"role": "user", "content": row["input"]}, *turns]


def run_folder(out: str | Path) -> Path:
    """The synthesis folder of OUT: OUT itself, or a `genpi run` folder's data/."""
    out = Path(out)
    if not (out / "dialogues").is_dir() and (out / "data" / "dialogues").is_dir():
        return out / "data"
    return out


def export(
    out: str | Path,
    to: str | Path,
    fmt: str = "messages",
    with_prompt: bool = False,
    prompts: list[str] | None = None,
    license: str = "other",
) -> dict:
    """Export OUT's good dialogue rows to DIR (module docstring); returns the card's front matter."""
    if fmt not in FORMATS:
        raise InputError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out, to = run_folder(out), Path(to)
    if to.exists() and (not to.is_dir() or any(to.iterdir())):
        raise InputError(f"{to} exists and is not an empty folder; choose another --to, or remove it")
    manifest = read_manifest(out) or {}
    rows = good_rows(out, prompts)
    if not rows:
        raise InputError(f"{out}: no good dialogues to export" + (f" for {', '.join(prompts)}" if prompts else ""))
    ids = sorted({r["prompt_id"] for r in rows})
    system = prompt_messages(manifest, ids, out) if with_prompt else {}
    splits: dict[str, list[dict]] = {}
    for r in rows:
        if r["split"] not in SPLITS:
            raise InputError(f"{out}: {r['prompt_id']} sample {r['sample_id']} has the unknown split {r['split']!r}")
        splits.setdefault(SPLITS[r["split"]], []).append(r)

    tmp = to.with_name(f".{to.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "data").mkdir(parents=True)
    try:
        files = {}
        for split, split_rows in splits.items():
            files[split] = write_split(tmp / "data", split, split_rows, fmt, system)
        front = card_front_matter(manifest, rows, splits, files, fmt, with_prompt, license)
        (tmp / "README.md").write_text(card(front, out, manifest, ids))
        if to.exists():
            to.rmdir()  # empty, checked above
        os.replace(tmp, to)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return front


def good_rows(out: Path, prompts: list[str] | None) -> list[dict]:
    """OUT's dialogue rows without an error, by prompt and sample (either shard layout: open_dialogues)."""
    con = open_dialogues(out)
    try:
        known = {r[0] for r in con.execute("SELECT DISTINCT prompt_id FROM dialogues").fetchall()}
        unknown = sorted(set(prompts or ()) - known)
        if unknown:
            raise InputError(f"{out}: no dialogues of {', '.join(unknown)} (the run has {', '.join(sorted(known))})")
        where = " AND prompt_id IN (SELECT unnest(?))" if prompts else ""
        cursor = con.execute(
            f"SELECT * FROM dialogues WHERE error IS NULL{where} ORDER BY prompt_id, sample_id",
            [list(prompts)] if prompts else [],
        )
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, values)) for values in cursor.fetchall()]
    finally:
        con.close()


def prompt_messages(manifest: dict, ids: list[str], out: Path) -> dict[str, list[dict]]:
    """{prompt id: P as chat messages} from the catalog the run's manifest recorded (--with-prompt)."""
    catalog = (manifest.get("catalog") or {}).get("prompts") or {}
    messages = {}
    for prompt_id in ids:
        if prompt_id not in catalog:
            raise InputError(f"{out}: --with-prompt needs the run's manifest.json, which has no prompt {prompt_id!r}")
        try:
            messages[prompt_id] = entry_from_json(catalog[prompt_id]).messages()
        except CatalogError as e:
            raise InputError(f"{out}: --with-prompt: the manifest's prompt {prompt_id!r}: {first_line(e)}") from None
    return messages


def write_split(folder: Path, split: str, rows: list[dict], fmt: str, system: dict[str, list[dict]]) -> str:
    """Write one split's rows; returns the file's path inside the export."""
    if fmt == "parquet":
        table = pa.Table.from_pylist([{n: r.get(n) for n in DIALOGUE_SCHEMA.names} for r in rows], DIALOGUE_SCHEMA)
    else:
        chat = []
        for r in rows:
            try:
                messages = dialogue_messages(r, system.get(r["prompt_id"]))
            except ValueError as e:
                raise InputError(f"cannot export the row: {e}") from None
            chat.append({"messages": messages, **{n: r.get(n) for n in META}})
        if fmt == "jsonl":
            path = folder / f"{split}.jsonl"
            with open(path, "w", encoding="utf-8") as f:
                for row in chat:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
            return path.relative_to(folder.parent).as_posix()
        table = pa.Table.from_pylist(chat, MESSAGES_SCHEMA)
    path = folder / f"{split}-00000-of-00001.parquet"  # the hub's file naming: {split}-{shard}-of-{shards}
    pq.write_table(table, path)
    return path.relative_to(folder.parent).as_posix()


def size_category(n: int) -> str:
    """The Hugging Face hub's size_categories bin of n rows."""
    bins = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"))
    return next((name for limit, name in bins if n < limit), "1M<n<10M" if n < 10_000_000 else "n>10M")


def card_front_matter(
    manifest: dict,
    rows: list[dict],
    splits: dict[str, list[dict]],
    files: dict[str, str],
    fmt: str,
    with_prompt: bool,
    license: str,
) -> dict:
    """The card's YAML: the hub's keys (license, task_categories, tags, size_categories, configs: the splits'
    files, which `datasets.load_dataset(DIR)` follows), then genpi's (prompts, models, sizes, how it was made)."""

    def models(key: str, role: str) -> list:  # the rows' models, else the manifest's
        return sorted({r[key] for r in rows if r.get(key)}) or [(manifest.get(role) or {}).get("model")]

    by_prompt: dict[str, dict] = {}
    for r in rows:
        p = by_prompt.setdefault(
            r["prompt_id"], {"id": r["prompt_id"], "sha256": r["prompt_sha256"], "train": 0, "test": 0}
        )
        p[SPLITS[r["split"]]] += 1
    recorded = manifest.get("prompts") or {}
    for p in by_prompt.values():  # the manifest's count of the rows that failed, when there is one
        shards = (recorded.get(p["id"]) or {}).get("shards") or {}
        if shards:
            p["failed"] = sum(s.get("failed", 0) for s in shards.values())

    def one(names: list) -> object:
        return names[0] if len(names) == 1 else names

    return {
        "pretty_name": f"genpi dialogues: {', '.join(by_prompt)}",
        "license": license,
        "task_categories": ["text-generation"],
        "tags": ["genpi", "prompt-internalization", "synthetic", "conversational"],
        "size_categories": [size_category(len(rows))],
        "configs": [
            {
                "config_name": "default",
                "data_files": [{"split": s, "path": files[s]} for s in SPLITS.values() if s in files],
            }
        ],
        "prompts": list(by_prompt.values()),
        "generator_model": one(models("generator_model", "generator")),
        "target_model": one(models("target_model", "target")),
        "num_rows": {s: len(splits[s]) for s in SPLITS.values() if s in splits},
        "format": fmt,
        "with_prompt": with_prompt,
        "made_with": f"genpi {__version__} (genpi synth, then genpi export)",
    }


def card(front: dict, out: Path, manifest: dict, ids: list[str]) -> str:
    """The dataset card: the front matter, then how the data was made and the quality table (genpi stats)."""
    from genpi.synth.stats import format_stats, quality_stats

    stats = [s for s in quality_stats(out) if s["prompt_id"] in ids]
    settings = manifest.get("settings") or {}
    made = {k: settings[k] for k in sorted(settings) if settings[k] is not None}
    fmt = front["format"]
    columns = (
        "`messages` (the dialogue: "
        + ("P's system turn and shots, then " if front["with_prompt"] else "")
        + "the pseudo user input, then the teacher's turns as `assistant` and the environment's as `user`, "
        "alternating, ending on the teacher), then the row's metadata: " + ", ".join(f"`{n}`" for n in META)
        if fmt != "parquet"
        else "the dialogue rows as genpi writes them (docs/design.md, the dialogue row contract)"
    )
    loader = "json" if fmt == "jsonl" else "parquet"
    lines = [
        *front_matter(front),
        f"# {front['pretty_name']}",
        "",
        "Training dialogues for Generative Prompt Internalization (GenPI): for each prompt P below, the generator "
        f"model (`{front['generator_model']}`) wrote pseudo user inputs from P's examples; the target model "
        f"(`{front['target_model']}`) with P in its context, the teacher, role-played the agent on each input "
        "against an environment persona (the target too, with P's shots' roles swapped); the target without P "
        "answered the same input (`student_output`), and the generator wrote why the teacher's first turn should "
        "replace that answer (`reason`). Fine-tuning the target on these dialogues without P teaches it to behave "
        "as if P were in its context.",
        "",
        f"Columns: {columns}. Splits: `train`, and `test` (genpi's held-out rows, `split` = `heldout`). "
        f"Only dialogues without an error are here. Licence: `{front['license']}`; set it (`genpi export --license`) "
        "to the terms of P and of the generator model's outputs.",
        "",
        "```python",
        "from datasets import load_dataset",
        "",
        'data = load_dataset("PATH/TO/THIS/FOLDER")  # or load_dataset("' + loader + '", data_dir=...)',
        "```",
        "",
        "## How it was made",
        "",
        f"`genpi synth` (genpi {__version__}), exported by `genpi export --format {fmt}"
        + (" --with-prompt" if front["with_prompt"] else "")
        + "`.",
        "",
        "| prompt | sha256 | train | test |",
        "| --- | --- | --- | --- |",
        *(f"| {p['id']} | `{p['sha256']}` | {p['train']} | {p['test']} |" for p in front["prompts"]),
        "",
    ]
    if made:
        lines += ["Synthesis settings:", "", "```yaml", yaml.safe_dump(made, sort_keys=True).rstrip(), "```", ""]
    lines += [
        "## Quality",
        "",
        "`genpi stats` over the run (all rows, failed ones included; percentages over good rows):",
        "",
        "```",
        format_stats(stats),
        "```",
        "",
    ]
    return "\n".join(lines)
