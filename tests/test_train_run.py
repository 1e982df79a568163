"""`genpi train` over a catalog on Ray: λ chosen per prompt, adapters written whole, reruns skip, stale refused."""

import contextlib
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import REPO, cli_in_process, copy_into
from test_recipe import row, write_calc_dialogues

from genpi import InputError
from genpi.catalog import load_catalog
from genpi.data import store
from genpi.data.adapters import StaleAdapterError, check_adapter, fingerprint, read_adapter_manifest
from genpi.train.plan import LAMBDA_RULE, Plan, prompt_settings, recorded_settings, write_best
from genpi.train.recipe import TrainSettings
from genpi.train.run import main, train_catalog

CATALOG = REPO / "tests" / "data" / "tiny.yaml"
CALC, GREET = load_catalog(CATALOG)


@pytest.fixture(scope="module")
def data(calc_dialogues):
    """calc has 8 train and 2 held-out dialogues, greet has none (the session's, conftest: read-only)."""
    return calc_dialogues


def train_argv(data, adapters, *extra, catalog=CATALOG, progress=False) -> list[str]:
    """`genpi train`'s arguments for the small trainings of these tests."""
    return [
        "train",
        str(data),
        "--catalog",
        str(catalog),
        "--out",
        str(adapters),
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--micro-batch",
        "2",
        "--max-length",
        "512",
        "--rank",
        "4",
        "--lr",
        "1e-2",
        *([] if progress else ["--no-progress"]),
        *extra,
    ]


def train(data, adapters, *extra, catalog=CATALOG, progress=False):
    command = [
        sys.executable,
        "-m",
        "genpi.cli",
        *train_argv(data, adapters, *extra, catalog=catalog, progress=progress),
    ]
    return subprocess.run(
        command, cwd=REPO, env=dict(os.environ, RAY_ADDRESS="local"), capture_output=True, text=True, timeout=600
    )


def refused_in_process(capsys, monkeypatch, data, adapters, *extra, catalog=CATALOG) -> tuple[int, str]:
    """`genpi train` with bad input, in this process (a subprocess each costs seconds of imports): (exit status,
    stderr). ray.init stops the command (stop_at_ray_init), so a refusal that came only after Ray started fails."""
    stop_at_ray_init(monkeypatch)
    return cli_in_process(capsys, *train_argv(data, adapters, *extra, catalog=catalog))


@pytest.mark.slow
def test_train_chooses_lambda_writes_the_adapter_and_skips_on_rerun(
    data, calc_genpi_trained, tiny_trainable_model, tmp_path, capsys, monkeypatch
):
    # the session's `train(data, adapters, "--base", tiny_trainable_model, "--lambdas", "0.3,0.7", progress=True)`
    # (conftest), copied: the reruns below write into the folder
    trained, result = calc_genpi_trained
    assert result.returncode == 0, result.stderr[-3000:]
    adapters = copy_into(trained, tmp_path)
    assert "adapters: 100%" in result.stderr and "2/2" in result.stderr
    assert "steps: 100%" in result.stderr and "4/4" in result.stderr  # 2 trials × 2 steps, reported while training
    outcomes = json.loads(result.stdout)
    assert outcomes["greet"] == {"status": "skipped", "reason": "no train rows"}
    assert outcomes["calc"]["status"] == "trained"

    manifest = check_adapter(adapters / "calc", CALC)
    trials, kls = manifest.eval_metrics["trials"], manifest.eval_metrics["trials_heldout_kl"]
    assert set(trials) == set(kls) == {"0.3", "0.7"} and manifest.lam == float(
        min(kls, key=kls.get)
    )  # λ by held-out teacher KL
    assert (
        manifest.eval_metrics["lambda_rule"] == LAMBDA_RULE == "heldout_teacher_kl"
        and manifest.eval_metrics["heldout_used_for_lambda"]
    )
    assert manifest.method == "genpi" and manifest.lora["r"] == 4 and manifest.lora["quantize_4bit"]
    assert manifest.train_metrics["train_examples"] == 8 and manifest.eval_metrics["heldout_kl"] == min(kls.values())
    assert manifest.eval_metrics["heldout_loss"] == trials[str(manifest.lam)]  # the held-out loss stays recorded
    assert manifest.train_metrics["heldout_kl_before"] > 0 and len(manifest.train_metrics["heldout_kl_per_epoch"]) == 1
    assert (
        manifest.train_metrics["data_degenerate_rows_skipped"] == 0
        and manifest.train_metrics["heldout_data_degenerate_turns_cut"] == 0
    )
    recorded = manifest.settings  # every setting, the λ values tried, and what "auto" became on this CPU
    assert recorded["lambdas"] == [0.3, 0.7] and recorded["lam"] == manifest.lam and recorded["loss_form"] == "convex"
    assert recorded["skip_degenerate"] and recorded["settings_from_catalog"] == {}
    assert recorded["schedule"] == "cosine" and recorded["warmup_ratio"] == 0.03 and recorded["max_grad_norm"] == 1.0
    assert (
        recorded["lr"] == 1e-2 and recorded["micro_batch"] == 2 and recorded["quantize"] and recorded["dtype"] == "auto"
    )
    assert recorded["effective"] == {
        "device": "cpu",
        "dtype": "float32",
        "compute_dtype_4bit": "float32",
        "gradient_checkpointing": False,
        "autocast": None,  # CPU: no autocast
        "optimizer": "adamw_torch",
    }
    assert [p.suffix for p in (adapters / ".tune").iterdir()] == [".log"]  # the experiment is gone, its log stays

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_trainable_model), str(adapters / "calc"))

    before = (adapters / "calc" / "genpi.json").stat().st_mtime_ns
    again = train(data, adapters, "--base", tiny_trainable_model, "--lambdas", "0.3,0.7")
    assert again.returncode == 0 and json.loads(again.stdout)["calc"]["status"] == "up to date"
    assert (adapters / "calc" / "genpi.json").stat().st_mtime_ns == before

    changed = tmp_path / "changed.yaml"
    entries = yaml.safe_load(CATALOG.read_text())
    entries[0]["system"] += " Be brief."
    changed.write_text(yaml.safe_dump(entries))
    [new_calc, _] = load_catalog(changed)
    with pytest.raises(StaleAdapterError, match="stale adapter"):
        check_adapter(adapters / "calc", new_calc)
    code, err = refused_in_process(capsys, monkeypatch, data, adapters, "--base", tiny_trainable_model, catalog=changed)
    assert code == 2 and "another version of the prompt" in err


