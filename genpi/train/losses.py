"""Losses for GenPI and its baselines, as plain functions over tensors.

A batch is a dict with `input_ids`, `attention_mask` and `labels` ([B, T] each);
`labels` holds the token id where a token is scored and -100 where it is not. As in
Hugging Face causal LMs the logits at position t predict the token at t + 1, so the
labels are shifted by one: position t is a *prediction position* when
`labels[:, t + 1] != -100` (`prediction_mask`).

- `token_loss`: summed cross-entropy and token count, so callers average correctly.
- `joint_loss`: GenPI's L = (1 − λ)·L_SFT + λ·L_PG (or L_SFT + λ·L_PG), each term a per-token
  mean over its own data.
- `response_logits`: the logits of the response positions only ([N, V]).
- `kld_loss` / `teacher_logits`: the KLD baseline, KL(teacher with prompt || student
  without) on the response tokens.
- `topk_loss`: top-k context distillation, the student's cross-entropy against the
  teacher's stored top-k probabilities.
- `reverse_kl_loss`: on-policy distillation, KL(student || teacher) on the student's own
  sampled tokens, over the whole vocabulary or the student's top k.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F

IGNORE = -100

LossSum = tuple[torch.Tensor, int]


def prediction_mask(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: True at positions whose logits predict a labelled token (t where labels[t+1] != -100)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE
    return mask


def count_tokens(batch: dict) -> int:
    """Labelled (scored) tokens in a batch, after the one-token shift; no forward pass needed."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def _accepts_logits_to_keep(model) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def token_loss(model, batch: dict) -> LossSum:
    """(summed next-token cross-entropy over the labelled tokens, number of those tokens).

    The sum is a scalar tensor (float32) that carries gradients; the count is an int.
    Only the LM-head rows at prediction positions are computed when the model supports
    `logits_to_keep` (the union over the batch), which saves the vocabulary projection
    for the unscored prompt/context tokens.
    """
    labels = batch["labels"]
    mask = prediction_mask(labels)  # [B, T]
    n_tokens = int(mask.sum())
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask")}
    keep = None
    if n_tokens and _accepts_logits_to_keep(model):
        keep = mask.any(dim=0).nonzero().squeeze(-1)  # [K] positions, ascending
        kwargs["logits_to_keep"] = keep
    logits = model(**kwargs).logits  # [B, T or K, V]
    if keep is not None:
        targets = labels[:, keep + 1]  # label of the next token for each kept position
    else:
        logits = logits[:, :-1]
        targets = labels[:, 1:]
    loss_sum = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(),
        targets.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )
    return loss_sum, n_tokens


def _mean(term: LossSum | None, n_total: int | None) -> torch.Tensor | float:
    if term is None:
        return 0.0
    loss_sum, n = term
    denom = n_total if n_total is not None else n
    return loss_sum / max(int(denom), 1)


LOSS_FORMS = ("convex", "additive")


def joint_loss(
    sft: LossSum | None,
    pg: LossSum | None,
    lam: float,
    *,
    sft_tokens: int | None = None,
    pg_tokens: int | None = None,
    form: str = "convex",
) -> torch.Tensor:
    """GenPI's joint loss: (1 − λ)·L_SFT + λ·L_PG (`form="convex"`, the authors' training
    scripts) or L_SFT + λ·L_PG (`form="additive"`, the paper's formula).

    `sft` and `pg` are `(loss_sum, n_tokens)` pairs from `token_loss` on the SFT batch
    (agent turns labelled) and on the PG batch (prompt P and reason r labelled).
    L_SFT = sft_sum / N_SFT and L_PG = pg_sum / N_PG: each term is the mean
    cross-entropy per labelled token of its *own* examples, so λ weighs the two tasks
    and not their token counts. N defaults to the count in the pair; with gradient
    accumulation pass the totals of the whole optimizer step (`count_tokens` over all
    its micro-batches) as `sft_tokens` / `pg_tokens`, and the micro-batch losses then
    sum to exactly the full-batch L. A missing term (None) or an empty one counts 0.
    """
    if form not in LOSS_FORMS:
        raise ValueError(f"unknown loss form {form!r}: expected one of {', '.join(LOSS_FORMS)}")
    sft_weight = 1.0 - lam if form == "convex" else 1.0
    total = sft_weight * _mean(sft, sft_tokens) + lam * _mean(pg, pg_tokens)
    if not torch.is_tensor(total):
        total = torch.tensor(float(total))
    return total


def response_logits(model, batch: dict) -> torch.Tensor:
    """[N, V] logits at the prediction positions of `batch` (row by row, left to right) only.

    The vocabulary projection runs on the N response positions' hidden states, not on all
    B×T of them, so a 128k vocabulary does not hold the whole sequence's logits. For heads
    that compute logits = lm_head(last hidden state) (Llama, Mistral, Qwen, SmolLM, ...).
    """
    if hasattr(model, "response_logits"):  # a full fine-tune's model (genpi.train.full.FullModel): its own forward
        return model.response_logits(batch, prediction_mask(batch["labels"]))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if any(getattr(base.config, name, None) for name in ("final_logit_softcapping", "logit_scale", "logits_scaling")):
        raise ValueError(f"{type(base).__name__} transforms its logits after the head: response_logits would be wrong")
    out = base.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False)
    return base.get_output_embeddings()(out.last_hidden_state[prediction_mask(batch["labels"])])


