"""The dialogue-row contract and the Parquet files of a synthesis run (and of the evaluations' results).

    OUT/inputs/ID.parquet                  pseudo user inputs of a prompt (INPUT_SCHEMA: prompt_id, sample_id, ...)
    OUT/dialogues/ID/part-NNNNN.parquet    one row per dialogue (DIALOGUE_SCHEMA)
    EVAL/NAME/ID/SYS/part-00000.parquet    evaluation NAME's rows of one system (results_path; each evaluation
                                           defines its schema, led by prompt_id and system)

Every file holds its prompt_id (and an evaluation's its system) as a column, and the folders are plain names, not
hive partitions (`prompt_id=ID/`): a folder of them is one table to pandas, pyarrow.dataset, polars, DuckDB and
Hugging Face `datasets` alike. Hive folders over files that also hold the column (genpi before issue 26: LEGACY)
made pandas refuse the folder (the path's dictionary-typed value against the file's string), and
dropping the column instead would leave a file that does not say which prompt it holds, lose the id in readers
that ignore hive paths (`datasets`), and let readers that infer a partition's type turn an id such as `007` into
the number 7. genpi's own readers list files of both layouts (legacy files hold the columns too); a resumed
synthesis moves a legacy run's folders to the plain names (upgrade_layout).

OUT/manifest.json, which lists the finished shards with their SHA-256, is genpi.data.manifest's.
Every file appears only when complete: it is written under a temporary name
and renamed into place (write_atomic), so a run killed at any point leaves either the old file
or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from genpi import InputError

TURN = pa.struct([("role", pa.string()), ("content", pa.string())])
# The teacher's top-k log-probabilities over one agent turn, for logit-level distillation (topk-kl):
# `token_ids` are the generated tokens of the turn's text; per token, the k most likely ids and their logprobs.
TOPK_TURN = pa.struct(
    [
        ("token_ids", pa.list_(pa.int32())),
        ("topk_ids", pa.list_(pa.list_(pa.int32()))),
        ("topk_logprobs", pa.list_(pa.list_(pa.float32()))),
    ]
)
# A role-play ends on the environment's end marker or at the turn limit, not at the agent's final action (as the
# reference; runs made before issue 25 also hold "final_action", which no count includes)
TERMINATED_BY = ("environment", "max_turns", "truncated", "error")

DIALOGUE_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("prompt_sha256", pa.string()),
        ("sample_id", pa.int64()),
        ("seed", pa.int64()),
        ("split", pa.string()),  # train | heldout
        ("input", pa.string()),
        ("turns", pa.list_(TURN)),  # agent turns "assistant", environment turns "user"; starts with the agent
        ("turn_cut", pa.list_(pa.bool_())),  # per turn: its text was cut by the token limit
        ("student_output", pa.string()),  # the target model's answer to `input` without the prompt (AS-IS)
        ("reason", pa.string()),  # why AS-IS should become the teacher's first turn (TO-BE), given the prompt
        ("student_output_cut", pa.bool_()),
        ("reason_cut", pa.bool_()),
        ("n_turns", pa.int32()),  # agent turns
        ("terminated", pa.bool_()),  # the environment emitted its end marker (asked once more after the last turn)
        ("terminated_by", pa.string()),  # how the dialogue ended: one of TERMINATED_BY
        ("hit_max_turns", pa.bool_()),  # the turn limit, not the environment's end marker, ended it
        ("truncated", pa.bool_()),  # stopped early because the dialogue outgrew the model's context
        ("final_action", pa.string()),  # the last agent turn
        ("final_action_valid", pa.bool_()),  # it matches actions.final (actions.valid without one); null without either
        ("teacher_topk", pa.list_(TOPK_TURN)),  # one per agent turn; null when not recorded (--teacher-topk 0)
        ("generator_model", pa.string()),
        ("target_model", pa.string()),
        ("prompt_tokens", pa.int64()),  # all prompt tokens processed for this dialogue
        ("agent_tokens", pa.int64()),  # generated tokens, per producer
        ("environment_tokens", pa.int64()),
        ("student_tokens", pa.int64()),
        ("reason_tokens", pa.int64()),
        ("error", pa.string()),  # null for a good dialogue; the reason a failed one failed
    ]
)
DIALOGUE_COLUMNS = tuple(DIALOGUE_SCHEMA.names)

# prompt_id: the folder of every prompt's inputs reads as one table (runs before issue 26 lack it: the file name says)
INPUT_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("sample_id", pa.int64()),
        ("seed", pa.int64()),
        ("split", pa.string()),
        ("input", pa.string()),
    ]
)
# The folder names of genpi before issue 26 (hive partitions); read still, never written.
LEGACY_PROMPT = "prompt_id="
LEGACY_SYSTEM = "system="


def shard_path(out: str | Path, prompt_id: str, shard: int) -> Path:
    return Path(out) / "dialogues" / prompt_id / f"part-{shard:05d}.parquet"


def dialogue_files(out: str | Path) -> list[Path]:
    """Every dialogue shard of OUT, in either layout (a legacy run's `prompt_id=ID/` folders too), sorted."""
    return sorted((Path(out) / "dialogues").glob("*/part-*.parquet"))


def upgrade_layout(out: str | Path) -> list[str]:
    """Move a legacy run's `dialogues/prompt_id=ID/` folders to `dialogues/ID/` (one rename each: atomic, the files
    as they were, so the manifest's SHA-256 still hold); returns the moved prompt ids. Called by a synthesis run
    that holds OUT's lock. InputError when a prompt has both folders (which one is the run's is not known)."""
    moved = []
    for old in sorted((Path(out) / "dialogues").glob(f"{LEGACY_PROMPT}*")):
        prompt_id = old.name.removeprefix(LEGACY_PROMPT)
        new = old.with_name(prompt_id)
        if new.exists():
            raise InputError(
                f"{old.parent} holds the dialogues of {prompt_id!r} twice, in {old.name}/ (genpi before issue 26) "
                f"and in {prompt_id}/; keep the run's one and remove the other"
            )
        os.replace(old, new)
        moved.append(prompt_id)
    return moved


def inputs_path(out: str | Path, prompt_id: str) -> Path:
    return Path(out) / "inputs" / f"{prompt_id}.parquet"


def results_path(eval_dir: str | Path, evaluation: str, prompt_id: str, system: str) -> Path:
    """Where evaluation NAME writes one system's rows for one prompt (plain folders, as the shards)."""
    return Path(eval_dir) / evaluation / prompt_id / system / "part-00000.parquet"


def legacy_results_path(eval_dir: str | Path, evaluation: str, prompt_id: str, system: str) -> Path:
    return (
        Path(eval_dir) / evaluation / f"{LEGACY_PROMPT}{prompt_id}" / f"{LEGACY_SYSTEM}{system}" / "part-00000.parquet"
    )


def write_results(
    eval_dir: str | Path, evaluation: str, prompt_id: str, system: str, rows: list[dict], schema: pa.Schema
) -> Path:
    """Write one system's rows of evaluation NAME for one prompt (atomically); the same rows written by a genpi
    before issue 26 (legacy folders of the same EVAL) are removed, so that no reader counts them twice."""
    path = results_path(eval_dir, evaluation, prompt_id, system)
    write_table(path, rows, schema)
    legacy = legacy_results_path(eval_dir, evaluation, prompt_id, system)
    if legacy.exists():
        legacy.unlink()
        for folder in (legacy.parent, legacy.parent.parent):  # the emptied legacy folders
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
    return path


def results_files(eval_dir: str | Path, evaluation: str, prompt_id: str | None = None) -> list[Path]:
    """The row files of evaluation NAME (of one prompt, or of all), in either layout, sorted."""
    root = Path(eval_dir) / evaluation
    prompts = ["*"] if prompt_id is None else [prompt_id, f"{LEGACY_PROMPT}{prompt_id}"]
    return sorted({f for p in prompts for f in root.glob(f"{p}/*/part-*.parquet")})


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def write_atomic(path: Path, write) -> str:
    """Write through a temporary file and rename it into place; returns the file's SHA-256 (read back from
    the written file, so that it is what a later check of the file compares with). Any OSError (disk full,
    I/O error) leaves `path` as it was and no temporary file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        digest = file_sha256(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return digest


def write_table(path: Path, rows: list[dict], schema: pa.Schema) -> str:
    """Write `rows` as one Parquet file, atomically; returns its SHA-256 (manifests record it per shard)."""
    table = pa.Table.from_pylist(rows, schema=schema)
    return write_atomic(path, lambda tmp: pq.write_table(table, tmp))


def read_rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def remove_stale_temporaries(out: str | Path) -> None:
    """Temporary files left by a killed run: never visible to readers, safe to drop."""
    for tmp in Path(out).rglob(".*.tmp"):
        tmp.unlink(missing_ok=True)
