"""Fidelity: how much of the with-prompt behaviour survives without the prompt.

On each prompt's held-out dialogues (split `heldout` of a synthesis run: never
trained on), the systems of genpi.eval.systems (teacher = base with P, base
without P, each adapter without P), all greedy, are measured three ways:

- behaviour checks (the catalog's `checks`, led by `format` = `actions.valid`; rules in genpi.checks):
  each check's pass rate on the first agent turn, over every agent turn of the episode, and per episode turn
  (turn k: among the episodes that reach it), with retention = system / teacher (`checks.NAME` for the first
  turn, `checks_all_turns.NAME` for all turns); language checks are judged among the languages that the
  whole catalog's checks name (besides the detector's usual few);
- first turn: in the action space (`actions.valid`), the action's kind (the
  regex's group `kind`, else its first group) and agreement with the teacher's
  reply to the same input: same kind, same action text exactly (counted over the
  inputs where the teacher acted), ROUGE-L F of the whole reply; and the
  distribution of kinds, so a system that always takes one action shows;
- whole episode: each system plays the agent against the environment persona
  exactly as synthesis does (genpi.synth.pipeline.role_play: same instruction,
  swapped shots, end marker, turn limit; the environment is the base model for
  every system), from the same inputs: share of agent turns in the action space,
  share of episodes whose last agent turn is a final action (episodes go on until the environment's end marker
  or the limit), mean agent turns, share at the limit;
- teacher-forced: on the teacher's dialogues stored at synthesis, each system's
  mean negative log-likelihood of the teacher's agent tokens without P, and the
  mean KL(teacher with P || system) over those tokens, full vocabulary. A served
  system (--served, genpi.eval.systems) gives no logits over HTTP: its NLL and KL are
  null and named in its summary's `not_scored`.

The headline (genpi.eval.gap): the KL gap closed, (KL_base − KL_system) / KL_base, with a paired 95% bootstrap
interval over the held-out dialogues; the on-policy reverse KL(system || teacher) on the system's own sampled
first-turn replies; the collateral damage KL(base || system) on general requests unrelated to P.

Retention is system / teacher for the rates and agreements, teacher / system for
the NLL (1.0 = as good as the teacher). The first turn is the episode's first
agent turn (the same greedy request). Per-reply rows go to
`EVAL/fidelity/ID/NAME/part-00000.parquet`; the summary to
`EVAL/fidelity.json` and each adapter's genpi.json (`eval_metrics.fidelity`).

λ: training picks λ by the teacher KL on these same held-out rows when it tried
more than one value; the summary then says `heldout_used_for_lambda: true` for that
adapter (its numbers are then slightly optimistic).

Over 400 lines on purpose: one evaluation whose three measurements share the systems, the held-out rows and one
summary; what stands alone already lives in genpi.eval.systems, gap, check_rates and metrics.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from pathlib import Path

import pyarrow as pa
from tqdm import tqdm

from genpi.catalog import PromptEntry, load_catalog
from genpi.checks import catalog_languages
from genpi.data.store import TURN
from genpi.eval.check_rates import check_columns, check_rates, check_retention, format_checks
from genpi.eval.evaluate import Evaluation, RunSettings, catalog_text, evaluate, notes, pct, row_schema, write_summary
from genpi.eval.gap import (
    BOOTSTRAP,
    COLLATERAL_TOKENS,
    GAP_METRICS,
    GENERAL_REQUESTS,
    Collateral,
    collateral_metrics,
    gap_lines,
    gap_metrics,
    onpolicy_columns,
    onpolicy_kl,
)
from genpi.eval.metrics import action, present_mean, ratio, rouge_l
from genpi.eval.settings import FidelitySettings, SystemsSettings
from genpi.eval.systems import BASE, TEACHER, Batcher, Prompt, System, catalog_prompts, prompt_of

CHECK_RESULT = pa.struct([("name", pa.string()), ("passed", pa.bool_())])  # passed: null without a reply
EVAL_SCHEMA = row_schema(
    ("sample_id", pa.int64()),
    ("input", pa.string()),
    ("reply", pa.string()),  # the first agent turn
    ("in_action_space", pa.bool_()),  # null without actions.valid
    ("kind", pa.string()),
    ("action", pa.string()),
    ("same_kind", pa.bool_()),  # as the teacher's reply; null where the teacher's is outside the action space
    ("same_action", pa.bool_()),
    ("rouge_l", pa.float64()),  # F against the teacher's reply
    ("turns", pa.list_(TURN)),  # the episode, agent turns "assistant"
    ("turns_valid", pa.list_(pa.bool_())),  # per agent turn: in the action space
    ("checks", pa.list_(CHECK_RESULT)),  # the first agent turn's behaviour checks (PromptEntry.all_checks)
    ("turn_checks", pa.list_(pa.list_(CHECK_RESULT))),  # per agent turn: its checks
    ("n_turns", pa.int32()),
    ("ended_final", pa.bool_()),  # the last agent turn matches actions.final
    ("hit_limit", pa.bool_()),
    ("terminated_by", pa.string()),
    ("tf_tokens", pa.int64()),  # teacher-forced: the teacher's agent tokens scored
    ("tf_nll", pa.float64()),  # summed over them
    ("tf_kl", pa.float64()),
    ("onpolicy_replies", pa.list_(pa.string())),  # first-turn replies sampled at temperature 1 (genpi.eval.gap)
    ("onpolicy_tokens", pa.int64()),  # their tokens, end-of-turn included
    ("onpolicy_rkl", pa.float64()),  # KL(system || teacher with P) summed over them
    ("error", pa.string()),
)
LOGIT_METRICS = ("nll", "kl")  # teacher-forced: they need the system's own logits
RATES = ("format_rate", "kind_agreement", "action_agreement", "rouge_l", "action_space_rate", "final_rate")


def heldout_rows(data: str | Path, entry: PromptEntry, limit: int | None = None) -> list[dict]:
    """The prompt's good held-out dialogue rows (refuses rows of another version of the prompt)."""
    from genpi.data.dialogues import prompt_rows

    return prompt_rows(data, entry)[1][:limit]


