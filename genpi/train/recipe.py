"""Train one prompt's adapter: GenPI's joint loss and the paper's baselines, in one loop.

    train_adapter(base, entry, train_rows, heldout_rows, settings) -> (PeftModel, metrics)

Methods (`TrainSettings.method`):
- genpi:     L = L_SFT + λ·L_PG (SFT on the multi-turn dialogue without P; PG: x, y_s, y_t → P, r)
- sft:       L_SFT only
- pg:        L_PG only (the paper's "w/o L_SFT" ablation)
- prepend:   L_SFT, with P in front of a row's dialogue with probability `prepend_ratio`, drawn
             anew at every step (so every epoch)
- kld:       token KL(teacher || student) on the agent turns; the teacher is the same base with the
             adapter disabled and P present, the student has the adapter and no P
- seqkd:     sequence-level distillation: SFT on the teacher's agent turns, all of them. The
             dialogues are the teacher's own generations, so this is L_SFT under the paper's name;
             LoRA, not full fine-tuning, so every method yields the same adapter format
- seqkd+kld: seqkd's loss plus kld's
- topk-kl:   top-k context distillation: on every agent token, the student's (no P) cross-entropy
             against the teacher's (with P) top-k probabilities stored at synthesis
             (`teacher_topk`); hard labels where no top-k aligns (end-of-turn markers)
- genpi+topk-kl: topk-kl's loss in place of L_SFT, plus λ·L_PG

A step takes `batch_size` dialogue rows (gradient accumulation over micro-batches of
examples of similar length, padded, never packed); each loss term is a per-token mean
over the whole step, so accumulation gives the same gradient as one big batch.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time

import torch
import torch.nn.functional as F

from genpi.catalog import PromptEntry
from genpi.train.examples import IGNORE, PG_VARIANTS, Example, align_topk, build_pg, build_sft, cut_to_labels
from genpi.train.losses import joint_loss, kld_loss, response_logits, response_targets, teacher_logits, token_loss, topk_loss
from genpi.train.qlora import LoraSettings, add_lora, load_base

METHODS = ("genpi", "sft", "pg", "prepend", "kld", "seqkd", "seqkd+kld", "topk-kl", "genpi+topk-kl")
JOINT_METHODS = ("genpi", "genpi+topk-kl")  # L_SFT-like term + λ·L_PG: the methods that choose λ
_PG_METHODS = JOINT_METHODS + ("pg",)
_KLD_METHODS = ("kld", "seqkd+kld")
_TOPK_METHODS = ("topk-kl", "genpi+topk-kl")


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    method: str = "genpi"
    lam: float = 0.5
    pg_variant: str = "full"
    epochs: int = 10
    lr: float = 1e-4
    batch_size: int = 32  # dialogue rows per optimizer step
    micro_batch: int = 4  # examples per forward pass
    max_length: int = 2048
    quantize: bool = True
    gradient_checkpointing: bool = False  # less memory for more compute (long PG examples, big models)
    lora: LoraSettings = dataclasses.field(default_factory=LoraSettings)
    seed: int = 0
    # baselines and ablations
    prepend_ratio: float = 0.5  # prepend: the share of rows that carry P, drawn at every step
    topk_k: int = 20  # topk-kl: teacher log-probabilities used per token (at most as many as stored)
    max_turn_tokens: int = 512  # each agent turn (and y_s, y_t in PG) is cut to this many tokens, as in the reference

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}: expected one of {', '.join(METHODS)}")
        if self.pg_variant not in PG_VARIANTS:
            raise ValueError(f"unknown PG variant {self.pg_variant!r}: expected one of {', '.join(PG_VARIANTS)}")
        if not 0.0 <= self.prepend_ratio <= 1.0:
            raise ValueError(f"prepend_ratio must lie in [0, 1], got {self.prepend_ratio}")
        if self.topk_k < 1 or self.max_turn_tokens < 1:
            raise ValueError(f"topk_k and max_turn_tokens must be positive, got {self.topk_k} and {self.max_turn_tokens}")


@dataclasses.dataclass
class RowExamples:
    """What one dialogue row trains, per method: the student's dialogue (no P), a PG example,
    the teacher's view of the same agent tokens (kld), the dialogue with P in front (prepend)."""

    student: Example | None = None
    pg: Example | None = None
    teacher: Example | None = None
    with_p: Example | None = None