@pytest.mark.slow
def test_no_gpus_per_trial_on_a_cluster_with_gpus_is_refused(data, tiny_trainable_model, tmp_path):
    import ray

    ray.init(
        num_cpus=1, num_gpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False
    )  # a GPU only in name
    try:
        with pytest.raises(InputError, match="--gpus-per-trial 0 on a Ray cluster with 1 GPUs"):
            train_catalog(
                data,
                CATALOG,
                tmp_path / "adapters",
                tiny_trainable_model,
                TrainSettings(),
                [0.5],
                num_gpus=0,
                progress=False,
            )
    finally:
        ray.shutdown()
    assert not (tmp_path / "adapters").exists()


@pytest.mark.slow
def test_valid_only_trains_on_dialogues_in_the_action_space(
    local_ray, tiny_trainable_model, tmp_path, capsys, monkeypatch
):
    data = write_calc_dialogues(tmp_path / "data", 10, heldout_from=8, off_format=frozenset({1, 4, 6}))
    # in process, on the module's Ray: `genpi train` as a subprocess is calc_genpi_trained's (conftest)
    argv = train_argv(data, tmp_path / "adapters", "--base", tiny_trainable_model, "--lambdas", "0.5", "--valid-only")
    capsys.readouterr()
    assert main(argv[1:]) == 0
    assert json.loads(capsys.readouterr().out)["calc"]["rows_outside_action_space_dropped"] == 3
    metrics = check_adapter(tmp_path / "adapters" / "calc", CALC).train_metrics
    assert metrics["train_examples"] == 5 and metrics["rows_outside_action_space_dropped"] == 3

    entries = yaml.safe_load(CATALOG.read_text())
    del entries[0]["actions"]
    no_regex = tmp_path / "no-regex.yaml"
    no_regex.write_text(yaml.safe_dump(entries))
    code, err = refused_in_process(
        capsys, monkeypatch, data, tmp_path / "other", "--base", tiny_trainable_model, "--valid-only", catalog=no_regex
    )
    assert code == 2 and "'calc' has no actions.valid regex" in err


