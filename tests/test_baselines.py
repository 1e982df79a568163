"""Baselines and ablations: seqkd, pg, prepend, kld and top-k context distillation, and their CLI flags."""

import dataclasses
import math

import pytest
import torch
from test_recipe import CALC, FAST, row
from transformers import AutoTokenizer

from genpi.train import run
from genpi.train.examples import IGNORE, PG_VARIANTS, align_topk, build_sft, loss_spans
from genpi.train.losses import kld_loss, prediction_mask, response_logits, teacher_logits
from genpi.train.plan import NO_LAMBDA
from genpi.train.qlora import LoraSettings, add_lora, load_base
from genpi.train.recipe import build_examples, collate, draw_students, micro_batches, step_loss, topk_targets

PAD = 0


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def settings(method, **kw):
    return dataclasses.replace(FAST, method=method, quantize=False, **kw)


def test_seqkd_trains_every_agent_turn(tokenizer):
    rows, report = build_examples([row(1)], CALC, tokenizer, settings("seqkd"))
    assert report["skipped"] == 0
    assert loss_spans(rows[0].student, tokenizer) == ["Act: compute(2+3)<|im_end|>", "Act: answer(5)<|im_end|>"]


def test_prepend_is_redrawn_every_step_and_reproducible(tokenizer):
    rows, _ = build_examples([row(i) for i in range(40)], CALC, tokenizer, settings("prepend", prepend_ratio=0.5))
    assert all(r.with_p is not None and len(r.with_p.input_ids) > len(r.student.input_ids) for r in rows)
    carries_p = lambda drawn: [e is r.with_p for e, r in zip(drawn, rows)]  # noqa: E731
    torch.manual_seed(0)
    first, second = (
        carries_p(draw_students(rows, settings("prepend"))),
        carries_p(draw_students(rows, settings("prepend"))),
    )
    assert first != second  # a new draw at the next epoch
    assert 10 < sum(first) < 30 and 10 < sum(second) < 30
    torch.manual_seed(0)
    assert carries_p(draw_students(rows, settings("prepend"))) == first  # the seed fixes the draws
    everyone = carries_p(draw_students(rows, settings("prepend", prepend_ratio=1.0)))
    assert all(everyone) and not any(carries_p(draw_students(rows, settings("prepend", prepend_ratio=0.0))))


def test_pg_method_trains_only_pg_examples(tiny_model, tokenizer):
    rows, report = build_examples([row(i) for i in range(4)], CALC, tokenizer, settings("pg"))
    assert report["skipped"] == 0 and all(r.student is None and r.pg is not None for r in rows)
    model = add_lora(load_base(tiny_model, quantize=False), LoraSettings(r=4, alpha=8, dropout=0.0))
    seen = []
    hook = lambda m, args, kwargs: seen.append(kwargs["input_ids"].shape[1])  # noqa: E731
    model.get_base_model().register_forward_pre_hook(hook, with_kwargs=True)
    assert step_loss(model, rows, settings("pg"), PAD) > 0
    # one forward per micro-batch of PG examples, each as wide as its longest PG example: no dialogue forward
    assert seen == [len(chunk[-1].input_ids) for chunk in micro_batches([r.pg for r in rows], FAST.micro_batch)]


@pytest.mark.parametrize("variant", PG_VARIANTS)
def test_every_pg_variant_is_reachable_from_the_cli(monkeypatch, variant):
    got = {}
    monkeypatch.setattr(run, "train_catalog", lambda data, catalog, out, base, s, *a: got.update(settings=s) or {})
    assert (
        run.main(
            [
                "data",
                "--catalog",
                "c.yaml",
                "--out",
                "o",
                "--method",
                "pg",
                "--pg-variant",
                variant,
                "--prepend-ratio",
                "0.25",
            ]
        )
        == 0
    )
    assert (
        got["settings"].method == "pg"
        and got["settings"].pg_variant == variant
        and got["settings"].prepend_ratio == 0.25
    )


