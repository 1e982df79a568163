"""Reading a synthesis run's dialogue rows (DuckDB over the Parquet shards of genpi.data.store).

    open_dialogues(OUT)       in-memory DuckDB connection with a view `dialogues` over every shard
    prompt_rows(OUT, ENTRY)   one prompt's good rows, (train, heldout), checked against the catalog's prompt

Every shard holds its `prompt_id` as a (VARCHAR) column, so ids such as `007` stay strings. The view reads
the files with `hive_partitioning = false`: the column comes from the file in both layouts
(genpi.data.store: `dialogues/ID/` and a legacy run's `dialogues/prompt_id=ID/`), never from a path.

A connection is sandboxed once its view exists: file access is limited to OUT
and the configuration is locked, so a query can read the run but nothing else.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import duckdb

from genpi import InputError
from genpi.catalog import PromptEntry
from genpi.data.store import dialogue_files

# What one connection may take: a query over a large run must not take the machine's memory, disk or cores
# (the defaults of `genpi sql` too).
MEMORY_LIMIT = "4GB"
MAX_TEMP = "10GB"  # what DuckDB may spill to disk beyond the memory limit (its default: 90% of the free disk)
THREADS = 2
# the columns training reads (a run from an older genpi may lack some)
REQUIRED_COLUMNS = {
    "prompt_id",
    "prompt_sha256",
    "sample_id",
    "split",
    "input",
    "turns",
    "student_output",
    "reason",
    "error",
}


def open_dialogues(
    out: str | Path, memory_limit: str = MEMORY_LIMIT, threads: int = THREADS, max_temp: str = MAX_TEMP
) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the view `dialogues` over all shards of OUT. What a query spills
    goes to a private folder inside OUT (DuckDB creates it when it first spills and removes it on close), at
    most `max_temp` of it; DuckDB's own default is `.tmp` in the working directory, unbounded."""
    out = Path(out)
    if not out.is_dir():
        raise InputError(f"{out}: no such run folder (run genpi synth first)")
    root = out.resolve()
    # The shards as a list of files, not a glob: OUT itself may hold glob characters ([, *, ?).
    files = [str(f) for f in dialogue_files(root)]
    if not files:
        raise InputError(f"{out}: no dialogue shards yet (run genpi synth first)")
    try:
        # Limits go in before the configuration is locked below.
        spill = root / f".duckdb-spill-{os.getpid()}-{secrets.token_hex(4)}"
        con = duckdb.connect(
            ":memory:",
            config={
                "memory_limit": memory_limit,
                "threads": threads,
                "temp_directory": str(spill),
                "max_temp_directory_size": max_temp,
            },
        )
    except duckdb.Error as e:
        raise InputError(
            f"bad DuckDB limits (memory {memory_limit!r}, temp {max_temp!r}, threads {threads}): {first_line(e)}"
        ) from None
    try:
        listed = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
        con.execute(f"CREATE VIEW dialogues AS SELECT * FROM read_parquet([{listed}], hive_partitioning = false)")
        con.execute("SET allowed_directories = ?", [[str(root) + "/"]])
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
        con.execute("SELECT * FROM dialogues LIMIT 0")  # unreadable shards fail here, not in a caller
    except duckdb.Error as e:
        con.close()
        raise InputError(f"{out}: cannot read the dialogue shards: {first_line(e)}") from None
    return con


def first_line(e: BaseException) -> str:
    """An error's first line (DuckDB's messages run over several), or its type's name when it has none."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def prompt_rows(data: str | Path, entry: PromptEntry) -> tuple[list[dict], list[dict]]:
    """The prompt's good dialogue rows, (train, heldout); clear errors for unusable data."""
    con = open_dialogues(data)
    columns = {row[0] for row in con.execute("DESCRIBE dialogues").fetchall()}
    missing = sorted(REQUIRED_COLUMNS - columns)
    if missing:
        raise InputError(f"{data}: dialogue shards lack the columns {', '.join(missing)}")
    cursor = con.execute("SELECT * FROM dialogues WHERE prompt_id = ? AND error IS NULL ORDER BY sample_id", [entry.id])
    names = [d[0] for d in cursor.description]
    rows = [dict(zip(names, values)) for values in cursor.fetchall()]
    stale = {r["prompt_sha256"] for r in rows} - {entry.sha256}
    if stale:
        raise InputError(
            f"{data}: dialogues of {entry.id!r} were synthesized from another version of the prompt; resynthesize"
        )
    return [r for r in rows if r["split"] == "train"], [r for r in rows if r["split"] == "heldout"]
