"""`--full-finetune` (genpi.train.full): every weight trained, the model folder it writes, its resume, the paper's
defaults, the model as an evaluation system, and the GPU path's wiring (TorchTrainer, FSDP, placement) on CPU."""

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from test_recipe import CALC, HELDOUT, TRAIN

from genpi import InputError
from genpi.data.adapters import MODEL, AdapterManifest, is_model, read_adapter_manifest, write_adapter
from genpi.train.full import (
    FullModel,
    check_gpu_cluster,
    check_placement,
    load_full,
    rank_rows,
    save_model,
    trainer_scaling,
)
from genpi.train.recipe import TrainSettings, train_adapter

FULL = TrainSettings(
    method="seqkd", full_finetune=True, epochs=2, lr=1e-3, batch_size=4, micro_batch=2, max_length=512, seed=0
)


def base_weights(path) -> dict:
    from transformers import AutoModelForCausalLM

    return {n: p.detach().clone() for n, p in AutoModelForCausalLM.from_pretrained(path).named_parameters()}


@pytest.fixture(scope="module")
def trained(tiny_trainable_model):
    reports = []
    model, metrics = train_adapter(
        tiny_trainable_model, CALC, TRAIN, HELDOUT, FULL, report=lambda m, s: reports.append((m, s))
    )
    return model, metrics, reports


def test_every_weight_of_the_student_changes_and_none_is_lora_or_quantized(trained, tiny_trainable_model):
    model, metrics, _ = trained
    before = base_weights(tiny_trainable_model)
    student = dict(model.student.named_parameters())
    assert set(student) == set(before)  # the base's own parameters: no LoRA module was added
    assert not any("lora_" in n for n, _ in model.named_parameters())
    for name, p in student.items():
        assert p.requires_grad and p.dtype == torch.float32, name  # trained, and not 4-bit
        assert not torch.equal(p.detach(), before[name]), f"{name} did not change"
    for name, p in model.teacher.named_parameters():  # the teacher is the frozen base
        assert not p.requires_grad and torch.equal(p, before[name]), name
    assert metrics["effective"]["compute_dtype_4bit"] is None and metrics["effective"]["optimizer"] == "adamw_torch"
    assert metrics["heldout_loss"] < metrics["heldout_loss_before"]


def test_kld_full_finetune_distils_from_the_frozen_teacher(tiny_trainable_model):
    settings = dataclasses.replace(FULL, method="kld", epochs=3)
    model, metrics = train_adapter(tiny_trainable_model, CALC, TRAIN, HELDOUT, settings)
    assert metrics["heldout_kl"] < metrics["heldout_kl_before"]
    before = base_weights(tiny_trainable_model)
    assert all(torch.equal(p, before[n]) for n, p in model.teacher.named_parameters())


