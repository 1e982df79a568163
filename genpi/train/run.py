"""`python -m genpi.train DATA --catalog CATALOG --out ADAPTERS`: one adapter per prompt, as one Ray Tune experiment.

The trials are prompts × λ (a grid; prompts alone for the methods without a λ). Each
trial reports every step through Ray's reporting API and checkpoints (LoRA weights,
optimizer and scheduler state, random generators, the epoch's data order) at the end
of every epoch and every --checkpoint-steps steps, into the experiment's storage
(`--storage`, default ADAPTERS/.tune: a shared folder on a cluster). A failed trial is
retried from its last checkpoint (--max-failures); a rerun of the same command after a
kill restores the experiment and resumes every unfinished trial where it stopped.
When the experiment ends, each prompt's best finished trial becomes `ADAPTERS/ID/` (PEFT
files plus genpi.json, renamed into place): the one with the lowest held-out teacher KL,
KL(teacher with P ‖ adapter without P) on the held-out dialogues' agent tokens, what
internalization is for (the held-out SFT loss always favours the smallest prompt-generation
weight, so it is recorded, not used). `--early-stop` stops a λ whose held-out teacher KL
falls behind the prompt's other λ trials (ASHA, per prompt). A prompt whose adapter already
exists for the same data, settings and λ values is skipped, so a rerun does only what is
missing.

A catalog prompt's `train` settings (lam, grad_clip, lr, epochs) are that prompt's, unless
the flag (--lambdas, --max-grad-norm, --lr, --epochs) is given: a flag holds for the whole
run. genpi.json records which settings came from the catalog.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path

from ray.tune import Callback
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler
from tqdm import tqdm

from genpi import InputError, __version__, exits_2_on_input_error
from genpi.catalog import PromptEntry, load_catalog
from genpi.cluster import init_ray
from genpi.data.adapters import AdapterManifest, fingerprint, read_adapter_manifest, write_adapter
from genpi.data.dialogues import prompt_rows
from genpi.data.runfolder import check_out, holding_lock
from genpi.flags import add_settings, from_args
from genpi.train.qlora import LoraSettings
from genpi.train.recipe import JOINT_METHODS, METHODS, TrainSettings

NO_LAMBDA = set(METHODS) - set(JOINT_METHODS)  # methods with one loss term: no λ to choose
LAMBDA_RULE = "heldout_teacher_kl"  # how a prompt's λ is chosen among several: lowest held-out teacher KL
# a catalog prompt's `train` keys and the setting each gives (its flag's dest: --lambdas, --max-grad-norm, --lr, --epochs)
CATALOG_TRAIN = {"lam": "lambdas", "grad_clip": "max_grad_norm", "lr": "lr", "epochs": "epochs"}
DEFAULT_LAMBDAS = "0.3,0.5,0.7"
LOCK = "train.lock"  # ADAPTERS/train.lock while a training runs (genpi.data.runfolder)


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


def train_catalog(
    data,
    catalog,
    out,
    base: str,
    settings: TrainSettings,
    lambdas: list[float],
    num_cpus: float = 1,
    num_gpus: float | None = None,
    progress: bool = True,
    valid_only: bool = False,
    storage: str | None = None,
    checkpoint_steps: int = 0,
    max_failures: int = 2,
    early_stop: bool = False,
    overrides=frozenset(),
) -> dict:
    """Train (or skip) every prompt of the catalog; returns {prompt_id: outcome}.

    `settings` and `lambdas` are the run's; a prompt's catalog `train` values replace them but for the keys
    in `overrides` (CATALOG_TRAIN keys whose flag was given: those hold for every prompt).

    `num_gpus` per trial defaults to 1 when the Ray cluster has GPUs, else 0; 0 on a cluster
    with GPUs is refused (InputError): Ray hides the GPUs from a task that asks for none, so
    every trial would train on the CPU.

    `valid_only` trains only on dialogues whose agent turns all lie in the prompt's action space: a
    small teacher breaks the format often, and its broken turns teach the adapter the same.
    """
    import ray

    from genpi.models import resolve_model

    if checkpoint_steps < 0 or max_failures < 0:
        raise InputError(
            f"--checkpoint-steps and --max-failures must be 0 or more, got {checkpoint_steps} and {max_failures}"
        )
    check_init_adapter(settings)
    entries = load_catalog(catalog)
    out = check_out(out).absolute()
    with holding_lock(out / LOCK, "training run"):  # two trainings of one folder would write the same adapters
        base_path = resolve_model(base)
        outcomes, plans = {}, []
        for entry in entries:  # read and check every prompt's data before any training starts
            prompt, prompt_lambdas, from_catalog = prompt_settings(entry, settings, lambdas, overrides)
            train, heldout = prompt_rows(data, entry)
            dropped = None
            if valid_only:
                if not entry.valid_action:
                    raise InputError(f"--valid-only: prompt {entry.id!r} has no actions.valid regex to filter by")
                kept = [
                    r
                    for r in train
                    if all(entry.in_action_space(t["content"]) for t in r["turns"] if t["role"] == "assistant")
                ]
                train, dropped = kept, len(train) - len(kept)
            if not train:
                reason = "no train rows" + (f" in the action space ({dropped} dropped)" if dropped else "")
                outcomes[entry.id] = {"status": "skipped", "reason": reason}
                continue
            if prompt.method not in NO_LAMBDA and len(prompt_lambdas) > 1 and not heldout:
                raise InputError(
                    f"prompt {entry.id!r} has no held-out dialogues to choose λ among {prompt_lambdas} by the held-out "
                    "teacher KL: synthesize with --heldout > 0, or pass one λ (--lambdas 0.3)"
                )
            if early_stop and not heldout:
                raise InputError(
                    f"--early-stop: prompt {entry.id!r} has no held-out dialogues to compare its trials by"
                )
            data_print = fingerprint(train, heldout, recorded_settings(prompt, prompt_lambdas), base)
            done = read_adapter_manifest(out / entry.id)
            if done and done.data_fingerprint == data_print and done.prompt_sha256 == entry.sha256:
                outcomes[entry.id] = {"status": "up to date", "lam": done.lam}
                continue
            plans.append(Plan(entry, train, heldout, prompt, prompt_lambdas, from_catalog, data_print, dropped))
        if not plans:
            return outcomes
        init_ray(log_to_driver=False)
        cluster_gpus = ray.cluster_resources().get("GPU", 0)
        if num_gpus is None:
            num_gpus = 1 if cluster_gpus else 0
        elif num_gpus == 0 and cluster_gpus:
            raise InputError(
                f"--gpus-per-trial 0 on a Ray cluster with {cluster_gpus:g} GPUs: Ray hides the GPUs from tasks that "
                "ask for none, so every trial would train on the CPU; leave --gpus-per-trial out (1 per trial) or set it > 0"
            )
        results, experiment = run_experiment(
            plans, base_path, out, storage, num_cpus, num_gpus, progress, checkpoint_steps, max_failures, early_stop
        )
        for plan in plans:
            outcomes[plan.entry.id] = write_best(plan, results.get(plan.entry.id, []), out, base)
        if all(outcomes[plan.entry.id]["status"] == "trained" for plan in plans):
            shutil.rmtree(
                experiment
            )  # every adapter is written; a failed trial's checkpoints and error files stay for a look
        return outcomes


def run_experiment(
    plans: list[Plan], base_path, out, storage, num_cpus, num_gpus, progress, checkpoint_steps, max_failures, early_stop
) -> tuple[dict[str, list], Path]:
    """Run (or resume) the Tune experiment over the plans' trials; returns ({prompt_id: [ray.tune.Result]}, its folder)."""
    import ray
    from ray import tune

    storage = Path(storage).absolute() if storage else out / ".tune"
    # The same command (same data, settings, λ values, trials) finds and resumes its own experiment.
    name = (
        "train-"
        + hashlib.sha256(
            json.dumps([[p.entry.id, p.fingerprint] for p in plans] + [checkpoint_steps, early_stop]).encode()
        ).hexdigest()[:16]
    )
    storage.mkdir(parents=True, exist_ok=True)
    log = storage / f"{name}.log"
    for logger_name in ("ray.tune", "ray.train", "ray.air"):  # Tune's own output goes to a file, not the terminal
        logger = logging.getLogger(logger_name)
        logger.handlers = [logging.FileHandler(log)]
        logger.propagate = False
    trials = [
        {"prompt_id": p.entry.id, "lam": lam}
        for p in plans
        for lam in ([None] if p.settings.method in NO_LAMBDA else p.lambdas)
    ]
    rows = {p.entry.id: ray.put((p.train, p.heldout)) for p in plans}  # once per prompt, shared by its λ trials
    trainable = tune.with_resources(
        tune.with_parameters(
            fit_trial,
            base=base_path,
            entries={p.entry.id: p.entry.to_json() for p in plans},
            rows=rows,
            settings={p.entry.id: p.settings for p in plans},
            checkpoint_steps=checkpoint_steps,
        ),
        {"cpu": num_cpus, "gpu": num_gpus},
    )
    bars = Progress(len(trials), progress)
    path = storage / name
    param_space = {"trial": tune.grid_search(trials)}
    if tune.Tuner.can_restore(path):
        print(f"genpi: resuming the training experiment in {path}", file=sys.stderr)
        # Tune does not save the param space: a run killed before its trials were created makes them again from this one
        tuner = tune.Tuner.restore(
            str(path), trainable, resume_unfinished=True, restart_errored=True, param_space=param_space
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                scheduler=PerPromptASHA({p.entry.id: p.settings.epochs for p in plans}) if early_stop else None,
                trial_dirname_creator=trial_folder_name,
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=str(storage),
                failure_config=tune.FailureConfig(max_failures=max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                callbacks=[bars],
                verbose=0,
            ),
        )
    try:
        with open(log, "a") as log_file, contextlib.redirect_stdout(log_file):  # Tune prints tables even when silent
            grid = tuner.fit()
    finally:
        bars.close()
    results: dict[str, list] = {}
    for result in grid:
        results.setdefault(result.config["trial"]["prompt_id"], []).append(result)
    return results, path


