"""Experiment tracking (genpi.tracking) of training, synthesis and evaluation records, read back from TensorBoard's
event files and MLflow's file store; `genpi serve`'s Prometheus metrics at /metrics."""

import asyncio
import json
import struct
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO, copy_into

from genpi import InputError
from genpi.catalog import load_catalog
from genpi.data.adapters import check_adapter
from genpi.tracking import mlflow_uri, open_tracker, parse_tracking, scalars

CATALOG = REPO / "tests" / "data" / "tiny.yaml"
CALC, GREET = load_catalog(CATALOG)


def tb_scalars(folder: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of every TensorBoard event file under `folder` (TFRecord frames of Event protos, read
    here: tensorboardX writes them but has no reader)."""
    from tensorboardX.proto.event_pb2 import Event

    found: dict[str, dict[int, float]] = {}
    files = sorted(folder.rglob("events.out.tfevents.*"))
    assert files, f"no event files under {folder}"
    for path in files:
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at : at + 8])
            event = Event.FromString(data[at + 12 : at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                found.setdefault(value.tag, {})[event.step] = value.simple_value
    return found


def mlflow_runs(folder: Path, experiment: str) -> dict[str, dict[str, dict[int, float]]]:
    """{run name: {metric: {step: value}}} of an MLflow experiment in FOLDER/.tracking/mlruns."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri(folder))
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment}"
    runs = {}
    for run in client.search_runs([found.experiment_id]):
        runs[run.info.run_name] = {
            key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)} for key in run.data.metrics
        }
    return runs


def test_tracking_names_are_checked_before_any_work():
    assert parse_tracking("none") == () and parse_tracking(None) == () and parse_tracking("") == ()
    assert parse_tracking("tensorboard, mlflow,tensorboard") == ("tensorboard", "mlflow")
    with pytest.raises(InputError, match="unknown tracker 'tensorbored'"):
        parse_tracking("tensorboard,tensorbored")


