"""Train one prompt's adapter: GenPI's joint loss and the paper's baselines, in one loop.

    train_adapter(base, entry, train_rows, heldout_rows, settings) -> (PeftModel, metrics)

Methods (`TrainSettings.method`):
- genpi:     L = (1 − λ)·L_SFT + λ·L_PG, or L_SFT + λ·L_PG with `loss_form="additive"` (SFT on the
             multi-turn dialogue without P; PG: x, y_s, y_t → P, r)
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

Optimisation as in the authors' scripts: AdamW without weight decay (bitsandbytes' paged
32-bit AdamW on CUDA), a linear warmup over the first 3% of the steps then a cosine decay,
gradients clipped to norm 1.0. Every batch is made on the model's device (`collate`): a
model placed on one GPU by `device_map` gets no hooks that would move its inputs.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time

import torch

from genpi.catalog import PromptEntry
from genpi.train.examples import IGNORE, Example, build_pg, build_sft
from genpi.train.losses import LOSS_FORMS, joint_loss, kld_loss, prediction_mask, teacher_logits, token_loss
from genpi.train.qlora import LoraSettings, add_lora, default_dtype, load_base

METHODS = ("genpi", "sft", "prepend", "kld", "seqkd", "seqkd+kld")
SCHEDULES = ("cosine", "constant")  # after a linear warmup
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    method: str = "genpi"
    lam: float = 0.5
    pg_variant: str = "full"
    prepend_p: float = 1.0
    epochs: int = 10
    lr: float = 1e-4
    batch_size: int = 32  # dialogue rows per optimizer step
    micro_batch: int = 2  # examples per forward pass (the reference: 2 × 16 accumulation)
    max_length: int = 2048
    quantize: bool = True
    gradient_checkpointing: bool | None = None  # less memory for more compute; None: on with CUDA
    lora: LoraSettings = dataclasses.field(default_factory=LoraSettings)
    seed: int = 0
    # the reference's optimisation and precision (the authors' training scripts)
    loss_form: str = "convex"  # (1 − λ)·L_SFT + λ·L_PG; "additive": L_SFT + λ·L_PG, as the paper writes it
    schedule: str = "cosine"
    warmup_ratio: float = 0.03  # share of the steps with a linear warmup from 0
    max_grad_norm: float = 1.0  # 0: no clipping (the reference: 1.0 for OS, 0.5 otherwise)
    weight_decay: float = 0.0
    dtype: str = "auto"  # unquantized weights and 4-bit compute; auto: bfloat16 with CUDA, float32 on CPU

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}: expected one of {', '.join(METHODS)}")
        for name, value, allowed in (("loss form", self.loss_form, LOSS_FORMS), ("schedule", self.schedule, SCHEDULES), ("dtype", self.dtype, DTYPES)):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}: expected one of {', '.join(allowed)}")
        if not 0.0 <= self.warmup_ratio <= 1.0 or self.max_grad_norm < 0 or self.weight_decay < 0:
            raise ValueError(f"warmup_ratio must lie in [0, 1], max_grad_norm and weight_decay must be >= 0; got {self.warmup_ratio}, {self.max_grad_norm}, {self.weight_decay}")


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


def collate(examples: list[Example], pad_id: int, device) -> dict:
    """A padded batch, made on `device` (the model's: nothing moves it there later)."""
    width = max(len(e.input_ids) for e in examples)
    pad = lambda values, fill: torch.tensor([v + [fill] * (width - len(v)) for v in values], device=device)  # noqa: E731
    return {
        "input_ids": pad([e.input_ids for e in examples], pad_id),
        "attention_mask": pad([[1] * len(e.input_ids) for e in examples], 0),
        "labels": pad([e.labels for e in examples], IGNORE),
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
    lam = settings.lam if settings.method == "genpi" else 0.0  # λ weighs the terms of the joint loss only
    total = 0.0
    if settings.method.endswith("kld"):
        pairs = sorted(step, key=lambda r: len(r.teacher.input_ids))
        for i in range(0, len(pairs), settings.micro_batch):
            chunk = pairs[i : i + settings.micro_batch]
            student, teacher = collate([r.student for r in chunk], pad_id, model.device), collate([r.teacher for r in chunk], pad_id, model.device)
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
        loss = joint_loss(token_loss(model, collate(chunk, pad_id, model.device)), None, lam, sft_tokens=n_student, form=settings.loss_form)
        loss.backward()
        total += loss.item()
    for chunk in micro_batches(pgs, settings.micro_batch):
        loss = joint_loss(None, token_loss(model, collate(chunk, pad_id, model.device)), lam, pg_tokens=n_pg, form=settings.loss_form)
        loss.backward()
        total += loss.item()
    return total


@torch.no_grad()
def heldout_loss(model, examples: list[Example], pad_id: int, micro_batch: int) -> float | None:
    """Mean SFT loss per agent token on held-out dialogues, without P: what the adapter must learn.
    Measured in eval mode (no dropout), so the values before and after training compare."""
    if not examples:
        return None
    training, loss_sum, n = model.training, 0.0, 0
    model.eval()
    for chunk in micro_batches(examples, micro_batch):
        s, k = token_loss(model, collate(chunk, pad_id, model.device))
        loss_sum, n = loss_sum + float(s), n + k
    model.train(training)
    return loss_sum / max(n, 1)


def make_optimizer(model, settings: TrainSettings, steps: int):
    """(optimizer, scheduler, optimizer name): AdamW, paged 32-bit (bitsandbytes) when the LoRA
    weights are on CUDA, as the reference; a linear warmup over ceil(warmup_ratio · steps)
    steps (as transformers' Trainer counts them), then a cosine decay to 0 or a constant lr."""
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    if params[0].is_cuda:  # paged: optimizer state spills to host memory under memory pressure
        import bitsandbytes as bnb

        optimizer, name = bnb.optim.PagedAdamW32bit(params, lr=settings.lr, weight_decay=settings.weight_decay), "paged_adamw_32bit"
    else:
        optimizer, name = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay), "adamw_torch"
    warmup = math.ceil(steps * settings.warmup_ratio)
    if settings.schedule == "cosine":
        scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, steps)
    else:
        scheduler = get_constant_schedule_with_warmup(optimizer, warmup)
    return optimizer, scheduler, name