def lambda_rule(plan: Plan, tried: list) -> str | None:
    """How the prompt's λ was chosen: by the held-out teacher KL among several, else where the one λ came from."""
    if plan.settings.method in NO_LAMBDA:
        return None
    if len(tried) > 1:
        return LAMBDA_RULE
    return "catalog" if "lam" in plan.from_catalog else "given"


def write_best(plan: Plan, tried: list, out: Path, base: str) -> dict:
    """Write the prompt's best finished trial (lowest held-out teacher KL) as ADAPTERS/ID/; returns the prompt's outcome."""
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
        method=settings.method,
        lam=lam,
        lora={**settings.lora.to_dict(), "quantize_4bit": settings.quantize},
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
        write_adapter(
            out / entry.id, manifest, lambda tmp: shutil.copytree(Path(folder) / "adapter", tmp, dirs_exist_ok=True)
        )
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


def check_init_adapter(settings: TrainSettings) -> None:
    """--init-adapter names a PEFT adapter of this run's LoRA shape (rank, alpha, target modules): refused before any
    training (InputError) rather than in every trial; the tensors' shapes are checked when a trial loads it."""
    if not settings.init_adapter:
        return
    folder = Path(settings.init_adapter)
    config = folder / "adapter_config.json"
    if not config.is_file() or not (folder / "adapter_model.safetensors").is_file():
        raise InputError(
            f"--init-adapter {folder}: not a PEFT adapter folder (adapter_config.json and adapter_model.safetensors)"
        )
    saved, lora = json.loads(config.read_text()), settings.lora
    if saved.get("r") != lora.r or saved.get("lora_alpha") != lora.alpha:
        raise InputError(
            f"--init-adapter {folder}: rank {saved.get('r')}, alpha {saved.get('lora_alpha')}; this run's LoRA is rank "
            f"{lora.r}, alpha {lora.alpha} (--rank, --alpha): the LoRA shapes must match"
        )


