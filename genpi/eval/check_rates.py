"""The behaviour checks of genpi eval fidelity, per system: each check (genpi.checks) on every agent turn of an
episode, its pass rates (first turn with a bootstrap interval, all turns, per turn k over the episodes that reach
it), their retention (system / teacher) and their lines under the fidelity table.
"""

from __future__ import annotations

from genpi.catalog import PromptEntry
from genpi.checks import run_checks
from genpi.eval.evaluate import pct
from genpi.eval.gap import rate_ci
from genpi.eval.metrics import present_mean, ratio


def check_columns(entry: PromptEntry, agent: list[str], languages=()) -> dict:
    """The `checks` (first agent turn) and `turn_checks` (every agent turn) columns of one episode's agent turns."""

    def results(reply: str | None) -> list[dict]:
        return [{"name": name, "passed": passed} for name, passed in run_checks(entry, reply, languages).items()]

    return {"checks": results(agent[0] if agent else None), "turn_checks": [results(t) for t in agent]}


def check_rates(records: list[dict]) -> dict:
    """Per check: pass rate of the first agent turn (with its bootstrap interval), of all agent turns, and per turn k
    (episodes reaching turn k)."""
    names = list(dict.fromkeys(c["name"] for r in records for c in r["checks"] or []))
    rates = {}
    for name in names:
        per_turn: list[list[bool]] = []
        for r in records:
            for k, turn in enumerate(r["turn_checks"] or []):
                if k == len(per_turn):
                    per_turn.append([])
                per_turn[k] += [c["passed"] for c in turn if c["name"] == name]
        first = [c["passed"] for r in records for c in r["checks"] or [] if c["name"] == name]
        rates[name] = {
            "first_turn": present_mean(first),
            "first_turn_ci": rate_ci(first),  # 95% bootstrap interval over the held-out inputs
            "all_turns": present_mean(v for turn in per_turn for v in turn),
            "per_turn": [present_mean(turn) for turn in per_turn],
        }
    return rates


def check_retention(metrics: dict, teacher: dict) -> dict:
    """system / teacher per check: `checks.NAME` (first turn), `checks_all_turns.NAME` (every agent turn),
    `checks_per_turn.NAME` (agent turn k, over the episodes that reach it)."""
    kept = {}
    for name, rates in metrics.get("checks", {}).items():
        reference = teacher.get("checks", {}).get(name, {})
        kept[f"checks.{name}"] = ratio(rates["first_turn"], reference.get("first_turn"))
        kept[f"checks_all_turns.{name}"] = ratio(rates["all_turns"], reference.get("all_turns"))
        kept[f"checks_per_turn.{name}"] = [
            ratio(a, b) for a, b in zip(rates["per_turn"], reference.get("per_turn") or [])
        ]
    return kept


def format_checks(result: dict) -> list[str]:
    """Per check and system: first-turn and all-turn pass rates, their retention, and the rate per episode turn."""
    lines = []
    for name in next(iter(result["systems"].values())).get("checks", {}):
        lines.append(f"check {name}: pass rate (first turn, all agent turns; retention = system / teacher; per turn)")
        for system, m in result["systems"].items():
            rates = m["checks"].get(name, {})
            kept = result["retention"].get(system, {})
            per_turn = " ".join(pct(v) for v in rates.get("per_turn", []))
            lines.append(
                f"  {system:<14}{pct(rates.get('first_turn')):>8}{pct(rates.get('all_turns')):>8}"
                f"{pct(kept.get(f'checks.{name}')):>10}{pct(kept.get(f'checks_all_turns.{name}')):>8}   {per_turn}"
            )
    return lines