def test_bad_input_exits_2(data, tmp_path, capsys, monkeypatch):
    code, err = refused_in_process(capsys, monkeypatch, data, tmp_path / "a", "--method", "distill")
    assert code == 2 and "unknown method 'distill'" in err
    code, err = refused_in_process(capsys, monkeypatch, tmp_path, tmp_path / "a")
    assert code == 2 and "no dialogue shards" in err
    bad = tmp_path / "bad"
    store.write_table(
        store.shard_path(bad, "calc", 0),
        [{"prompt_id": "calc", "input": "x"}],
        store.pa.schema([("prompt_id", store.pa.string()), ("input", store.pa.string())]),
    )
    code, err = refused_in_process(capsys, monkeypatch, bad, tmp_path / "a")
    assert code == 2 and "lack the columns" in err
    code, err = refused_in_process(capsys, monkeypatch, data, tmp_path / "a", "--checkpoint-steps", "-1")
    assert code == 2 and "--checkpoint-steps and --max-failures must be 0 or more" in err
    assert read_adapter_manifest(tmp_path / "a" / "calc") is None


@pytest.mark.slow
def test_bad_input_exits_2_from_the_command_line(tmp_path):
    """The one refusal run as the command itself: its exit status and message (the others run in process)."""
    empty = train(tmp_path, tmp_path / "a")
    assert empty.returncode == 2 and "no dialogue shards" in empty.stderr
    assert read_adapter_manifest(tmp_path / "a" / "calc") is None


def test_fingerprint_covers_every_setting_and_the_lambdas():
    train, heldout = [dict(row(i), sample_id=i, split="train") for i in range(2)], []
    base = fingerprint(train, heldout, recorded_settings(TrainSettings(), [0.3, 0.5]), "smollm2")
    assert fingerprint(train, heldout, recorded_settings(TrainSettings(), [0.3, 0.5]), "smollm2") == base
    assert fingerprint(train, heldout, recorded_settings(TrainSettings(), [0.3, 0.7]), "smollm2") != base
    for change in (
        {"loss_form": "additive"},
        {"lr": 2e-4},
        {"schedule": "constant"},
        {"max_grad_norm": 0.5},
        {"warmup_ratio": 0.1},
        {"weight_decay": 0.01},
        {"epochs": 3},
        {"batch_size": 16},
        {"micro_batch": 4},
        {"dtype": "bfloat16"},
        {"quantize": False},
    ):
        assert (
            fingerprint(
                train, heldout, recorded_settings(dataclasses.replace(TrainSettings(), **change), [0.3, 0.5]), "smollm2"
            )
            != base
        ), change
    sft = TrainSettings(method="sft")  # no λ to choose: the λ values tried do not matter
    assert fingerprint(train, heldout, recorded_settings(sft, [0.3]), "smollm2") == fingerprint(
        train, heldout, recorded_settings(sft, [0.5, 0.7]), "smollm2"
    )


def test_lambda_choice_without_heldout_rows_is_refused(tmp_path, capsys, monkeypatch):
    data = write_calc_dialogues(tmp_path / "data", 8, heldout_from=8)
    code, err = refused_in_process(capsys, monkeypatch, data, tmp_path / "adapters", "--lambdas", "0.3,0.7")
    assert code == 2 and "no held-out dialogues to choose λ" in err and "--heldout" in err
    code, err = refused_in_process(capsys, monkeypatch, data, tmp_path / "adapters", "--lambdas", "0.3", "--early-stop")
    assert code == 2 and "--early-stop: prompt 'calc' has no held-out dialogues" in err
    assert not (tmp_path / "adapters").exists()


@dataclasses.dataclass(frozen=True)
class WithTrain(type(CALC)):
    """A catalog entry with per-prompt `train` settings (PromptEntry.train, parsed by genpi.catalog)."""

    train: dict = dataclasses.field(default_factory=dict)


def with_train(entry, **train):
    fields = {f.name: getattr(entry, f.name) for f in dataclasses.fields(type(entry)) if f.init}
    return WithTrain(**{**fields, "train": train})


