"""The report's Table 1: the paper's main table (its systems in its order) from a run that evaluated its rows.

Each evaluated system is put in its row by what it is, not by its name: the teacher is the upper bound, a
compressed system (genpi eval --compressed) an LLMLingua-2 row by its requested rate, an adapter folder a row by its
genpi.json (method, full fine-tune or LoRA, prepend ratio). A row the run did not evaluate is listed as not run; a
system that is no row of the table (topk-kl, a LoRA kld, a compression at another rate) is named under it. The
columns are values of EVAL/fidelity.json, EVAL/efficiency.json and the adapters' genpi.json, as in the rest of the
report (docs/table1.md says how to run every row).
"""

from __future__ import annotations

import json
from pathlib import Path

from genpi.eval.markdown import cell, interval, rate, table

# the paper's rows in its order: (row, the system of this run that would be it)
ROWS = (
    ("Upper bound (P in the prompt)", "the teacher"),
    ("LLMLingua-2 ×0.9", "system compressed at rate 0.9 (--compressed NAME=llmlingua2:0.9)"),
    ("LLMLingua-2 ×0.7", "system compressed at rate 0.7 (--compressed NAME=llmlingua2:0.7)"),
    ("LLMLingua-2 ×0.3", "system compressed at rate 0.3 (--compressed NAME=llmlingua2:0.3)"),
    ("ICAE", "icae folder (--methods icae)"),
    ("Full fine-tune KLD", "full fine-tune of kld (full_finetune: kld)"),
    ("Full fine-tune SeqKD", "full fine-tune of seqkd (full_finetune: seqkd)"),
    ("Full fine-tune SeqKD+KLD", "full fine-tune of seqkd+kld (full_finetune: seqkd+kld)"),
    ("Prompt prepending 100%", "prepend adapter at prepend_ratio 1.0"),
    ("Prompt prepending 50%", "prepend adapter at prepend_ratio 0.5"),
    ("SFT-only", "sft adapter (LoRA)"),
    ("GenPI", "genpi adapter (LoRA)"),
)
LINGUA_RATES = {0.9: ROWS[1][0], 0.7: ROWS[2][0], 0.3: ROWS[3][0]}
FULL_ROWS = {"kld": ROWS[5][0], "seqkd": ROWS[6][0], "seqkd+kld": ROWS[7][0]}
PREPEND_ROWS = {1.0: ROWS[8][0], 0.5: ROWS[9][0]}
MIN_ROWS = 3  # the table is shown when the run has at least this many rows besides the upper bound
# efficiency's system whose prefix a row's requests start with (the adapters': the base's, without P)
WITH_P, MERGED, ICAE_SLOTS = "with-P", "internalized-merged", "icae-slots"


def table1_row(name: str, metrics: dict, manifest) -> str | None:
    """The row of Table 1 a system is (its fidelity metrics; its genpi.json for an adapter folder), or None."""
    if name == "teacher":
        return ROWS[0][0]
    if metrics.get("compressed"):
        return next((row for r, row in LINGUA_RATES.items() if abs(metrics["compressed"]["rate"] - r) < 1e-9), None)
    if manifest is None:
        return None
    full = manifest.kind == "model" or bool(manifest.settings.get("full_finetune"))
    if manifest.method == "icae":
        return ROWS[4][0]
    if full:
        return FULL_ROWS.get(manifest.method)
    if manifest.method == "prepend":
        ratio = manifest.settings.get("prepend_ratio")
        return next((row for r, row in PREPEND_ROWS.items() if ratio is not None and abs(ratio - r) < 1e-9), None)
    return {"sft": ROWS[10][0], "genpi": ROWS[11][0]}.get(manifest.method)


def _made(name: str, metrics: dict, manifest) -> str:
    """How a row's system was made, in a few words (from its files)."""
    if name == "teacher":
        return "the base with P"
    if metrics.get("compressed"):
        c = metrics["compressed"]
        return f"{c['compressor']}, rate {c['achieved_rate']:.2f} achieved"
    s, t = manifest.settings, manifest.train_metrics
    how = "full fine-tune" if manifest.kind == "model" or s.get("full_finetune") else "LoRA"
    if manifest.method == "icae":
        how = f"{s.get('memory_tokens')} memory slots, {s.get('pretrain_steps')} pretraining steps"
    lam = f", λ {manifest.lam:g}" if manifest.lam is not None and manifest.method == "genpi" else ""
    return f"{how}{lam}, {t.get('steps')} steps, batch {s.get('batch_size')}, lr {cell(s.get('lr'))}"


