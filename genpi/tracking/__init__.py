"""Experiment tracking: where training, synthesis and evaluation send their figures, opened here and nowhere else.

    --tracking tensorboard         event files under FOLDER/.tracking/tb/ (default; `tensorboard --logdir` it)
    --tracking mlflow              an MLflow file store FOLDER/.tracking/mlruns (offline; `mlflow ui` reads it)
    --tracking wandb               Weights & Biases, offline unless $WANDB_MODE says otherwise, under FOLDER/.tracking/
    --tracking tensorboard,mlflow  several at once; `none`: nothing

FOLDER is the run's own: ADAPTERS for a training and an evaluation's adapters, OUT for a synthesis. A training is
a Ray Tune experiment, so it goes through Tune's own logger callbacks (`tune_callbacks`), fed every step's report;
a synthesis and an evaluation's records, which are not Tune runs, through `open_tracker`. Either way only numbers
are logged (nested dicts flattened with "/", None, booleans, strings and lists left out), at genpi's own step.

This module imports nothing of genpi's stages: synth, train and eval all import it.
"""

from __future__ import annotations

import math
import os
import re
from numbers import Real
from pathlib import Path

from genpi import InputError

TRACKERS = ("tensorboard", "mlflow", "wandb")
DEFAULT = "tensorboard"
HELP = "where figures are logged: tensorboard, mlflow, wandb, several joined by commas, or none (default: tensorboard)"
FOLDER = ".tracking"  # inside the run's folder; genpi's readers skip folders that start with a dot
PROJECT = "genpi"  # the MLflow experiments genpi-train, genpi-synth, genpi-eval; the W&B project
_PACKAGES = {"tensorboard": "tensorboardX", "mlflow": "mlflow", "wandb": "wandb"}
_INSTALL = {"tensorboard": "tensorboardX", "mlflow": "'genpi[mlflow]'", "wandb": "wandb"}
_BAD_KEY = re.compile(r"[^A-Za-z0-9_\-. /]")  # MLflow refuses other characters in a metric's name


def parse_tracking(text: str | None) -> tuple[str, ...]:
    """`--tracking`'s value as tracker names; () for none. An unknown name, or a tracker whose package is not
    installed, is an InputError (before any work starts, not in the middle of a run)."""
    names = tuple(dict.fromkeys(n.strip() for n in (text or "none").split(",") if n.strip()))
    if names in ((), ("none",)):
        return ()
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise InputError(f"--tracking: unknown tracker {unknown[0]!r}: expected {', '.join(TRACKERS)} or none")
    import importlib.util

    for name in names:
        if importlib.util.find_spec(_PACKAGES[name]) is None:
            raise InputError(f"--tracking {name}: {_PACKAGES[name]} is not installed: pip install {_INSTALL[name]}")
    return names


def tracking_folder(folder: str | Path) -> Path:
    return Path(folder).absolute() / FOLDER