def test_prompt_settings_come_from_the_catalog_unless_a_flag_was_given():
    run = TrainSettings(epochs=10, lr=1e-4, max_grad_norm=1.0)
    web = with_train(CALC, lam=0.7, grad_clip=0.5, lr=3e-4, epochs=2)
    settings, lambdas, used = prompt_settings(web, run, [0.3, 0.5, 0.7])
    assert (settings.max_grad_norm, settings.lr, settings.epochs, lambdas) == (0.5, 3e-4, 2, [0.7])
    assert used == {"lam": 0.7, "grad_clip": 0.5, "lr": 3e-4, "epochs": 2}
    assert dataclasses.replace(settings, max_grad_norm=1.0, lr=1e-4, epochs=10) == run  # nothing else changed

    settings, lambdas, used = prompt_settings(web, run, [0.3, 0.5], overrides={"lam", "lr"})  # --lambdas and --lr given
    assert (settings.max_grad_norm, settings.lr, settings.epochs, lambdas) == (0.5, 1e-4, 2, [0.3, 0.5])
    assert used == {"grad_clip": 0.5, "epochs": 2}
    everything = prompt_settings(web, run, [0.3], overrides={"lam", "grad_clip", "lr", "epochs"})
    assert everything == (run, [0.3], {})

    sft = dataclasses.replace(run, method="sft")  # no λ to take from the catalog
    assert prompt_settings(with_train(CALC, lam=0.3), sft, [0.5]) == (sft, [0.5], {})
    assert prompt_settings(CALC, run, [0.3, 0.7]) == (run, [0.3, 0.7], {})  # an entry without `train`
    for bad in ({"epochs": 0}, {"lr": -1.0}, {"grad_clip": -0.5}, {"lam": "high"}):
        with pytest.raises(InputError, match="prompt 'calc': catalog field train"):
            prompt_settings(with_train(CALC, **bad), run, [0.5])


def test_flags_given_hold_for_the_whole_run(monkeypatch, tmp_path):
    from genpi.train import run

    seen = {}
    monkeypatch.setattr(run, "train_catalog", lambda *args: seen.update(args=args) or {})
    assert run.main(["data", "--catalog", "c.yaml", "--out", str(tmp_path)]) == 0
    settings, lambdas, overrides = seen["args"][4], seen["args"][5], seen["args"][-2]  # then --tracking
    assert (
        overrides == frozenset()
        and lambdas == [0.3, 0.5, 0.7]
        and (settings.epochs, settings.lr, settings.max_grad_norm) == (10, 1e-4, 1.0)
    )
    assert settings.skip_degenerate
    assert (
        run.main(
            [
                "data",
                "--catalog",
                "c.yaml",
                "--out",
                str(tmp_path),
                "--lr",
                "1e-3",
                "--max-grad-norm",
                "0.5",
                "--keep-degenerate",
            ]
        )
        == 0
    )
    settings, lambdas, overrides = seen["args"][4], seen["args"][5], seen["args"][-2]
    assert (
        overrides == {"lr", "grad_clip"}
        and settings.lr == 1e-3
        and settings.max_grad_norm == 0.5
        and not settings.skip_degenerate
    )
    assert run.main(["data", "--catalog", "c.yaml", "--out", str(tmp_path), "--lambdas", "0.5", "--epochs", "3"]) == 0
    assert seen["args"][-2] == {"lam", "epochs"} and seen["args"][5] == [0.5] and seen["args"][4].epochs == 3


@pytest.mark.slow
def test_catalog_train_settings_are_applied_and_recorded(local_ray, data, tiny_trainable_model, tmp_path, monkeypatch):
    from genpi.train import run

    # the catalog says λ 0.7, clip 0.5, 1 epoch: the run's λ values and 10 epochs yield; --lr (given) holds
    monkeypatch.setattr(
        run, "load_catalog", lambda path: [with_train(CALC, lam=0.7, grad_clip=0.5, epochs=1, lr=5.0), GREET]
    )
    settings = TrainSettings(epochs=10, batch_size=4, micro_batch=2, max_length=512, lr=1e-2)
    outcomes = train_catalog(
        data,
        CATALOG,
        tmp_path / "adapters",
        tiny_trainable_model,
        settings,
        [0.3, 0.5],
        progress=False,
        overrides=frozenset({"lr"}),
    )
    assert outcomes["calc"]["status"] == "trained" and outcomes["calc"]["lam"] == 0.7
    manifest = check_adapter(tmp_path / "adapters" / "calc", CALC)
    assert manifest.settings["settings_from_catalog"] == {"lam": 0.7, "grad_clip": 0.5, "epochs": 1}
    assert (
        manifest.settings["lambdas"] == [0.7]
        and manifest.settings["max_grad_norm"] == 0.5
        and manifest.settings["epochs"] == 1
    )
    assert manifest.settings["lr"] == 1e-2 and manifest.train_metrics["steps"] == 2  # 8 rows, batch 4, 1 epoch
    assert manifest.eval_metrics["lambda_rule"] == "catalog" and not manifest.eval_metrics["heldout_used_for_lambda"]
    assert list(manifest.eval_metrics["trials_heldout_kl"]) == ["0.7"]