def load_state(path: str | Path) -> dict:
    """A trial's training state from its checkpoint: tensors, numbers, strings, bytes and containers of them
    only (weights_only), so a checkpoint folder that someone else could write cannot run code in a trial."""
    import torch

    return torch.load(path, weights_only=True)


def fit_trial(config: dict, base: str, entries: dict, rows: dict, settings: dict, checkpoint_steps: int) -> None:
    """A Tune function trainable: one (prompt, λ) trial, resumed from its last checkpoint when there is one.

    `settings` maps prompt ids to their TrainSettings (catalog values applied); `rows` maps prompt ids to
    object refs of (train, heldout): each prompt's rows were put in the object store once, and a trial
    fetches only its own prompt's. The last report carries `finished` and a checkpoint holding the
    adapter (`adapter/`) beside the training state.
    """
    import ray
    import torch
    from ray import tune

    from genpi.catalog import entry_from_json
    from genpi.train.qlora import save_adapter
    from genpi.train.recipe import train_adapter

    prompt_id, lam = config["trial"]["prompt_id"], config["trial"]["lam"]
    train, heldout = ray.get(rows[prompt_id])
    resume, checkpoint = None, tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            resume = load_state(Path(folder) / "state.pt")
    resumed_from = len(resume["losses"]) if resume else None
    last_state = [resume]

    def report(metrics: dict, state, **files) -> None:
        metrics = {**metrics, "prompt_id": prompt_id, "lam": lam, "resumed_from_step": resumed_from}
        if state is None:
            tune.report(metrics)
            return
        last_state[0] = state = state()
        with tempfile.TemporaryDirectory() as folder:
            torch.save(state, Path(folder) / "state.pt")
            for name, save in files.items():
                save(Path(folder) / name)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))

    prompt = settings[prompt_id]
    trial_settings = dataclasses.replace(prompt, lam=lam if lam is not None else prompt.lam)
    model, metrics = train_adapter(
        base, entry_from_json(entries[prompt_id]), train, heldout, trial_settings, report, checkpoint_steps, resume
    )
    report({**metrics, "finished": True}, lambda: last_state[0], adapter=lambda folder: save_adapter(model, folder))


