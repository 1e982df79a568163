"""`genpi train` as a Ray Tune experiment: a killed run resumes exactly, a killed trial is retried from its checkpoint,
a failing prompt fails alone, ASHA stops a λ that falls behind (on the held-out teacher KL), and each prompt's rows
are put in the object store once."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file
from test_recipe import row, write_calc_dialogues

from genpi.catalog import load_catalog
from genpi.data import store
from genpi.data.adapters import check_adapter
from genpi.train.recipe import TrainSettings

pytestmark = pytest.mark.slow  # end to end (conftest)

CATALOG = REPO / "tests" / "data" / "tiny.yaml"
CALC, GREET = load_catalog(CATALOG)


@pytest.fixture(scope="module")
def data(calc_dialogues):
    """calc has 8 train and 2 held-out dialogues, greet has none (the session's, conftest: read-only)."""
    return calc_dialogues


def command(data, adapters, model, *extra):
    return [
        sys.executable,
        "-m",
        "genpi.cli",
        "train",
        str(data),
        "--catalog",
        str(CATALOG),
        "--out",
        str(adapters),
        "--base",
        model,
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
        "--no-progress",
        *extra,
    ]


def run_here(capsys, data, adapters, model, *extra) -> tuple[int, str, str]:
    """The same `genpi train` command in this process, on `local_ray` (genpi.cluster.init_ray keeps a running Ray):
    (exit status, stdout, stderr). The kills below need a real process; a run that is only resumed or compared
    does not pay a process's imports and a Ray of its own."""
    from genpi.cli import main

    capsys.readouterr()  # what came before is not this command's
    code = main(command(data, adapters, model, *extra)[3:])  # after `python -m genpi.cli`
    out, err = capsys.readouterr()
    return code, out, err


def start(data, adapters, model, *extra):
    return subprocess.Popen(
        command(data, adapters, model, *extra),
        cwd=REPO,
        env=dict(os.environ, RAY_ADDRESS="local"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_for_checkpoint(adapters, ended, timeout=300):
    """Until the experiment's saved state lists a trial checkpoint (Tune saves it within seconds of the checkpoint).
    `ended()`: None while the run goes on, else why it ended (the wait fails)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any("checkpoint_0" in p.read_text() for p in (adapters / ".tune").glob("train-*/experiment_state-*.json")):
            return
        why = ended()
        assert why is None, why
        time.sleep(0.1)
    raise AssertionError("no checkpoint appeared")


def weights(folder):
    return load_file(str(folder / "adapter_model.safetensors"))


def test_a_killed_run_resumes_from_its_last_checkpoint_and_ends_with_the_same_adapter(
    data, tiny_trainable_model, tmp_path, local_ray, capsys
):
    extra = ("--epochs", "8", "--lambdas", "0.5")
    process = start(data, tmp_path / "killed", tiny_trainable_model, *extra)
    wait_for_checkpoint(
        tmp_path / "killed", lambda: None if process.poll() is None else process.communicate()[1][-3000:]
    )
    os.killpg(process.pid, signal.SIGKILL)  # the driver and its local Ray: nothing gets to clean up
    process.wait()
    assert not (tmp_path / "killed" / "calc").exists()

    code, _, err = run_here(capsys, data, tmp_path / "killed", tiny_trainable_model, *extra)  # the same command again
    assert code == 0, err[-3000:]
    assert "resuming the training experiment" in err
    step = check_adapter(tmp_path / "killed" / "calc", CALC).train_metrics["resumed_from_step"]
    assert (
        step and step % 2 == 0 and 2 <= step < 16
    )  # from an epoch's end (2 steps each): finished epochs are not redone
    assert f"resumed from the checkpoint at step {step} of 16" in err

    code, _, err = run_here(capsys, data, tmp_path / "whole", tiny_trainable_model, *extra)
    assert code == 0, err[-3000:]
    assert check_adapter(tmp_path / "whole" / "calc", CALC).train_metrics["resumed_from_step"] is None
    expected, got = weights(tmp_path / "whole" / "calc"), weights(tmp_path / "killed" / "calc")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)  # bit for bit


def trial_pids(root):
    """The Tune trial processes descending from `root` (the test's genpi train), not another run's on this machine."""
    parents = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except (OSError, ValueError):
            continue
        parents[int(proc.name)] = (int(stat.rsplit(")", 1)[1].split()[1]), cmdline)

    def descends(pid):
        while pid in parents and pid != root:
            pid = parents[pid][0]
        return pid == root

    return [pid for pid, (_, cmdline) in parents.items() if "ray::ImplicitFunc" in cmdline and descends(pid)]


def test_a_killed_trial_is_retried_from_its_checkpoint_and_a_failing_prompt_fails_alone(
    tiny_trainable_model, tmp_path, local_ray, capsys
):
    data = write_calc_dialogues(tmp_path / "data", 10, heldout_from=8)
    greetings = []  # greet's rows have no agent turn to learn: its trial raises every time it runs
    for i in range(4):
        r = dict.fromkeys(store.DIALOGUE_COLUMNS)
        r.update(row(i), prompt_id="greet", prompt_sha256=GREET.sha256, sample_id=i, seed=i, split="train", turns=[])
        greetings.append(r)
    store.write_table(store.shard_path(data, "greet", 0), greetings, store.DIALOGUE_SCHEMA)
    adapters, finished, killed = tmp_path / "adapters", threading.Event(), []

    def kill_the_trial():  # a preempted or OOM-killed trial; the run's driver (this process) lives on
        try:
            wait_for_checkpoint(adapters, lambda: "the run ended before a checkpoint" if finished.is_set() else None)
            [pid] = trial_pids(os.getpid())  # 2 CPUs per trial on a 2-CPU Ray: one at a time; greet's failed in seconds
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except BaseException as e:
            killed.append(e)

    killer = threading.Thread(target=kill_the_trial)
    killer.start()
    # --max-failures 1: one retry is what the killed trial needs, and each of greet's runs costs a trial's imports
    extra = ("--epochs", "8", "--lambdas", "0.5", "--cpus-per-trial", "2", "--max-failures", "1")
    try:
        code, out, err = run_here(capsys, data, adapters, tiny_trainable_model, *extra)
    finally:
        finished.set()
        killer.join()
    assert len(killed) == 1 and isinstance(killed[0], int), killed
    assert code == 1, err[-3000:]  # a prompt failed
    outcomes = json.loads(out)
    assert outcomes["greet"]["status"] == "failed" and "no usable train rows" in outcomes["greet"]["errors"][0]
    assert outcomes["calc"]["status"] == "trained"
    assert check_adapter(adapters / "calc", CALC).train_metrics["resumed_from_step"] >= 2
    assert "resumed from the checkpoint at step" in err
    assert not (adapters / "greet").exists()
    assert list((adapters / ".tune").glob("train-*/greet-*/error.txt"))  # the failed trial's record stays


def test_early_stop_stops_the_lambda_that_falls_behind(data, tiny_trainable_model, tmp_path, local_ray, capsys):
    # additive form, no clipping, a high learning rate: λ = 50 weighs prompt generation so much that the held-out
    # dialogue loss runs away
    code, out, err = run_here(
        capsys,
        data,
        tmp_path / "adapters",
        tiny_trainable_model,
        "--epochs",
        "6",
        "--lambdas",
        "0.1,0.2,50",
        "--early-stop",
        "--loss-form",
        "additive",
        "--max-grad-norm",
        "0",
        "--lr",
        "3e-2",
    )
    assert code == 0, err[-3000:]
    calc = json.loads(out)["calc"]
    assert calc["status"] == "trained" and calc["lam"] != 50
    stopped = calc["early_stopped"]
    assert (
        50.0 in stopped["lams"] and 12 + 2 <= stopped["steps_run"] < stopped["steps_of_full_sweep"] == 3 * 12
    )  # one ran whole
    kls = check_adapter(tmp_path / "adapters" / "calc", CALC).eval_metrics["trials_heldout_kl"]
    assert kls["50.0"] > max(
        v for k, v in kls.items() if k != "50.0"
    )  # behind on held-out teacher KL (ASHA's metric) where it stopped


def test_each_prompts_rows_go_to_the_object_store_once(data, tiny_trainable_model, tmp_path, monkeypatch, local_ray):
    import ray

    from genpi.train.run import train_catalog

    puts = []
    real_put = ray.put
    monkeypatch.setattr(ray, "put", lambda value, **kw: puts.append(value) or real_put(value, **kw))
    settings = TrainSettings(epochs=1, batch_size=4, micro_batch=2, max_length=512, lr=1e-2)
    outcomes = train_catalog(
        data, CATALOG, tmp_path / "adapters", tiny_trainable_model, settings, [0.3, 0.7], progress=False
    )
    assert (
        outcomes["calc"]["status"] == "trained"
        and len(check_adapter(tmp_path / "adapters" / "calc", CALC).eval_metrics["trials"]) == 2
    )
    row_puts = [p for p in puts if isinstance(p, tuple) and len(p) == 2 and all(isinstance(x, list) for x in p)]
    assert len(row_puts) == 1 and [len(x) for x in row_puts[0]] == [8, 2]  # calc's rows, once for its 2 λ trials


def test_a_run_killed_before_its_trials_were_made_resumes(data, tiny_trainable_model, tmp_path, monkeypatch, local_ray):
    """Tune writes tuner.pkl when the Tuner is made, without the param space: a rerun must give it again."""
    from ray import tune

    from genpi.train.run import train_catalog

    settings = TrainSettings(epochs=1, batch_size=4, micro_batch=2, max_length=512, lr=1e-2)
    with monkeypatch.context() as patch:  # killed right after the Tuner was made: no trial, no experiment state
        patch.setattr(tune.Tuner, "fit", lambda self: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            train_catalog(data, CATALOG, tmp_path / "adapters", tiny_trainable_model, settings, [0.5], progress=False)
    assert list((tmp_path / "adapters" / ".tune").glob("train-*/tuner.pkl"))
    assert not list((tmp_path / "adapters" / ".tune").glob("train-*/experiment_state-*.json"))
    outcomes = train_catalog(
        data, CATALOG, tmp_path / "adapters", tiny_trainable_model, settings, [0.5], progress=False
    )
    assert outcomes["calc"]["status"] == "trained"
    check_adapter(tmp_path / "adapters" / "calc", CALC)