class FakeResult:
    """What write_best reads of a ray.tune.Result: config, metrics, error, checkpoint.as_directory()."""

    def __init__(self, lam, folder, **metrics):
        self.config, self.error, self.folder = {"trial": {"prompt_id": "calc", "lam": lam}}, None, folder
        self.metrics = {"finished": True, "effective": {}, "steps": 2, **metrics}
        self.checkpoint = self

    @contextlib.contextmanager
    def as_directory(self):
        yield self.folder


def test_lambda_is_the_lowest_heldout_teacher_kl_not_the_lowest_heldout_loss(tmp_path):
    folders = {}
    for lam in (0.3, 0.7):
        (tmp_path / str(lam) / "adapter").mkdir(parents=True)
        (tmp_path / str(lam) / "adapter" / "weights").write_text(str(lam))
        folders[lam] = tmp_path / str(lam)
    # λ 0.3 has the lower held-out SFT loss (what the old rule chose), λ 0.7 the lower teacher KL
    tried = [
        FakeResult(0.3, folders[0.3], heldout_loss=1.0, heldout_kl=0.40),
        FakeResult(0.7, folders[0.7], heldout_loss=1.2, heldout_kl=0.25),
    ]
    plan = Plan(CALC, [], [], TrainSettings(), [0.3, 0.7], {}, "print", None)
    outcome = write_best(plan, tried, tmp_path / "adapters", "base")
    assert (
        outcome["status"] == "trained"
        and outcome["lam"] == 0.7
        and outcome["heldout_kl"] == 0.25
        and outcome["heldout_loss"] == 1.2
    )
    manifest = check_adapter(tmp_path / "adapters" / "calc", CALC)
    assert (tmp_path / "adapters" / "calc" / "weights").read_text() == "0.7"  # that trial's adapter
    assert manifest.eval_metrics == {
        "heldout_loss": 1.2,
        "heldout_kl": 0.25,
        "lambda_rule": "heldout_teacher_kl",
        "heldout_used_for_lambda": True,
        "trials": {"0.3": 1.0, "0.7": 1.2},
        "trials_heldout_kl": {"0.3": 0.40, "0.7": 0.25},
    }
    no_kl = [FakeResult(0.3, folders[0.3], heldout_loss=1.0, heldout_kl=None), tried[1]]
    failed = write_best(plan, no_kl, tmp_path / "other", "base")
    assert failed["status"] == "failed" and "no held-out teacher KL" in failed["errors"][0]
    one = write_best(dataclasses.replace(plan, lambdas=[0.3]), tried[:1], tmp_path / "one", "base")
    assert one["lam"] == 0.3 and check_adapter(tmp_path / "one" / "calc", CALC).eval_metrics["lambda_rule"] == "given"


def live_lock(path, pid):
    """A lock as a run of this host, boot and PID namespace holds it."""
    from genpi.data import runfolder

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**runfolder._me(), "pid": pid, "start_ticks": None}))


def stop_at_ray_init(monkeypatch) -> list:
    """ray.init replaced by one that records the cluster Ray would use (None: a new local one) and stops there."""
    import ray
    from ray._private import services

    used = []

    def init(address=None, **kwargs):
        used.append(services.canonicalize_bootstrap_address(address))
        raise RuntimeError("stop at ray.init")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    return used


def stale_ray_session(tmp_path, monkeypatch) -> str:
    """Ray's session file naming the GCS of a head that died uncleanly, as plain ray.init() finds it."""
    from ray._private import services

    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("10.255.255.1:6379")
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert services.canonicalize_bootstrap_address(None) == "10.255.255.1:6379"  # where a plain ray.init() hangs
    return "10.255.255.1:6379"


def test_a_second_training_of_one_folder_is_refused_naming_the_holder(
    data, tiny_trainable_model, tmp_path, capsys, monkeypatch
):
    stop_at_ray_init(monkeypatch)  # the code before the lock ran trainings into each other: stop them before Ray
    adapters = tmp_path / "adapters"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live_lock(adapters / "train.lock", holder.pid)
        argv = [
            str(data),
            "--catalog",
            str(CATALOG),
            "--out",
            str(adapters),
            "--base",
            tiny_trainable_model,
            "--lambdas",
            "0.5",
            "--no-progress",
        ]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "in use by another training run" in err and f"pid {holder.pid}" in err and err.count("\n") == 1
        assert json.loads((adapters / "train.lock").read_text())["pid"] == holder.pid  # left alone
    finally:
        holder.kill()
        holder.wait()
    with pytest.raises(RuntimeError, match="stop at ray.init"):  # the holder is gone: its lock is taken over
        main(argv)
    assert not (adapters / "train.lock").exists()  # and released on the way out


