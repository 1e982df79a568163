"""What each prompt of a training run trains with, and which of its trials becomes its adapter.

A prompt's settings are the run's, with its catalog `train` values (lam, grad_clip, lr, epochs) in place of those
whose flag was not given; its λ values are tried as trials, and the finished trial with the lowest held-out teacher
KL is written as ADAPTERS/ID/ with genpi.json recording where each setting and the λ came from.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from genpi import InputError, __version__
from genpi.catalog import PromptEntry
from genpi.data.adapters import ADAPTER, MODEL, AdapterManifest, write_adapter
from genpi.data.model_card import hub_ready
from genpi.train.recipe import JOINT_METHODS, METHODS, TrainSettings

NO_LAMBDA = set(METHODS) - set(JOINT_METHODS)  # methods with one loss term: no λ to choose
LAMBDA_RULE = "heldout_teacher_kl"  # how a prompt's λ is chosen among several: lowest held-out teacher KL
# a catalog prompt's `train` keys and the setting each gives (its flag's dest: --lambdas, --max-grad-norm, --lr,
# --epochs)
CATALOG_TRAIN = {"lam": "lambdas", "grad_clip": "max_grad_norm", "lr": "lr", "epochs": "epochs"}


@dataclasses.dataclass
class Plan:
    """One prompt to train: its rows, its settings (the catalog's `train` values applied) and λ values."""

    entry: PromptEntry
    train: list[dict]
    heldout: list[dict]
    settings: TrainSettings
    lambdas: list[float]
    from_catalog: dict  # {catalog train key: value} of the settings the catalog gave
    fingerprint: str
    dropped: int | None  # --valid-only: rows outside the action space


def recorded_settings(settings: TrainSettings, lambdas: list[float]) -> dict:
    """Every training setting, whole, and the λ values tried (methods with a λ to choose)."""
    return {**dataclasses.asdict(settings), "lambdas": None if settings.method in NO_LAMBDA else list(lambdas)}


# TrainSettings fields added after adapters were first fingerprinted (issue 25's baselines): at their defaults they
# leave an adapter's fingerprint as it was, so one trained before they existed stays up to date
ADDED_SINCE_FINGERPRINTS = ("memory_tokens", "pretrain_steps", "full_finetune")


def fingerprint_settings(settings: TrainSettings, lambdas: list[float]) -> dict:
    """What of the settings an adapter's fingerprint covers: recorded_settings, less the later fields at their
    defaults."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainSettings)}
    recorded = recorded_settings(settings, lambdas)
    return {k: v for k, v in recorded.items() if not (k in ADDED_SINCE_FINGERPRINTS and v == defaults[k])}


def prompt_settings(
    entry: PromptEntry, settings: TrainSettings, lambdas: list[float], overrides=frozenset()
) -> tuple[TrainSettings, list[float], dict]:
    """The prompt's settings and λ values: the run's, with the catalog's `train` values in place of those whose
    flag was not given (`overrides`: the CATALOG_TRAIN keys set for the whole run); and {key: value} of those
    the catalog gave. `lam` makes the λ values [lam] (methods with a λ only)."""
    train = getattr(entry, "train", None) or {}  # PromptEntry.train where the catalog has it
    used = {k: v for k, v in train.items() if k in CATALOG_TRAIN and k not in overrides and v is not None}
    if settings.method in NO_LAMBDA:
        used.pop("lam", None)
    try:
        changes = {CATALOG_TRAIN[k]: (int if k == "epochs" else float)(v) for k, v in used.items() if k != "lam"}
        lambdas = [float(used["lam"])] if "lam" in used else lambdas
        if changes.get("epochs", 1) < 1 or changes.get("lr", 1.0) <= 0:
            raise ValueError(f"epochs must be >= 1 and lr > 0, got {used}")
        settings = dataclasses.replace(settings, **changes)
    except (TypeError, ValueError) as e:
        raise InputError(f"prompt {entry.id!r}: catalog field train: {e}") from None
    return settings, lambdas, used


def lambda_rule(plan: Plan, tried: list) -> str | None:
    """How the prompt's λ was chosen: by the held-out teacher KL among several, else where the one λ came from."""
    if plan.settings.method in NO_LAMBDA:
        return None
    if len(tried) > 1:
        return LAMBDA_RULE
    return "catalog" if "lam" in plan.from_catalog else "given"


def write_best(plan: Plan, tried: list, out: Path, base: str, base_path: str = "", base_digest: str = "") -> dict:
    """Write the prompt's best finished trial (lowest held-out teacher KL) as ADAPTERS/ID/; returns the prompt's
    outcome. `base_path` and `base_digest`: the folder `base` resolved to and its weights_digest (what check_base
    holds the adapter to)."""
    entry, settings = plan.entry, plan.settings
    finished = [r for r in tried if r.error is None and r.metrics.get("finished")]
    errors = [
        f"λ={r.config['trial']['lam']}: {type(r.error).__name__}: {str(r.error).strip().splitlines()[-1]}"
        for r in tried
        if r.error is not None
    ]
    stopped = [r.config["trial"]["lam"] for r in tried if r.error is None and not r.metrics.get("finished")]
    if not finished:
        return {"status": "failed", "errors": errors or ["no trial finished"]}
    if len(finished) > 1 and any(
        r.metrics.get("heldout_kl") is None for r in finished
    ):  # every held-out row was unusable
        return {
            "status": "failed",
            "errors": ["no held-out teacher KL to choose λ by (every held-out row was skipped)"],
        }
    best = min(finished, key=lambda r: r.metrics.get("heldout_kl") or 0.0)
    lam, metrics = best.config["trial"]["lam"], best.metrics
    kept = (
        "train_loss_first",
        "train_loss_last",
        "train_losses",
        "grad_norm_first",
        "grad_norm_last",
        "steps",
        "train_examples",
        "heldout_examples",
        "heldout_loss_before",
        "heldout_loss_per_epoch",
        "heldout_kl_examples",
        "heldout_kl_before",
        "heldout_kl_per_epoch",
        "seconds",
        "resumed_from_step",
    )
    rule = lambda_rule(plan, tried)
    manifest = AdapterManifest(
        prompt_id=entry.id,
        prompt_sha256=entry.sha256,
        base_model=base,
        base_path=base_path,
        base_digest=base_digest,
        method=settings.method,
        lam=lam,
        lora={} if settings.full_finetune else {**settings.lora.to_dict(), "quantize_4bit": settings.quantize},
        kind=MODEL if settings.full_finetune else ADAPTER,
        data_fingerprint=plan.fingerprint,
        settings={
            **recorded_settings(settings, plan.lambdas),
            "lam": lam,
            "effective": metrics["effective"],
            "settings_from_catalog": plan.from_catalog,
        },
        train_metrics={
            **{k: metrics[k] for k in kept if k in metrics},
            **{k: v for k, v in metrics.items() if k.startswith(("data_", "heldout_data_"))},
            **{k: v for k, v in metrics.items() if k.startswith("onpolicy_")},
            "rows_outside_action_space_dropped": plan.dropped,
        },
        eval_metrics={
            "heldout_loss": metrics["heldout_loss"],
            "heldout_kl": metrics.get("heldout_kl"),
            "lambda_rule": rule,
            "heldout_used_for_lambda": rule == LAMBDA_RULE,
            # every trial's figures where it ended (an early-stopped one: its last epoch)
            "trials": {str(r.config["trial"]["lam"]): r.metrics.get("heldout_loss") for r in tried},
            "trials_heldout_kl": {str(r.config["trial"]["lam"]): r.metrics.get("heldout_kl") for r in tried},
        },
        genpi_version=__version__,
    )
    with best.checkpoint.as_directory() as folder:

        def save(tmp: Path) -> None:  # the weights, and the model card and portable config the hub reads
            shutil.copytree(Path(folder) / "adapter", tmp, dirs_exist_ok=True)
            hub_ready(tmp, manifest, configs=True)

        write_adapter(out / entry.id, manifest, save)
    outcome = {
        "status": "trained",
        "lam": lam,
        "heldout_loss": metrics["heldout_loss"],
        "heldout_kl": metrics.get("heldout_kl"),
    }
    if plan.dropped is not None:
        outcome["rows_outside_action_space_dropped"] = plan.dropped
    if errors:
        outcome["errors"] = errors
    if stopped:  # stopped early by ASHA: the steps they did not run are what early stopping saved
        ran = [r.metrics["steps"] if r.metrics.get("finished") else r.metrics.get("step", 0) for r in tried]
        outcome["early_stopped"] = {
            "lams": stopped,
            "steps_run": sum(ran),
            "steps_of_full_sweep": metrics["steps"] * len(tried),
        }
    return outcome