def _prompt_tokens(name: str, row: str, metrics: dict, efficiency: dict | None) -> int | None:
    """The tokens a request of the system starts with, as efficiency measured them for the prompt; None if not."""
    if efficiency is None:
        return None
    systems = efficiency["systems"]
    if row == ROWS[0][0]:
        key = WITH_P
    elif metrics.get("compressed"):
        key = name
    elif row == ROWS[4][0]:
        key = ICAE_SLOTS
    else:
        key = MERGED
    return systems.get(key, {}).get("prefix_tokens")


def _read_manifest(folder):
    from genpi.data.adapters import read_adapter_manifest

    return read_adapter_manifest(folder) if folder else None


def table1_section(fidelity: dict, eval_dir: Path, synthesis: dict | None = None) -> list[str]:
    """The "Table 1" section, per evaluated prompt that has at least MIN_ROWS of the table's rows besides the upper
    bound; [] for the others (a run of one or two methods has its tables below). `synthesis`: the run's manifest.json
    (its sizes state the scale), if there is one."""
    path = Path(eval_dir) / "efficiency.json"
    costs = {r["prompt_id"]: r for r in json.loads(path.read_text())["results"]} if path.exists() else {}
    md: list[str] = []
    for r in (r for r in fidelity["results"] if "skipped" not in r):
        found: dict[str, list[list]] = {row: [] for row, _ in ROWS}
        others = []
        checks = list(dict.fromkeys(c for m in r["systems"].values() for c in m.get("checks") or {}))
        for name, m in r["systems"].items():
            manifest = _read_manifest(r["adapters"].get(name))
            row = table1_row(name, m, manifest)
            if row is None:
                if name != "base":
                    others.append(name)
                continue
            cells = [name, _made(name, m, manifest), rate(m.get("kl_gap_closed")), interval(m.get("kl_gap_closed_ci"))]
            for check in checks:
                rates = (m.get("checks") or {}).get(check) or {}
                cells += [rate(rates.get("first_turn")), interval(rates.get("first_turn_ci"))]
            cells.append(_prompt_tokens(name, row, m, costs.get(r["prompt_id"])))
            found[row].append(cells)
        if sum(bool(v) for row, v in found.items() if row != ROWS[0][0]) < MIN_ROWS:
            continue
        headers = ["Table 1 row", "system", "how it was made", "KL gap closed", "95% interval"]
        headers += [h for c in checks for h in (f"{c} (first reply)", "95% interval")]
        headers.append("prompt tokens per request")
        rows = [[row, *cells] for row, what in ROWS for cells in found[row] or [["not run", f"this run has no {what}"]]]
        rows = [cells + [None] * (len(headers) - len(cells)) for cells in rows]
        md += [f"### {r['prompt_id']} ({r['inputs']} held-out inputs)", ""] + table(headers, rows) + [""]
        cost = costs.get(r["prompt_id"])
        md += [
            "KL gap closed: (KL_base − KL_system) / KL_base on the teacher's held-out agent tokens; "
            + (
                "the checks (format: in the prompt's action space, then the catalog's checks): pass rate of the "
                "first replies; "
                if checks
                else ""
            )
            + "prompt tokens per request: the tokens before the conversation (P, its compressed form, the ICAE slots, "
            "or the chat template's system turn without P), "
            + (
                f"as genpi eval efficiency counted them ({cost['tokenizer']})."
                if cost
                else "not measured (no genpi eval efficiency of this prompt)."
            ),
            "",
        ]
        if others:
            md += [f"Also evaluated, no row of Table 1: {', '.join(f'`{n}`' for n in others)}.", ""]
    if not md:
        return []
    head = ["## Table 1", ""]
    head += [
        "The paper's Table 1 in its order, each row the system of this run that is that row (how it was made: its "
        "files); scale: " + _scale(fidelity, synthesis) + ".",
        "",
    ]
    return head + md


def _scale(fidelity: dict, synthesis: dict | None) -> str:
    """The run's scale in words: the evaluated base, the synthesized dialogues and the held-out inputs per prompt
    (the training of each row is in its cell)."""
    command = fidelity.get("command") or []
    base = command[command.index("--base") + 1] if "--base" in command[:-1] else "genpi eval's default base"
    inputs = ", ".join(f"{r['prompt_id']} {r['inputs']}" for r in fidelity["results"] if "skipped" not in r)
    made = ""
    if synthesis:
        s = synthesis["settings"]
        made = f"{s['samples']} synthesized dialogues per prompt ({s['heldout']} held out), "
    return f"base `{base}`, {made}held-out inputs evaluated per prompt: {inputs}"