def episode_settings(data: str | Path, max_new_tokens: int | None, max_turns: int | None):
    """Synthesis's settings as the run recorded them (turn limit, token limits), without the teacher's top-k."""
    from genpi.data.manifest import read_manifest
    from genpi.synth.pipeline import SynthSettings

    known = {f.name for f in dataclasses.fields(SynthSettings)}
    recorded = (read_manifest(data) or {}).get("settings", {})
    settings = SynthSettings(**{k: v for k, v in recorded.items() if k in known})
    changes = {"teacher_topk": 0}
    if max_new_tokens:
        changes.update(max_agent_tokens=max_new_tokens, max_environment_tokens=max_new_tokens)
    if max_turns:
        changes["max_turns"] = max_turns
    return dataclasses.replace(settings, **changes)


def play_episodes(
    entry: PromptEntry, rows: list[dict], systems: list[System], engine, settings, progress: bool = False
) -> dict[str, list[dict]]:
    """Every system plays every row's input as the agent; the base model (with its persona) is the environment."""
    from genpi.synth.pipeline import blank_row, role_play

    batcher = Batcher(engine)
    environment = batcher.view(System(BASE))

    bar = tqdm(
        total=len(systems) * len(rows),
        unit="episode",
        desc=f"{entry.id}: episodes",
        file=sys.stderr,
        disable=not progress,
    )

    async def play(system: System, row: dict) -> dict:
        sample = {k: row[k] for k in ("sample_id", "seed", "split", "input")}
        episode = blank_row(entry, sample, settings, BASE, system.name)
        try:
            await role_play(
                entry,
                episode,
                environment,
                settings,
                agent=batcher.view(system),
                with_prompt=system.with_prompt,
                agent_prompt=prompt_of(entry, system),
            )
        except Exception as e:  # recorded on the episode, never dropped
            episode["error"] = f"{type(e).__name__}: {e}"
        bar.update(1)
        return episode

    async def play_all() -> list[dict]:
        return await asyncio.gather(*(play(s, r) for s in systems for r in rows))

    episodes = batcher.run(play_all())
    bar.close()
    return {s.name: episodes[i * len(rows) : (i + 1) * len(rows)] for i, s in enumerate(systems)}