def test_cli_refuses_bad_baseline_settings(monkeypatch, capsys):
    monkeypatch.setattr(run, "train_catalog", lambda *a: pytest.fail("must not train"))
    with pytest.raises(SystemExit) as e:
        run.main(["data", "--catalog", "c.yaml", "--out", "o", "--pg-variant", "backwards"])
    assert e.value.code == 2
    assert run.main(["data", "--catalog", "c.yaml", "--out", "o", "--method", "prepend", "--prepend-ratio", "1.5"]) == 2
    assert "prepend_ratio must lie in [0, 1]" in capsys.readouterr().err
    assert NO_LAMBDA == {"sft", "pg", "prepend", "kld", "seqkd", "seqkd+kld", "topk-kl", "onpolicy", "icae"}


def test_kld_keeps_a_row_whose_view_with_p_is_cut(tokenizer):
    long_row = row(3)
    student_full = build_sft(long_row, tokenizer, 4096)
    teacher_full = build_sft(long_row, tokenizer, 4096, CALC.messages())
    # Room for the whole dialogue without P, but not with P: the teacher's view loses its last turn.
    s = settings("kld", max_length=len(teacher_full.input_ids) - 2)
    assert len(student_full.input_ids) <= s.max_length
    rows, report = build_examples([long_row], CALC, tokenizer, s)
    assert report["skipped"] == 0 and len(rows) == 1
    student, teacher = rows[0].student, rows[0].teacher
    assert loss_spans(student, tokenizer) == loss_spans(teacher, tokenizer) == ["Act: compute(4+5)<|im_end|>"]
    assert student.truncated_tokens == len(student_full.input_ids) - len(student.input_ids) > 0
    assert report["truncated_examples"] == 2


def test_kld_step_projects_only_the_response_positions(tiny_model, tokenizer):
    rows, _ = build_examples([row(i) for i in range(3)], CALC, tokenizer, settings("kld"))
    model = add_lora(load_base(tiny_model, quantize=False), LoraSettings(r=4, alpha=8, dropout=0.0))
    head_rows = []
    model.get_base_model().get_output_embeddings().register_forward_hook(
        lambda m, i, o: head_rows.append(o.shape[:-1].numel())
    )
    assert step_loss(model, rows, settings("kld"), PAD) > 0
    positions = sum(e.loss_token_count for r in rows for e in (r.student, r.teacher))
    assert sum(head_rows) == positions  # not B × T per view
    assert sum(head_rows) < sum(len(e.input_ids) for r in rows for e in (r.student, r.teacher)) / 4


def test_max_turn_tokens_cuts_a_long_turn_and_counts_it(tokenizer):
    long = dict(row(0), turns=[{"role": "assistant", "content": "Act: " + " ".join(f"w{i}" for i in range(40))}])
    whole = build_sft(long, tokenizer, 4096)
    cut = build_sft(long, tokenizer, 4096, max_turn_tokens=5)
    content = len(whole.agent_tokens[0])
    assert len(cut.agent_tokens[0]) == 5 and content > 5
    assert cut.loss_token_count == 5 + 1  # the cut content, then its end-of-turn marker
    assert cut.truncated_tokens == content - 5
    _, report = build_examples([long], CALC, tokenizer, settings("sft", max_turn_tokens=5))
    assert report["truncated_examples"] == 1 and report["truncated_tokens"] == content - 5


def fake_topk(example, k=3):
    """A teacher top-k per agent turn whose first entry is the token itself."""
    out = []
    for positions in example.agent_tokens:
        ids = [example.input_ids[p] for p in positions]
        out.append(
            {
                "token_ids": ids,
                "topk_ids": [[t, t + 1, t + 2][:k] for t in ids],
                "topk_logprobs": [[math.log(0.7), math.log(0.2), math.log(0.05)][:k] for _ in ids],
            }
        )
    return out


