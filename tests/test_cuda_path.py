"""The CUDA path as the paper ran it (issue 25 §4), checked on the CPU: training's bfloat16 autocast, the
transformers engine's GPU request on a cluster with GPUs, the role-play's two endings, Table 4's "% invalid final
action" per task, and the reference's token limits in the paper preset."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import ray
import torch
from conftest import REPO
from test_pipeline import SAMPLE, Scripted, outcome
from test_recipe import row

from genpi import InputError
from genpi.catalog import load_catalog
from genpi.data import store
from genpi.data.manifest import new_manifest, write_manifest
from genpi.engines import EngineConfig
from genpi.runconfig import read_config
from genpi.synth import actors
from genpi.synth import run as synth_run
from genpi.synth.pipeline import END, SynthSettings, blank_row, instruction_texts, role_play, synthesize_dialogue
from genpi.synth.stats import quality_stats
from genpi.train import recipe
from genpi.train.precision import autocast_dtype
from genpi.train.qlora import LoraSettings

CALC, GREET = load_catalog(REPO / "tests" / "data" / "tiny.yaml")
AGENTS = REPO / "examples" / "agents.yaml"


# 1. bfloat16 really bfloat16 on CUDA


def test_training_autocasts_to_bfloat16_on_cuda_only():
    assert autocast_dtype("cuda", torch.bfloat16) == torch.bfloat16
    assert autocast_dtype("cpu", torch.bfloat16) is None  # the CPU keeps float32 throughout
    assert autocast_dtype("cpu", torch.float32) is None
    assert autocast_dtype("cuda", torch.float32) is None  # --dtype float32 asked for float32
    assert autocast_dtype("cuda", torch.float16) is None  # no loss scaling: no float16 autocast


def train_one_step(base, monkeypatch, **changes):
    """One SFT step on 4 calc rows; returns (the dtypes a LoRA layer's output had in the training step, the
    autocast state seen there, the metrics)."""
    seen, state = [], []
    step_loss = recipe.step_loss

    def spy(model, *args, **kwargs):
        lora = next(m for name, m in model.named_modules() if name.endswith("q_proj.lora_A.default"))
        hook = lora.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
        state.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        try:
            return step_loss(model, *args, **kwargs)
        finally:
            hook.remove()

    monkeypatch.setattr(recipe, "step_loss", spy)
    settings = recipe.TrainSettings(
        method="sft",
        epochs=1,
        batch_size=4,
        micro_batch=2,
        max_length=256,
        quantize=False,
        lr=1e-3,
        lora=LoraSettings(r=4, alpha=8, dropout=0.0),
    )
    settings = dataclasses.replace(settings, **changes)
    _, metrics = recipe.train_adapter(base, CALC, [row(i) for i in range(4)], [], settings)
    return seen, state, metrics


def test_the_training_step_runs_under_the_autocast_the_device_gets(tiny_trainable_model, monkeypatch):
    """On the CPU (this machine) no autocast: float32 LoRA products, `autocast: null` recorded. With the device
    answered as CUDA would be (autocast_dtype patched: the CPU's autocast stands in for CUDA's), the step's
    forward passes run in bfloat16 and genpi.json's settings say so."""
    seen, state, metrics = train_one_step(tiny_trainable_model, monkeypatch)
    assert seen and set(seen) == {torch.float32} and state == [(False, torch.get_autocast_dtype("cpu"))]
    assert metrics["effective"]["autocast"] is None and metrics["effective"]["device"] == "cpu"

    asked = []
    monkeypatch.setattr(recipe, "autocast_dtype", lambda device, dtype: asked.append((device, dtype)) or torch.bfloat16)
    seen, state, metrics = train_one_step(tiny_trainable_model, monkeypatch)
    assert asked == [("cpu", torch.float32)]  # asked with the model's device and weight dtype
    assert seen and set(seen) == {torch.bfloat16} and state == [(True, torch.bfloat16)]
    assert metrics["effective"]["autocast"] == "bfloat16"
    assert all(v == v for v in metrics["train_losses"])  # a finite loss through the autocast step (no NaN)
    # the paper's path: a 4-bit base with gradient checkpointing (what CUDA turns on), under the same autocast
    seen, state, metrics = train_one_step(tiny_trainable_model, monkeypatch, quantize=True, gradient_checkpointing=True)
    assert seen and set(seen) == {torch.bfloat16} and state == [(True, torch.bfloat16)]
    assert metrics["effective"]["autocast"] == "bfloat16" and metrics["effective"]["gradient_checkpointing"] is True
    assert all(v == v for v in metrics["train_losses"])


