"""Train one prompt's adapter: GenPI's joint loss and the paper's baselines, in one loop.

    train_adapter(base, entry, train_rows, heldout_rows, settings) -> (PeftModel, metrics)

Methods (`TrainSettings.method`):
- genpi:     L = L_SFT + λ·L_PG (SFT on the multi-turn dialogue without P; PG: x, y_s, y_t → P, r)
- sft:       L_SFT only
- prepend:   L_SFT, with P prepended to an example with probability `prepend_p`
- kld:       token KL(teacher || student) on the agent turns; the teacher is the same base with the
             adapter disabled and P present, the student has the adapter and no P
- seqkd:     SFT on the teacher's first turn alone (single-turn sequence-level distillation); LoRA,
             not full fine-tuning, so every method yields the same adapter format
- seqkd+kld: seqkd's loss plus kld's, on the first turn

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

from genpi.catalog import PromptEntry
from genpi.train.examples import IGNORE, Example, build_pg, build_sft
from genpi.train.losses import joint_loss, kld_loss, prediction_mask, teacher_logits, token_loss
from genpi.train.qlora import LoraSettings, add_lora, load_base

METHODS = ("genpi", "sft", "prepend", "kld", "seqkd", "seqkd+kld")


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    method: str = "genpi"
    lam: float = 0.5
    pg_variant: str = "full"
    prepend_p: float = 1.0
    epochs: int = 10
    lr: float = 1e-4
    batch_size: int = 32  # dialogue rows per optimizer step
    micro_batch: int = 4  # examples per forward pass
    max_length: int = 2048
    quantize: bool = True
    gradient_checkpointing: bool = False  # less memory for more compute (long PG examples, big models)
    lora: LoraSettings = dataclasses.field(default_factory=LoraSettings)
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}: expected one of {', '.join(METHODS)}")


@dataclasses.dataclass
class RowExamples:
    """What one dialogue row trains: a student example, and per method a PG or a teacher example."""

    student: Example
    pg: Example | None = None
    teacher: Example | None = None  # the same agent tokens with P in front (kld)


def build_examples(rows: list[dict], entry: PromptEntry, tokenizer, settings: TrainSettings, rng: random.Random) -> tuple[list[RowExamples], dict]:
    """Examples for every usable row, and counts of what was cut or skipped (never silently)."""
    prompt = entry.messages()
    first_only = settings.method.startswith("seqkd")
    out, report = [], {"rows": len(rows), "skipped": 0, "skip_reasons": {}, "truncated_examples": 0, "truncated_tokens": 0}
    for row in rows:
        try:
            with_p = settings.method == "prepend" and rng.random() < settings.prepend_p
            student = build_sft(row, tokenizer, settings.max_length, prompt if with_p else (), first_only)
            made = RowExamples(student)
            if settings.method == "genpi":
                made.pg = build_pg(row, entry, tokenizer, settings.max_length, settings.pg_variant)
            if settings.method.endswith("kld"):
                made.teacher = build_sft(row, tokenizer, settings.max_length, prompt, first_only)
                if made.teacher.loss_token_count != student.loss_token_count:
                    raise ValueError("teacher and student examples were cut differently (P too long for max_length)")
        except ValueError as e:
            report["skipped"] += 1
            reason = str(e).split(":")[0]
            report["skip_reasons"][reason] = report["skip_reasons"].get(reason, 0) + 1
            continue
        for example in (made.student, made.pg, made.teacher):
            if example is not None and example.truncated_tokens:
                report["truncated_examples"] += 1
                report["truncated_tokens"] += example.truncated_tokens
        out.append(made)
    return out, report


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


def step_loss(model, step: list[RowExamples], settings: TrainSettings, pad_id: int) -> float:
    """Forward and backward over one optimizer step's rows; returns the step's loss."""
    students = [r.student for r in step]
    pgs = [r.pg for r in step if r.pg is not None]
    n_student, n_pg = predicted_tokens(students), predicted_tokens(pgs)
    total = 0.0
    if settings.method.endswith("kld"):
        pairs = sorted(step, key=lambda r: len(r.teacher.input_ids))
        for i in range(0, len(pairs), settings.micro_batch):
            chunk = pairs[i : i + settings.micro_batch]
            student, teacher = collate([r.student for r in chunk], pad_id), collate([r.teacher for r in chunk], pad_id)
            teacher_out = teacher_logits(model, teacher)
            student_out = model(input_ids=student["input_ids"], attention_mask=student["attention_mask"]).logits
            n = predicted_tokens([r.student for r in chunk])
            loss = kld_loss(student_out, teacher_out, prediction_mask(student["labels"]), prediction_mask(teacher["labels"]))
            loss = loss * n / max(n_student, 1)  # per-token mean over the whole step
            if settings.method == "seqkd+kld":  # cross-entropy from the same student logits: no second forward
                ce = torch.nn.functional.cross_entropy(
                    student_out[:, :-1].reshape(-1, student_out.size(-1)).float(),
                    student["labels"][:, 1:].reshape(-1),
                    ignore_index=IGNORE,
                    reduction="sum",
                )
                loss = loss + ce / max(n_student, 1)
            loss.backward()
            total += loss.item()
        return total
    for chunk in micro_batches(students, settings.micro_batch):
        loss = joint_loss(token_loss(model, collate(chunk, pad_id)), None, 0.0, sft_tokens=n_student)
        loss.backward()
        total += loss.item()
    for chunk in micro_batches(pgs, settings.micro_batch):
        loss = joint_loss(None, token_loss(model, collate(chunk, pad_id)), settings.lam, pg_tokens=n_pg)
        loss.backward()
        total += loss.item()
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
    rows, report = build_examples(train_rows, entry, tokenizer, settings, rng)
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
