"""`python -m genpi.train DATA --catalog CATALOG --out ADAPTERS`: one adapter per prompt, on Ray.

One Ray task per (prompt, λ) trains an adapter into `ADAPTERS/.trials/ID/lam=λ/`;
when a prompt's trials are done, the one with the lowest held-out loss becomes
`ADAPTERS/ID/` (PEFT files plus genpi.json, renamed into place). A prompt whose
adapter already exists for the same data, settings and λ values is skipped, so a
rerun does only what is missing. The trial folders must be on storage that the
driver can read (the local disk on one machine, a shared volume on a cluster).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import sys
from pathlib import Path

from genpi import InputError, __version__
from genpi.catalog import PromptEntry, load_catalog
from genpi.train.adapters import AdapterManifest, read_adapter_manifest, write_adapter
from genpi.train.qlora import LoraSettings
from genpi.train.examples import PG_VARIANTS
from genpi.train.losses import LOSS_FORMS
from genpi.train.recipe import DTYPES, JOINT_METHODS, METHODS, SCHEDULES, TrainSettings

REQUIRED_COLUMNS = {"prompt_id", "prompt_sha256", "sample_id", "split", "input", "turns", "student_output", "reason", "error"}
NO_LAMBDA = set(METHODS) - set(JOINT_METHODS)  # methods with one loss term: no λ to choose


def read_rows(data: str | Path, entry: PromptEntry) -> tuple[list[dict], list[dict]]:
    """The prompt's good dialogue rows, (train, heldout); clear errors for unusable data."""
    from genpi.synth.stats import open_dialogues

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
        raise InputError(f"{data}: dialogues of {entry.id!r} were synthesized from another version of the prompt; resynthesize")
    return [r for r in rows if r["split"] == "train"], [r for r in rows if r["split"] == "heldout"]


def recorded_settings(settings: TrainSettings, lambdas: list[float]) -> dict:
    """Every training setting, whole, and the λ values tried (methods with a λ to choose)."""
    return {**dataclasses.asdict(settings), "lambdas": None if settings.method in NO_LAMBDA else list(lambdas)}