# 2. the transformers engine asks Ray for a GPU on a cluster with GPUs


def test_the_transformers_engine_takes_a_gpu_where_the_cluster_has_them():
    args = synth_run.parse_args(["catalog.yaml", "--out", "x"])
    target = synth_run.engine_config(args, "target")
    assert target.kind == "transformers" and target.num_gpus is None  # not chosen until Ray is up
    assert synth_run.engine_gpus(target, "target", 8.0).num_gpus == 1
    assert synth_run.engine_gpus(target, "target", 0.0).num_gpus == 0  # a CPU cluster: the CPU
    given = synth_run.engine_config(synth_run.parse_args(["c.yaml", "--out", "x", "--target-gpus", "0.5"]), "target")
    assert synth_run.engine_gpus(given, "target", 8.0).num_gpus == 0.5
    zero = synth_run.engine_config(synth_run.parse_args(["c.yaml", "--out", "x", "--generator-gpus", "0"]), "generator")
    with pytest.raises(InputError, match="--generator-gpus 0 .* 8 GPUs: Ray hides the GPUs"):
        synth_run.engine_gpus(zero, "generator", 8.0)
    assert synth_run.engine_gpus(zero, "generator", 0.0).num_gpus == 0
    vllm = synth_run.engine_config(synth_run.parse_args(["c.yaml", "--out", "x", "--engine", "vllm"]), "target")
    assert synth_run.engine_gpus(vllm, "target", 8.0) == vllm and vllm.num_gpus == 1  # tp GPUs, as before
    remote = synth_run.parse_args(["c.yaml", "--out", "x", "--target", "openai:http://h:8000/v1/m"])
    assert synth_run.engine_gpus(synth_run.engine_config(remote, "target"), "target", 8.0).num_gpus == 0


def test_synthesis_asks_ray_for_the_gpus(tmp_path, monkeypatch):
    """The actor of each engine is started with the GPUs engine_gpus gives on the cluster Ray reports."""
    started = []

    class Actor:  # stands in for the Ray actor class: records its resource request
        @staticmethod
        def options(**resources):
            started.append(resources)
            raise RuntimeError("recorded")

    monkeypatch.setattr(synth_run, "init_ray", lambda **kwargs: None)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"GPU": 2.0})
    monkeypatch.setattr(actors, "EngineActor", Actor)
    catalog = REPO / "tests" / "data" / "tiny.yaml"
    args = synth_run.parse_args([str(catalog), "--out", str(tmp_path / "out")])
    config = synth_run.engine_config(args, "target")
    with pytest.raises(RuntimeError, match="recorded"):
        synth_run.synthesize(catalog, tmp_path / "out", SynthSettings(samples=1), config, config)
    assert started and started[0]["num_gpus"] == 1

    started.clear()
    cpu = dataclasses.replace(config, num_gpus=0)  # the API's EngineConfig() default: on the CPU
    with pytest.raises(InputError, match="--generator-gpus 0 .* 2 GPUs"):
        synth_run.synthesize(catalog, tmp_path / "out2", SynthSettings(samples=1), cpu, cpu)
    assert not started  # refused before any actor starts


# 3. role-play as the reference: until the end marker or the turn limit


def play(entry, engine, settings=SynthSettings()):
    return asyncio.run(synthesize_dialogue(entry, SAMPLE, engine, engine, settings))


