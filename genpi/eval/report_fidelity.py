"""The report's fidelity section and its opening verdict, from EVAL/fidelity.json (genpi eval fidelity), and the
per-turn action-space rates, the one part of the report read from the fidelity Parquet rows."""

from __future__ import annotations

from pathlib import Path

from genpi.data.store import results_files
from genpi.eval import plots
from genpi.eval.markdown import cell, interval, rate, scored_results, served, short, table

FIDELITY = (
    ("format", "format_rate"),
    ("kind agreement", "kind_agreement"),
    ("action agreement", "action_agreement"),
    ("ROUGE-L F", "rouge_l"),
    ("episode in-space", "action_space_rate"),
    ("episode final", "final_rate"),
    ("mean turns", "mean_turns"),
    ("at limit", "hit_limit_rate"),
    ("NLL", "nll"),
    ("KL", "kl"),
)
SHARES = {"format_rate", "kind_agreement", "action_agreement", "action_space_rate", "final_rate", "hit_limit_rate"}
# the metrics whose system / teacher the retention table shows: FIDELITY's but for the episode length and KL
RETENTION = tuple((name, key) for name, key in FIDELITY if key not in ("mean_turns", "hit_limit_rate", "kl"))


def per_turn_rates(eval_dir: Path, prompt_id: str) -> dict[str, list[float]]:
    """Per system: the share of agent turns k (k = 1, 2, ...) in the action space, over the episodes that reach
    turn k."""
    import duckdb

    files = [str(f) for f in results_files(eval_dir, "fidelity", prompt_id)]  # either layout (genpi.data.store)
    if not files:
        return {}
    rows = (
        duckdb.connect()
        .execute(
            "SELECT system, turns_valid FROM read_parquet(?, hive_partitioning = false) "
            "WHERE error IS NULL AND turns_valid IS NOT NULL",
            [files],
        )
        .fetchall()
    )
    by_system: dict[str, list[list[bool]]] = {}
    for system, valid in rows:
        by_system.setdefault(system, []).append(valid)
    rates = {}
    for system, episodes in by_system.items():
        longest = max(map(len, episodes), default=0)
        reached = [[e[k] for e in episodes if len(e) > k] for k in range(longest)]
        rates[system] = [sum(v) / len(v) for v in reached]
    return rates


def verdict(fidelity: dict) -> list[str]:
    """The report's opening paragraph, per evaluated prompt: what the adapter that closes the most of the KL gap keeps
    of the teacher's behaviour without P, with its interval, and what it costs on requests unrelated to P."""
    lines = []
    for r in (r for r in fidelity["results"] if "skipped" not in r):
        systems, kept = r["systems"], r["retention"]
        gaps = {
            n: m["kl_gap_closed"]
            for n, m in systems.items()
            if n not in ("teacher", "base") and m.get("kl_gap_closed") is not None
        }
        if not gaps:
            continue
        best = max(gaps, key=gaps.get)
        m, teacher, base = systems[best], systems["teacher"], systems["base"]
        said = []
        for check, rates in (m.get("checks") or {}).items():
            if not teacher["checks"].get(check, {}).get("first_turn"):  # nothing to keep
                said.append(
                    f"passes `{check}` on {cell(rate(rates['first_turn']))} of its first replies (the teacher on none)"
                )
                continue
            said.append(
                f"keeps {cell(rate(kept[best].get(f'checks.{check}')))} of the teacher's `{check}` rate "
                f"(first replies: {cell(rate(rates['first_turn']))} against the teacher's "
                f"{cell(rate(teacher['checks'][check]['first_turn']))} "
                f"and the base's {cell(rate(base['checks'][check]['first_turn']))})"
            )
        said.append(
            f"closes {cell(rate(gaps[best]))} of the KL gap to the teacher "
            f"(95% interval {interval(m.get('kl_gap_closed_ci')) or '–'})"
        )
        if m.get("collateral_kl") is not None:
            said.append(
                f"costs {cell(m['collateral_kl'])} nats per token of KL to the base on general requests unrelated to P"
            )
        others = ", ".join(
            f"`{n}` {cell(rate(g))}" for n, g in sorted(gaps.items(), key=lambda kv: -kv[1]) if n != best
        )
        lines += [
            f"**{r['prompt_id']}** ({r['inputs']} held-out inputs): without the prompt, the `{best}` adapter "
            + ", ".join(said[:-1])
            + (" and " if len(said) > 1 else "")
            + said[-1]
            + "."
            + (f" Gap closed by the others: {others}." if others else ""),
            "",
        ]
    return lines


def _check_cells(metrics: dict, kept: dict, check: str) -> list:
    rates = (metrics.get("checks") or {}).get(check)
    if rates is None:
        return [None] * 4
    return [
        rate(rates["first_turn"]),
        interval(rates.get("first_turn_ci")),
        rate(rates["all_turns"]),
        rate(kept.get(f"checks.{check}")),
    ]


