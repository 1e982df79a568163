"""Losses: token_loss, joint_loss, response_logits, kld_loss, teacher_logits, topk_loss (tiny random Llama, CPU)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from genpi.train.losses import (
    IGNORE,
    count_tokens,
    joint_loss,
    kld_loss,
    prediction_mask,
    response_logits,
    response_targets,
    teacher_logits,
    token_loss,
    topk_loss,
)


@pytest.fixture(scope="module")
def model(tiny_model):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    m.eval()
    return m


def make_batch(seed: int, rows: int = 2, length: int = 12, pad_last: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 1000, (rows, length), generator=g)
    attn = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :4] = IGNORE  # unscored context
    labels[0, 7] = IGNORE  # a hole in the middle
    if rows > 1 and pad_last:
        attn[-1, -pad_last:] = 0  # right padding
        labels[-1, -pad_last:] = IGNORE
        ids[-1, -pad_last:] = 0
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def hand_loss(model, batch) -> tuple[torch.Tensor, int]:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    total, n = torch.zeros(()), 0
    rows, length = batch["labels"].shape
    for b in range(rows):
        for t in range(length - 1):
            target = batch["labels"][b, t + 1]
            if target != IGNORE:
                total = total + F.cross_entropy(logits[b, t][None], target[None], reduction="sum")
                n += 1
    return total, n


class NoKeep(torch.nn.Module):
    """A model whose forward has no logits_to_keep: exercises the full-logits path."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def test_token_loss_matches_hand_computation(model):
    batch = make_batch(0)
    expected, n = hand_loss(model, batch)
    got, got_n = token_loss(model, batch)
    assert got_n == n == count_tokens(batch) == 2 * 8 - 1 - 3
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-4)
    full, full_n = token_loss(NoKeep(model), batch)
    assert full_n == n
    assert torch.allclose(full, expected, rtol=1e-5, atol=1e-4)
    # HF's own mean loss with labels agrees too.
    hf = model(**batch).loss
    assert torch.allclose(got / got_n, hf, rtol=1e-5, atol=1e-5)


def test_token_loss_has_gradients(model):
    batch = make_batch(1)
    loss, _ = token_loss(model, batch)
    loss.backward()
    grad = model.get_input_embeddings().weight.grad
    assert grad is not None and grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_joint_loss_convex_and_additive_forms(model):
    sft_batch, pg_batch = make_batch(2), make_batch(3, rows=3, length=16)
    lam = 0.3
    sft, pg = token_loss(model, sft_batch), token_loss(model, pg_batch)
    l_sft = model(**sft_batch).loss  # per-token mean over the SFT examples
    l_pg = model(**pg_batch).loss
    close = lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-5)  # noqa: E731
    # the authors' scripts (the default): (1 − λ)·L_SFT + λ·L_PG; the paper: L_SFT + λ·L_PG
    assert close(joint_loss(sft, pg, lam), (1 - lam) * l_sft + lam * l_pg)
    assert close(joint_loss(sft, pg, lam, form="additive"), l_sft + lam * l_pg)
    assert close(joint_loss(sft, None, lam), (1 - lam) * l_sft) and close(
        joint_loss(sft, None, lam, form="additive"), l_sft
    )
    assert close(joint_loss(None, pg, lam), lam * l_pg) and close(
        joint_loss(None, pg, lam, form="additive"), lam * l_pg
    )
    with pytest.raises(ValueError, match="unknown loss form 'mean'"):
        joint_loss(sft, pg, lam, form="mean")

    # Gradient accumulation: micro-batches normalized by the step's totals sum to the full L.
    halves = [{k: v[i : i + 1] for k, v in sft_batch.items()} for i in range(2)]
    n_sft = sum(count_tokens(h) for h in halves)
    n_pg = count_tokens(pg_batch)
    parts = [joint_loss(token_loss(model, h), None, lam, sft_tokens=n_sft, form="additive") for h in halves]
    parts.append(joint_loss(None, pg, lam, pg_tokens=n_pg, form="additive"))
    assert torch.allclose(sum(parts), l_sft + lam * l_pg, rtol=1e-5, atol=1e-5)


def hand_kld(s_logits, t_logits, temperature):
    terms = []
    for s, t in zip(s_logits, t_logits):
        p = torch.softmax(t / temperature, -1)
        q = torch.softmax(s / temperature, -1)
        terms.append((p * (p.log() - q.log())).sum())
    return torch.stack(terms).mean()