def optimizer_step(model, optimizer, scheduler, settings: TrainSettings) -> float:
    """Clip the gradients to `max_grad_norm` (0: no clipping), step, advance the schedule;
    returns the gradient norm before clipping."""
    params = [p for p in model.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm or math.inf)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


def train_adapter(base: str, entry: PromptEntry, train_rows: list[dict], heldout_rows: list[dict], settings: TrainSettings, progress=None):
    """Fit one adapter; returns (PeftModel, metrics). `progress(step, steps, loss)` is called after each step.

    `metrics["effective"]` holds what "auto" settings became on this machine: device, dtypes,
    gradient checkpointing, optimizer.
    """
    from transformers import AutoTokenizer

    rng = random.Random(settings.seed)
    torch.manual_seed(settings.seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows, report = build_examples(train_rows, entry, tokenizer, settings, rng)
    if not rows:
        raise ValueError(f"prompt {entry.id!r}: no usable train rows ({report['rows']} rows, {report['skipped']} skipped)")
    # held-out rows are cut and counted as train rows are (SFT view, no P); one too long never fails the trial
    held, heldout_report = build_examples(heldout_rows, entry, tokenizer, dataclasses.replace(settings, method="sft"), rng)
    heldout = [r.student for r in held]
    dtype = default_dtype() if settings.dtype == "auto" else getattr(torch, settings.dtype)
    checkpointing = torch.cuda.is_available() if settings.gradient_checkpointing is None else settings.gradient_checkpointing
    model = add_lora(load_base(base, quantize=settings.quantize, dtype=dtype), settings.lora, gradient_checkpointing=checkpointing)
    steps_per_epoch = math.ceil(len(rows) / settings.batch_size)
    steps, losses, norms, started = steps_per_epoch * settings.epochs, [], [], time.perf_counter()
    optimizer, scheduler, optimizer_name = make_optimizer(model, settings, steps)
    initial = heldout_loss(model, heldout, pad_id, settings.micro_batch)
    for epoch in range(settings.epochs):
        rng.shuffle(rows)
        for k in range(steps_per_epoch):
            loss = step_loss(model, rows[k * settings.batch_size : (k + 1) * settings.batch_size], settings, pad_id)
            norms.append(optimizer_step(model, optimizer, scheduler, settings))
            losses.append(loss)
            if progress:
                progress(len(losses), steps, loss)
    model.eval()
    metrics = {
        "train_loss_first": losses[0],
        "train_loss_last": losses[-1],
        "grad_norm_first": norms[0],  # before clipping
        "grad_norm_last": norms[-1],
        "steps": steps,
        "train_examples": len(rows),
        "heldout_examples": len(heldout),
        "heldout_loss_before": initial,
        "heldout_loss": heldout_loss(model, heldout, pad_id, settings.micro_batch),
        "seconds": time.perf_counter() - started,
        **{f"data_{k}": v for k, v in report.items()},
        **{f"heldout_data_{k}": v for k, v in heldout_report.items()},
        "effective": {
            "device": str(model.device),
            "dtype": str(dtype).removeprefix("torch."),
            "compute_dtype_4bit": str(dtype).removeprefix("torch.") if settings.quantize else None,
            "gradient_checkpointing": model.get_base_model().is_activation_checkpointing,
            "optimizer": optimizer_name,
        },
    }
    return model, metrics
