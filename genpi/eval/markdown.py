"""How `genpi report` writes: Markdown tables, and how every number in them appears (`cell`)."""

from __future__ import annotations

from genpi.eval.systems import served_notes


class Rate(float):
    """A share, shown as a percentage."""


def rate(value) -> Rate | None:
    return None if value is None else Rate(value)


def cell(value) -> str:
    """How every number appears in the report's tables: shares as whole percentages, other numbers to 3 decimals."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, Rate):
        return f"{100 * value:.0f}%"
    if isinstance(value, float):
        return f"{value:.2e}" if 0 < abs(value) < 1e-3 else f"{value:.3f}"  # learning rates stay readable
    return str(value).replace("|", "\\|").replace("\n", " ")


def interval(ci: list[float] | None, share: bool = True) -> str | None:
    """A bootstrap interval as one cell."""
    if ci is None:
        return None
    lo, hi = (rate(ci[0]), rate(ci[1])) if share else ci
    return f"[{cell(lo)}, {cell(hi)}]"


def short(text: str, width: int = 24) -> str:
    """A table header from a free text (an action kind): its first line, at most `width` characters."""
    line = text.strip().splitlines()[0] if text.strip() else text
    return line if len(line) <= width and "\n" not in text.strip() else line[: width - 1] + "…"


def table(headers: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)] + [
        "| " + " | ".join(cell(v) for v in r) + " |" for r in rows
    ]


def served(metrics: dict[str, dict]) -> list[str]:
    """The note under a table of systems: which were served, and at what address (genpi.eval.systems)."""
    notes = served_notes(metrics)
    return ["; ".join(notes) + ".", ""] if notes else []


def drop_empty_sections(md: list[str]) -> list[str]:
    """Headings with nothing under them go (what is missing is listed once, at the end)."""
    out = []
    for i, line in enumerate(md):
        if line.startswith("## "):
            following = next((x for x in md[i + 1 :] if x.strip()), None)
            if following is None or following.startswith("## "):
                continue
        if not line.strip() and out and not out[-1].strip():
            continue
        out.append(line)
    return out


def scored_results(summary: dict, name: str, missing: list[str], adapters: dict[str, dict]) -> list[dict]:
    """A whole-catalog summary's (fidelity, leakage) scored results; each skipped prompt's reason goes to `missing`,
    each scored prompt's adapter folders to `adapters` (prompt id -> {system: folder})."""
    done = [r for r in summary["results"] if "skipped" not in r]
    missing += [f"{name} of {r['prompt_id']}: {r['skipped']}" for r in summary["results"] if "skipped" in r]
    for r in done:
        adapters.setdefault(r["prompt_id"], {}).update(r["adapters"])
    return done
