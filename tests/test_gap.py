"""KL gap closed, bootstrap intervals, on-policy reverse KL and collateral damage (genpi.eval.gap): the math on
hand-made numbers, the reverse KL against a plain forward pass, and one `evaluate_catalog` run on the tiny Llama."""

import math
import random

import duckdb
import pytest
import torch
from conftest import REPO
from test_recipe import row, write_calc_dialogues

from genpi.catalog import load_catalog
from genpi.eval.gap import (
    GENERAL_REQUESTS,
    bootstrap_ci,
    collateral_metrics,
    end_of_turn,
    gap_closed,
    gap_lines,
    gap_metrics,
    kl_per_token,
    mean,
    onpolicy_kl,
    rate_ci,
)
from genpi.eval.systems import System

CATALOG = REPO / "tests" / "data" / "tiny.yaml"
CALC, GREET = load_catalog(CATALOG)
TEACHER, BASE = System("teacher", None, True), System("base")


def records(kl_sums, rkl=None):
    """Per-reply rows as fidelity writes them: the teacher-forced KL sum (10 teacher tokens a row) and the
    on-policy columns."""
    return [
        {"tf_tokens": 10, "tf_kl": kl, "onpolicy_tokens": 5 if rkl else None, "onpolicy_rkl": rkl[i] if rkl else None}
        for i, kl in enumerate(kl_sums)
    ]


BASE_KL = [3.0, 5.0, 2.0, 8.0, 4.0, 6.0]


def test_gap_closed_is_one_for_the_teacher_zero_for_the_base_and_negative_for_a_constant_answer():
    rng = random.Random(1)
    near = [k * rng.uniform(0.2, 0.4) for k in BASE_KL]  # a good adapter: 60-80% of the KL gone on every row
    constant = [k + 9.0 for k in BASE_KL]  # one answer to everything: far from the teacher wherever it varies
    g = gap_metrics(
        {
            "teacher": records([0.0] * 6),
            "base": records(BASE_KL),
            "base-again": records(list(BASE_KL)),
            "near": records(near),
            "constant": records(constant),
        }
    )
    assert g["teacher"]["kl_gap_closed"] == 1.0 and g["teacher"]["kl_gap_closed_ci"] == [1.0, 1.0]
    assert g["base"]["kl_gap_closed"] == 0.0 and g["base"]["kl_gap_closed_ci"] == [0.0, 0.0]
    assert g["base-again"] == g["base"]
    assert g["near"]["kl_gap_closed"] == pytest.approx(1 - sum(near) / sum(BASE_KL))
    lo, hi = g["near"]["kl_gap_closed_ci"]
    assert 0.6 <= lo < g["near"]["kl_gap_closed"] < hi <= 0.8  # paired: every resample stays within the rows' range
    c = g["constant"]
    assert c["kl_gap_closed"] == pytest.approx(-54 / 28) and c["kl_gap_closed_ci"][1] < 0  # never rewarded
    assert g["near"]["reverse_kl"] is None and g["near"]["reverse_kl_ci"] is None  # not measured: null, not 0


def test_gap_leaves_out_rows_not_scored_and_is_undefined_without_a_gap():
    base = records(BASE_KL)
    half = records([k / 2 for k in BASE_KL])
    half[0]["tf_kl"] = None  # a row that could not be scored: left out of both sides
    served = records([None] * 6)
    g = gap_metrics({"base": base, "half": half, "served": served})
    assert g["half"]["kl_gap_closed"] == 0.5 and g["half"]["kl_gap_closed_ci"] == [0.5, 0.5]
    assert g["served"] == {"kl_gap_closed": None, "kl_gap_closed_ci": None, "reverse_kl": None, "reverse_kl_ci": None}
    assert gap_closed([(0.0, 0.0), (0.0, 1.0)]) is None  # the base is already the teacher: nothing to close


