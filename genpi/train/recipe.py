"""Train one prompt's adapter: GenPI's joint loss and the paper's baselines, in one loop.

    train_adapter(base, entry, train_rows, heldout_rows, settings) -> (PeftModel, metrics)

Methods (`TrainSettings.method`):
- genpi:     L = (1 − λ)·L_SFT + λ·L_PG, or L_SFT + λ·L_PG with `loss_form="additive"` (SFT on the
             multi-turn dialogue without P; PG: x, y_s, y_t → P, r)
- sft:       L_SFT only
- pg:        L_PG only (the paper's "w/o L_SFT" ablation)
- prepend:   L_SFT, with P in front of a row's dialogue with probability `prepend_ratio`, drawn
             anew at every step (so every epoch)
- kld:       token KL(teacher || student) on the agent turns; the teacher is the same base with the
             adapter disabled and P present, the student has the adapter and no P
- seqkd:     sequence-level distillation (Kim & Rush): SFT on the teacher's generated agent turns, all of
             them, as the paper ran it with `full_finetune` (every weight, batch 64, lr 1e-5:
             genpi.train.full); `sft` is GenPI without L_PG, a LoRA adapter on the same dialogues
- seqkd+kld: seqkd's loss plus kld's
- topk-kl:   top-k context distillation: on every agent token, the student's (no P) cross-entropy
             against the teacher's (with P) top-k probabilities stored at synthesis
             (`teacher_topk`); hard labels where no top-k aligns (end-of-turn markers)
- genpi+topk-kl: topk-kl's loss in place of L_SFT, plus λ·L_PG
- onpolicy:  on-policy distillation (OPCD, GKD; `genpi.train.onpolicy`): the student (adapter on,
             no P) samples its first agent turn for each training input at temperature 1, through an
             engine whose copy of the adapter is refreshed every `refresh_steps` steps (the replies of
             those steps sampled in one batch); the loss is the per-token reverse KL(student || teacher) on those
             tokens, the teacher being the base with the adapter disabled and P in front
- genpi+onpolicy: onpolicy's loss in place of L_SFT, plus λ·L_PG
- icae:      the In-context Autoencoder baseline (genpi.train.icae): an encoder LoRA compresses P into
             `memory_tokens` slots that the frozen base reads in P's place; pretrained (autoencoding and
             language modelling) for `pretrain_steps` steps, then fine-tuned on the teacher's agent turns

`init_adapter` starts any method from a saved adapter's LoRA weights (e.g. onpolicy warm-started
from a genpi adapter); its rank, alpha and target modules must be the run's.

Degenerate teacher turns (loops, genpi.synth.quality.degenerate) are not trained on by default
(`skip_degenerate`): a row whose first agent turn loops is skipped, a later loop cuts the dialogue
before it; both counted in the build report, for train and held-out rows alike.

A step takes `batch_size` dialogue rows (gradient accumulation over micro-batches of
examples of similar length, padded, never packed); each loss term is a per-token mean
over the whole step, so accumulation gives the same gradient as one big batch.

Optimisation as in the authors' scripts: AdamW without weight decay (bitsandbytes' paged
32-bit AdamW on CUDA), a linear warmup over the first 3% of the steps then a cosine decay,
gradients clipped to norm 1.0. Every batch is made on the model's device (`collate`): a
model placed on one GPU by `device_map` gets no hooks that would move its inputs.

Over 400 lines on purpose: as in torchtune's recipes, one training flow is one readable file (settings, the
examples each method builds, the step's loss, the loop), read top to bottom; what stands alone already lives in
genpi.train.examples, losses, onpolicy and qlora.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time

import torch
import torch.nn.functional as F

from genpi.catalog import PromptEntry
from genpi.flags import setting
from genpi.synth.quality import first_degenerate_agent_turn
from genpi.train.examples import IGNORE, PG_VARIANTS, Example, align_topk, build_pg, build_sft, cut_to_labels
from genpi.train.full import NOT_FULL, load_full, load_trainable_state, rank_rows, trainable_state
from genpi.train.losses import (
    LOSS_FORMS,
    joint_loss,
    kld_loss,
    response_logits,
    response_targets,
    teacher_logits,
    token_loss,
    topk_loss,
)
from genpi.train.onpolicy import OnPolicySampler, adapter_files, reply_views, reverse_kl_sums, sample_seed, write_files
from genpi.train.precision import autocast_dtype, dtype_name, training_autocast
from genpi.train.qlora import LoraSettings, add_lora, default_dtype, load_base, load_lora_weights, save_adapter

METHODS = (
    "genpi",
    "sft",
    "pg",
    "prepend",
    "kld",
    "seqkd",
    "seqkd+kld",
    "topk-kl",
    "genpi+topk-kl",
    "onpolicy",
    "genpi+onpolicy",
    "icae",
)
JOINT_METHODS = ("genpi", "genpi+topk-kl", "genpi+onpolicy")  # L_SFT-like term + λ·L_PG: the methods that choose λ
_PG_METHODS = JOINT_METHODS + ("pg",)
_KLD_METHODS = ("kld", "seqkd+kld")
_TOPK_METHODS = ("topk-kl", "genpi+topk-kl")
ONPOLICY_METHODS = ("onpolicy", "genpi+onpolicy")
# what the on-policy methods count (metrics onpolicy_*): the sampler's, plus replies no example could be built from
ONPOLICY_COUNTS = (
    "refreshes",
    "requests",
    "reply_tokens",
    "replies_cut",
    "failed",
    "unusable",
    "refresh_seconds",
    "sample_seconds",
)
SCHEDULES = ("cosine", "constant")  # after a linear warmup
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    method: str = setting("genpi", f"one of {', '.join(METHODS)}")
    lam: float = setting(0.5, "λ, the prompt-generation weight of the joint methods")
    pg_variant: str = setting("full", "what prompt generation produces from what (ablations)", choices=PG_VARIANTS)
    epochs: int = setting(10, "passes over the train rows")
    lr: float = setting(1e-4, "peak learning rate")
    batch_size: int = setting(32, "dialogue rows per optimizer step")
    micro_batch: int = setting(2, "examples per forward pass (the reference: 2 x 16 accumulation)")
    max_length: int = setting(2048, "tokens per example at most")
    quantize: bool = setting(True, "plain LoRA on an unquantized base", flag="--no-4bit")
    gradient_checkpointing: bool | None = setting(
        None, "recompute activations: less memory, more compute (default: on with CUDA)"
    )
    lora: LoraSettings = dataclasses.field(default_factory=LoraSettings)  # flags --rank, --alpha (genpi.train.run)
    seed: int = setting(0, "the seed of the data order, dropout, LoRA initialisation and on-policy samples")
    # the reference's optimisation and precision (the authors' training scripts)
    loss_form: str = setting(
        "convex",
        "convex: (1-λ)·L_SFT + λ·L_PG (the authors' scripts); additive: L_SFT + λ·L_PG (the paper)",
        choices=LOSS_FORMS,
    )
    schedule: str = setting("cosine", "learning rate after the linear warmup", choices=SCHEDULES)
    warmup_ratio: float = setting(0.03, "share of the steps with a linear warmup from 0")
    max_grad_norm: float = setting(1.0, "gradient clipping (0: none; the reference: 1.0 for OS, 0.5 otherwise)")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    dtype: str = setting(
        "auto", "unquantized weights and 4-bit compute (auto: bfloat16 with CUDA, float32 on CPU)", choices=DTYPES
    )
    # baselines and ablations
    prepend_ratio: float = setting(0.5, "prepend: share of rows that carry P, redrawn every step")
    topk_k: int = setting(20, "topk-kl: teacher log-probabilities used per token (at most as many as stored)")
    max_turn_tokens: int = setting(
        512, "each agent turn (and y_s, y_t in PG) is cut to this many tokens, as in the reference"
    )
    # on-policy methods
    refresh_steps: int = setting(4, "onpolicy: refresh the sampler's adapter every N optimizer steps")
    onpolicy_max_tokens: int = setting(96, "onpolicy: token limit of each sampled reply")
    onpolicy_topk: int = setting(
        0, "onpolicy: reverse KL over the student's top-k tokens plus the rest as one (0: the whole vocabulary)"
    )
    init_adapter: str | None = setting(
        None,
        "start from this PEFT adapter's LoRA weights (same rank, alpha, targets), e.g. onpolicy from a genpi adapter",
        metavar="DIR",
    )
    skip_degenerate: bool = setting(
        True,
        "train on looping teacher turns too (default: skip a row whose first agent turn loops, cut a dialogue before a "
        "later one)",
        flag="--keep-degenerate",
    )
    memory_tokens: int = setting(128, "icae: memory slots k that P is compressed into (the paper: 128)")
    pretrain_steps: int = setting(
        100, "icae: autoencoding and language-modelling steps on P and the dialogues before fine-tuning"
    )
    full_finetune: bool = setting(
        False,
        "train every weight of the base (no LoRA, no quantization), as the paper's KLD/SeqKD baselines; the output "
        "is a model folder; kld, seqkd, seqkd+kld then default to batch 64, lr 1e-5, 10 epochs",
    )
    max_steps: int = setting(
        0,
        "stop after this many optimizer steps (0: the epochs decide); the learning-rate schedule spans them, so every "
        "method of a study gets the same budget",
    )

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}: expected one of {', '.join(METHODS)}")
        for name, value, allowed in (
            ("loss form", self.loss_form, LOSS_FORMS),
            ("schedule", self.schedule, SCHEDULES),
            ("dtype", self.dtype, DTYPES),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}: expected one of {', '.join(allowed)}")
        if not 0.0 <= self.warmup_ratio <= 1.0 or self.max_grad_norm < 0 or self.weight_decay < 0:
            raise ValueError(
                f"warmup_ratio must lie in [0, 1], max_grad_norm and weight_decay must be >= 0; "
                f"got {self.warmup_ratio}, {self.max_grad_norm}, {self.weight_decay}"
            )
        if self.pg_variant not in PG_VARIANTS:
            raise ValueError(f"unknown PG variant {self.pg_variant!r}: expected one of {', '.join(PG_VARIANTS)}")
        if not 0.0 <= self.prepend_ratio <= 1.0:
            raise ValueError(f"prepend_ratio must lie in [0, 1], got {self.prepend_ratio}")
        if self.topk_k < 1 or self.max_turn_tokens < 1:
            raise ValueError(
                f"topk_k and max_turn_tokens must be positive, got {self.topk_k} and {self.max_turn_tokens}"
            )
        if self.memory_tokens < 1 or self.pretrain_steps < 0:
            raise ValueError(
                f"memory_tokens must be at least 1 and pretrain_steps 0 or more (icae), "
                f"got {self.memory_tokens} and {self.pretrain_steps}"
            )
        if self.full_finetune and (self.method in NOT_FULL or self.init_adapter):
            raise ValueError(
                f"full_finetune: not with {'--init-adapter' if self.init_adapter else 'method ' + self.method} "
                "(the on-policy methods sample through an engine that reloads a LoRA adapter, not a whole model)"
            )
        if self.max_steps < 0:
            raise ValueError(f"max_steps must be 0 (the epochs decide) or positive, got {self.max_steps}")
        if self.refresh_steps < 1 or self.onpolicy_max_tokens < 1 or self.onpolicy_topk < 0:
            raise ValueError(
                f"refresh_steps and onpolicy_max_tokens must be positive and onpolicy_topk 0 or more, "
                f"got {self.refresh_steps}, {self.onpolicy_max_tokens} and {self.onpolicy_topk}"
            )


@dataclasses.dataclass
class RowExamples:
    """What one dialogue row trains, per method: the student's dialogue (no P), a PG example,
    the teacher's view of the same agent tokens (kld), the dialogue with P in front (prepend), and
    the input x (on-policy methods sample the student's reply to it at every step)."""

    student: Example | None = None
    pg: Example | None = None
    teacher: Example | None = None
    with_p: Example | None = None
    input: str = ""


def without_degenerate_turns(row: dict) -> dict | None:
    """The row without its looping teacher turns: None when the first agent turn loops (nothing to learn
    from it, not even its PG example, whose TO-BE is that turn); cut before a later looping agent turn
    (the row keeps its earlier turns, and their per-turn fields); the row itself when none loops."""
    at = first_degenerate_agent_turn(row.get("turns") or [])
    if at is None:
        return row
    kept = row["turns"][:at]
    if not any(t["role"] == "assistant" for t in kept):
        return None
    agents = sum(t["role"] == "assistant" for t in kept)
    cut = {"turns": kept}
    if row.get("turn_cut") is not None:
        cut["turn_cut"] = row["turn_cut"][:at]
    if row.get("teacher_topk") is not None:  # one per agent turn
        cut["teacher_topk"] = row["teacher_topk"][:agents]
    return {**row, **cut}


def build_examples(
    rows: list[dict], entry: PromptEntry, tokenizer, settings: TrainSettings
) -> tuple[list[RowExamples], dict]:
    """Examples for every usable row, and counts of what was cut or skipped (never silently).

    With `skip_degenerate`, `degenerate_rows_skipped` counts the rows whose first agent turn loops (not
    trained on) and `degenerate_turns_cut` the rows cut before a later looping agent turn."""
    prompt, method, cap = entry.messages(), settings.method, settings.max_turn_tokens
    out = []
    report = {"rows": len(rows), "skipped": 0, "skip_reasons": {}, "truncated_examples": 0, "truncated_tokens": 0}
    if settings.skip_degenerate:
        report["degenerate_rows_skipped"] = report["degenerate_turns_cut"] = 0
        kept = []
        for row in rows:
            clean = without_degenerate_turns(row)
            if clean is None:
                report["degenerate_rows_skipped"] += 1
                continue
            report["degenerate_turns_cut"] += clean is not row
            kept.append(clean)
        rows = kept
    if method in _TOPK_METHODS:
        report["topk_unaligned_turns"] = 0
        if not any(row.get("teacher_topk") for row in rows):
            raise ValueError(
                f"method {method}: no row has the teacher's top-k log-probabilities; synthesize with --teacher-topk K"
            )
    for row in rows:
        try:
            made = RowExamples(input=row.get("input") or "")
            if method in ONPOLICY_METHODS and not made.input.strip():
                raise ValueError("on-policy example: the row has no input")
            if method not in ("pg", *ONPOLICY_METHODS):  # on-policy methods train on the student's own replies
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
    logprobs = (
        torch.cat([F.pad(t, (0, k - t.size(1)), value=-math.inf) for t in logprobs]) if logprobs else torch.zeros(0, k)
    )
    return torch.tensor(index, dtype=torch.long, device=device), ids.to(device), logprobs.to(device)


def step_loss(
    model,
    step: list[RowExamples],
    settings: TrainSettings,
    pad_id: int,
    onpolicy: list[tuple[Example, Example]] | None = None,
    terms: dict | None = None,
) -> float:
    """Forward and backward over one optimizer step's rows; returns the step's loss.

    `onpolicy` (the on-policy methods): the (student, teacher) views of the replies the student sampled
    for this step's inputs (`genpi.train.onpolicy.reply_views`); their reverse KL takes L_SFT's place.
    `terms`, a dict, gets the step's loss terms unweighted (tracked): `loss_sft`, the L_SFT-like term (the
    method's own loss: KL for kld, reverse KL for the on-policy methods ...), and `loss_pg`, L_PG, where there are.
    Every tensor is made on the device the collated batches are on; nothing is moved here.
    """
    method = settings.method
    batch = lambda examples: collate(examples, pad_id, model.device)  # noqa: E731
    students, pgs = draw_students(step, settings), [r.pg for r in step if r.pg is not None]
    if method in ONPOLICY_METHODS:
        students = [s for s, _ in onpolicy or ()]
    n_student, n_pg = predicted_tokens(students), predicted_tokens(pgs)
    # λ weighs L_PG only in the joint methods; alone, each term keeps weight 1 in either loss form
    lam = settings.lam if method in JOINT_METHODS else float(method == "pg")
    total, sums = 0.0, {}

    def backward(sft=None, pg=None):
        nonlocal total
        loss = joint_loss(sft, pg, lam, sft_tokens=n_student, pg_tokens=n_pg, form=settings.loss_form)
        loss.backward()
        total += loss.item()
        for name, term in (("loss_sft", sft), ("loss_pg", pg)):
            if term is not None:
                sums[name] = sums.get(name, 0.0) + float(term[0])

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
    elif method in ONPOLICY_METHODS:
        for loss_sum, n in reverse_kl_sums(model, onpolicy or [], batch, settings.micro_batch, settings.onpolicy_topk):
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
    if terms is not None:  # each term's mean per token of the whole step, as joint_loss weighs it
        terms.update({name: value / max(n_student if name == "loss_sft" else n_pg, 1) for name, value in sums.items()})
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


HELDOUT_TEACHER_BYTES = 1 << 30  # held-out teacher logits kept in host memory up to this size (heldout_kl)


def heldout_teacher_cache(model, pairs: list[RowExamples]) -> list | None:
    """An empty list for heldout_kl to keep the teacher's held-out logits in, or None when they would take more
    than HELDOUT_TEACHER_BYTES (float32 over the vocabulary at every held-out agent token): the teacher (the base
    with P, adapter off) does not train, so one pass serves every epoch's held-out KL."""
    vocab = model.get_base_model().config.vocab_size
    return [] if sum(r.teacher.loss_token_count for r in pairs) * vocab * 4 <= HELDOUT_TEACHER_BYTES else None


@torch.no_grad()
def heldout_kl(
    model, pairs: list[RowExamples], pad_id: int, micro_batch: int, teacher: list | None = None
) -> float | None:
    """Mean KL(teacher with P ‖ adapter without P) per agent token on held-out dialogues: what internalization
    is for, and how a λ sweep picks its λ. The teacher is the same base with the adapter disabled and P in
    front (`kld`'s views: `pairs` from build_examples with method "kld"). Eval mode without gradients, as
    heldout_loss: a 4-bit model built by add_lora keeps its differentiable layout through it.

    `teacher` (heldout_teacher_cache): empty, it gets the teacher's logits of each micro-batch (on the CPU); filled,
    they are read from it instead of computed again."""
    if not pairs:
        return None
    training, kl_sum, n = model.training, 0.0, 0
    model.eval()
    try:
        ordered = sorted(pairs, key=lambda r: len(r.teacher.input_ids))
        for j, i in enumerate(range(0, len(ordered), micro_batch)):
            chunk = ordered[i : i + micro_batch]
            student = response_logits(model, collate([r.student for r in chunk], pad_id, model.device))
            if teacher is None or j == len(teacher):
                logits = teacher_logits(model, collate([r.teacher for r in chunk], pad_id, model.device))
                if teacher is not None:
                    teacher.append(logits.cpu())
            else:
                logits = teacher[j].to(student.device)
            kl_sum, n = kl_sum + float(kld_loss(student, logits)) * student.size(0), n + student.size(0)
    finally:
        model.train(training)
    return kl_sum / max(n, 1)


def make_optimizer(model, settings: TrainSettings, steps: int):
    """(optimizer, scheduler, optimizer name): AdamW, paged 32-bit (bitsandbytes) when the LoRA
    weights are on CUDA, as the reference; a linear warmup over ceil(warmup_ratio · steps)
    steps (as transformers' Trainer counts them), then a cosine decay to 0 or a constant lr."""
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    if (
        params[0].is_cuda and not settings.full_finetune
    ):  # paged: optimizer state spills to host memory under memory pressure
        import bitsandbytes as bnb

        optimizer, name = (
            bnb.optim.PagedAdamW32bit(params, lr=settings.lr, weight_decay=settings.weight_decay),
            "paged_adamw_32bit",
        )
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
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # sharded (FSDP) parameters: a DTensor
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


def train_adapter(
    base: str,
    entry: PromptEntry,
    train_rows: list[dict],
    heldout_rows: list[dict],
    settings: TrainSettings,
    report=None,
    checkpoint_steps: int = 0,
    resume: dict | None = None,
    engine=None,
):
    """Fit one adapter; returns (PeftModel, metrics).

    `report(metrics, state)` is called after every optimizer step with the step, the step count, the
    loss (and its terms, `step_loss`), the learning rate the step took, the gradient norm before clipping and
    the epochs done; at the end of every epoch (and every `checkpoint_steps` steps) `state()`
    returns all a resumed run needs to continue exactly: the LoRA weights, the optimizer and scheduler
    state, the random generators and the epoch's data order (elsewhere `state` is None), and the
    epoch-end metrics add the held-out loss and the held-out teacher KL (heldout_kl). `resume`, such a state,
    continues from it: the same steps on the same rows as an uninterrupted run. `metrics["effective"]` holds
    what "auto" settings became on this machine.

    The on-policy methods sample through `engine` (`genpi.train.onpolicy.OnPolicySampler`: an engine that loads
    LoRA adapters, e.g. vLLM's with LoRA on a GPU cluster); by default a transformers engine on the same base
    folder, in this process, on the model's device (float32 on CPU). Their metrics `onpolicy_*` count the
    refreshes, requests, reply tokens, replies cut by the token limit, failed or unusable replies, and the time
    spent refreshing and sampling.
    """
    from transformers import AutoTokenizer

    rng = random.Random(settings.seed)
    torch.manual_seed(settings.seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows, report_data = build_examples(train_rows, entry, tokenizer, settings)
    if not rows:
        degenerate = (
            f", {report_data['degenerate_rows_skipped']} looping" if report_data.get("degenerate_rows_skipped") else ""
        )
        raise ValueError(
            f"prompt {entry.id!r}: no usable train rows "
            f"({report_data['rows']} rows, {report_data['skipped']} skipped{degenerate})"
        )
    # held-out rows are cut and counted as train rows are (SFT view, no P); one too long never fails the trial
    held, heldout_report = build_examples(heldout_rows, entry, tokenizer, dataclasses.replace(settings, method="sft"))
    heldout = [r.student for r in held]
    # and as kld's pairs (teacher with P, student without) for the held-out teacher KL
    pairs, _ = build_examples(heldout_rows, entry, tokenizer, dataclasses.replace(settings, method="kld"))
    dtype = default_dtype() if settings.dtype == "auto" else getattr(torch, settings.dtype)
    checkpointing = (
        torch.cuda.is_available() if settings.gradient_checkpointing is None else settings.gradient_checkpointing
    )
    if settings.full_finetune:  # every weight, beside a frozen copy as the teacher (genpi.train.full)
        model = load_full(base, dtype, checkpointing)
    else:
        model = add_lora(
            load_base(base, quantize=settings.quantize, dtype=dtype),
            settings.lora,
            gradient_checkpointing=checkpointing,
        )
    if settings.init_adapter and resume is None:  # a resumed run's weights come from its state
        load_lora_weights(model, settings.init_adapter)
    autocast = autocast_dtype(model.device.type, dtype)  # bfloat16 on CUDA (genpi.train.precision), else None
    steps_per_epoch = math.ceil(len(rows) / settings.batch_size)
    steps = (
        settings.max_steps or steps_per_epoch * settings.epochs
    )  # a step budget may end within an epoch, or span several
    optimizer, scheduler, optimizer_name = make_optimizer(model, settings, steps)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    # Also on resume: a 4-bit model's first inference pass changes how bitsandbytes computes later ones (measured on
    # CPU), so a resumed run matches an uninterrupted one bit for bit only if it makes that pass too.
    before = heldout_loss(model, heldout, pad_id, settings.micro_batch)
    held_teacher = heldout_teacher_cache(model, pairs)
    # the adapter starts as the identity: the base's KL
    kl_before = heldout_kl(model, pairs, pad_id, settings.micro_batch, held_teacher)
    if resume is None:
        run = {
            "epoch": 0,
            "step_in_epoch": 0,
            "order": None,
            "losses": [],
            "norms": [],
            "heldout_losses": [],
            "seconds": 0.0,
            "heldout_loss_before": before,
            "heldout_kls": [],
            "heldout_kl_before": kl_before,
        }
        if settings.method in ONPOLICY_METHODS:  # counts, and the files of the adapter the sampler has (for a resume)
            run["onpolicy"] = dict.fromkeys(ONPOLICY_COUNTS, 0)
            run["onpolicy_adapter"] = None
            run["onpolicy_pending"] = {}  # step -> [(input, sampled reply or None when it failed)], sampled ahead
    else:
        run = {
            k: v
            for k, v in resume.items()
            if k not in ("lora", "optimizer", "scheduler", "rng", "torch_rng", "cuda_rng")
        }
        run.setdefault("heldout_kls", [None] * len(run["heldout_losses"]))  # a checkpoint from before the held-out KL
        run.setdefault("heldout_kl_before", kl_before)
        load_trainable_state(model, optimizer, trainable, resume)
        scheduler.load_state_dict(resume["scheduler"])
        rng.setstate(resume["rng"])
        torch.set_rng_state(resume["torch_rng"])
        if resume["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(resume["cuda_rng"])

    def state() -> dict:
        return {
            **run,
            **trainable_state(model, optimizer, trainable),  # "lora": the trained weights (all, full_finetune)
            "scheduler": scheduler.state_dict(),
            "rng": rng.getstate(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }

    sampler, own_engine = None, engine is None
    if settings.method in ONPOLICY_METHODS:
        if own_engine:
            from genpi.engines.hf import TransformersEngine

            engine_dtype = "float32" if model.device.type == "cpu" else str(dtype).removeprefix("torch.")
            engine = TransformersEngine(
                base,
                max_batch=settings.batch_size * settings.refresh_steps,
                dtype=engine_dtype,
                device=str(model.device),
                threads=torch.get_num_threads(),
            )
        sampler = OnPolicySampler(engine, settings.onpolicy_max_tokens)

    def sample_replies(epoch_rows: list[RowExamples], k: int) -> list[tuple[Example, Example]]:
        """The student's replies to the inputs of step k of this epoch, as (student, teacher) views.

        At a step with none pending, the sampler samples the replies of every step up to the next refresh (or the
        epoch's or the run's end) in one batch, each request with its own seed: batched, as an engine serves best.
        Its adapter is refreshed from the live model at every multiple of `refresh_steps` (restored as it was
        after a resume). The pending replies live in the run's state, so a resumed run trains on the same ones."""
        step, size, pending, counts = len(run["losses"]), settings.batch_size, run["onpolicy_pending"], run["onpolicy"]
        if step not in pending:
            before = sampler.stats()
            if step % settings.refresh_steps == 0:
                run["onpolicy_adapter"] = adapter_files(sampler.refresh(lambda folder: save_adapter(model, folder)))
            elif sampler.adapter is None:  # resumed between two refreshes, with no reply pending
                sampler.refresh(write_files(run["onpolicy_adapter"]))
                counts["refreshes"] -= 1  # the same adapter again: not a refresh of the run
            ahead = min(settings.refresh_steps - step % settings.refresh_steps, steps_per_epoch - k, steps - step)
            asked = [
                (step + j, i, r.input)
                for j in range(ahead)
                for i, r in enumerate(epoch_rows[(k + j) * size : (k + j + 1) * size])
            ]
            completions = sampler.sample(
                [x for _, _, x in asked], [sample_seed(settings.seed, s, i) for s, i, _ in asked]
            )
            for (s, _, x), completion in zip(asked, completions):
                pending.setdefault(s, []).append((x, completion.text if completion.error is None else None))
            for name, value in sampler.stats().items():
                counts[name] += value - before[name]
        pairs = []
        for x, reply in pending.pop(step):
            try:
                if reply is not None:
                    pairs.append(reply_views(entry, x, reply, tokenizer, settings.max_length, settings.max_turn_tokens))
            except ValueError:
                counts["unusable"] += 1
        return pairs

    started = time.perf_counter() - run["seconds"]
    try:
        while len(run["losses"]) < steps:
            if run["order"] is None:  # a new epoch: its order is drawn once and kept in checkpoints
                run["order"] = list(range(len(rows)))
                rng.shuffle(run["order"])
            epoch_rows, epoch = [rows[i] for i in run["order"]], run["epoch"]
            while run["epoch"] == epoch:
                k = run["step_in_epoch"]
                step_rows = epoch_rows[k * settings.batch_size : (k + 1) * settings.batch_size]
                step_rows = rank_rows(step_rows, settings.micro_batch)  # FSDP: this rank's share
                replies = sample_replies(epoch_rows, k) if sampler else None
                terms, lr = {}, scheduler.get_last_lr()[0]  # the learning rate this step takes
                with training_autocast(model.device.type, autocast):
                    loss = step_loss(model, step_rows, settings, pad_id, replies, terms)
                run["norms"].append(optimizer_step(model, optimizer, scheduler, settings))
                run["losses"].append(loss)
                run["step_in_epoch"] += 1
                step = len(run["losses"])
                metrics = {
                    "step": step,
                    "steps": steps,
                    "loss": loss,
                    **terms,
                    "lr": lr,
                    "grad_norm": run["norms"][-1],  # before clipping
                    "epoch": run["epoch"] + run["step_in_epoch"] / steps_per_epoch,
                }
                if (
                    run["step_in_epoch"] == steps_per_epoch or step == steps
                ):  # the epoch (or the run) is done: held-out figures, a checkpoint
                    run["epoch"], run["step_in_epoch"], run["order"] = run["epoch"] + 1, 0, None
                    run["heldout_losses"].append(heldout_loss(model, heldout, pad_id, settings.micro_batch))
                    run["heldout_kls"].append(heldout_kl(model, pairs, pad_id, settings.micro_batch, held_teacher))
                    metrics.update(
                        epoch=run["epoch"], heldout_loss=run["heldout_losses"][-1], heldout_kl=run["heldout_kls"][-1]
                    )
                run["seconds"] = time.perf_counter() - started
                checkpoint = run["step_in_epoch"] == 0 or (checkpoint_steps and step % checkpoint_steps == 0)
                if report:
                    report(metrics, state if checkpoint else None)
    finally:
        if sampler is not None:
            sampler.close()
            if own_engine:
                engine.close()
    model.eval()
    metrics = {
        "train_loss_first": run["losses"][0],
        "train_loss_last": run["losses"][-1],
        "train_losses": run["losses"],  # per step: the training curve
        "grad_norm_first": run["norms"][0],  # before clipping
        "grad_norm_last": run["norms"][-1],
        "steps": steps,
        "train_examples": len(rows),
        "heldout_examples": len(heldout),
        "heldout_loss_before": run["heldout_loss_before"],
        "heldout_loss": run["heldout_losses"][-1],
        "heldout_loss_per_epoch": run["heldout_losses"],
        "heldout_kl_examples": len(pairs),
        "heldout_kl_before": run["heldout_kl_before"],  # KL(teacher with P ‖ base without P): the gap to close
        "heldout_kl": run["heldout_kls"][-1],
        "heldout_kl_per_epoch": run["heldout_kls"],
        "seconds": time.perf_counter() - started,
        **{f"data_{k}": v for k, v in report_data.items()},
        **{f"heldout_data_{k}": v for k, v in heldout_report.items()},
        **{f"onpolicy_{k}": v for k, v in run.get("onpolicy", {}).items()},
        "effective": {
            "device": str(model.device),
            "dtype": str(dtype).removeprefix("torch."),
            "compute_dtype_4bit": str(dtype).removeprefix("torch.")
            if settings.quantize and not settings.full_finetune
            else None,
            "gradient_checkpointing": model.get_base_model().is_activation_checkpointing,
            "autocast": dtype_name(autocast),  # what the training steps' forward passes autocast to
            "optimizer": optimizer_name,
        },
    }
    return model, metrics
