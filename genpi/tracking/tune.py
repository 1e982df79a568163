"""Ray Tune's TensorBoard and MLflow logger callbacks as a training uses them (genpi.tracking.tune_callbacks): a
trial's numbers only, at its optimizer step. Classes of a module of their own, so that Tune can pickle them with
the experiment (a rerun restores them) while `genpi.tracking` itself imports no Ray."""

from __future__ import annotations

from pathlib import Path

from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.tune.logger import TBXLoggerCallback
from ray.tune.result import AUTO_RESULT_KEYS, TRAINING_ITERATION

from genpi.tracking import scalars


class AtStep:
    """Before a Tune logger callback: a report's numbers (nested dicts flattened, lists and strings left out), at
    genpi's optimizer step (`step`; the trial's last report, its summary, at `steps`) in place of Tune's count of
    reports, which a trial resumed from a checkpoint does not keep in step."""

    def log_trial_result(self, iteration, trial, result):
        step = result.get("step") or result.get("steps") or result[TRAINING_ITERATION]
        numbers = scalars({k: v for k, v in result.items() if k not in AUTO_RESULT_KEYS and k not in ("step", "steps")})
        super().log_trial_result(iteration, trial, {**numbers, TRAINING_ITERATION: int(step)})


class TensorBoard(AtStep, TBXLoggerCallback):
    """Tune's TensorBoard logger, one folder per trial under `folder` (not in the trial's own folder, which is
    removed once every adapter is written)."""

    def __init__(self, folder: Path):
        super().__init__()
        self.folder = Path(folder)

    def log_trial_start(self, trial):  # as Tune's own, in a folder that stays
        if trial in self._trial_writer:
            self._trial_writer[trial].close()
        self._trial_writer[trial] = self._summary_writer_cls(str(self.folder / str(trial)), flush_secs=30)
        self._trial_result[trial] = {}


class MLflow(AtStep, MLflowLoggerCallback):
    """Tune's MLflow logger: one MLflow run per trial."""
