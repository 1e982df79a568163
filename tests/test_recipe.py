"""One prompt's training loop on the tiny Llama: every method runs, and learning happens."""

import dataclasses

import pytest

from conftest import REPO
from genpi.catalog import load_catalog
from genpi.train.qlora import LoraSettings
from genpi.train.recipe import METHODS, TrainSettings, train_adapter

CALC, _ = load_catalog(REPO / "tests" / "data" / "tiny.yaml")


def row(i):
    a, b = i % 7 + 1, i % 5 + 2
    return {
        "input": f"What is {a} plus {b}?",
        "turns": [
            {"role": "assistant", "content": f"Act: compute({a}+{b})"},
            {"role": "user", "content": f"Result: {a + b}"},
            {"role": "assistant", "content": f"Act: answer({a + b})"},
        ],
        "student_output": f"The answer is {a + b}.",
        "reason": "The prompt asks for compute and answer actions instead of prose.",
    }


def write_calc_dialogues(out, n: int, heldout_from: int, off_format: frozenset[int] = frozenset()):
    """A synthesis folder written by hand: n calc dialogue rows, held out from sample `heldout_from` on;
    in the samples `off_format` the agent's last turn is prose, outside the action space."""
    from genpi.synth import store

    rows = []
    for i in range(n):
        r = dict.fromkeys(store.DIALOGUE_COLUMNS)
        r.update(row(i), prompt_id="calc", prompt_sha256=CALC.sha256, sample_id=i, seed=i, split="heldout" if i >= heldout_from else "train")
        if i in off_format:
            r["turns"] = r["turns"][:2] + [{"role": "assistant", "content": "The answer is probably right."}]
        rows.append(r)
    store.write_table(store.shard_path(out, "calc", 0), rows, store.DIALOGUE_SCHEMA)
    return out


TRAIN = [row(i) for i in range(8)]
HELDOUT = [row(i) for i in range(8, 10)]
FAST = TrainSettings(epochs=4, lr=1e-2, batch_size=4, micro_batch=2, max_length=512, lora=LoraSettings(r=4, alpha=8, dropout=0.0))


def test_genpi_qlora_lowers_the_training_and_heldout_loss(tiny_trainable_model):
    steps = []
    model, metrics = train_adapter(tiny_trainable_model, CALC, TRAIN, HELDOUT, FAST, progress=lambda *a: steps.append(a))
    assert metrics["steps"] == 8 and [s[0] for s in steps] == list(range(1, 9))
    assert metrics["train_loss_last"] < metrics["train_loss_first"]
    assert metrics["heldout_loss"] < metrics["heldout_loss_before"]
    assert metrics["data_skipped"] == 0 and metrics["train_examples"] == 8
    base = model.get_base_model()
    assert base.is_loaded_in_4bit


@pytest.mark.parametrize("method", [m for m in METHODS if m != "genpi"])
def test_every_baseline_trains(tiny_trainable_model, method):
    from transformers import AutoTokenizer

    from genpi.train.examples import build_sft

    settings = dataclasses.replace(FAST, method=method, epochs=1, quantize=False)
    train = TRAIN
    if "topk" in method:  # a teacher top-k that puts 0.6 on the token itself: the student's own tokens
        tok = AutoTokenizer.from_pretrained(tiny_trainable_model)
        turns = lambda r: [[e.input_ids[p] for p in t] for e in [build_sft(r, tok, 512)] for t in e.agent_tokens]  # noqa: E731
        topk = lambda ids: {"token_ids": ids, "topk_ids": [[t, 0] for t in ids], "topk_logprobs": [[-0.5, -3.0]] * len(ids)}  # noqa: E731
        train = [dict(r, teacher_topk=[topk(ids) for ids in turns(r)]) for r in TRAIN]
    model, metrics = train_adapter(tiny_trainable_model, CALC, train, HELDOUT, settings)
    assert metrics["steps"] == 2 and metrics["train_loss_first"] > 0
    assert metrics["heldout_loss"] != metrics["heldout_loss_before"]  # the adapter changed the student
    assert metrics.get("data_topk_unaligned_turns", 0) == 0


def test_bad_method_and_no_usable_rows(tiny_trainable_model):
    with pytest.raises(ValueError, match="unknown method 'distill'"):
        TrainSettings(method="distill")
    no_agent = [dict(row(0), turns=[])]
    with pytest.raises(ValueError, match="no usable train rows"):
        train_adapter(tiny_trainable_model, CALC, no_agent, [], dataclasses.replace(FAST, epochs=1))


def test_gradient_checkpointing_changes_memory_not_results(tiny_trainable_model):
    plain = dataclasses.replace(FAST, epochs=1, quantize=False)
    _, expected = train_adapter(tiny_trainable_model, CALC, TRAIN, HELDOUT, plain)
    model, metrics = train_adapter(tiny_trainable_model, CALC, TRAIN, HELDOUT, dataclasses.replace(plain, gradient_checkpointing=True))
    assert model.get_base_model().is_activation_checkpointing
    for key in ("train_loss_first", "train_loss_last", "heldout_loss"):
        assert metrics[key] == pytest.approx(expected[key], rel=1e-4), key