def fingerprint(train: list[dict], heldout: list[dict], settings: TrainSettings, lambdas: list[float], base: str) -> str:
    """What an adapter depends on: its data, every training setting, the λ values tried and its base."""
    digest = hashlib.sha256()
    for row in train + heldout:
        digest.update(json.dumps([row["sample_id"], row["split"], row["input"], row["turns"], row["student_output"], row["reason"]], sort_keys=True, default=str).encode())
    digest.update(json.dumps({**recorded_settings(settings, lambdas), "base": base}, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def fit_trial(base: str, entry_json: dict, train: list[dict], heldout: list[dict], settings: TrainSettings, folder: str, steps=None) -> dict:
    """A Ray task: train one adapter and save its PEFT files to `folder`; returns its metrics.

    `steps`, a ray.util.queue.Queue, receives (folder, step, steps, loss) after every optimizer step.
    """
    from genpi.catalog import entry_from_json
    from genpi.train.qlora import save_adapter
    from genpi.train.recipe import train_adapter

    report = (lambda step, total, loss: steps.put_nowait((folder, step, total, loss))) if steps is not None else None
    model, metrics = train_adapter(base, entry_from_json(entry_json), train, heldout, settings, progress=report)
    save_adapter(model, folder)
    return metrics


def train_catalog(data, catalog, out, base: str, settings: TrainSettings, lambdas: list[float], num_cpus: float = 1,
                  num_gpus: float | None = None, progress: bool = True, valid_only: bool = False) -> dict:  # fmt: skip
    """Train (or skip) every prompt of the catalog; returns {prompt_id: outcome}.

    `num_gpus` per trial defaults to 1 when the Ray cluster has GPUs, else 0; 0 on a cluster
    with GPUs is refused (InputError): Ray hides the GPUs from a task that asks for none, so
    every trial would train on the CPU.

    `valid_only` trains only on dialogues whose agent turns all lie in the prompt's action space: a
    small teacher breaks the format often, and its broken turns teach the adapter the same.
    """
    import ray
    from ray.util.queue import Queue
    from tqdm import tqdm

    from genpi.models import resolve_model

    entries = load_catalog(catalog)
    out = Path(out)
    base_path = resolve_model(base)
    outcomes, plans = {}, []
    for entry in entries:  # read and check every prompt's data before any training starts
        train, heldout = read_rows(data, entry)
        dropped = None
        if valid_only:
            if not entry.valid_action:
                raise InputError(f"--valid-only: prompt {entry.id!r} has no actions.valid regex to filter by")
            kept = [r for r in train if all(entry.in_action_space(t["content"]) for t in r["turns"] if t["role"] == "assistant")]
            train, dropped = kept, len(train) - len(kept)
        if not train:
            reason = "no train rows" + (f" in the action space ({dropped} dropped)" if dropped else "")
            outcomes[entry.id] = {"status": "skipped", "reason": reason}
            continue
        if settings.method not in NO_LAMBDA and len(lambdas) > 1 and not heldout:
            raise InputError(f"prompt {entry.id!r} has no held-out dialogues to choose λ among {lambdas} by their held-out loss: "
                             "synthesize with --heldout > 0, or pass one λ (--lambdas 0.3)")  # fmt: skip
        data_print = fingerprint(train, heldout, settings, lambdas, base)
        done = read_adapter_manifest(out / entry.id)
        if done and done.data_fingerprint == data_print and done.prompt_sha256 == entry.sha256:
            outcomes[entry.id] = {"status": "up to date", "lam": done.lam}
            continue
        plans.append((entry, train, heldout, data_print, dropped))
    if not ray.is_initialized():
        ray.init(log_to_driver=False, configure_logging=False)
    cluster_gpus = ray.cluster_resources().get("GPU", 0)
    if num_gpus is None:
        num_gpus = 1 if cluster_gpus else 0
    elif num_gpus == 0 and cluster_gpus and plans:
        raise InputError(f"--gpus-per-trial 0 on a Ray cluster with {cluster_gpus:g} GPUs: Ray hides the GPUs from tasks that "
                         "ask for none, so every trial would train on the CPU; leave --gpus-per-trial out (1 per trial) or set it > 0")  # fmt: skip
    task = ray.remote(fit_trial).options(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=1)
    steps = Queue(actor_options={"num_cpus": 0}) if progress and plans else None  # 0 CPUs: never holds up a trial
    trials = {}
    for entry, train, heldout, _, _ in plans:
        rows = ray.put(train), ray.put(heldout)  # once per prompt, shared by its λ trials
        for lam in ([None] if settings.method in NO_LAMBDA else lambdas):
            folder = out / ".trials" / entry.id / f"lam={lam}"
            trial_settings = dataclasses.replace(settings, lam=lam if lam is not None else settings.lam)
            ref = task.remote(base_path, entry.to_json(), *rows, trial_settings, str(folder), steps)
            trials[ref] = (entry.id, lam, folder)
    results: dict[str, list] = {}
    bar = tqdm(total=len(trials), unit="trial", desc="adapters", disable=not progress, file=sys.stderr)
    step_bar = tqdm(total=0, unit="step", desc="steps", disable=not progress, file=sys.stderr)
    done_steps, total_steps = {}, {}
    pending = list(trials)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=1.0)
        while steps is not None and not steps.empty():
            folder, step, total, loss = steps.get_nowait()
            done_steps[folder], total_steps[folder] = step, total
            step_bar.total, step_bar.n = sum(total_steps.values()), sum(done_steps.values())
            step_bar.set_postfix(loss=f"{loss:.3f}")  # redraws the bar
        for ref in ready:
            prompt_id, lam, folder = trials[ref]
            try:
                results.setdefault(prompt_id, []).append((lam, folder, ray.get(ref), None))
            except Exception as e:  # one failed trial is recorded; the other prompts go on
                results.setdefault(prompt_id, []).append((lam, folder, None, f"{type(e).__name__}: {str(e).splitlines()[0]}"))
            bar.update(1)
    step_bar.close()
    bar.close()
    for entry, train, heldout, data_print, dropped in plans:
        tried = results.get(entry.id, [])
        good = [t for t in tried if t[2] is not None]
        if not good:
            outcomes[entry.id] = {"status": "failed", "errors": [t[3] for t in tried]}
            continue
        if len(good) > 1 and any(t[2]["heldout_loss"] is None for t in good):  # every held-out row was unusable
            outcomes[entry.id] = {"status": "failed", "errors": ["no held-out loss to choose λ by (every held-out row was skipped)"]}
            continue
        lam, folder, metrics, _ = min(good, key=lambda t: t[2]["heldout_loss"] if t[2]["heldout_loss"] is not None else 0.0)
        manifest = AdapterManifest(
            prompt_id=entry.id,
            prompt_sha256=entry.sha256,
            base_model=base,
            method=settings.method,
            lam=lam,
            lora={**settings.lora.to_dict(), "quantize_4bit": settings.quantize},
            data_fingerprint=data_print,
            settings={**recorded_settings(settings, lambdas), "lam": lam, "effective": metrics["effective"]},
            train_metrics={**{k: v for k, v in metrics.items() if k not in ("heldout_loss", "effective")}, "rows_outside_action_space_dropped": dropped},
            eval_metrics={"heldout_loss": metrics["heldout_loss"], "trials": {str(t[0]): (t[2] or {}).get("heldout_loss", t[3]) for t in tried}},
            genpi_version=__version__,
        )
        write_adapter(out / entry.id, manifest, lambda tmp, src=folder: shutil.copytree(src, tmp, dirs_exist_ok=True))
        shutil.rmtree(out / ".trials" / entry.id, ignore_errors=True)
        outcomes[entry.id] = {"status": "trained", "lam": lam, "heldout_loss": metrics["heldout_loss"]}
        if dropped is not None:
            outcomes[entry.id]["rows_outside_action_space_dropped"] = dropped
    return outcomes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m genpi.train", description=__doc__.splitlines()[0])
    p.add_argument("data", help="synthesis run folder (genpi synth --out)")
    p.add_argument("--catalog", required=True)
    p.add_argument("--out", required=True, help="adapters folder: ADAPTERS/ID/")
    p.add_argument("--base", default="smollm2", help="base model: local folder or 'smollm2'")
    p.add_argument("--method", default="genpi", help=f"one of {', '.join(METHODS)}")
    p.add_argument("--lambdas", default="0.3,0.5,0.7", help=f"λ values to try per prompt ({', '.join(JOINT_METHODS)})")
    d = TrainSettings()
    p.add_argument("--pg-variant", default=d.pg_variant, choices=PG_VARIANTS, help="what prompt generation produces from what (ablations)")
    p.add_argument("--prepend-ratio", type=float, default=d.prepend_ratio, help="prepend: share of rows that carry P, redrawn every step")
    p.add_argument("--topk-k", type=int, default=d.topk_k, help="topk-kl: teacher log-probabilities used per token")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--micro-batch", type=int, default=d.micro_batch)
    p.add_argument("--max-length", type=int, default=d.max_length)
    p.add_argument("--rank", type=int, default=LoraSettings.r)
    p.add_argument("--alpha", type=int, default=LoraSettings.alpha)
    p.add_argument("--no-4bit", action="store_true", help="plain LoRA on an unquantized base")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, help="recompute activations: less memory, more compute (default: on with CUDA)")
    p.add_argument("--loss-form", default=d.loss_form, choices=LOSS_FORMS, help="convex: (1-λ)·L_SFT + λ·L_PG (the authors' scripts); additive: L_SFT + λ·L_PG (the paper)")
    p.add_argument("--schedule", default=d.schedule, choices=SCHEDULES, help="learning rate after the linear warmup")
    p.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio, help="share of the steps with a linear warmup")
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="gradient clipping (0: none; the reference: 1.0 for OS, 0.5 otherwise)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--dtype", default=d.dtype, choices=DTYPES, help="unquantized weights and 4-bit compute (auto: bfloat16 with CUDA, float32 on CPU)")
    p.add_argument("--valid-only", action="store_true", help="train only on dialogues whose agent turns all match actions.valid")
    p.add_argument("--cpus-per-trial", type=float, default=1)
    p.add_argument("--gpus-per-trial", type=float, default=None, help="default: 1 if the Ray cluster has GPUs, else 0")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        if args.method not in METHODS:
            raise InputError(f"--method: unknown method {args.method!r}: expected one of {', '.join(METHODS)}")
        try:
            lambdas = [float(x) for x in args.lambdas.split(",")]
        except ValueError:
            raise InputError(f"--lambdas: expected numbers separated by commas, got {args.lambdas!r}") from None
        try:
            settings = TrainSettings(
                method=args.method, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, micro_batch=args.micro_batch,
                max_length=args.max_length, quantize=not args.no_4bit, gradient_checkpointing=args.gradient_checkpointing, lora=LoraSettings(r=args.rank, alpha=args.alpha),
                loss_form=args.loss_form, schedule=args.schedule, warmup_ratio=args.warmup_ratio, max_grad_norm=args.max_grad_norm,
                weight_decay=args.weight_decay, dtype=args.dtype,
                pg_variant=args.pg_variant, prepend_ratio=args.prepend_ratio, topk_k=args.topk_k,
            )  # fmt: skip
        except ValueError as e:  # a setting out of range (--prepend-ratio, --topk-k, --warmup-ratio ...)
            raise InputError(str(e)) from None
        outcomes = train_catalog(args.data, args.catalog, args.out, args.base, settings, lambdas,
                                 args.cpus_per_trial, args.gpus_per_trial, not args.no_progress, args.valid_only)  # fmt: skip
    except InputError as e:
        print(f"genpi: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(outcomes, indent=2))
    return 1 if any(o["status"] == "failed" for o in outcomes.values()) else 0