def test_a_final_action_does_not_end_the_dialogue_the_end_marker_does():
    engine = Scripted(
        agent=["Act: answer(8)", "Act: compute(4+4)", "Act: answer(8)"],
        environment=["Result: ok", "Result: 8", END],
        student=["x"],
        reason=["y"],
    )
    r = play(CALC, engine)  # calc's limit is 3
    assert r["error"] is None and r["n_turns"] == 3 and not engine.replies["agent"]
    assert outcome(r) == ("environment", True, False, False)
    assert r["final_action"] == "Act: answer(8)" and r["final_action_valid"] is True


def test_the_end_marker_on_the_last_allowed_turn_is_not_the_limit():
    engine = Scripted(
        agent=["Act: compute(1)", "Act: answer(1)"], environment=["Result: 1", END], student=["x"], reason=["y"]
    )
    r = play(CALC, engine, SynthSettings(max_turns=2))
    assert outcome(r) == ("environment", True, False, False) and r["n_turns"] == 2


def test_the_limit_ends_a_dialogue_the_environment_never_ends():
    engine = Scripted(
        agent=["Act: answer(8)", "Act: answer(8)", "Act: answer(8)"],
        environment=["Result: 8", "Result: 8", "Result: 8"],
        student=["x"],
        reason=["y"],
    )
    r = play(CALC, engine)
    assert outcome(r) == ("max_turns", False, True, False) and r["n_turns"] == 3
    assert len(engine.requests["environment"]) == 3  # asked once more after the last turn: termination measured
    assert [t["role"] for t in r["turns"]] == ["assistant", "user", "assistant", "user", "assistant"]
    assert r["final_action_valid"] is True  # at the limit, and yet a valid final action


def test_an_overflow_after_the_last_turn_is_the_limit_not_a_truncation():
    from test_pipeline import overflow

    engine = Scripted(agent=["Act: answer(8)"], environment=[overflow(1020)], student=["x"], reason=["y"])
    r = play(CALC, engine, SynthSettings(max_turns=1))
    assert outcome(r) == ("max_turns", False, True, False)


# 4. Table 4's "% invalid final action", per task as the paper defines it

FINALS = {  # prompt: (final actions, last turns that are not one)
    "os-shell": (
        ["Think: done.\nAct: finish", "Think: I know it.\nAct: answer(42)"],
        ["Think: look.\nAct: bash\n```bash\nls\n```", "The answer is 42."],
    ),
    "web-select": (
        [
            "Answer: B\nAction: CLICK\nValue: None",
            "Answer: C\nAction: TYPE\nValue: Boston",
            "Answer: D\nAction: SELECT\nValue: Pickup",
            "Answer: A\nAction: CLICK\nValue: None",  # None of the above
        ],
        ["Answer: B\nAction: HOVER\nValue: None", "I would click B."],
    ),
    "web-shop": (
        [
            "Thought: search first.\nAction: search[beeswax candles]",
            "Thought: open it.\nAction: click[B084ZPX6TD]",
            "Thought: buy.\nAction: click[Buy Now]",
        ],
        ["Thought: buy.\nAction: buy[B084ZPX6TD]", "Thought: I am not sure what to do."],
    ),
}


def rows_for(entry, finals, others):
    """One dialogue per last turn, each played to its end (one turn, the environment's END)."""
    out = []
    for i, last in enumerate(finals + others):
        engine = Scripted(agent=[last], environment=[END], student=["x"], reason=["y"])
        sample = dict(SAMPLE, sample_id=i, seed=i)
        out.append(asyncio.run(synthesize_dialogue(entry, sample, engine, engine, SynthSettings(teacher_topk=0))))
    return out


