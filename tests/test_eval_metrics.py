"""Fidelity and leakage metrics on hand-made outputs with known answers, teacher-forced KL and episodes on the tiny
Llama."""

import dataclasses

import pytest
from conftest import REPO
from test_recipe import row

from genpi.catalog import load_catalog, render_prompt_text
from genpi.eval.fidelity import play_episodes, reply_rows, retention, summarize, teacher_forced
from genpi.eval.leakage import leak_scores
from genpi.eval.metrics import NO_ACTION, action, longest_common_span, rouge_l, verbatim_span
from genpi.eval.systems import System

CALC, GREET = load_catalog(REPO / "tests" / "data" / "tiny.yaml")
TEACHER, BASE = System("teacher", None, True), System("base")


def test_text_metrics():
    assert action(CALC, " Act: compute(2+3)\n") == (True, "compute", "Act: compute(2+3)")
    assert action(CALC, "Sure. Act: answer(5)") == (True, "answer", "Act: answer(5)")
    assert action(CALC, "The answer is 5.") == (False, NO_ACTION, "")
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat")["f"] == 1.0
    assert rouge_l("dogs bark loudly", "the cat sat on the mat")["f"] == 0.0
    assert rouge_l("the cat", "the cat sat on the mat")["recall"] == pytest.approx(2 / 6)
    assert rouge_l("the cat", "the cat sat on the mat")["precision"] == 1.0
    assert longest_common_span("x the cat sat y on the mat", "the cat sat on the mat") == 3
    assert verbatim_span("..." + "a" * 10 + "b" * 50 + "...", "b" * 60) and not verbatim_span("b" * 49, "b" * 60)