def teacher_forced(
    entry: PromptEntry, rows: list[dict], systems: list[System], engine, max_length: int, progress: bool = False
) -> dict[str, list]:
    """Per system and row: (tokens, summed NLL, summed KL(teacher || system)) on the teacher's agent tokens;
    None for a row that cannot be scored or a served system. The teacher's logits are the base's with P (adapters
    disabled)."""
    import torch
    import torch.nn.functional as F

    from genpi.train.icae import slot_response_logits
    from genpi.train.losses import kld_loss, response_logits, response_targets
    from genpi.train.recipe import TrainSettings, build_examples, collate

    tokenizer, model = engine.tokenizer, engine.model
    settings = TrainSettings(
        method="kld", max_length=max_length, quantize=False
    )  # the student and teacher views, aligned
    out: dict[str, list] = {s.name: [] for s in systems}
    for row in tqdm(rows, unit="row", desc=f"{entry.id}: teacher-forced", file=sys.stderr, disable=not progress):
        made, _ = build_examples([row], entry, tokenizer, settings)
        if not made:
            for s in systems:
                out[s.name].append(None)
            continue
        student = collate([made[0].student], engine.pad_id, engine.device)
        with torch.no_grad():
            with engine.serving(None):
                teacher = response_logits(model, collate([made[0].teacher], engine.pad_id, engine.device)).float()
            targets = response_targets(student)
            for s in systems:
                if s.served:  # its logits stay on its server
                    out[s.name].append(None)
                    continue
                if s.with_prompt:
                    logits = teacher
                elif s.compressed:  # the base given the compressed P: its own view of the same agent tokens
                    own, _ = build_examples([row], s.compressed.entry, tokenizer, settings)
                    with engine.serving(None):
                        logits = response_logits(model, collate([own[0].teacher], engine.pad_id, engine.device))
                    logits = logits.float()
                else:  # an adapter, a full fine-tune (engine.model: its own model, genpi.engines.routed), or an
                    # ICAE system: the base (adapter None) with P's slots in front
                    with engine.serving(s.adapter):
                        logits = (
                            response_logits(engine.model, student)
                            if s.icae is None
                            else slot_response_logits(engine.model, student, s.icae)
                        ).float()
                n = targets.numel()
                nll = float(F.cross_entropy(logits, targets, reduction="sum"))
                out[s.name].append((n, nll, float(kld_loss(logits, teacher)) * n))
    return out


def reply_rows(
    entry: PromptEntry, rows: list[dict], systems: list[System], episodes: dict, forced: dict, languages=()
) -> dict[str, list[dict]]:
    """The per-reply Parquet rows (EVAL_SCHEMA) of each system (`languages`: the catalog's, for language checks)."""
    from genpi.synth.pipeline import is_final

    has_actions = entry.valid_action is not None
    out: dict[str, list[dict]] = {}
    teacher_first = []
    for system in [s for s in systems if s.name == TEACHER] + [s for s in systems if s.name != TEACHER]:
        records = []
        for i, row in enumerate(rows):
            episode = episodes[system.name][i]
            agent = [t["content"] for t in episode["turns"] if t["role"] == "assistant"]
            reply = agent[0] if agent else None
            in_space, kind, act = action(entry, reply or "")
            if system.name == TEACHER:
                teacher_first.append((reply, in_space, kind, act))
            t_reply, t_in, t_kind, t_act = teacher_first[i]
            scored = has_actions and reply is not None and t_reply is not None and t_in
            forced_row = forced[system.name][i]
            records.append(
                {
                    "prompt_id": entry.id,
                    "system": system.name,
                    "sample_id": row["sample_id"],
                    "input": row["input"],
                    "reply": reply,
                    "in_action_space": in_space if has_actions and reply is not None else None,
                    "kind": kind if has_actions and reply is not None else None,
                    "action": act if has_actions and in_space else None,
                    "same_kind": kind == t_kind if scored else None,
                    "same_action": act == t_act if scored else None,
                    "rouge_l": rouge_l(reply, t_reply)["f"] if reply is not None and t_reply is not None else None,
                    "turns": episode["turns"],
                    "turns_valid": [entry.in_action_space(t) for t in agent] if has_actions else None,
                    **check_columns(entry, agent, languages),
                    "n_turns": episode["n_turns"],
                    "ended_final": bool(agent) and is_final(entry, agent[-1]) if entry.final_action else None,
                    "hit_limit": bool(episode["hit_max_turns"]),
                    "terminated_by": episode["terminated_by"],
                    "tf_tokens": forced_row[0] if forced_row else None,
                    "tf_nll": forced_row[1] if forced_row else None,
                    "tf_kl": forced_row[2] if forced_row else None,
                    "error": episode["error"],
                }
            )
        out[system.name] = records
    return out