def test_kld_loss_values():
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(6, 50, generator=g)
    student = torch.randn(6, 50, generator=g)
    # Identical distributions: 0.
    assert kld_loss(teacher.clone(), teacher).abs() < 1e-6
    # Otherwise positive, and equal to the hand computation, at any temperature.
    for temp in (1.0, 2.0):
        got = kld_loss(student, teacher, temperature=temp)
        assert got > 0
        assert torch.allclose(got, hand_kld(student, teacher, temp), rtol=1e-5, atol=1e-6)
    # F.kl_div agrees (input: student log-probs, target: teacher log-probs).
    ref = (
        F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction="none")
        .sum(-1)
        .mean()
    )
    assert torch.allclose(kld_loss(student, teacher), ref, rtol=1e-5, atol=1e-6)


def test_kld_loss_rejects_unaligned_tokens():
    with pytest.raises(ValueError, match="differ in shape"):
        kld_loss(torch.randn(4, 50), torch.randn(5, 50))


def test_topk_loss_matches_hand_computation():
    # 2 positions, vocabulary 4, k = 2; the teacher's top-2 are not renormalized (mass 0.9 and 0.7).
    student = torch.tensor([[1.0, 0.0, -1.0, 2.0], [0.5, 0.5, 0.0, -0.5]], requires_grad=True)
    ids = torch.tensor([[3, 0], [1, 2]])
    logprobs = torch.tensor([[0.6, 0.3], [0.4, 0.3]]).log()
    z0 = math.log(sum(math.exp(x) for x in (1.0, 0.0, -1.0, 2.0)))
    z1 = math.log(sum(math.exp(x) for x in (0.5, 0.5, 0.0, -0.5)))
    hand = -(0.6 * (2.0 - z0) + 0.3 * (1.0 - z0) + 0.4 * (0.5 - z1) + 0.3 * (0.0 - z1))
    got = topk_loss(student, ids, logprobs)
    assert got.item() == pytest.approx(hand, rel=1e-6)
    got.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    # A padded entry (log-probability -inf) weighs nothing.
    padded = topk_loss(
        student, torch.tensor([[3, 0, 0], [1, 2, 0]]), torch.cat([logprobs, torch.full((2, 1), -math.inf)], 1)
    )
    assert padded.item() == pytest.approx(hand, rel=1e-6)


def response_batch(with_prefix: bool, seed: int = 4) -> dict:
    """Two rows of context + scored response, right-padded; with_prefix puts a prompt P (7 tokens) first."""
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(5, 1000, (7,), generator=g)  # the prompt P, seen by the teacher only
    convs = [torch.randint(5, 1000, (n,), generator=g) for n in (5, 3)]  # conversation context
    responses = [torch.randint(5, 1000, (n,), generator=g) for n in (4, 6)]  # scored agent turns
    rows = []
    for conv, resp in zip(convs, responses):
        ids = torch.cat([prefix, conv, resp]) if with_prefix else torch.cat([conv, resp])
        labels = torch.full_like(ids, IGNORE)
        labels[-len(resp) :] = resp
        rows.append((ids, labels))
    width = max(len(ids) for ids, _ in rows)
    out = {k: torch.zeros(len(rows), width, dtype=torch.long) for k in ("input_ids", "attention_mask")}
    out["labels"] = torch.full((len(rows), width), IGNORE)
    for i, (ids, labels) in enumerate(rows):
        out["input_ids"][i, : len(ids)] = ids
        out["attention_mask"][i, : len(ids)] = 1
        out["labels"][i, : len(ids)] = labels
    out["responses"] = torch.cat(responses)
    return out


def test_response_logits_are_the_full_logits_at_response_positions(model):
    batch = response_batch(False)
    rows = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, i, o: rows.append(o.shape[:-1].numel()))
    try:
        got = response_logits(model, batch)
    finally:
        handle.remove()
    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = prediction_mask(batch["labels"])
    assert got.shape == (10, full.size(-1)) and rows == [10]  # the head ran on the 10 response positions only
    assert torch.allclose(got, full[mask], atol=1e-5)
    assert torch.equal(response_targets(batch), batch["responses"])


def test_kld_teacher_and_student_score_the_same_tokens(tiny_model):
    from genpi.train.qlora import LoraSettings, add_lora, load_base

    peft_model = add_lora(load_base(tiny_model, quantize=False), LoraSettings(dropout=0.0))
    peft_model.eval()
    teacher_batch, student_batch = response_batch(True), response_batch(False)
    assert torch.equal(response_targets(teacher_batch), response_targets(student_batch))

    t_logits = teacher_logits(peft_model, teacher_batch)
    assert not t_logits.requires_grad and t_logits.size(0) == 10
    # LoRA starts as the identity (B = 0): the student on the teacher's own input matches exactly.
    assert kld_loss(response_logits(peft_model, teacher_batch), t_logits) < 1e-6
    # Perturb the adapter: the teacher (adapter disabled) stays the base, the student moves.
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    assert torch.allclose(teacher_logits(peft_model, teacher_batch), t_logits)
    loss = kld_loss(response_logits(peft_model, student_batch), t_logits)
    assert loss > 0 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
