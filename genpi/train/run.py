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
missing. Every trial's reports (per step the loss and its terms, λ, the learning rate and the
gradient norm; per epoch the held-out figures) go through Ray Tune's logger callbacks to
TensorBoard (ADAPTERS/.tracking/tb/, the default), MLflow or W&B (--tracking; genpi.tracking).

A catalog prompt's `train` settings (lam, grad_clip, lr, epochs) are that prompt's, unless
the flag (--lambdas, --max-grad-norm, --lr, --epochs) is given: a flag holds for the whole
run. genpi.json records which settings came from the catalog.

`--full-finetune` trains every weight (genpi.train.full): kld, seqkd and seqkd+kld then take the paper's batch 64,
lr 1e-5 and 10 epochs unless --batch-size, --lr, --epochs say otherwise (for every prompt: a catalog's train.lr and
train.epochs are GenPI's LoRA settings), and on a GPU cluster each trial runs as a TorchTrainer with FSDP over its
--gpus-per-trial GPUs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

from genpi import InputError, exits_2_on_input_error
from genpi.catalog import load_catalog
from genpi.cluster import init_ray
from genpi.data.adapters import fingerprint, read_adapter_manifest, weights_digest
from genpi.data.dialogues import prompt_rows
from genpi.data.runfolder import check_out, holding_lock
from genpi.flags import add_settings, from_args
from genpi.tracking import DEFAULT as DEFAULT_TRACKING
from genpi.tracking import HELP as TRACKING_HELP
from genpi.tracking import parse_tracking
from genpi.train.experiment import run_experiment
from genpi.train.full import paper_defaults
from genpi.train.plan import CATALOG_TRAIN, NO_LAMBDA, Plan, fingerprint_settings, prompt_settings, write_best
from genpi.train.qlora import LoraSettings
from genpi.train.recipe import JOINT_METHODS, METHODS, TrainSettings

DEFAULT_LAMBDAS = "0.3,0.5,0.7"
LOCK = "train.lock"  # ADAPTERS/train.lock while a training runs (genpi.data.runfolder)


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
    tracking: str | None = DEFAULT_TRACKING,
) -> dict:
    """Train (or skip) every prompt of the catalog; returns {prompt_id: outcome}.

    `settings` and `lambdas` are the run's; a prompt's catalog `train` values replace them but for the keys
    in `overrides` (CATALOG_TRAIN keys whose flag was given: those hold for every prompt).

    `num_gpus` per trial defaults to 1 when the Ray cluster has GPUs, else 0; 0 on a cluster
    with GPUs is refused (InputError): Ray hides the GPUs from a task that asks for none, so
    every trial would train on the CPU.

    `tracking` (genpi.tracking, e.g. "tensorboard,mlflow"; None: none) logs every trial's reports under
    OUT/.tracking/.

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
    trackers = parse_tracking(tracking)
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
            data_print = fingerprint(train, heldout, fingerprint_settings(prompt, prompt_lambdas), base)
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
                "ask for none, so every trial would train on the CPU; leave --gpus-per-trial out (1 per trial) "
                "or set it > 0"
            )
        if settings.full_finetune:
            from genpi.train.full import check_gpu_cluster

            try:
                check_gpu_cluster(cluster_gpus, num_gpus)
            except ValueError as e:
                raise InputError(str(e)) from None
        results, experiment = run_experiment(
            plans=plans,
            base_path=base_path,
            out=out,
            storage=storage,
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            progress=progress,
            checkpoint_steps=checkpoint_steps,
            max_failures=max_failures,
            early_stop=early_stop,
            tracking=trackers,
        )
        base_digest = weights_digest(base_path)  # genpi.json holds the adapters to these weights (check_base)
        for plan in plans:
            outcomes[plan.entry.id] = write_best(
                plan, results.get(plan.entry.id, []), out, base, str(Path(base_path).absolute()), base_digest
            )
        if all(outcomes[plan.entry.id]["status"] == "trained" for plan in plans):
            shutil.rmtree(
                experiment
            )  # every adapter is written; a failed trial's checkpoints and error files stay for a look
        return outcomes


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
    "batch_size": "--batch-size",
}


def build_parser() -> argparse.ArgumentParser:
    d, help = TrainSettings(), {f.name: f.metadata.get("help", "") for f in dataclasses.fields(TrainSettings)}
    p = argparse.ArgumentParser(prog="python -m genpi.train", description=__doc__.splitlines()[0])
    p.add_argument("data", help="synthesis run folder (genpi synth --out)")
    p.add_argument("--catalog", required=True)
    p.add_argument("--out", required=True, help="adapters folder: ADAPTERS/ID/")
    p.add_argument(
        "--base", default="smollm2", help="base model: local folder, hub id ORG/NAME in the local cache, or 'smollm2'"
    )
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
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"{help['batch_size']} (default {d.batch_size}; --full-finetune kld, seqkd, seqkd+kld: 64)",
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
    p.add_argument("--tracking", default=DEFAULT_TRACKING, help=f"{TRACKING_HELP}; under ADAPTERS/.tracking/")
    p.add_argument("--no-progress", action="store_true")
    return p


def settings_from_args(args: argparse.Namespace) -> tuple[TrainSettings, list[float], frozenset]:
    """The run's TrainSettings, its λ values, and the CATALOG_TRAIN keys whose flag was given (those hold for every
    prompt; the others yield to a prompt's catalog `train` values)."""
    d = TrainSettings()
    overrides = frozenset(key for key, dest in CATALOG_TRAIN.items() if getattr(args, dest) is not None)
    given = {dest: getattr(args, dest) for dest in ("epochs", "lr", "max_grad_norm", "batch_size")}
    catalog_decides = {dest: getattr(d, dest) if value is None else value for dest, value in given.items()}
    if args.method not in METHODS:
        raise InputError(f"--method: unknown method {args.method!r}: expected one of {', '.join(METHODS)}")
    if args.full_finetune:  # the paper's settings of its full-fine-tune rows, for every prompt (not the catalog's)
        paper = paper_defaults(args.method, {dest for dest, value in given.items() if value is not None})
        catalog_decides.update(paper)
        overrides |= {key for key, dest in CATALOG_TRAIN.items() if dest in paper}
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
        args.tracking,
    )
    print(json.dumps(outcomes, indent=2))
    return 1 if any(o["status"] == "failed" for o in outcomes.values()) else 0