def test_reverse_kl_is_token_weighted_with_an_interval():
    g = gap_metrics(
        {"base": records(BASE_KL, rkl=[1.0, 2.0, 3.0, 1.0, 2.0, 3.0]), "teacher": records([0.0] * 6, rkl=[0.0] * 6)}
    )
    assert g["base"]["reverse_kl"] == pytest.approx(12.0 / 30) and g["teacher"]["reverse_kl"] == 0.0
    lo, hi = g["base"]["reverse_kl_ci"]
    assert 0.2 <= lo < 0.4 < hi <= 0.6 and g["teacher"]["reverse_kl_ci"] == [0.0, 0.0]
    damage = collateral_metrics({"base": [(4, 0.0), (6, 0.0)], "sft": [(4, 0.4), (6, 0.2)], "served": None})
    assert damage["base"]["collateral_kl"] == 0.0 and damage["sft"]["collateral_kl"] == pytest.approx(0.06)
    assert damage["served"] == {"collateral_kl": None, "collateral_kl_ci": None}


def test_bootstrap_is_deterministic_covers_the_estimate_and_has_the_right_width():
    rng = random.Random(7)
    values = [rng.random() < 0.3 for _ in range(400)]
    p = mean(values)
    ci = bootstrap_ci(values, mean, n=1000, seed=0)
    assert ci == bootstrap_ci(values, mean, n=1000, seed=0) == rate_ci(values + [None], n=1000, seed=0)
    assert ci != bootstrap_ci(values, mean, n=1000, seed=1)
    assert ci[0] < p < ci[1]
    half = 1.96 * math.sqrt(p * (1 - p) / len(values))  # the normal approximation of a binomial rate's interval
    assert ci[0] == pytest.approx(p - half, abs=0.015) and ci[1] == pytest.approx(p + half, abs=0.015)
    narrow = bootstrap_ci(values, mean, level=0.5)
    assert ci[0] < narrow[0] < p < narrow[1] < ci[1]
    assert bootstrap_ci([], mean) is None and bootstrap_ci([1.0, 2.0], lambda rows: None) is None
    assert bootstrap_ci([2.5] * 5, mean) == [2.5, 2.5]
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci(values, mean, level=95)


def test_kl_per_token_by_hand():
    p_logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    q_logits = torch.tensor([[3.0, 2.0, 1.0], [0.0, math.log(2.0), math.log(5.0)]])
    expected = []
    for p_row, q_row in zip(p_logits.tolist(), q_logits.tolist()):
        p = [math.exp(v) / sum(math.exp(w) for w in p_row) for v in p_row]
        q = [math.exp(v) / sum(math.exp(w) for w in q_row) for v in q_row]
        expected.append(sum(a * math.log(a / b) for a, b in zip(p, q)))
    assert kl_per_token(p_logits, q_logits).tolist() == pytest.approx(expected, rel=1e-6)
    assert expected[0] == pytest.approx(2 * (math.exp(3) - math.exp(1)) / (math.exp(1) + math.exp(2) + math.exp(3)))
    assert kl_per_token(p_logits, p_logits).abs().max() < 1e-7
    with pytest.raises(ValueError, match="shape"):
        kl_per_token(p_logits, q_logits[:1])


def test_gap_lines_show_percent_with_intervals():
    lines = gap_lines(
        {
            "teacher": {
                "kl_gap_closed": 1.0,
                "kl_gap_closed_ci": [1.0, 1.0],
                "reverse_kl": 0.0,
                "reverse_kl_ci": [0.0, 0.0],
                "collateral_kl": 0.0123,
            },
            "sft": {
                "kl_gap_closed": -0.25,
                "kl_gap_closed_ci": [-0.5, 0.125],
                "reverse_kl": None,
                "reverse_kl_ci": None,
                "collateral_kl": None,
            },
        }
    )
    assert "gap closed" in lines[0] and "100.0% [100.0%, 100.0%]" in lines[1] and "0.012" in lines[1]
    assert "-25.0% [-50.0%, 12.5%]" in lines[2] and lines[2].rstrip().endswith("-")


@pytest.fixture(scope="module")
def engine(tiny_finishing_model):
    from genpi.engines.hf import TransformersEngine

    return TransformersEngine(tiny_finishing_model, dtype="float32", max_batch=8)