def scalars(metrics: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of `metrics`, nested dicts flattened with "/", keys made safe for every tracker."""
    out = {}
    for key, value in metrics.items():
        name = _BAD_KEY.sub("_", f"{prefix}{key}")
        if isinstance(value, dict):
            out.update(scalars(value, f"{name}/"))
        elif isinstance(value, Real) and not isinstance(value, bool) and not math.isnan(value):
            out[name] = float(value)
    return out


class Tracker:
    """The trackers a synthesis or an evaluation logs to: `log(metrics, step)` to each, `close()` when done. Nothing
    is opened (no folder made) before the first `log`."""

    def __init__(self, names: tuple[str, ...], folder: str | Path, kind: str, run: str, params: dict | None = None):
        self.names, self.folder, self.kind, self.run, self.params = names, folder, kind, run, params or {}
        self.writer = self.mlflow = self.wandb = None
        self.opened = False

    def _open(self) -> None:
        self.opened, root = True, tracking_folder(self.folder)
        if "tensorboard" in self.names:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(root / "tb" / self.kind / self.run))
        if "mlflow" in self.names:
            from mlflow.tracking import MlflowClient

            client, name = MlflowClient(tracking_uri=mlflow_uri(self.folder)), f"{PROJECT}-{self.kind}"
            experiment = client.get_experiment_by_name(name)
            run = client.create_run(
                experiment.experiment_id if experiment else client.create_experiment(name), run_name=self.run
            )
            for key, value in self.params.items():
                client.log_param(run.info.run_id, key, value)
            self.mlflow = (client, run.info.run_id)
        if "wandb" in self.names:
            import wandb

            (root / "wandb").mkdir(parents=True, exist_ok=True)
            self.wandb = wandb.init(
                project=PROJECT,
                group=self.kind,
                name=self.run,
                dir=str(root),
                mode=os.environ.get("WANDB_MODE", "offline"),
                config=self.params,
                reinit="create_new",
            )

    def log(self, metrics: dict, step: int = 0) -> None:
        if not self.names:
            return
        if not self.opened:
            self._open()
        numbers = scalars(metrics)
        if self.writer:
            for key, value in numbers.items():
                self.writer.add_scalar(key, value, global_step=step)
            self.writer.flush()
        if self.mlflow:
            import time

            from mlflow.entities import Metric

            client, run_id = self.mlflow
            now = int(time.time() * 1000)
            batch = [Metric(key, value, now, step) for key, value in numbers.items()]
            for i in range(0, len(batch), 1000):  # MLflow's limit per call
                client.log_batch(run_id, metrics=batch[i : i + 1000])
        if self.wandb:
            self.wandb.log(numbers, step=step)

    def close(self) -> None:
        if self.writer:
            self.writer.close()
        if self.mlflow:
            client, run_id = self.mlflow
            client.set_terminated(run_id)
        if self.wandb:
            self.wandb.finish()
        self.writer = self.mlflow = self.wandb = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_tracker(
    tracking: str | tuple[str, ...] | None, folder: str | Path, kind: str, run: str, params: dict | None = None
) -> Tracker:
    """A Tracker for one run of `kind` (synth, eval) named `run`, writing under FOLDER/.tracking/: TensorBoard
    events in tb/KIND/RUN, MLflow runs in the experiment genpi-KIND of mlruns/, W&B runs in the project genpi
    (group KIND). `tracking`: --tracking's text, or names from parse_tracking."""
    names = tracking if isinstance(tracking, tuple) else parse_tracking(tracking)
    return Tracker(names, folder, kind, run, params)


def mlflow_uri(folder: str | Path) -> str:
    """Where MLflow runs go: $MLFLOW_TRACKING_URI when set (a server, a database), else the file store of the run's
    folder, FOLDER/.tracking/mlruns: offline, no server. MLflow 3 keeps its file store in maintenance mode and
    refuses it unless $MLFLOW_ALLOW_FILE_STORE says otherwise: set here for this process, as MLflow advises."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return (tracking_folder(folder) / "mlruns").as_uri()


def tune_callbacks(tracking: tuple[str, ...], folder: str | Path, experiment: str) -> list:
    """Ray Tune's own logger callbacks for a training experiment, writing under FOLDER/.tracking/: TensorBoard events
    in tb/EXPERIMENT/TRIAL (Tune's trial folders are removed once every adapter is written), MLflow runs in the
    experiment genpi-train (tagged with EXPERIMENT), W&B runs in the project genpi (group EXPERIMENT). Each trial
    is one run, named by its trial (PROMPT-lam=λ); every report is logged at the trial's optimizer step."""
    from genpi.tracking import tune

    root, callbacks = tracking_folder(folder), []
    if "tensorboard" in tracking:
        callbacks.append(tune.TensorBoard(root / "tb" / experiment))
    if "mlflow" in tracking:
        callbacks.append(
            tune.MLflow(mlflow_uri(folder), experiment_name=f"{PROJECT}-train", tags={"tune_experiment": experiment})
        )
    if "wandb" in tracking:
        from ray.air.integrations.wandb import WandbLoggerCallback  # imports wandb: only when asked for

        os.environ.setdefault("WANDB_MODE", "offline")  # Ray's callback reads it: no API key asked for offline
        (root / "wandb").mkdir(parents=True, exist_ok=True)
        callbacks.append(WandbLoggerCallback(project=PROJECT, group=experiment, dir=str(root)))
    return callbacks