def summarize(records: list[dict]) -> dict:
    """One system's metrics over its per-reply rows (errors excluded from every rate, and counted)."""
    good = [r for r in records if r["error"] is None]
    kinds: dict[str, int] = {}
    for r in good:
        if r["kind"] is not None:
            kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    valid_turns = [v for r in good if r["turns_valid"] is not None for v in r["turns_valid"]]
    tokens = sum(r["tf_tokens"] or 0 for r in records)
    return {
        "inputs": len(records),
        "errors": len(records) - len(good),
        "format_rate": present_mean(r["in_action_space"] for r in good),
        "kind_agreement": present_mean(r["same_kind"] for r in good),
        "action_agreement": present_mean(r["same_action"] for r in good),
        "rouge_l": present_mean(r["rouge_l"] for r in good),
        "kinds": dict(sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0]))),
        "action_space_rate": sum(valid_turns) / len(valid_turns) if valid_turns else None,
        "final_rate": present_mean(r["ended_final"] for r in good),
        "mean_turns": present_mean(r["n_turns"] for r in good),
        "hit_limit_rate": present_mean(r["hit_limit"] for r in good),
        "tf_tokens": tokens,
        "nll": sum(r["tf_nll"] or 0.0 for r in records) / tokens if tokens else None,
        "kl": sum(r["tf_kl"] or 0.0 for r in records) / tokens if tokens else None,
        "checks": check_rates(good),
    }


def retention(metrics: dict, teacher: dict) -> dict:
    """system / teacher per rate; teacher / system for the NLL (lower is better)."""
    kept = {name: ratio(metrics[name], teacher[name]) for name in RATES}
    kept["nll"] = ratio(teacher["nll"], metrics["nll"])
    kept.update(check_retention(metrics, teacher))
    return kept


def heldout_used_for_lambda(system: System) -> bool:
    lambdas = (system.manifest.settings or {}).get("lambdas") if system.manifest else None
    return bool(lambdas and len(lambdas) > 1)


def evaluate_catalog(
    data, systems: SystemsSettings, settings: FidelitySettings = FidelitySettings(), command: list[str] | None = None
) -> dict:
    """Evaluate every prompt that has held-out rows; returns (and writes to OUT/fidelity.json) the summary.
    `settings.onpolicy_samples`: sampled first-turn replies per input for the reverse KL (0: not measured);
    `settings.collateral`: measure KL(base || system) on genpi.eval.gap.GENERAL_REQUESTS."""
    catalog, limit, progress = systems.catalog, settings.limit, settings.progress
    onpolicy_samples = settings.onpolicy_samples
    out = Path(settings.out) if settings.out else Path(data) / "eval"
    languages = catalog_languages(load_catalog(catalog))  # every prompt's language checks tell these apart

    def inputs(entry: PromptEntry) -> tuple[list[dict], str | None]:
        rows = heldout_rows(data, entry, limit)
        return rows, None if rows else f"no held-out rows in {data} (synthesize with --heldout > 0)"

    # every check before the model loads
    plans, skipped, base_path = catalog_prompts(systems, settings.prompt_ids, inputs)
    episode = episode_settings(data, settings.max_new_tokens, settings.max_turns)
    unrelated: list[Collateral] = []  # the base's replies to the general requests, made once (on the first prompt)

    def play(prompt: Prompt, engine) -> dict[str, list[dict]]:
        entry, systems, rows = prompt.entry, prompt.systems, prompt.inputs
        if settings.collateral and not unrelated:
            unrelated.append(Collateral(engine, min(episode.max_agent_tokens, COLLATERAL_TOKENS)))
        print(f"genpi eval fidelity: {entry.id}: {len(rows)} held-out inputs, {len(systems)} systems", file=sys.stderr)
        episodes = play_episodes(entry, rows, systems, engine, episode, progress)
        forced = teacher_forced(entry, rows, systems, engine, min(engine.max_model_len, 8192), progress)
        sampled = (
            onpolicy_kl(entry, rows, systems, engine, episode.max_agent_tokens, onpolicy_samples, progress=progress)
            if onpolicy_samples
            else {}
        )
        records = reply_rows(entry, rows, systems, episodes, forced, languages)
        for name, rs in records.items():
            for r, scored in zip(rs, sampled.get(name) or [None] * len(rs)):
                r.update(onpolicy_columns(scored))
        return records

    def finish(prompt: Prompt, records: dict, metrics: dict) -> dict:
        damage = collateral_metrics(
            unrelated[0].score(prompt.entry, prompt.systems, progress) if unrelated else dict.fromkeys(records)
        )
        for name, figures in gap_metrics(records).items():
            metrics[name].update(figures, **damage[name])
        return {"heldout_used_for_lambda": {s.name: heldout_used_for_lambda(s) for s in prompt.systems if s.folder}}

    def describe(prompt: Prompt, form) -> dict:
        entry = prompt.entry
        return {
            "prompt_id": entry.id,
            "inputs": len(prompt.inputs),
            "first_turn_actions": "scored" if entry.valid_action else "skipped: the prompt has no actions.valid regex",
            "checks": [c.to_json() for c in entry.all_checks],
        }

    def record_of(s: System, result: dict, form: str | None) -> dict:
        metrics = result["systems"]
        return {
            "system": s.name,
            "served_as": form,
            "inputs": result["inputs"],
            "eval_out": str(out),
            "heldout_used_for_lambda": result["heldout_used_for_lambda"][s.name],
            "metrics": metrics[s.name],
            "retention": result["retention"][s.name],
            "teacher": metrics[TEACHER],
            "base": metrics[BASE],
        }

    fidelity = Evaluation(
        "fidelity",
        EVAL_SCHEMA,
        play,
        summarize,
        describe,
        retention,
        teacher_retention=True,
        not_scored=LOGIT_METRICS + GAP_METRICS,
        finish=finish,
        record=record_of,
    )
    form, results = evaluate(
        fidelity, plans, RunSettings(base_path, out, systems.max_batch, settings.record, tracking=settings.tracking)
    )
    summary = {
        "command": command,
        "data": str(data),
        "catalog": str(catalog),
        "base": base_path,
        "served_as": form,
        "teacher_forced": "mean NLL of the teacher's agent tokens without P; "
        "mean KL(teacher with P || system), full vocabulary",
        "gap": {
            "kl_gap_closed": "(KL_base - KL_system) / KL_base, KL the teacher-forced KL above",
            "reverse_kl": "mean KL(system || teacher with P) per token of the system's own first-turn replies, "
            "sampled at temperature 1",
            "collateral_kl": "mean KL(base || system) per token of the base's greedy replies to general requests, no P",
            "onpolicy_samples": onpolicy_samples,
            "collateral_requests": len(GENERAL_REQUESTS) if settings.collateral else 0,
            "bootstrap": dict(BOOTSTRAP, over="held-out dialogues (collateral: requests), paired for the gap"),
        },
        "episode_settings": {
            "max_turns_cap": episode.max_turns,
            "max_agent_tokens": episode.max_agent_tokens,
            "max_environment_tokens": episode.max_environment_tokens,
            "greedy": True,
        },
        "results": results + skipped,
    }
    write_summary(out / "fidelity.json", summary)
    return summary