def trial_folder_name(trial) -> str:
    return f"{trial.config['trial']['prompt_id']}-lam={trial.config['trial']['lam']}-{trial.trial_id}"


class PerPromptASHA(FIFOScheduler):
    """ASHA among each prompt's λ trials only, on the held-out teacher KL: KLs of different prompts do not
    compare. `epochs`: {prompt id: its epochs} (a catalog prompt may train longer than another)."""

    def __init__(self, epochs: dict[str, int]):
        super().__init__()
        self.epochs, self.by_prompt, self.added = epochs, {}, set()

    def _asha(self, trial) -> AsyncHyperBandScheduler:
        prompt_id = trial.config["trial"]["prompt_id"]
        if prompt_id not in self.by_prompt:
            self.by_prompt[prompt_id] = AsyncHyperBandScheduler(
                time_attr="epoch",
                metric="heldout_kl",
                mode="min",
                max_t=self.epochs[prompt_id],
                grace_period=1,
                reduction_factor=3,
                stop_last_trials=False,  # a trial at its last epoch still reports its adapter
            )
        return self.by_prompt[prompt_id]

    def on_trial_add(self, tune_controller, trial):
        self.added.add(trial.trial_id)
        self._asha(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result):
        if result.get("heldout_kl") is None:  # a step within an epoch, or no usable held-out row
            return self.CONTINUE
        if trial.trial_id not in self.added:  # a trial restored with the experiment
            self.on_trial_add(tune_controller, trial)
        return self._asha(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result):
        if trial.trial_id in self.added:
            self.added.discard(trial.trial_id)
            self._asha(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial):
        if trial.trial_id in self.added:
            self.added.discard(trial.trial_id)
            self._asha(trial).on_trial_remove(tune_controller, trial)