def test_invalid_final_action_follows_the_papers_definition_per_task(tmp_path):
    entries = load_catalog(AGENTS, list(FINALS))
    for entry in entries:
        finals, others = FINALS[entry.id]
        rows = rows_for(entry, finals, others)
        assert [r["final_action_valid"] for r in rows] == [True] * len(finals) + [False] * len(others), entry.id
        store.write_table(store.shard_path(tmp_path, entry.id, 0), rows, store.DIALOGUE_SCHEMA)
    write_manifest(
        tmp_path,
        new_manifest(AGENTS, entries, EngineConfig(), EngineConfig(), SynthSettings(), 32, instruction_texts()),
    )
    stats = {s["prompt_id"]: s for s in quality_stats(tmp_path)}
    for prompt_id, (finals, others) in FINALS.items():
        expected = round(100 * len(others) / (len(finals) + len(others)), 1)
        assert stats[prompt_id]["pct_invalid_final_action"] == expected, prompt_id


def test_a_web_shop_dialogue_at_the_turn_limit_is_not_invalid_for_lacking_buy_now():
    [shop] = load_catalog(AGENTS, ["web-shop"])
    turns = ["Thought: s.\nAction: search[mugs]", "Thought: o.\nAction: click[B01]", "Thought: o.\nAction: click[red]"]
    engine = Scripted(agent=turns, environment=["page 1", "page 2", "page 3"], student=["x"], reason=["y"])
    r = play(shop, engine, SynthSettings(max_turns=3, teacher_topk=0))
    assert r["hit_max_turns"] and r["final_action_valid"] is True


# 5. the reference's token limits per call in the paper preset, and each one used


@pytest.mark.parametrize("config", [REPO / "genpi" / "presets" / "paper.yaml", REPO / "cluster" / "paper-run.yaml"])
def test_the_paper_preset_sets_the_references_token_limits(config):
    from genpi.flags import from_args
    from genpi.run import build_parser, stage_commands

    preset = read_config(config)
    args = build_parser().parse_args([str(AGENTS), "--out", "/tmp/run", "--config", str(config)])
    [(name, argv), *_] = stage_commands(args, preset, [e.id for e in load_catalog(AGENTS)])
    assert name == "synth"
    settings = from_args(SynthSettings, synth_run.parse_args(argv))
    limits = (settings.max_agent_tokens, settings.max_environment_tokens, settings.max_student_tokens)
    assert limits == (2048, 2048, 2048) and settings.max_reason_tokens == 512
    # each settable: a role's own flag after them wins
    settings = from_args(SynthSettings, synth_run.parse_args([*argv, "--max-reason-tokens", "300"]))
    assert settings.max_reason_tokens == 300 and settings.max_agent_tokens == 2048


def test_each_role_calls_with_its_own_token_limit():
    settings = SynthSettings(
        max_agent_tokens=11, max_environment_tokens=12, max_student_tokens=13, max_reason_tokens=14, teacher_topk=0
    )
    engine = Scripted(
        agent=["Act: compute(1)", "Act: answer(1)"], environment=["Result: 1", END], student=["x"], reason=["y"]
    )
    play(CALC, engine, settings)
    limits = {persona: {r.sampling.max_tokens for r in requests} for persona, requests in engine.requests.items()}
    assert limits == {"agent": {11}, "environment": {12}, "student": {13}, "reason": {14}}


def test_eval_episodes_count_a_final_last_turn_not_how_the_dialogue_ended():
    """Fidelity's `ended_final`: the episode's last agent turn is a final action (terminated_by no longer says)."""
    from genpi.eval.fidelity import reply_rows
    from genpi.eval.systems import TEACHER, System

    episode = blank_row(CALC, SAMPLE, SynthSettings(teacher_topk=0), "g", "t")
    engine = Scripted(agent=["Act: compute(1)", "Act: answer(2)"], environment=["Result: 2", END])
    asyncio.run(role_play(CALC, episode, engine, SynthSettings(teacher_topk=0)))
    assert episode["terminated_by"] == "environment"
    [record] = reply_rows(
        CALC, [dict(SAMPLE)], [System(TEACHER, None, True)], {"teacher": [episode]}, {"teacher": [None]}
    )["teacher"]
    assert record["ended_final"] is True