def test_a_tracker_whose_package_is_missing_is_refused_naming_it(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(InputError, match="--tracking wandb: wandb is not installed: pip install wandb"):
        parse_tracking("wandb")


def test_only_numbers_are_logged_nested_dicts_flattened():
    metrics = {"loss": 1.5, "steps": 3, "done": True, "lam": None, "id": "calc", "losses": [1.0], "nan": float("nan")}
    metrics["m"] = {"kl (nats)": 0.25, "by": {"x": 2}}
    assert scalars(metrics) == {"loss": 1.5, "steps": 3.0, "m/kl _nats_": 0.25, "m/by/x": 2.0}


def test_a_tracker_writes_tensorboard_and_mlflow_and_nothing_before_its_first_figure(tmp_path):
    tracker = open_tracker("tensorboard,mlflow", tmp_path, "eval", "fidelity/calc")
    tracker.close()
    assert not (tmp_path / ".tracking").exists()  # nothing logged: no folder made
    with open_tracker("tensorboard,mlflow", tmp_path, "eval", "fidelity/calc") as tracker:
        tracker.log({"metrics": {"kl": 0.5}, "system": "adapter"}, step=2)
        tracker.log({"metrics": {"kl": 0.25}}, step=3)
    assert tb_scalars(tmp_path / ".tracking" / "tb" / "eval" / "fidelity" / "calc") == {"metrics/kl": {2: 0.5, 3: 0.25}}
    assert mlflow_runs(tmp_path, "genpi-eval") == {"fidelity/calc": {"metrics/kl": {2: 0.5, 3: 0.25}}}
    with open_tracker("none", tmp_path / "other", "eval", "x") as tracker:
        tracker.log({"kl": 1.0})
    assert not (tmp_path / "other").exists()


def test_a_synthesis_logs_its_throughput_and_quality_table(tmp_path, monkeypatch):
    """genpi synth's main on the fake engine of test_synth_run (no Ray): the throughput as shards are written, the
    quality table at the end, both in one tracked run."""
    from test_synth_run import OPTIONS, SETTINGS, Fake, manifest_for

    from genpi.synth import run as synth_run

    out = tmp_path / "out"

    def synthesize(*args, tracker=None, **kwargs):  # synthesize around the fake engine
        out.mkdir(parents=True, exist_ok=True)
        run = synth_run.Synthesis(out, load_catalog(CATALOG), manifest_for(SETTINGS), SETTINGS, OPTIONS, tracker)
        asyncio.run(run.run(Fake(), [Fake()]))
        return run.manifest

    monkeypatch.setattr(synth_run, "synthesize", synthesize)
    assert synth_run.main([str(CATALOG), "--out", str(out), "--no-progress", "--tracking", "tensorboard,mlflow"]) == 0
    [run] = (out / ".tracking" / "tb" / "synth").iterdir()
    logged = tb_scalars(run)
    dialogues = logged["throughput/dialogues"]
    assert max(dialogues) == 10 and dialogues[10] == 10  # 5 per prompt, logged at the count done
    assert min(dialogues) < 10  # as the shards were written, not only at the end
    assert logged["throughput/dialogues_per_s"][10] > 0 and logged["throughput/tokens_per_s"][10] == 0  # a fake engine
    assert logged["quality/calc/rows"] == {10: 5.0} and logged["quality/greet/failed"] == {10: 0.0}
    [(name, metrics)] = mlflow_runs(out, "genpi-synth").items()
    assert name == run.name and metrics["quality/calc/rows"] == {10: 5.0}
    assert metrics["throughput/dialogues"] == dialogues


def test_a_bad_tracking_flag_exits_2_before_a_synthesis_starts(tmp_path, capsys):
    from genpi.synth.run import main

    assert main([str(CATALOG), "--out", str(tmp_path / "out"), "--no-progress", "--tracking", "tb"]) == 2
    assert "unknown tracker 'tb'" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_an_evaluation_logs_what_it_records_in_each_adapter(tmp_path):
    """`evaluate`'s record step on a made-up evaluation (no model): genpi.json and the trackers get the same figures."""
    import pyarrow as pa

    from genpi.data.adapters import AdapterManifest, write_adapter
    from genpi.eval.evaluate import Evaluation, RunSettings, evaluate, row_schema
    from genpi.eval.systems import TEACHER, Prompt, System

    adapters = tmp_path / "adapters"
    manifest = AdapterManifest(CALC.id, CALC.sha256, "base", "sft", None, {}, "test")
    folder = write_adapter(
        adapters / CALC.id, manifest, lambda tmp: (tmp / "adapter_model.safetensors").write_bytes(b"")
    )
    systems = [System(TEACHER, with_prompt=True), System("adapters", adapter="calc", folder=folder)]
    scores = {TEACHER: [1.0, 0.5], "adapters": [0.5, 0.0]}
    made_up = Evaluation(
        "made-up",
        row_schema(("score", pa.float64())),
        lambda prompt, engine: {
            n: [{"prompt_id": CALC.id, "system": n, "score": x} for x in xs] for n, xs in scores.items()
        },
        lambda rows: {"score": sum(r["score"] for r in rows) / len(rows)},
        lambda prompt, form: {"prompt_id": prompt.entry.id},
        retention=lambda m, teacher: m["score"] / teacher["score"],
        record=lambda s, result, form: {"metrics": result["systems"][s.name], "retention": result["retention"][s.name]},
    )
    run = RunSettings(None, tmp_path / "eval", tracking="tensorboard,mlflow", model=False)
    evaluate(made_up, [Prompt(CALC, systems)], run)
    recorded = check_adapter(folder, CALC).eval_metrics["made-up"]
    assert recorded == {"metrics": {"score": 0.25}, "retention": pytest.approx(1 / 3)}
    expected = {"metrics/score": {0: 0.25}, "retention": {0: pytest.approx(1 / 3)}}
    assert tb_scalars(adapters / ".tracking" / "tb" / "eval" / "made-up" / "calc") == expected
    assert mlflow_runs(adapters, "genpi-eval") == {"made-up/calc": expected}
    with pytest.raises(InputError, match="unknown tracker"):  # refused before anything is played
        evaluate(made_up, [Prompt(CALC, systems)], RunSettings(None, tmp_path / "eval2", tracking="tb", model=False))
    assert not (tmp_path / "eval2").exists()


def test_a_bad_tracking_flag_exits_2_before_a_training_starts(calc_dialogues, tmp_path, capsys):
    from genpi.train.run import main

    argv = [str(calc_dialogues), "--catalog", str(CATALOG), "--out", str(tmp_path / "adapters"), "--tracking", "x"]
    assert main(argv) == 2
    assert "--tracking: unknown tracker 'x'" in capsys.readouterr().err and not (tmp_path / "adapters").exists()


@pytest.mark.slow
def test_a_training_logs_every_step_to_tensorboard_and_mlflow(calc_genpi_trained, tmp_path):
    """The session's `genpi train --tracking tensorboard,mlflow` (conftest's calc_genpi_trained: calc, 8 train rows,
    batch 4, 1 epoch: 2 steps per trial, λ 0.3 and 0.7) through Ray Tune's logger callbacks."""
    trained, result = calc_genpi_trained
    assert result.returncode == 0, result.stderr[-3000:]
    adapters = copy_into(trained, tmp_path)  # reading MLflow's file store may write into it
    chosen = json.loads(result.stdout)["calc"]["lam"]
    losses = check_adapter(adapters / "calc", CALC).train_metrics["train_losses"]
    assert len(losses) == 2
    [experiment] = (adapters / ".tracking" / "tb").iterdir()
    assert experiment.name.startswith("train-") and not (adapters / ".tune" / experiment.name).exists()
    runs = mlflow_runs(adapters, "genpi-train")
    assert set(runs) == {"calc-lam=0.3", "calc-lam=0.7"}
    for lam in (0.3, 0.7):
        logged = tb_scalars(experiment / f"calc-lam={lam}")  # the trial's events outlive Tune's trial folder
        tune = {tag.removeprefix("ray/tune/"): values for tag, values in logged.items()}
        assert set(tune["lr"]) == set(tune["grad_norm"]) == set(tune["loss_sft"]) == set(tune["loss_pg"]) >= {1, 2}
        assert (
            tune["lam"][1] == pytest.approx(lam) and tune["lr"][1] != tune["lr"][2]
        )  # the warmup and cosine schedule move it
        for step in (1, 2):  # convex form: loss = (1 - λ)·L_SFT + λ·L_PG
            assert tune["loss"][step] == pytest.approx(
                (1 - lam) * tune["loss_sft"][step] + lam * tune["loss_pg"][step], rel=1e-4
            )
        assert 2 in tune["heldout_kl"] and 2 in tune["heldout_loss"]  # the epoch's held-out figures
        assert set(runs[f"calc-lam={lam}"]["grad_norm"]) >= {1, 2}
        assert runs[f"calc-lam={lam}"]["loss"] == pytest.approx(tune["loss"], rel=1e-5)
        if lam == chosen:  # the adapter's recorded losses: every step, at its step
            assert tune["loss"] == pytest.approx(dict(enumerate(losses, 1)), rel=1e-5)


# `genpi serve`'s /metrics: the embedded server on the tiny model with two adapters (conftest's `served`)


def metric_samples(url: str, headers: dict) -> dict[tuple, float]:
    """{(sample name, sorted labels): value} of GET /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    root = url.removesuffix("/v1")
    with urllib.request.urlopen(urllib.request.Request(root + "/metrics", headers=headers), timeout=30) as response:
        assert response.headers["content-type"].startswith("text/plain")
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


USAGE = {"include_usage": True}


def test_metrics_count_requests_and_tokens_per_model(served):
    from test_serve import AUTH, chat, post, stream_events

    url, _, base_name = served
    usage = {"calc": [0, 0], base_name: [0, 0]}
    for model, text in (("calc", "What is 2+3?"), ("calc", "And 4*5?"), (base_name, "Hello there")):
        status, body = post(url, {"model": model, "messages": chat(text), "max_tokens": 8, "temperature": 0})
        assert status == 200
        usage[model][0] += body["usage"]["prompt_tokens"]
        usage[model][1] += body["usage"]["completion_tokens"]
    events = stream_events(
        url,
        {"model": "calc", "messages": chat("Count."), "max_tokens": 5, "temperature": 0, **{"stream_options": USAGE}},
    )
    [last] = [json.loads(e) for e in events if e != "[DONE]" and json.loads(e).get("usage")]
    usage["calc"][0] += last["usage"]["prompt_tokens"]
    usage["calc"][1] += last["usage"]["completion_tokens"]
    assert post(url, {"model": "no-such-model", "messages": chat("hi")})[0] == 404
    assert post(url, b"{not json")[0] == 400

    with pytest.raises(urllib.error.HTTPError) as refused:  # the API key guards /metrics as it does /v1/models
        metric_samples(url, {})
    assert refused.value.code == 401
    samples = metric_samples(url, AUTH)  # a completion's figures are counted before its response is sent

    def sample(name, **labels):
        return samples.get((name, tuple(sorted(labels.items()))))

    assert sample("genpi_requests_total", model="calc", status="200") == 3
    assert sample("genpi_requests_total", model=base_name, status="200") == 1
    assert sample("genpi_requests_total", model="", status="404") == 1  # an unknown model is no label of its own
    assert sample("genpi_requests_total", model="", status="400") == 1
    assert sample("genpi_requests_total", model="greet", status="200") is None
    assert sample("genpi_prompt_tokens_total", model="calc") == usage["calc"][0] > 0
    assert sample("genpi_completion_tokens_total", model="calc") == usage["calc"][1] > 0
    assert sample("genpi_prompt_tokens_total", model=base_name) == usage[base_name][0] > 0
    assert sample("genpi_completion_tokens_total", model=base_name) == usage[base_name][1] > 0
    assert sample("genpi_prompt_tokens_total", model="greet") == 0  # every served model is there from the start
    assert sample("genpi_queue_depth", model="calc") == 0 and sample("genpi_queue_depth", model="greet") == 0
    assert sample("genpi_time_to_first_token_seconds_count", model="calc") == 3
    ttft = sample("genpi_time_to_first_token_seconds_sum", model="calc")
    assert 0 < ttft <= sample("genpi_request_duration_seconds_sum", model="calc")


def test_each_app_counts_in_a_registry_of_its_own():
    from genpi.engines import Completion
    from genpi.serve.metrics import ServeMetrics

    one, two = ServeMetrics(["calc"]), ServeMetrics(["calc"])  # the default registry would refuse the second
    one.submitted("calc")
    assert one.queue.labels("calc")._value.get() == 1 and two.queue.labels("calc")._value.get() == 0
    one.finished("calc", Completion(prompt_tokens=7, completion_tokens=3), 0.5, 1.0)
    assert b'genpi_prompt_tokens_total{model="calc"} 7.0' in one.render()
    assert b'genpi_prompt_tokens_total{model="calc"} 0.0' in two.render()