def build_examples(rows: list[dict], entry: PromptEntry, tokenizer, settings: TrainSettings) -> tuple[list[RowExamples], dict]:
    """Examples for every usable row, and counts of what was cut or skipped (never silently)."""
    prompt, method, cap = entry.messages(), settings.method, settings.max_turn_tokens
    out = []
    report = {"rows": len(rows), "skipped": 0, "skip_reasons": {}, "truncated_examples": 0, "truncated_tokens": 0}
    if method in _TOPK_METHODS:
        report["topk_unaligned_turns"] = 0
        if not any(row.get("teacher_topk") for row in rows):
            raise ValueError(f"method {method}: no row has the teacher's top-k log-probabilities; synthesize with --teacher-topk K")
    for row in rows:
        try:
            made = RowExamples()
            if method != "pg":
                made.student = build_sft(row, tokenizer, settings.max_length, max_turn_tokens=cap)
            if method in _PG_METHODS:
                made.pg = build_pg(row, entry, tokenizer, settings.max_length, settings.pg_variant, cap)
            if method == "prepend":
                made.with_p = build_sft(row, tokenizer, settings.max_length, prompt, cap)
            if method in _KLD_METHODS:
                # P makes the teacher's view longer, so it may keep fewer agent tokens: the student keeps the same ones
                made.teacher = build_sft(row, tokenizer, settings.max_length, prompt, cap)
                made.student = cut_to_labels(made.student, made.teacher.loss_token_count)
                if _labelled(made.student) != _labelled(made.teacher):
                    raise ValueError("KLD example: the views with and without P label different tokens")
            if method in _TOPK_METHODS:
                if not row.get("teacher_topk"):
                    raise ValueError("top-k example: the row has no teacher_topk")
                report["topk_unaligned_turns"] += align_topk(made.student, row["teacher_topk"], settings.topk_k)
        except ValueError as e:
            report["skipped"] += 1
            reason = str(e).split(":")[0]
            report["skip_reasons"][reason] = report["skip_reasons"].get(reason, 0) + 1
            continue
        for example in (made.student, made.pg, made.teacher, made.with_p):
            if example is not None and example.truncated_tokens:
                report["truncated_examples"] += 1
                report["truncated_tokens"] += example.truncated_tokens
        out.append(made)
    return out, report


def _labelled(example: Example) -> list[int]:
    return [label for label in example.labels if label != IGNORE]


def collate(examples: list[Example], pad_id: int) -> dict:
    width = max(len(e.input_ids) for e in examples)
    pad = lambda values, fill: [v + [fill] * (width - len(v)) for v in values]  # noqa: E731
    return {
        "input_ids": torch.tensor(pad([e.input_ids for e in examples], pad_id)),
        "attention_mask": torch.tensor(pad([[1] * len(e.input_ids) for e in examples], 0)),
        "labels": torch.tensor(pad([e.labels for e in examples], IGNORE)),
    }


def micro_batches(examples: list[Example], size: int) -> list[list[Example]]:
    """Length-bucketed: similar lengths together, so little padding."""
    ordered = sorted(examples, key=lambda e: len(e.input_ids))
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]


def predicted_tokens(examples: list[Example]) -> int:
    return sum(e.loss_token_count for e in examples)


def draw_students(step: list[RowExamples], settings: TrainSettings) -> list[Example]:
    """The student examples of a step; for `prepend`, each row carries P with probability
    `prepend_ratio`, drawn here at every step (torch's generator: reproducible from the seed)."""
    if settings.method != "prepend":
        return [r.student for r in step if r.student is not None]
    draws = torch.rand(len(step)) < settings.prepend_ratio
    return [r.with_p if with_p else r.student for r, with_p in zip(step, draws.tolist())]