def test_topk_alignment_tolerates_edges_and_counts_failures(tokenizer):
    ex = build_sft(row(2), tokenizer, 4096)
    topk = fake_topk(ex)
    first, second = ex.agent_tokens
    # Turn 1: the engine generated a leading token that the stripped text lost; turn 2: unrelated tokens.
    shifted = dict(
        topk[0],
        token_ids=[198] + topk[0]["token_ids"],
        topk_ids=[[198]] + topk[0]["topk_ids"],
        topk_logprobs=[[0.0]] + topk[0]["topk_logprobs"],
    )
    unrelated = dict(topk[1], token_ids=[5, 6, 7])
    assert align_topk(ex, [shifted, unrelated], k=2) == 1
    assert ex.topk_positions == first  # every content token of turn 1, none of turn 2, no end-of-turn marker
    assert ex.topk_ids.tolist() == [[ex.input_ids[p], ex.input_ids[p] + 1] for p in first]
    assert torch.allclose(ex.topk_logprobs, torch.tensor([[math.log(0.7), math.log(0.2)]] * len(first)))
    assert not set(second) & set(ex.topk_positions)
    none = build_sft(row(2), tokenizer, 4096)
    assert align_topk(none, [unrelated], k=2) == 2  # turn 2 has no stored top-k at all
    assert none.topk_positions == [] and none.topk_ids.shape == (0, 0)


def test_topk_rows_without_teacher_topk_are_counted_or_refused(tokenizer):
    good = dict(row(0), teacher_topk=fake_topk(build_sft(row(0), tokenizer, 4096)))
    rows, report = build_examples([good, row(1)], CALC, tokenizer, settings("topk-kl"))
    assert len(rows) == 1 and report["skip_reasons"] == {"top-k example": 1} and report["topk_unaligned_turns"] == 0
    with pytest.raises(ValueError, match="synthesize with --teacher-topk K"):
        build_examples([row(1)], CALC, tokenizer, settings("genpi+topk-kl"))


def test_topk_kl_lowers_the_kl_to_the_teacher(tiny_model, tokenizer):
    """The teacher is the base with P in front; the student (LoRA, no P) learns from its stored top-k."""
    s = settings("topk-kl", lr=1e-2, topk_k=20)
    model = add_lora(load_base(tiny_model, quantize=False), LoraSettings(r=8, alpha=16, dropout=0.0))
    data = [row(i) for i in range(4)]
    teachers = [build_sft(r, tokenizer, 4096, CALC.messages()) for r in data]
    for r, teacher in zip(data, teachers):
        with torch.no_grad(), model.disable_adapter():
            logprobs = torch.log_softmax(model(input_ids=torch.tensor([teacher.input_ids])).logits[0].float(), -1)
        r["teacher_topk"] = []
        for positions in teacher.agent_tokens:
            top = logprobs[[p - 1 for p in positions]].topk(s.topk_k)  # the logits at p - 1 predict token p
            r["teacher_topk"].append(
                {
                    "token_ids": [teacher.input_ids[p] for p in positions],
                    "topk_ids": top.indices.tolist(),
                    "topk_logprobs": top.values.tolist(),
                }
            )
    rows, report = build_examples(data, CALC, tokenizer, s)
    assert report["skipped"] == 0 and report["topk_unaligned_turns"] == 0
    assert all(r.student.topk_positions == sum(r.student.agent_tokens, []) for r in rows)

    student_batch, teacher_batch = collate([r.student for r in rows], PAD, "cpu"), collate(teachers, PAD, "cpu")
    targets = teacher_logits(model, teacher_batch)
    soft = [set(r.student.topk_positions) for r in rows]
    content = torch.tensor(
        [
            p in have
            for r, have in zip(rows, soft)
            for p in range(1, len(r.student.labels))
            if r.student.labels[p] != IGNORE
        ]
    )
    assert content.sum() == sum(map(len, soft)) and targets.size(0) == content.numel()
    index, ids, _ = topk_targets([r.student for r in rows], "cpu")  # the rows of response_logits that get the soft loss
    assert torch.equal(index, content.nonzero().squeeze(1)) and ids.shape == (len(index), s.topk_k)

    def kl() -> float:
        with torch.no_grad():
            return float(kld_loss(response_logits(model, student_batch)[content], targets[content]))

    before = kl()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=s.lr)
    for _ in range(8):
        step_loss(model, rows, s, PAD)
        optimizer.step()
        optimizer.zero_grad()
    after = kl()
    assert before > 0.5 and after < 0.6 * before, (before, after)  # measured: 12.5 -> 4.8
    assert prediction_mask(student_batch["labels"]).sum() == targets.size(0)