def _num(value) -> str:
    return "-" if value is None else f"{value:.3f}"


COLUMNS = (
    ("format", "format_rate", pct),
    ("kind agr", "kind_agreement", pct),
    ("act agr", "action_agreement", pct),
    ("rougeL", "rouge_l", _num),
    ("ep in-space", "action_space_rate", pct),
    ("ep final", "final_rate", pct),
    ("turns", "mean_turns", _num),
    ("at limit", "hit_limit_rate", pct),
    ("NLL", "nll", _num),
    ("KL", "kl", _num),
)


def format_summary(summary: dict) -> str:
    return catalog_text(summary, _table)


def _table(r: dict) -> list[str]:
    """One prompt's result: the gap, the metrics and retention per system, the checks, the notes."""
    lines = [f"\n{r['prompt_id']} ({r['inputs']} held-out inputs; first-turn actions {r['first_turn_actions']})"]
    lines += gap_lines(r["systems"]) + [""]
    lines.append(f"{'system':<14}" + "".join(f"{h:>12}" for h, _, _ in COLUMNS) + "   kinds")
    for name, m in r["systems"].items():
        kinds = ", ".join(f"{k}:{n}" for k, n in list(m["kinds"].items())[:4])
        lines.append(f"{name:<14}" + "".join(f"{f(m[key]):>12}" for _, key, f in COLUMNS) + f"   {kinds}")
    for name, kept in r["retention"].items():
        if name != TEACHER:
            lines.append(
                f"{'  retention':<14}"
                + "".join(f"{pct(kept.get(key)) if key in kept else '':>12}" for _, key, _ in COLUMNS)
                + f"   ({name})"
            )
    for name, used in r["heldout_used_for_lambda"].items():
        if used:
            lines.append(f"note: {name}: λ was chosen on these held-out rows (heldout_used_for_lambda: true)")
    lines += format_checks(r)
    return lines + notes(r)


__all__ = ["EVAL_SCHEMA", "evaluate_catalog", "format_summary", "retention", "summarize"]