def test_onpolicy_reverse_kl_is_zero_for_the_teacher_and_matches_a_plain_forward_pass(engine):
    from genpi.engines import ChatRequest, Sampling

    rows = [dict(row(i), sample_id=i) for i in range(3)]
    copy = System("copy", None, True)
    scored = onpolicy_kl(CALC, rows, [TEACHER, copy, BASE], engine, max_tokens=10, samples=2)
    assert scored == onpolicy_kl(CALC, rows, [TEACHER, copy, BASE], engine, max_tokens=10, samples=2)  # seeded
    for t, c, b in zip(scored["teacher"], scored["copy"], scored["base"]):
        assert t == c and t[2] == 0.0 and len(t[0]) == 2
        assert b[2] > 0 and 2 <= b[1] <= 2 * 11  # two samples of at most 10 tokens and an end-of-turn token each
    assert any(t[0] != b[0] for t, b in zip(scored["teacher"], scored["base"]))  # P changes what is sampled

    # a sampled reply of the base that ended at its end-of-turn token, scored by a plain full forward pass of each view
    user = [{"role": "user", "content": rows[0]["input"]}]
    for seed in range(100):
        [completion] = engine.generate([ChatRequest(user, Sampling(temperature=1.0, max_tokens=10, logprobs=1), seed)])
        if completion.finish_reason == "stop":
            break
    assert completion.finish_reason == "stop"
    reply = completion.token_ids + end_of_turn(engine)
    assert end_of_turn(engine) == [engine.tokenizer.convert_tokens_to_ids("<|im_end|>")]

    def reply_logits(context):
        ids = engine.encode(context)
        with torch.no_grad(), engine.serving(None):
            logits = engine.model(input_ids=torch.tensor([ids + reply], device=engine.device)).logits[0]
        return logits[len(ids) - 1 : len(ids) - 1 + len(reply)]

    base, teacher = reply_logits(user), reply_logits(CALC.messages() + user)
    by_hand = sum(float((b.softmax(-1) * (b.log_softmax(-1) - t.log_softmax(-1))).sum()) for b, t in zip(base, teacher))
    alone = dict(rows[0], sample_id=seed)  # its sample seed is the one above
    only = onpolicy_kl(CALC, [alone], [BASE], engine, max_tokens=10, samples=1)["base"][0]
    assert only[0] == [completion.text] and only[1] == len(reply) and only[2] == pytest.approx(by_hand, rel=1e-4)