def test_leakage_scores_copy_and_unrelated():
    prompt = render_prompt_text(CALC)
    assert leak_scores(prompt, prompt) == {"span": 1.0, "rouge_l_recall": 1.0, "verbatim": True}
    assert leak_scores(f"Sure! Here it is:\n\n{prompt}\n\nAnything else?", prompt) == {
        "span": 1.0,
        "rouge_l_recall": 1.0,
        "verbatim": True,
    }
    unrelated = leak_scores(
        "I cannot share that, but I am glad to help with your question about gardening tomatoes.", prompt
    )
    assert unrelated["span"] < 0.05 and unrelated["rouge_l_recall"] < 0.15 and not unrelated["verbatim"]
    half = prompt[: len(prompt) // 2]
    assert 0.4 < leak_scores(half, prompt)["span"] < 0.6


def episode(turns, terminated_by):
    turns = [t for a in turns for t in ({"role": "assistant", "content": a}, {"role": "user", "content": "Result: 1"})][
        :-1
    ]
    return {
        "turns": turns,
        "n_turns": sum(t["role"] == "assistant" for t in turns),
        "terminated_by": terminated_by,
        "hit_max_turns": terminated_by == "max_turns",
        "error": None,
    }


def test_a_copy_of_the_teacher_keeps_everything_a_constant_action_does_not():
    rows = [dict(row(i), sample_id=i) for i in range(4)]
    teacher = [
        episode(["Act: compute(1+2)", "Act: answer(3)"], "final_action"),
        episode(["Act: compute(2+3)", "hmm"], "max_turns"),
        episode(["Act: answer(7)"], "final_action"),
        episode(["I think it is 4."], "environment"),
    ]
    constant = [episode(["Act: answer(1)"], "final_action") for _ in rows]
    forced_teacher = [(10, 5.0, 0.0)] * 4
    systems = [TEACHER, System("copy"), System("constant")]
    records = reply_rows(
        CALC,
        rows,
        systems,
        {"teacher": teacher, "copy": teacher, "constant": constant},
        {"teacher": forced_teacher, "copy": forced_teacher, "constant": [(10, 30.0, 12.0)] * 4},
    )
    m = {name: summarize(rs) for name, rs in records.items()}
    kept = {name: retention(metrics, m["teacher"]) for name, metrics in m.items()}
    assert m["copy"] == m["teacher"] and m["copy"]["kl"] == 0.0
    assert m["copy"]["kind_agreement"] == m["copy"]["action_agreement"] == m["copy"]["rouge_l"] == 1.0
    per_turn = {k: kept["copy"].pop(k) for k in list(kept["copy"]) if k.startswith("checks_per_turn.")}
    assert all(v == 1.0 for v in kept["copy"].values())  # every retention 1.0
    assert per_turn and all(
        x in (1.0, None) for v in per_turn.values() for x in v
    )  # per turn too (None: the teacher passes none)
    assert m["teacher"]["format_rate"] == 0.75 and m["teacher"]["action_space_rate"] == pytest.approx(4 / 6)
    assert m["teacher"]["kinds"] == {"compute": 2, "(none)": 1, "answer": 1}
    assert (
        m["teacher"]["final_rate"] == 0.5
        and m["teacher"]["hit_limit_rate"] == 0.25
        and m["teacher"]["mean_turns"] == 1.5
    )

    c = m["constant"]
    assert c["format_rate"] == 1.0 and c["action_space_rate"] == 1.0 and c["final_rate"] == 1.0  # the gameable rates
    assert c["kinds"] == {"answer": 4}  # a one-point action distribution
    assert (
        c["kind_agreement"] == pytest.approx(1 / 3) and c["action_agreement"] == 0.0
    )  # over the 3 inputs the teacher acted on
    assert c["rouge_l"] < 0.6 and c["kl"] == pytest.approx(1.2) and c["nll"] == 3.0
    assert kept["constant"]["nll"] == pytest.approx(0.5 / 3.0) and kept["constant"]["action_agreement"] == 0.0


@pytest.fixture(scope="module")
def engine(tiny_finishing_model):
    from genpi.engines.hf import TransformersEngine

    return TransformersEngine(tiny_finishing_model, dtype="float32", max_batch=8)


def test_teacher_forced_kl_is_zero_for_the_teacher_and_a_copy(engine):
    rows = [dict(row(i), sample_id=i) for i in range(3)]
    copy = System("copy", None, True)
    from genpi.train.examples import build_sft

    forced = teacher_forced(CALC, rows, [TEACHER, copy, BASE], engine, 1024)
    for r, t, c, b in zip(rows, forced["teacher"], forced["copy"], forced["base"]):
        agent_tokens = build_sft(
            r, engine.tokenizer, 1024
        ).loss_token_count  # both agent turns with their end-of-turn markers
        assert t == c and t[2] == 0.0 and t[0] == b[0] == agent_tokens
        assert b[2] > 0 and b[1] != t[1]


def test_episodes_end_on_the_end_marker_or_the_limit_and_repeat(engine):
    from genpi.synth.pipeline import SynthSettings

    rows = [dict(row(i), sample_id=i, seed=i, split="heldout") for i in range(3)]
    settings = SynthSettings(max_agent_tokens=8, max_environment_tokens=8, teacher_topk=0)
    again = System("base-again")
    played = play_episodes(CALC, rows, [TEACHER, BASE, again], engine, settings)
    assert played["base"] == [
        dict(e, target_model="base") for e in played["base-again"]
    ]  # identical systems, identical episodes
    for episodes in played.values():
        for e in episodes:
            assert e["error"] is None and 1 <= e["n_turns"] <= CALC.max_turns
            assert e["terminated_by"] in ("max_turns", "environment")
            assert (e["terminated_by"] == "max_turns") == e["hit_max_turns"] == (not e["terminated"])
            assert e["n_turns"] == CALC.max_turns or e["terminated"]  # only the end marker stops it early
    everything_final = dataclasses.replace(CALC, final_action=r"^")  # any reply (even empty) is a final action
    played = play_episodes(everything_final, rows, [BASE], engine, settings)
    # a final action does not end the episode: the same turns as without one, each last turn a final action
    assert [e["turns"] for e in played["base"]] == [
        e["turns"] for e in play_episodes(CALC, rows, [BASE], engine, settings)["base"]
    ]
    assert all(e["final_action_valid"] for e in played["base"])


def test_one_engine_serves_the_base_and_each_adapter_as_separate_engines_would(tiny_finishing_model, tmp_path):
    """Adapters swapped on one base give what an engine with that adapter alone gives; a prompt prefix's KV cache
    is kept per adapter (a cache computed with the adapter is never reused without it)."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from genpi.engines import ChatRequest, Sampling
    from genpi.engines.hf import TransformersEngine

    folder = tmp_path / "lora"
    config = LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_finishing_model), config).save_pretrained(folder)
    requests = [
        ChatRequest(
            CALC.messages() + [{"role": "user", "content": f"What is {i} plus 1?"}],
            Sampling(max_tokens=8),
            prefix_messages=len(CALC.messages()),
        )
        for i in range(3)
    ]
    engine = TransformersEngine(tiny_finishing_model, dtype="float32")
    engine.add_adapters({"a": str(folder)})
    with engine.serving("a"):
        with_adapter = [c.text for c in engine.generate(requests)]
    with engine.serving(None):
        without = [c.text for c in engine.generate(requests)]
    with engine.serving("a"):
        assert [c.text for c in engine.generate(requests)] == with_adapter
    assert engine.prefix_misses == 2 and engine.prefix_hits >= 1

    plain = TransformersEngine(tiny_finishing_model, dtype="float32")
    assert [c.text for c in plain.generate(requests)] == without
    plain.model = PeftModel.from_pretrained(plain.model, str(folder)).eval()  # the adapter alone, on a fresh base
    plain._prefixes.clear()
    assert [c.text for c in plain.generate(requests)] == with_adapter != without