def fidelity_section(fidelity: dict, eval_dir: Path, figure, adapters: dict, missing: list, figures: list) -> list[str]:
    """The "Fidelity without the prompt" section of a fidelity.json, per evaluated prompt. `figure(name)` is the path
    of a plot beside the report; the adapters the results name, the prompts skipped and the plots drawn are added to
    `adapters` ({prompt: {system: folder}}), `missing` and `figures`."""
    md = ["## Fidelity without the prompt", ""]
    md += [
        f"Command: `{' '.join(fidelity['command'] or [])}`",
        "",
        f"Served as: {fidelity['served_as']}. Teacher-forced: {fidelity['teacher_forced']}. Episodes: "
        + ", ".join(f"{k} {v}" for k, v in fidelity["episode_settings"].items())
        + ".",
        "",
    ]
    if "gap" in fidelity:
        gap = fidelity["gap"]
        boot = gap["bootstrap"]
        md += [
            f"KL gap closed: {gap['kl_gap_closed']}; its interval: {100 * boot['level']:.0f}% bootstrap over "
            f"{boot['over']} ({boot['resamples']} resamples, seed {boot['seed']}). "
            f"Reverse KL: {gap['reverse_kl']} ({gap['onpolicy_samples']} per input). "
            f"Collateral KL: {gap['collateral_kl']} ({gap['collateral_requests']} requests).",
            "",
        ]
    done = scored_results(fidelity, "fidelity", missing, adapters)
    for r in done:
        md += [f"### {r['prompt_id']} ({r['inputs']} held-out inputs)", ""]
        md += table(
            ["system", "KL gap closed", "95% interval", "KL", "reverse KL", "collateral KL"],
            [
                [
                    name,
                    rate(m.get("kl_gap_closed")),
                    interval(m.get("kl_gap_closed_ci")),
                    m["kl"],
                    m.get("reverse_kl"),
                    m.get("collateral_kl"),
                ]
                for name, m in r["systems"].items()
            ],
        ) + [""]
        checks = list(dict.fromkeys(c for m in r["systems"].values() for c in m.get("checks") or {}))
        if checks:
            md += [
                "Behaviour checks: pass rate of the first reply [95% interval], of every agent turn, and retention "
                "(first reply, system / teacher):",
                "",
            ]
            md += table(
                ["system"]
                + [f"{c} {what}" for c in checks for what in ("first", "interval", "all turns", "retention")],
                [
                    [name] + [v for c in checks for v in _check_cells(m, r["retention"].get(name, {}), c)]
                    for name, m in r["systems"].items()
                ],
            ) + [""]
        md += served(r["systems"])
        if r["first_turn_actions"] != "scored":
            md += [f"First-turn actions: {r['first_turn_actions']}.", ""]
            continue
        md += table(
            ["system"] + [h for h, _ in FIDELITY],
            [[name] + [rate(m[k]) if k in SHARES else m[k] for _, k in FIDELITY] for name, m in r["systems"].items()],
        ) + [""]
        md += ["Retention (system / teacher; NLL: teacher / system):", ""]
        md += table(
            ["system"] + [h for h, _ in RETENTION],
            [
                [name] + [rate(kept.get(k)) for _, k in RETENTION]
                for name, kept in r["retention"].items()
                if name != "teacher"
            ],
        ) + [""]
        md += ["Action kinds of the first turn (count of replies):", ""]
        kinds = sorted({k for m in r["systems"].values() for k in m["kinds"]})
        md += table(
            ["system"] + [short(k) for k in kinds],
            [[name] + [m["kinds"].get(k, 0) for k in kinds] for name, m in r["systems"].items()],
        ) + [""]
        used = [name for name, flag in r["heldout_used_for_lambda"].items() if flag]
        if used:
            md += [
                f"Note: λ of {', '.join(used)} was chosen by the teacher KL on these held-out rows "
                "(`heldout_used_for_lambda`).",
                "",
            ]
        rates = per_turn_rates(eval_dir, r["prompt_id"])
        rates = {name: rates[name] for name in r["systems"] if name in rates}
        if rates:
            longest = max(map(len, rates.values()))
            md += ["Share of agent turn k in the action space (episodes that reach turn k):", ""]
            md += table(
                ["system"] + [f"turn {k + 1}" for k in range(longest)],
                [[name] + [rate(x) for x in v] + [None] * (longest - len(v)) for name, v in rates.items()],
            ) + [""]
    if done:
        others = sorted({n for r in done for n in r["retention"] if n != "teacher"})
        panels = [
            (
                f"retention: {r['prompt_id']}",
                plots.bars(
                    [h for h, _ in RETENTION],
                    {n: [r["retention"][n].get(k) for _, k in RETENTION] for n in others if n in r["retention"]},
                    "system / teacher",
                ),
            )
            for r in done
        ]
        plots.figure(figure("retention"), panels)
        figures.append(figure("retention"))
        panels = [
            (
                f"per-turn action-space rate: {r['prompt_id']}",
                plots.lines(per_turn_rates(eval_dir, r["prompt_id"]), "agent turn", "share in the action space"),
            )
            for r in done
            if r["first_turn_actions"] == "scored"
        ]
        if panels:
            plots.figure(figure("per-turn"), panels)
            figures.append(figure("per-turn"))
        md += [f"![retention]({figure('retention').name})", ""] + (
            [f"![per-turn action-space rate]({figure('per-turn').name})", ""] if panels else []
        )
    return md