def random_lora_adapters(base: str, folder):
    """An adapters folder with a calc adapter whose LoRA weights are random and nonzero (it changes the model
    everywhere, P or not)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from genpi.data.adapters import AdapterManifest, write_adapter

    torch.manual_seed(0)
    lora = {"r": 4, "alpha": 64, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=4, lora_alpha=64, target_modules=lora["target_modules"], init_lora_weights=False),
    )
    manifest = AdapterManifest("calc", CALC.sha256, base, "sft", None, lora, "test")
    write_adapter(folder / "calc", manifest, lambda tmp: model.save_pretrained(tmp))
    return folder


def test_collateral_computes_the_bases_logits_once_for_every_system(tiny_trainable_model, tmp_path, monkeypatch):
    """Per batch of general requests: the base's logits once, then each system's; the sums are each system's KL
    against the base as scored alone."""
    from genpi.engines.hf import TransformersEngine
    from genpi.eval import gap
    from genpi.eval.systems import System

    engine = TransformersEngine(tiny_trainable_model, dtype="float32", device="cpu")
    try:
        engine.add_adapters({"noisy": str(random_lora_adapters(tiny_trainable_model, tmp_path / "adapters") / "calc")})
        systems = [System("teacher", with_prompt=True), System("base"), System("noisy", adapter="noisy")]
        collateral = gap.Collateral(engine, max_tokens=6)
        calls, real = [], gap._logits
        monkeypatch.setattr(
            gap, "_logits", lambda e, adapter, examples: calls.append(adapter) or real(e, adapter, examples)
        )
        scored = collateral.score(CALC, systems)
        kept = [(r, ids) for r, ids in zip(collateral.requests, collateral.replies) if ids]
        assert len(kept) > gap.SCORE_BATCH  # two batches
        assert calls == [None, None, "noisy"] * 2  # per batch: the base, the teacher (the base with P), noisy
        user = lambda r: [{"role": "user", "content": r}]  # noqa: E731
        base = [gap._view(engine.encode(user(r)), ids) for r, ids in kept]
        teacher = [gap._view(engine.encode(CALC.messages() + user(r)), ids) for r, ids in kept]
        alone = {  # each scored alone against the base (the base's logits again each time)
            "teacher": gap._kl_sums(engine, (None, base), (None, teacher)),
            "noisy": gap._kl_sums(engine, (None, base), ("noisy", base)),
        }
        assert scored["base"] == [(len(ids), 0.0) for _, ids in kept]
        for name in ("teacher", "noisy"):
            assert scored[name] == [(len(ids), x) for (_, ids), x in zip(kept, alone[name])] and alone[name][0] > 0
    finally:
        engine.close()


def test_evaluate_catalog_reports_the_gap_the_reverse_kl_and_the_collateral(tiny_trainable_model, tmp_path):
    from genpi.eval.fidelity import evaluate_catalog, format_summary
    from genpi.eval.settings import FidelitySettings, SystemsSettings

    data = write_calc_dialogues(tmp_path / "data", 7, heldout_from=4)
    adapters = random_lora_adapters(tiny_trainable_model, tmp_path / "adapters")
    out = tmp_path / "eval"
    systems = SystemsSettings(str(CATALOG), (f"noisy={adapters}",), base=tiny_trainable_model)
    summary = evaluate_catalog(
        data,
        systems,
        FidelitySettings("calc", record=False, out=str(out), max_new_tokens=6, max_turns=1, onpolicy_samples=1),
    )
    [calc] = summary["results"]
    m = calc["systems"]
    for name in ("teacher", "base", "noisy"):
        assert {"kl_gap_closed", "kl_gap_closed_ci", "reverse_kl", "reverse_kl_ci", "collateral_kl"} <= set(m[name])
    assert m["teacher"]["kl_gap_closed"] == 1.0 and m["base"]["kl_gap_closed"] == 0.0
    assert m["noisy"]["kl_gap_closed"] == pytest.approx((m["base"]["kl"] - m["noisy"]["kl"]) / m["base"]["kl"])
    lo, hi = m["noisy"]["kl_gap_closed_ci"]
    assert lo <= m["noisy"]["kl_gap_closed"] <= hi
    assert abs(m["teacher"]["reverse_kl"]) < 1e-6 and m["base"]["reverse_kl"] > 0 and m["noisy"]["reverse_kl"] > 0
    assert m["base"]["collateral_kl"] == 0.0 and m["noisy"]["collateral_kl"] > 0 and m["teacher"]["collateral_kl"] > 0
    assert (
        summary["gap"]["collateral_requests"] == len(GENERAL_REQUESTS)
        and summary["gap"]["bootstrap"]["resamples"] == 1000
    )

    rows = (
        duckdb.connect()
        .execute(
            f"SELECT system, onpolicy_replies, onpolicy_tokens, onpolicy_rkl "
            f"FROM read_parquet('{out}/fidelity/**/*.parquet', hive_partitioning=true)"
        )
        .fetchall()
    )
    assert len(rows) == 9
    for system, replies, tokens, rkl in rows:
        assert len(replies) == 1 and 1 <= tokens <= 7 and (rkl == 0.0) == (system == "teacher")
    noisy = [(t, r) for s, _, t, r in rows if s == "noisy"]
    assert m["noisy"]["reverse_kl"] == pytest.approx(sum(r for _, r in noisy) / sum(t for t, _ in noisy))
    text = format_summary(summary)
    assert "gap closed [95% CI]" in text and "100.0% [100.0%, 100.0%]" in text

    lean = evaluate_catalog(
        data,
        systems,
        FidelitySettings(
            "calc",
            record=False,
            out=str(tmp_path / "lean"),
            max_new_tokens=4,
            max_turns=1,
            limit=1,
            onpolicy_samples=0,
            collateral=False,
        ),
    )
    for metrics in lean["results"][0]["systems"].values():
        assert (
            metrics["reverse_kl"] is None and metrics["collateral_kl"] is None and metrics["kl_gap_closed"] is not None
        )
    assert lean["gap"]["onpolicy_samples"] == 0 and lean["gap"]["collateral_requests"] == 0


def test_a_negative_number_of_samples_exits_2(tmp_path, capsys):
    from genpi.eval.run import main

    assert (
        main(
            [
                "fidelity",
                str(tmp_path),
                "--catalog",
                str(CATALOG),
                "--adapters",
                str(tmp_path),
                "--onpolicy-samples",
                "-1",
            ]
        )
        == 2
    )
    assert "--onpolicy-samples must be at least 0, got -1" in capsys.readouterr().err