class Progress(Callback):
    """One bar for trials and one for steps (with the loss): Tune's own tables stay off."""

    def __init__(self, trials: int, enabled: bool):
        self.trials, self.enabled = trials, enabled
        self.bars = None
        self.steps, self.totals, self.ended, self.announced = {}, {}, set(), set()

    def __getstate__(self):  # Tune pickles its callbacks with the experiment: no open bars
        return {**self.__dict__, "bars": None}

    def _bars(self):
        if self.bars is None:
            self.bars = (
                tqdm(total=self.trials, unit="trial", desc="adapters", disable=not self.enabled, file=sys.stderr),
                tqdm(total=0, unit="step", desc="steps", disable=not self.enabled, file=sys.stderr),
            )
        return self.bars

    def on_trial_result(self, iteration, trials, trial, result, **info):
        trials_bar, steps_bar = self._bars()
        if result.get("resumed_from_step") and trial.trial_id not in self.announced:
            self.announced.add(trial.trial_id)
            steps_bar.write(
                f"genpi: {result['prompt_id']} λ={result['lam']}: resumed from the checkpoint at step "
                f"{result['resumed_from_step']} of {result['steps']}",
                file=sys.stderr,
            )
        if "step" in result:
            self.steps[trial.trial_id], self.totals[trial.trial_id] = result["step"], result["steps"]
            steps_bar.total, steps_bar.n = sum(self.totals.values()), sum(self.steps.values())
            steps_bar.set_postfix(loss=f"{result['loss']:.3f}")  # redraws the bar

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._ended(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended(trial)

    def _ended(self, trial):
        if trial.trial_id not in self.ended:
            self.ended.add(trial.trial_id)
            self._bars()[0].update(1)

    def close(self):
        for bar in self.bars or ():
            bar.close()


# TrainSettings fields whose flags are written by hand below: a prompt's catalog `train` value or the trial decides
# them when the flag is not given (--lambdas, --epochs, --lr, --max-grad-norm), the method is checked with its own
# message, the LoRA shape is nested; the rest come from the fields (genpi.flags)
HAND_FLAGS = {
    "method": "--method",
    "lam": "--lambdas",
    "epochs": "--epochs",
    "lr": "--lr",
    "max_grad_norm": "--max-grad-norm",
    "lora": "--rank, --alpha",
}


def build_parser() -> argparse.ArgumentParser:
    d, help = TrainSettings(), {f.name: f.metadata.get("help", "") for f in dataclasses.fields(TrainSettings)}
    p = argparse.ArgumentParser(prog="python -m genpi.train", description=__doc__.splitlines()[0])
    p.add_argument("data", help="synthesis run folder (genpi synth --out)")
    p.add_argument("--catalog", required=True)
    p.add_argument("--out", required=True, help="adapters folder: ADAPTERS/ID/")
    p.add_argument("--base", default="smollm2", help="base model: local folder or 'smollm2'")
    p.add_argument("--method", default=d.method, help=f"{help['method']} (default %(default)s)")
    p.add_argument(
        "--lambdas",
        default=None,
        help=f"λ values to try per prompt ({', '.join(JOINT_METHODS)}; default {DEFAULT_LAMBDAS}, "
        "or a prompt's catalog train.lam); the lowest held-out teacher KL wins",
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"{help['epochs']} (default {d.epochs}, or a prompt's catalog train.epochs)",
    )
    p.add_argument(
        "--lr", type=float, default=None, help=f"{help['lr']} (default {d.lr:g}, or a prompt's catalog train.lr)"
    )
    p.add_argument(
        "--max-grad-norm",
        type=float,
        default=None,
        help=f"{help['max_grad_norm']}; default {d.max_grad_norm}, or a prompt's catalog train.grad_clip",
    )
    p.add_argument("--rank", type=int, default=LoraSettings.r, help="LoRA rank (default %(default)s)")
    p.add_argument("--alpha", type=int, default=LoraSettings.alpha, help="LoRA alpha (default %(default)s)")
    add_settings(p, TrainSettings, [f.name for f in dataclasses.fields(TrainSettings) if f.name not in HAND_FLAGS])
    p.add_argument(
        "--valid-only", action="store_true", help="train only on dialogues whose agent turns all match actions.valid"
    )
    p.add_argument("--cpus-per-trial", type=float, default=1)
    p.add_argument("--gpus-per-trial", type=float, default=None, help="default: 1 if the Ray cluster has GPUs, else 0")
    p.add_argument(
        "--storage",
        default=None,
        help="where the trials checkpoint (default: ADAPTERS/.tune; a shared folder on a cluster)",
    )
    p.add_argument(
        "--checkpoint-steps", type=int, default=0, help="also checkpoint every N steps (always: at every epoch's end)"
    )
    p.add_argument(
        "--max-failures", type=int, default=2, help="retries of a failed trial, each from its last checkpoint"
    )
    p.add_argument(
        "--early-stop",
        action="store_true",
        help="stop a λ whose held-out teacher KL falls behind the prompt's others (ASHA)",
    )
    p.add_argument("--no-progress", action="store_true")
    return p


def settings_from_args(args: argparse.Namespace) -> tuple[TrainSettings, list[float], frozenset]:
    """The run's TrainSettings, its λ values, and the CATALOG_TRAIN keys whose flag was given (those hold for every
    prompt; the others yield to a prompt's catalog `train` values)."""
    d = TrainSettings()
    overrides = frozenset(key for key, dest in CATALOG_TRAIN.items() if getattr(args, dest) is not None)
    given = {dest: getattr(args, dest) for dest in ("epochs", "lr", "max_grad_norm")}
    catalog_decides = {dest: getattr(d, dest) if value is None else value for dest, value in given.items()}
    if args.method not in METHODS:
        raise InputError(f"--method: unknown method {args.method!r}: expected one of {', '.join(METHODS)}")
    text = DEFAULT_LAMBDAS if args.lambdas is None else args.lambdas
    try:
        lambdas = [float(x) for x in text.split(",")]
    except ValueError:
        raise InputError(f"--lambdas: expected numbers separated by commas, got {text!r}") from None
    try:
        init_adapter = str(Path(args.init_adapter).absolute()) if args.init_adapter else None
        lora = LoraSettings(r=args.rank, alpha=args.alpha)
        settings = from_args(TrainSettings, args, lam=d.lam, lora=lora, init_adapter=init_adapter, **catalog_decides)
    except ValueError as e:  # a setting out of range (--prepend-ratio, --topk-k, --warmup-ratio ...)
        raise InputError(str(e)) from None
    return settings, lambdas, overrides


@exits_2_on_input_error
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings, lambdas, overrides = settings_from_args(args)
    outcomes = train_catalog(
        args.data,
        args.catalog,
        args.out,
        args.base,
        settings,
        lambdas,
        args.cpus_per_trial,
        args.gpus_per_trial,
        not args.no_progress,
        args.valid_only,
        args.storage,
        args.checkpoint_steps,
        args.max_failures,
        args.early_stop,
        overrides,
    )
    print(json.dumps(outcomes, indent=2))
    return 1 if any(o["status"] == "failed" for o in outcomes.values()) else 0