def test_train_starts_a_local_ray_beside_a_stale_session_file(
    data, tiny_trainable_model, tmp_path, capsys, monkeypatch
):
    stale_ray_session(tmp_path, monkeypatch)
    used = stop_at_ray_init(monkeypatch)
    with pytest.raises(RuntimeError, match="stop at ray.init"):
        train_catalog(
            data, CATALOG, tmp_path / "adapters", tiny_trainable_model, TrainSettings(), [0.5], progress=False
        )
    assert used == [None]  # a new local cluster, not the dead one
    assert "genpi: Ray: using a local Ray cluster of its own" in capsys.readouterr().err
    monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6379")  # asked for: that cluster
    with pytest.raises(RuntimeError):
        train_catalog(
            data, CATALOG, tmp_path / "adapters", tiny_trainable_model, TrainSettings(), [0.5], progress=False
        )
    assert used[-1] == "10.1.2.3:6379" and "RAY_ADDRESS=10.1.2.3:6379" in capsys.readouterr().err
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setenv(
        "RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"
    )  # the driver of a Ray job: the job's cluster, found as `auto` finds it
    with pytest.raises(RuntimeError):
        train_catalog(
            data, CATALOG, tmp_path / "adapters", tiny_trainable_model, TrainSettings(), [0.5], progress=False
        )
    assert (
        used[-1] is not None and "the Ray cluster of this Ray job" in capsys.readouterr().err
    )  # the file's, or a running GCS's


@pytest.mark.parametrize("text", ["{not json", "", "[1, 2]", '{"prompt_id": "calc"}', "\xff\xfe".encode("latin-1")])
def test_a_corrupt_adapter_manifest_exits_2_naming_the_file(data, tiny_trainable_model, tmp_path, capsys, text):
    folder = tmp_path / "adapters" / "calc"
    folder.mkdir(parents=True)
    (folder / "genpi.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    argv = [
        str(data),
        "--catalog",
        str(CATALOG),
        "--out",
        str(tmp_path / "adapters"),
        "--base",
        tiny_trainable_model,
        "--lambdas",
        "0.5",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(f"genpi: error: {folder / 'genpi.json'}: not a valid genpi adapter manifest")
        and err.count("\n") == 1
    )


@pytest.mark.slow
def test_checkpoints_load_tensors_and_plain_data_only(tiny_trainable_model, tmp_path, monkeypatch):
    import ray
    import torch
    from ray import tune
    from test_recipe import FAST, HELDOUT, TRAIN

    import genpi.train.recipe as recipe
    from genpi.train.experiment import fit_trial

    train_adapter = recipe.train_adapter
    # a checkpoint holding anything else does not run it
    canary = tmp_path / "canary"
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    torch.save({"losses": Canary(str(canary))}, checkpoint / "state.pt")
    monkeypatch.setattr(tune, "get_checkpoint", lambda: tune.Checkpoint.from_directory(str(checkpoint)))
    monkeypatch.setattr(ray, "get", lambda ref: ref)
    resumed = []
    monkeypatch.setattr(recipe, "train_adapter", lambda *args, **kwargs: resumed.append(args) or (None, {}))
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        fit_trial(
            {"trial": {"prompt_id": "calc", "lam": 0.5}},
            tiny_trainable_model,
            {"calc": CALC.to_json()},
            {"calc": ([], [])},
            {"calc": FAST},
            0,
        )
    assert not canary.exists() and not resumed

    # a real state (LoRA tensors, optimizer and scheduler, random generators, the epoch's order) loads whole
    states = []
    settings = dataclasses.replace(FAST, epochs=1, quantize=False)
    train_adapter(
        tiny_trainable_model, CALC, TRAIN[:4], HELDOUT, settings, report=lambda m, s: s and states.append(s())
    )
    torch.save(states[-1], tmp_path / "state.pt")
    from genpi.train.experiment import load_state

    loaded = load_state(tmp_path / "state.pt")
    assert loaded["rng"] == states[-1]["rng"] and loaded["losses"] == states[-1]["losses"]
    assert all(torch.equal(loaded["lora"][k], v) for k, v in states[-1]["lora"].items())


def touch(path: str) -> list:
    with open(path, "w") as f:
        f.write("ran")
    return []


class Canary:
    def __reduce__(self):
        return touch, (self.path,)

    def __init__(self, path: str):
        self.path = path