def response_targets(batch: dict) -> torch.Tensor:
    """[N] the labelled tokens that `response_logits` predicts, in the same order."""
    return batch["labels"][:, 1:][batch["labels"][:, 1:] != IGNORE]


def kld_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over response tokens of KL(teacher || student), token by token.

    The teacher saw the prompt P plus the conversation, the student the conversation
    only: both [N, V] tensors hold the logits of the same N response tokens in the same
    order (`response_logits` of each view). Both distributions are
    softmax(logits / temperature); the result is not multiplied by temperature**2 (scale it
    yourself if you want the Hinton convention). Teacher logits are treated as constants.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits differ in shape: "
            f"{tuple(student_logits.shape)} vs {tuple(teacher_logits.shape)}"
        )
    if student_logits.size(0) == 0:
        return student_logits.sum() * 0.0
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)  # [N]
    return kl.mean()


def topk_loss(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of the student against the teacher's top-k: −Σ_pos Σ_j p_teacher(j)·log p_student(j).

    `student_logits` [M, V] (no P in the context), `topk_ids` / `topk_logprobs` [M, k] the
    teacher's k most likely tokens at the same positions and their log-probabilities (with P,
    at T=1). Not renormalized: the teacher mass outside its top k carries no loss. A padded
    entry has log-probability -inf (weight 0).
    """
    log_p_s = F.log_softmax(student_logits.float(), dim=-1).gather(-1, topk_ids.long())
    return -(topk_logprobs.float().exp() * log_p_s).sum()


def reverse_kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, topk: int = 0) -> torch.Tensor:
    """Mean over response tokens of the reverse KL(student || teacher) = Σ_v p_s(v)·(log p_s(v) − log p_t(v)).

    On-policy distillation (GKD; OPCD, arXiv 2602.12275): the N response tokens are the student's own
    sampled reply; `student_logits` [N, V] are the student's (adapter on, no P, with gradients),
    `teacher_logits` [N, V] the teacher's at the same positions (with P; treated as constants). A mean,
    as `kld_loss`: multiply by N for the sum that `joint_loss` averages over a whole step.

    `topk > 0` (for 128k vocabularies): the KL of the two distributions coarsened to the student's k most
    likely tokens, each on its own, plus one outcome "any other token" holding the rest of each side's mass.
    Not renormalized to the k tokens: merging outcomes never raises a KL, so this is a lower bound of the
    full reverse KL, never negative, 0 only where both agree on the k tokens, and exact at k = V. Unlike a
    KL renormalized over the k tokens it still sees a teacher that puts its mass elsewhere (the tail term),
    and unlike the plain partial sum over the k tokens it cannot go negative. Its backward touches only
    k + 1 outcomes per token; the forward still needs each side's log-normalizer over the vocabulary.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits differ in shape: "
            f"{tuple(student_logits.shape)} vs {tuple(teacher_logits.shape)}"
        )
    if topk < 0:
        raise ValueError(f"topk must be 0 (the whole vocabulary) or positive, got {topk}")
    if student_logits.size(0) == 0:
        return student_logits.sum() * 0.0
    teacher_logits = teacher_logits.detach()
    if not topk or topk >= student_logits.size(-1):
        log_p_s = F.log_softmax(student_logits.float(), dim=-1)
        log_p_t = F.log_softmax(teacher_logits.float(), dim=-1)
        return (log_p_s.exp() * (log_p_s - log_p_t)).sum(dim=-1).mean()
    ids = (
        student_logits.detach().topk(topk, dim=-1).indices
    )  # [N, k]: which tokens; the gradient flows through the gather
    log_p_s = student_logits.gather(-1, ids).float() - torch.logsumexp(student_logits.float(), dim=-1, keepdim=True)
    log_p_t = teacher_logits.gather(-1, ids).float() - torch.logsumexp(teacher_logits.float(), dim=-1, keepdim=True)
    tail_s, tail_t = _log_rest(log_p_s), _log_rest(log_p_t)
    kl = (log_p_s.exp() * (log_p_s - log_p_t)).sum(dim=-1) + tail_s.exp() * (tail_s - tail_t)
    return kl.mean()


def _log_rest(log_p: torch.Tensor) -> torch.Tensor:
    """[N] log(1 − Σ_j p_j) of [N, k] log-probabilities: the log-mass of every other token. Kept at or above
    log(1e-6) (float32 rounding can make the k tokens' mass reach 1), where it carries no gradient."""
    covered = torch.logsumexp(log_p, dim=-1).clamp(max=math.log1p(-1e-6))
    return torch.log(-torch.expm1(covered))


@torch.no_grad()
def teacher_logits(peft_model, batch: dict) -> torch.Tensor:
    """`response_logits` of the base model (adapter disabled) for `batch`, without gradients.

    The teacher is the same base the student trains on: with QLoRA that is the 4-bit
    base, not the original full-precision model.
    """
    with peft_model.disable_adapter():
        return response_logits(peft_model, batch)


__all__ = [
    "IGNORE",
    "LOSS_FORMS",
    "count_tokens",
    "joint_loss",
    "kld_loss",
    "prediction_mask",
    "response_logits",
    "response_targets",
    "reverse_kl_loss",
    "teacher_logits",
    "token_loss",
    "topk_loss",
]