def topk_targets(examples: list[Example], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For the batch of `examples`: which of its `response_logits` rows have a teacher top-k, and
    their [M, k] top-k ids and log-probabilities, on `device` (the batch's)."""
    index, ids, logprobs, offset = [], [], [], 0
    for e in examples:
        row_of = {p: i for i, p in enumerate(p for p in range(1, len(e.labels)) if e.labels[p] != IGNORE)}
        index += [offset + row_of[p] for p in e.topk_positions]
        offset += len(row_of)
        if e.topk_positions:
            ids.append(e.topk_ids)
            logprobs.append(e.topk_logprobs)
    k = max((t.size(1) for t in ids), default=1)
    ids = torch.cat([F.pad(t, (0, k - t.size(1))) for t in ids]) if ids else torch.zeros(0, k, dtype=torch.int32)
    logprobs = torch.cat([F.pad(t, (0, k - t.size(1)), value=-math.inf) for t in logprobs]) if logprobs else torch.zeros(0, k)
    return torch.tensor(index, dtype=torch.long, device=device), ids.to(device), logprobs.to(device)


def step_loss(model, step: list[RowExamples], settings: TrainSettings, pad_id: int) -> float:
    """Forward and backward over one optimizer step's rows; returns the step's loss.

    Every tensor is made on the device the collated batches are on; nothing is moved here.
    """
    method = settings.method
    batch = lambda examples: collate(examples, pad_id)  # noqa: E731
    students, pgs = draw_students(step, settings), [r.pg for r in step if r.pg is not None]
    n_student, n_pg = predicted_tokens(students), predicted_tokens(pgs)
    # λ weighs L_PG only in the joint methods; alone, each term keeps weight 1 in either loss form
    lam = settings.lam if method in JOINT_METHODS else float(method == "pg")
    total = 0.0

    def backward(sft=None, pg=None):
        nonlocal total
        loss = joint_loss(sft, pg, lam, sft_tokens=n_student, pg_tokens=n_pg)
        loss.backward()
        total += loss.item()

    if method in _KLD_METHODS:
        pairs = sorted(step, key=lambda r: len(r.teacher.input_ids))
        for i in range(0, len(pairs), settings.micro_batch):
            chunk = pairs[i : i + settings.micro_batch]
            student, teacher = batch([r.student for r in chunk]), batch([r.teacher for r in chunk])
            s_logits = response_logits(model, student)
            n = s_logits.size(0)
            loss_sum = kld_loss(s_logits, teacher_logits(model, teacher)) * n
            if method == "seqkd+kld":  # cross-entropy from the same student logits: no second forward
                loss_sum = loss_sum + F.cross_entropy(s_logits.float(), response_targets(student), reduction="sum")
            backward(sft=(loss_sum, n))
    elif method in _TOPK_METHODS:
        for chunk in micro_batches(students, settings.micro_batch):
            b = batch(chunk)
            logits, targets = response_logits(model, b), response_targets(b)
            soft, topk_ids, topk_logprobs = topk_targets(chunk, targets.device)
            hard = torch.ones_like(targets, dtype=torch.bool)
            hard[soft] = False
            loss_sum = topk_loss(logits[soft], topk_ids, topk_logprobs)
            loss_sum = loss_sum + F.cross_entropy(logits[hard].float(), targets[hard], reduction="sum")
            backward(sft=(loss_sum, targets.numel()))
    else:
        for chunk in micro_batches(students, settings.micro_batch):
            backward(sft=token_loss(model, batch(chunk)))
    for chunk in micro_batches(pgs, settings.micro_batch):
        backward(pg=token_loss(model, batch(chunk)))
    return total


@torch.no_grad()
def heldout_loss(model, examples: list[Example], pad_id: int, micro_batch: int) -> float | None:
    """Mean SFT loss per agent token on held-out dialogues, without P: what the adapter must learn."""
    if not examples:
        return None
    loss_sum, n = 0.0, 0
    for chunk in micro_batches(examples, micro_batch):
        s, k = token_loss(model, collate(chunk, pad_id))
        loss_sum, n = loss_sum + float(s), n + k
    return loss_sum / max(n, 1)


def train_adapter(base: str, entry: PromptEntry, train_rows: list[dict], heldout_rows: list[dict], settings: TrainSettings, progress=None):
    """Fit one adapter; returns (PeftModel, metrics). `progress(step, steps, loss)` is called after each step."""
    from transformers import AutoTokenizer

    rng = random.Random(settings.seed)
    torch.manual_seed(settings.seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows, report = build_examples(train_rows, entry, tokenizer, settings)
    if not rows:
        raise ValueError(f"prompt {entry.id!r}: no usable train rows ({report['rows']} rows, {report['skipped']} skipped)")
    heldout = [build_sft(r, tokenizer, settings.max_length) for r in heldout_rows]
    model = add_lora(load_base(base, quantize=settings.quantize), settings.lora, gradient_checkpointing=settings.gradient_checkpointing)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.lr)
    steps_per_epoch = math.ceil(len(rows) / settings.batch_size)
    steps, losses, started = steps_per_epoch * settings.epochs, [], time.perf_counter()
    initial = heldout_loss(model, heldout, pad_id, settings.micro_batch)
    for epoch in range(settings.epochs):
        rng.shuffle(rows)
        for k in range(steps_per_epoch):
            loss = step_loss(model, rows[k * settings.batch_size : (k + 1) * settings.batch_size], settings, pad_id)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss)
            if progress:
                progress(len(losses), steps, loss)
    model.eval()
    metrics = {
        "train_loss_first": losses[0],
        "train_loss_last": losses[-1],
        "steps": steps,
        "train_examples": len(rows),
        "heldout_examples": len(heldout),
        "heldout_loss_before": initial,
        "heldout_loss": heldout_loss(model, heldout, pad_id, settings.micro_batch),
        "seconds": time.perf_counter() - started,
        **{f"data_{k}": v for k, v in report.items()},
    }
    return model, metrics
