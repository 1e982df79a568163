"""The Ray Tune experiment of a training run: one trial per (prompt, λ), checkpointed and resumable.

`run_experiment` runs (or resumes) the trials; `fit_trial` is the trainable one trial runs; `PerPromptASHA` stops a
λ that falls behind its prompt's others (--early-stop); `Progress` draws the bars in place of Tune's tables.
"""

from __future__ import annotations

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

from genpi.tracking import tune_callbacks
from genpi.train.plan import NO_LAMBDA, Plan


def run_experiment(
    plans: list[Plan],
    base_path,
    out,
    storage,
    num_cpus,
    num_gpus,
    progress,
    checkpoint_steps,
    max_failures,
    early_stop,
    tracking: tuple[str, ...] = (),
) -> tuple[dict[str, list], Path]:
    """Run (or resume) the Tune experiment over the plans' trials; returns ({prompt_id: [ray.tune.Result]}, its
    folder). `tracking` (genpi.tracking): where every trial's reports are logged, under OUT/.tracking/."""
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
    # a full fine-tune on GPUs: the trial drives a TorchTrainer whose workers hold the GPUs (genpi.train.full)
    workers = int(num_gpus) if num_gpus and any(p.settings.full_finetune for p in plans) else 0
    trainable = tune.with_resources(
        tune.with_parameters(
            fit_trial,
            base=base_path,
            entries={p.entry.id: p.entry.to_json() for p in plans},
            rows=rows,
            settings={p.entry.id: p.settings for p in plans},
            checkpoint_steps=checkpoint_steps,
            workers=workers,
            storage=str(storage / name),
            max_failures=max_failures,
        ),
        {"cpu": 1, "gpu": 0} if workers else {"cpu": num_cpus, "gpu": num_gpus},
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
                trial_name_creator=trial_name,  # a tracker's run name
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=str(storage),
                failure_config=tune.FailureConfig(max_failures=max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                callbacks=[bars, *tune_callbacks(tracking, out, name)],
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


def load_state(path: str | Path) -> dict:
    """A trial's training state from its checkpoint: tensors, numbers, strings, bytes and containers of them
    only (weights_only), so a checkpoint folder that someone else could write cannot run code in a trial."""
    import torch

    return torch.load(path, weights_only=True)


def resumed(checkpoint) -> tuple[dict | None, int | None]:
    """A trial's state from its Ray (Tune or Train) checkpoint and the step it resumes from; (None, None) without."""
    if checkpoint is None:
        return None, None
    with checkpoint.as_directory() as folder:
        state = load_state(Path(folder) / "state.pt")
    return state, len(state["losses"])


def fit_trial(
    config: dict,
    base: str,
    entries: dict,
    rows: dict,
    settings: dict,
    checkpoint_steps: int,
    workers: int = 0,
    storage: str = "",
    max_failures: int = 0,
) -> None:
    """A Tune function trainable: one (prompt, λ) trial, resumed from its last checkpoint when there is one.

    `settings` maps prompt ids to their TrainSettings (catalog values applied); `rows` maps prompt ids to
    object refs of (train, heldout): each prompt's rows were put in the object store once, and a trial
    fetches only its own prompt's. The last report carries `finished` and a checkpoint holding the
    adapter (`adapter/`) beside the training state; a full fine-tune's model folder there instead, and with
    `workers` (GPUs per trial) the trial runs as a TorchTrainer of that many FSDP workers (genpi.train.full).
    """
    import ray
    import torch
    from ray import tune

    from genpi.catalog import entry_from_json
    from genpi.train.icae import train_icae
    from genpi.train.qlora import save_adapter
    from genpi.train.recipe import train_adapter

    prompt_id, lam = config["trial"]["prompt_id"], config["trial"]["lam"]
    prompt = settings[prompt_id]
    trial_settings = dataclasses.replace(prompt, lam=lam if lam is not None else prompt.lam)
    if workers:
        given = {
            "base": base,
            "entry": entries[prompt_id],
            "settings": trial_settings,
            "rows": ray.get(rows[prompt_id]),
        }
        given.update(checkpoint_steps=checkpoint_steps, tags={"prompt_id": prompt_id, "lam": lam})
        name = f"full-{prompt_id}-lam={lam}"  # the trial's own run folder: a rerun resumes it
        return trainer_trial(given, workers, True, storage, name, max_failures)
    train, heldout = ray.get(rows[prompt_id])
    resume, resumed_from = resumed(tune.get_checkpoint())
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

    # ICAE (genpi.train.icae) has a model and a loop of its own: an encoder LoRA, memory tokens, two phases
    train_method = train_icae if trial_settings.method == "icae" else train_adapter
    model, metrics = train_method(
        base, entry_from_json(entries[prompt_id]), train, heldout, trial_settings, report, checkpoint_steps, resume
    )
    if trial_settings.method == "icae":  # its encoder, memory tokens and P's slots, not a LoRA of the base
        save = model.save
    elif trial_settings.full_finetune:
        from genpi.train.full import save_model

        save = lambda folder: save_model(model, folder, base)  # noqa: E731
    else:
        save = lambda folder: save_adapter(model, folder)  # noqa: E731
    report({**metrics, "finished": True}, lambda: last_state[0], adapter=save)


def worker_loop(config: dict) -> None:
    """One TorchTrainer worker (one FSDP rank): the recipe's loop on this rank's share of the rows; rank 0 writes
    the checkpoints (training state and, at the end, the model folder `adapter/`), every rank reports."""
    import ray.train
    import torch

    from genpi.catalog import entry_from_json
    from genpi.train.full import save_model
    from genpi.train.recipe import train_adapter

    rank = ray.train.get_context().get_world_rank()
    if torch.cuda.is_available():
        torch.cuda.set_device(ray.train.torch.get_device())
    train, heldout = config["rows"]
    resume, resumed_from = resumed(ray.train.get_checkpoint())
    last_state = [resume]

    def report(metrics: dict, state, **files) -> None:
        metrics = {**metrics, **config["tags"], "resumed_from_step": resumed_from}
        if state is None:
            ray.train.report(metrics)
            return
        last_state[0] = state = state()  # every rank: gathering sharded weights is a collective
        with tempfile.TemporaryDirectory() as folder:
            if rank == 0:
                torch.save(state, Path(folder) / "state.pt")
            for name, save in files.items():
                save(Path(folder) / name)
            checkpoint = ray.train.Checkpoint.from_directory(folder) if rank == 0 else None
            ray.train.report(metrics, checkpoint=checkpoint)

    base, settings = config["base"], config["settings"]
    model, metrics = train_adapter(
        base, entry_from_json(config["entry"]), train, heldout, settings, report, config["checkpoint_steps"], resume
    )
    report({**metrics, "finished": True}, lambda: last_state[0], adapter=lambda f: save_model(model, f, base))


def fit_with_trainer(config: dict, workers: int, use_gpu: bool, storage: str, name: str, max_failures: int = 2):
    """Run one trial's full fine-tune as a TorchTrainer (`config`: what `worker_loop` reads); returns its
    ray.train.Result (metrics of the last report, the checkpoint with `adapter/`). The run folder STORAGE/NAME
    is the trial's own: a rerun of the same trial restores it and its workers resume from its last checkpoint."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from genpi.train.full import trainer_scaling

    callbacks = []
    try:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())  # the steps reach Tune's bars and ASHA as a LoRA trial's do
    except RuntimeError:  # not inside a Tune trial (a test, a direct call)
        pass
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=trainer_scaling(workers, use_gpu),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
    )
    return trainer.fit()


def trainer_trial(config: dict, workers: int, use_gpu: bool, storage: str, name: str, max_failures: int):
    """A Tune trial that drives a TorchTrainer: its last report carries `finished` and a Tune checkpoint holding
    the model folder `adapter/`, as an in-process trial's does (genpi.train.plan.write_best reads it)."""
    from ray import tune

    result = fit_with_trainer(config, workers, use_gpu, storage, name, max_failures)
    if result.error is not None:
        raise result.error
    with result.checkpoint.as_directory() as folder, tempfile.TemporaryDirectory() as out:
        shutil.copytree(Path(folder) / "adapter", Path(out) / "adapter")
        tune.report(dict(result.metrics), checkpoint=tune.Checkpoint.from_directory(out))


def trial_name(trial) -> str:
    return f"{trial.config['trial']['prompt_id']}-lam={trial.config['trial']['lam']}"


def trial_folder_name(trial) -> str:
    return f"{trial_name(trial)}-{trial.trial_id}"


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