def test_the_model_folder_loads_with_transformers(trained, tiny_trainable_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, _, _ = trained
    folder = save_model(model, tmp_path / "model", tiny_trainable_model)
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    for name, p in loaded.named_parameters():
        assert torch.equal(p, dict(model.student.named_parameters())[name].detach()), name
    assert (
        AutoTokenizer.from_pretrained(folder).get_vocab()
        == AutoTokenizer.from_pretrained(tiny_trainable_model).get_vocab()
    )


def test_a_resumed_full_finetune_ends_with_the_same_weights(tiny_trainable_model):
    settings = dataclasses.replace(FULL, epochs=2, batch_size=2)
    states = []

    def keep(metrics, state):
        if state is not None:
            states.append((metrics["step"], copy.deepcopy(state())))

    whole, _ = train_adapter(tiny_trainable_model, CALC, TRAIN, HELDOUT, settings, report=keep, checkpoint_steps=3)
    assert [s for s, _ in states] == [3, 4, 6, 8]
    step, state = states[0]  # mid-epoch
    assert set(state["lora"]) == {f"student.{n}" for n, _ in whole.student.named_parameters()}  # every weight
    later = []
    resumed, _ = train_adapter(
        tiny_trainable_model, CALC, TRAIN, HELDOUT, settings, resume=state, report=lambda m, s: later.append(m["step"])
    )
    assert later == list(range(step + 1, 9))
    ours = dict(resumed.student.named_parameters())
    for name, p in whole.student.named_parameters():
        assert torch.allclose(p, ours[name], atol=1e-6), name


@pytest.mark.parametrize("method", ["kld", "seqkd", "seqkd+kld"])
def test_the_paper_settings_are_the_full_finetune_defaults_and_flags_override_them(method):
    from genpi.train.run import build_parser, settings_from_args

    head = ["RUN", "--catalog", "C", "--out", "A", "--method", method]
    settings, _, overrides = settings_from_args(build_parser().parse_args(head + ["--full-finetune"]))
    assert (settings.batch_size, settings.lr, settings.epochs) == (64, 1e-5, 10) and settings.full_finetune
    assert {"lr", "epochs"} <= overrides  # a catalog's train.lr / train.epochs (GenPI's LoRA settings) yield
    given = ["--full-finetune", "--batch-size", "8", "--lr", "2e-5", "--epochs", "3"]
    settings, _, _ = settings_from_args(build_parser().parse_args(head + given))
    assert (settings.batch_size, settings.lr, settings.epochs) == (8, 2e-5, 3)
    settings, _, _ = settings_from_args(build_parser().parse_args(head))  # without the switch: LoRA, genpi's
    assert (settings.batch_size, settings.lr, settings.full_finetune) == (32, 1e-4, False)


def test_other_methods_keep_their_defaults_and_onpolicy_is_refused():
    from genpi.train.run import build_parser, settings_from_args

    args = build_parser().parse_args(["R", "--catalog", "C", "--out", "A", "--method", "sft", "--full-finetune"])
    settings, _, _ = settings_from_args(args)
    assert (settings.batch_size, settings.lr, settings.full_finetune) == (32, 1e-4, True)
    with pytest.raises(InputError, match="on-policy"):
        settings_from_args(
            build_parser().parse_args(["R", "--catalog", "C", "--out", "A", "--method", "onpolicy", "--full-finetune"])
        )


def write_model_system(root: Path, model: FullModel, base: str, method: str = "kld") -> Path:
    manifest = AdapterManifest(CALC.id, CALC.sha256, base, method, None, {}, "fp", kind=MODEL)
    write_adapter(root / CALC.id, manifest, lambda tmp: save_model(model, tmp, base))
    return root


def test_a_model_folder_is_an_evaluation_system_of_its_own(trained, tiny_trainable_model, tmp_path):
    from genpi.eval.fidelity import teacher_forced
    from genpi.eval.systems import load_engine, prompt_systems

    model, _, _ = trained
    copy_of_base = load_full(tiny_trainable_model, torch.float32)  # untrained: its student is the base
    dirs = {
        "seqkd": write_model_system(tmp_path / "seqkd", model, tiny_trainable_model, "seqkd"),
        "same": write_model_system(tmp_path / "same", copy_of_base, tiny_trainable_model),
    }
    assert is_model(read_adapter_manifest(dirs["seqkd"] / CALC.id))
    systems, missing = prompt_systems(CALC, dirs, tiny_trainable_model)
    assert not missing and [s.model is not None for s in systems] == [False, False, True, True]
    engine = load_engine(tiny_trainable_model, systems)
    try:
        forced = teacher_forced(CALC, HELDOUT, systems, engine, 512)
        base, same, seqkd = (forced[name][0] for name in ("base", "same", "seqkd"))
        assert same == pytest.approx(base, rel=1e-5)  # a copy of the base scores as the base: the right model ran
        assert seqkd[1] < base[1]  # the trained model fits the teacher's turns better (its own weights ran)
        assert forced["teacher"][0][2] == 0.0
        from genpi.engines import ChatRequest, Sampling

        ask = ChatRequest([{"role": "user", "content": "What is 2 plus 3?"}], Sampling(max_tokens=4, logprobs=3))
        names = [s.adapter for s in systems[1:]]  # base, seqkd, same: in one call, each to its own model
        firsts = [c.topk_logprobs[0] for c in engine.generate([ask] * 3, adapters=names)]
        assert firsts[2] == pytest.approx(firsts[0], abs=1e-4) and firsts[1] != pytest.approx(firsts[0], abs=1e-2)
    finally:
        engine.close()


def test_manifest_kind_is_checked_and_old_manifests_are_adapters(tmp_path):
    import json

    manifest = AdapterManifest("calc", "x" * 64, "b", "genpi", 0.5, {"r": 4}, "fp")
    write_adapter(tmp_path / "a", manifest, lambda tmp: None)
    data = json.loads((tmp_path / "a" / "genpi.json").read_text())
    del data["kind"]  # written before full fine-tunes
    (tmp_path / "a" / "genpi.json").write_text(json.dumps(data))
    assert not is_model(read_adapter_manifest(tmp_path / "a"))
    (tmp_path / "a" / "genpi.json").write_text(json.dumps({**data, "kind": "weights"}))
    with pytest.raises(InputError, match="kind"):
        read_adapter_manifest(tmp_path / "a")


def test_placement_check_fails_on_a_tensor_on_another_device(tiny_trainable_model):
    model = load_full(tiny_trainable_model, torch.float32)
    batch = {"input_ids": torch.tensor([[1, 2]]), "labels": torch.tensor([[1, 2]])}
    check_placement(model, batch)  # all on the CPU
    with pytest.raises(ValueError, match="batch input_ids is on meta"):
        check_placement(model, {**batch, "input_ids": batch["input_ids"].to("meta")})
    moved = FullModel(model.student, model.teacher, "cuda:0")  # a model said to be on a GPU, its weights on the CPU
    with pytest.raises(ValueError, match="is on cpu, the model on cuda:0"):
        check_placement(moved, batch)


def test_the_gpu_path_asks_ray_for_one_gpu_per_worker_and_refuses_cpu_clusters():
    scaling = trainer_scaling(4, use_gpu=True, cpus_per_worker=2)
    assert scaling.num_workers == 4 and scaling.use_gpu and scaling.resources_per_worker == {"CPU": 2, "GPU": 1}
    assert trainer_scaling(1, use_gpu=False).resources_per_worker == {"CPU": 1}
    with pytest.raises(ValueError, match="whole number"):
        trainer_scaling(0.5, use_gpu=True)
    check_gpu_cluster(8, 4)
    check_gpu_cluster(0, 0)  # a CPU cluster without GPUs asked: the trial trains on the CPU
    with pytest.raises(ValueError, match="has no GPUs"):
        check_gpu_cluster(0, 4)
    with pytest.raises(ValueError, match="whole GPUs"):
        check_gpu_cluster(8, 0.5)
    with pytest.raises(ValueError, match="has 2 GPUs"):
        check_gpu_cluster(2, 4)


def test_each_rank_gets_its_share_only_when_every_rank_runs_as_many_forwards(monkeypatch):
    import genpi.train.full as full

    rows = list(range(8))
    monkeypatch.setattr(full, "distributed", lambda: (1, 4))
    assert rank_rows(rows, 2) == [1, 5]
    assert rank_rows(rows[:3], 2) == rows[:3]  # rank 3 would get none: every rank computes the whole step
    monkeypatch.setattr(full, "distributed", lambda: (0, 1))
    assert rank_rows(rows, 2) == rows


@pytest.mark.slow
def test_the_torch_trainer_path_trains_with_fsdp_on_one_cpu_worker(tiny_trainable_model, tmp_path):
    """The GPU path's wiring on CPU: a TorchTrainer of one gloo worker, the student sharded by FSDP2 (a mesh of
    one), checkpoints of the gathered weights and the model folder in the last one."""
    import ray
    from transformers import AutoModelForCausalLM

    from genpi.train.experiment import fit_with_trainer

    settings = dataclasses.replace(FULL, method="seqkd+kld", epochs=1)
    config = {
        "base": tiny_trainable_model,
        "entry": CALC.to_json(),
        "settings": settings,
        "rows": (TRAIN, HELDOUT),
        "checkpoint_steps": 0,
        "tags": {"prompt_id": CALC.id, "lam": None},
    }
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        result = fit_with_trainer(config, workers=1, use_gpu=False, storage=str(tmp_path / "runs"), name="t")
    finally:
        ray.shutdown()
    assert result.metrics["finished"] and result.metrics["steps"] == 2
    with result.checkpoint.as_directory() as folder:
        loaded = AutoModelForCausalLM.from_pretrained(Path(folder) / "adapter")
        before = base_weights(tiny_trainable_model)
        assert all(not torch.equal(p, before[n]) for n, p in loaded.named_parameters())
        assert (Path(folder) / "state.pt").is_file()
