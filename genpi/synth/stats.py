"""Quality statistics and ad-hoc SQL over a synthesis run's dialogue shards (DuckDB).

    quality_stats(OUT)      one dict per prompt: the paper's quality figures (Table 4), counts, lengths
    format_stats(stats)     those as a fixed-width table (plus the commonest errors)
    run_sql(OUT, QUERY)     one read-only SELECT over `dialogues` -> QueryResult (columns, rows, cut)
    rows_json(result)       its rows as a JSON list of row objects
    format_rows(cols, rows) a fixed-width table of a query result

Both read the shards through genpi.data.dialogues.open_dialogues (a sandboxed DuckDB view `dialogues`).
Table 4's figures, as the paper defines them, from the row columns of genpi.data.store.DIALOGUE_SCHEMA:
    % max turns             hit_max_turns: the turn limit, not the environment's end marker, ended the dialogue
    % no termination        not terminated: the environment never emitted its end marker, not even when
                            asked once more after the last allowed turn
    % invalid final action  not final_action_valid: the last agent turn does not match actions.final, the
                            prompt's own final actions (the paper per task: OS finish or answer; web browsing
                            click, type, select or None; web shopping search or click); actions.valid where
                            the catalog gives no final; prompts with neither: null
and `terminated_by` counts how the dialogues ended (store.TERMINATED_BY; failed rows are "error").
Two figures of teaching value (genpi.synth.quality), computed in Python over the rows DuckDB reads:
    % degenerate turns      agent turns that are loops (one repeated phrase covers most of the turn)
    % degenerate rows       dialogues with at least one such turn
    % inputs passing        dialogues whose student_output (the base without P) already passes the
                            prompt's behaviour checks (genpi.checks): inputs that cannot teach P; null
                            without a check (or without the run's manifest, which holds the catalog)
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path

import duckdb

from genpi import InputError
from genpi.data.dialogues import MAX_TEMP, MEMORY_LIMIT, THREADS, first_line, open_dialogues
from genpi.data.manifest import read_manifest
from genpi.data.store import TERMINATED_BY
from genpi.synth.quality import behaviour_check, degenerate

TOP_ERRORS = 3
MAX_CELL = 60

# Per-prompt figures over the dialogue rows; percentages are over good (error-free) rows.
_STATS_SQL = """
WITH d AS (SELECT *, error IS NULL AS good FROM dialogues),
per_prompt AS (
    SELECT
        prompt_id,
        count(*) AS rows,
        count(*) FILTER (WHERE NOT good) AS failed,
        count(*) FILTER (WHERE good AND split = 'train') AS train,
        count(*) FILTER (WHERE good AND split = 'heldout') AS heldout,
        round(avg(n_turns) FILTER (WHERE good), 2) AS avg_turns,
        round(avg(CASE WHEN hit_max_turns THEN 100.0 ELSE 0.0 END) FILTER (WHERE good), 1) AS pct_hit_max_turns,
        round(avg(CASE WHEN terminated THEN 0.0 ELSE 100.0 END) FILTER (WHERE good), 1) AS pct_no_termination,
        round(avg(CASE WHEN final_action_valid THEN 0.0 ELSE 100.0 END)
              FILTER (WHERE good AND final_action_valid IS NOT NULL), 1) AS pct_invalid_final_action,
        round(avg(CASE WHEN truncated THEN 100.0 ELSE 0.0 END) FILTER (WHERE good), 1) AS pct_truncated,
        {by_columns},
        round(avg(length(input)) FILTER (WHERE good), 1) AS mean_input_chars,
        round(sum(list_sum(list_transform(list_filter(turns, lambda t: t.role = 'assistant'),
                                          lambda t: length(t.content)))) FILTER (WHERE good)
              / nullif(sum(len(list_filter(turns, lambda t: t.role = 'assistant'))) FILTER (WHERE good), 0), 1)
            AS mean_agent_turn_chars,
        round(avg(length(student_output)) FILTER (WHERE good), 1) AS mean_student_chars,
        round(avg(length(reason)) FILTER (WHERE good), 1) AS mean_reason_chars,
        round(1 - count(DISTINCT input) FILTER (WHERE good)
                  / nullif(count(*) FILTER (WHERE good), 0), 3) AS duplicate_input_rate,
        CAST(sum(coalesce(agent_tokens, 0) + coalesce(environment_tokens, 0)
                 + coalesce(student_tokens, 0) + coalesce(reason_tokens, 0)) AS BIGINT) AS generated_tokens
    FROM d
    GROUP BY prompt_id
)
SELECT * FROM per_prompt ORDER BY prompt_id
""".format(
    by_columns=",\n        ".join(f"count(*) FILTER (WHERE terminated_by = '{t}') AS by_{t}" for t in TERMINATED_BY)
)

_ERRORS_SQL = f"""
SELECT prompt_id, error, count(*) AS n
FROM dialogues
WHERE error IS NOT NULL
GROUP BY prompt_id, error
QUALIFY row_number() OVER (PARTITION BY prompt_id ORDER BY n DESC, error) <= {TOP_ERRORS}
ORDER BY prompt_id, n DESC, error
"""

# The columns the Python figures read: good rows only, as the percentages of _STATS_SQL.
_TEXT_SQL = "SELECT prompt_id, turns, student_output FROM dialogues WHERE error IS NULL"
_BATCH = 1000

_ZERO_COUNTS = {"rows": 0, "failed": 0, "train": 0, "heldout": 0, "generated_tokens": 0} | {
    f"by_{t}": 0 for t in TERMINATED_BY
}

# Defaults of `genpi sql`: a query over a large run must not take the machine's time, nor print more than a
# terminal (or a pipe) takes (its memory, disk and cores: genpi.data.dialogues' MEMORY_LIMIT, MAX_TEMP, THREADS).
TIMEOUT_S = 300.0
MAX_ROWS = 10_000


def _manifest_prompts(out: str | Path) -> dict[str, dict]:
    """gold_turns / max_turns / samples per prompt id from OUT/manifest.json ({} without one)."""
    manifest = read_manifest(out) or {}
    return {
        prompt_id: {
            "gold_turns": None if record.get("gold_turns") is None else round(float(record["gold_turns"]), 2),
            "max_turns": record.get("max_turns"),
            "samples": record.get("samples"),
        }
        for prompt_id, record in (manifest.get("prompts") or {}).items()
    }


def _manifest_checks(out: str | Path, check) -> dict[str, object]:
    """{prompt id: check(entry)} for the prompts of the catalog stored in OUT/manifest.json ({} without one)."""
    from genpi.catalog import CatalogError, entry_from_json

    checks = {}
    for prompt_id, data in (((read_manifest(out) or {}).get("catalog") or {}).get("prompts") or {}).items():
        try:
            checks[prompt_id] = check(entry_from_json(data))
        except CatalogError:  # a manifest from another genpi version: no check rather than no stats
            checks[prompt_id] = None
    return checks


def _pct(part: int, whole: int) -> float | None:
    return round(100.0 * part / whole, 1) if whole else None


def _text_figures(con, checks: dict) -> dict[str, dict]:
    """Per prompt: pct_degenerate_turns, pct_degenerate_rows, pct_inputs_already_passing (over good rows)."""
    counts: dict[str, list[int]] = {}  # prompt id -> [rows, agent turns, degenerate turns, degenerate rows, in format]
    result = con.execute(_TEXT_SQL)
    while batch := result.fetchmany(_BATCH):
        for prompt_id, turns, student_output in batch:
            c = counts.setdefault(prompt_id, [0, 0, 0, 0, 0])
            loops = [degenerate(t["content"]) for t in turns or [] if t["role"] == "assistant"]
            check = checks.get(prompt_id)
            c[0], c[1], c[2], c[3] = c[0] + 1, c[1] + len(loops), c[2] + sum(loops), c[3] + any(loops)
            c[4] += bool(check and check(student_output or ""))
    return {
        prompt_id: {
            "pct_degenerate_turns": _pct(c[2], c[1]),
            "pct_degenerate_rows": _pct(c[3], c[0]),
            "pct_inputs_already_passing": _pct(c[4], c[0]) if checks.get(prompt_id) else None,
        }
        for prompt_id, c in counts.items()
    }


def quality_stats(out: str | Path, check=behaviour_check) -> list[dict]:
    """One dict per prompt (those with rows, plus those the manifest lists), sorted by prompt id.

    Keys: prompt_id, gold_turns, max_turns, samples (from the manifest; None without one),
    rows, failed, train, heldout, avg_turns, pct_hit_max_turns, pct_no_termination,
    pct_invalid_final_action, pct_truncated, terminated_by ({reason: count} for every
    store.TERMINATED_BY, over all rows), mean_input_chars, mean_agent_turn_chars,
    mean_student_chars, mean_reason_chars, duplicate_input_rate, generated_tokens,
    pct_degenerate_turns, pct_degenerate_rows, pct_inputs_already_passing, top_errors.
    Percentages (0-100, 1 decimal) and means are over good rows; counts of tokens over all rows.
    `check(entry)` gives the predicate "a reply already shows P's behaviour" for a catalog entry, or
    None (then pct_inputs_already_passing is null); the entries come from the run's manifest.
    """
    checks = _manifest_checks(out, check)
    con = open_dialogues(out)
    try:
        result = con.execute(_STATS_SQL)
        columns = [c[0] for c in result.description]
        by_id = {row[0]: dict(zip(columns, row)) for row in result.fetchall()}
        errors: dict[str, list[dict]] = {}
        for prompt_id, error, n in con.execute(_ERRORS_SQL).fetchall():
            errors.setdefault(prompt_id, []).append({"error": error, "count": n})
        text = _text_figures(con, checks)
    finally:
        con.close()
    no_text = dict.fromkeys(("pct_degenerate_turns", "pct_degenerate_rows", "pct_inputs_already_passing"))
    manifest = _manifest_prompts(out)
    stats = []
    for prompt_id in sorted(set(by_id) | set(manifest)):
        row = by_id.get(prompt_id) or {c: _ZERO_COUNTS.get(c) for c in columns}
        info = manifest.get(prompt_id, {})
        stats.append(
            {
                "prompt_id": prompt_id,
                "gold_turns": info.get("gold_turns"),
                "max_turns": info.get("max_turns"),
                "samples": info.get("samples"),
                **{c: row[c] for c in columns if c != "prompt_id" and not c.startswith("by_")},
                **text.get(prompt_id, no_text),
                "terminated_by": {t: row[f"by_{t}"] for t in TERMINATED_BY},
                "top_errors": errors.get(prompt_id, []),
            }
        )
    return stats


# (header, key, format) in display order: the paper's quality figures first.
_STATS_COLUMNS = [
    ("prompt", "prompt_id", "{}"),
    ("gold turns", "gold_turns", "{:.2f}"),
    ("avg turns", "avg_turns", "{:.2f}"),
    ("max", "max_turns", "{}"),
    ("% max turns", "pct_hit_max_turns", "{:.1f}"),
    ("% no term", "pct_no_termination", "{:.1f}"),
    ("% invalid final", "pct_invalid_final_action", "{:.1f}"),
    ("ended env/max/trunc/err", "terminated_by", None),
    ("rows", "rows", "{}"),
    ("failed", "failed", "{}"),
    ("train", "train", "{}"),
    ("heldout", "heldout", "{}"),
    ("dup input", "duplicate_input_rate", "{:.3f}"),
    ("% trunc", "pct_truncated", "{:.1f}"),
    ("% degen turns", "pct_degenerate_turns", "{:.1f}"),
    ("% degen rows", "pct_degenerate_rows", "{:.1f}"),
    ("% input passes", "pct_inputs_already_passing", "{:.1f}"),
    ("input ch", "mean_input_chars", "{:.0f}"),
    ("agent turn ch", "mean_agent_turn_chars", "{:.0f}"),
    ("student ch", "mean_student_chars", "{:.0f}"),
    ("reason ch", "mean_reason_chars", "{:.0f}"),
    ("gen tokens", "generated_tokens", "{}"),
]


def format_stats(stats: list[dict]) -> str:
    """A fixed-width table, one line per prompt; then the commonest error reasons per prompt."""
    if not stats:
        return "no prompts"
    headers = [h for h, _, _ in _STATS_COLUMNS]
    body = [[_stat_cell(s.get(key), fmt) for _, key, fmt in _STATS_COLUMNS] for s in stats]
    lines = [_table(headers, body, numeric=[i > 0 for i in range(len(headers))])]
    failing = [s for s in stats if s.get("top_errors")]
    if failing:
        lines.append("")
        lines.append(f"most common errors (top {TOP_ERRORS} per prompt):")
        for s in failing:
            lines.append(f"  {s['prompt_id']} ({s['failed']} failed):")
            for e in s["top_errors"]:
                lines.append(f"    {e['count']:>6}  {_cell(e['error'], 100)}")
    return "\n".join(lines)


def _stat_cell(value, fmt: str | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):  # terminated_by counts
        return "/".join(str(value[t]) for t in TERMINATED_BY)
    return fmt.format(value)


@dataclasses.dataclass
class QueryResult:
    """What `genpi sql` prints: at most max_rows rows, and whether the query had more."""

    columns: list[str]
    rows: list[tuple]
    cut: bool  # the query had more rows than max_rows: those were neither fetched nor converted
    deadline: float  # time.monotonic() when the time limit ends: rendering the rows counts against it too
    timeout: float

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise InputError(f"query stopped after the time limit of {self.timeout:g} s (--timeout)")


def run_sql(
    out: str | Path,
    query: str,
    memory_limit: str = MEMORY_LIMIT,
    threads: int = THREADS,
    timeout: float = TIMEOUT_S,
    max_rows: int = MAX_ROWS,
    max_temp: str = MAX_TEMP,
) -> QueryResult:
    """Run one read-only SELECT over the view `dialogues`; its first `max_rows` rows. InputError for anything
    else, a bad query, or one whose running and converting take longer than `timeout` seconds."""
    if max_rows < 1 or not timeout > 0:
        raise InputError(f"--max-rows must be at least 1 and --timeout above 0, got {max_rows} and {timeout:g}")
    con = open_dialogues(out, memory_limit, threads, max_temp)
    timer = threading.Timer(timeout, con.interrupt)
    timer.daemon = True
    try:
        try:
            statements = con.extract_statements(query)
        except duckdb.Error as e:
            raise InputError(f"bad query: {first_line(e)}") from None
        if not statements:
            raise InputError("empty query: give one SELECT statement over the view `dialogues`")
        if len(statements) > 1:
            raise InputError(f"expected one SELECT statement, got {len(statements)} statements")
        kind = statements[0].type
        if kind != duckdb.StatementType.SELECT:
            raise InputError(f"only a SELECT statement is allowed, got {kind.name}")
        result = QueryResult([], [], False, time.monotonic() + timeout, timeout)
        timer.start()
        try:
            cursor = con.execute(statements[0])
            result.columns = [c[0] for c in cursor.description]
            # In batches, one past the cap: the interrupt stops DuckDB between chunks, the deadline the conversion
            # to Python values, and rows past the cap are never converted.
            while len(result.rows) <= max_rows:
                batch = cursor.fetchmany(min(_BATCH, max_rows + 1 - len(result.rows)))
                result.check_time()
                if not batch:
                    break
                result.rows += batch
        except duckdb.InterruptException:
            raise InputError(f"query stopped after the time limit of {timeout:g} s (--timeout)") from None
        except duckdb.Error as e:
            raise InputError(f"query failed: {first_line(e)}") from None
    finally:
        timer.cancel()
        con.close()
    result.cut = len(result.rows) > max_rows
    del result.rows[max_rows:]
    return result


def rows_json(result: QueryResult) -> str:
    """The rows as a JSON list of row objects (values JSON lacks as strings), within the query's time limit."""
    parts = []
    for row in result.rows:
        result.check_time()
        parts.append(json.dumps(dict(zip(result.columns, row)), indent=2, default=str))
    return "[\n" + ",\n".join("  " + p.replace("\n", "\n  ") for p in parts) + "\n]" if parts else "[]"


def _cell(value: object, width: int = MAX_CELL) -> str:
    text = "NULL" if value is None else str(value)
    text = text.replace("\r", "\\r").replace("\n", "\\n").replace("\t", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def _table(headers: list[str], body: list[list[str]], numeric: list[bool]) -> str:
    widths = [max([len(h)] + [len(r[i]) for r in body]) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if n else c.ljust(w) for c, w, n in zip(cells, widths, numeric)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in body])


def format_rows(columns: list[str], rows: list[tuple], check_time=lambda: None) -> str:
    """A query result as a fixed-width table (cells cut to ~60 characters) with a row count; `check_time()` is
    called before each row is rendered (QueryResult.check_time: InputError past the time limit)."""
    numeric = [
        bool(rows)
        and all(isinstance(r[i], (int, float)) and not isinstance(r[i], bool) for r in rows if r[i] is not None)
        for i in range(len(columns))
    ]
    body = []
    for row in rows:
        check_time()
        body.append([_cell(v) for v in row])
    count = f"({len(rows)} row{'' if len(rows) == 1 else 's'})"
    return _table([_cell(c) for c in columns], body, numeric) + "\n" + count
