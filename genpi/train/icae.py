"""ICAE, the In-context Autoencoder baseline (Ge et al., ICLR 2024): `genpi train --method icae`.

    train_icae(base, entry, train_rows, heldout_rows, settings, report, checkpoint_steps, resume) -> (Icae, metrics)

An encoder (the base + LoRA) reads P's tokens (P's messages as the chat template renders them, what the teacher
reads) followed by k learnable memory tokens (`TrainSettings.memory_tokens`, 128 as in the paper); its last hidden
states at those k positions are P's k memory slots. The decoder is the base alone, frozen (LoRA disabled): its input
embeddings are [slots; the conversation's tokens without P], the slots standing where the teacher has P, at
positions 0..k-1. Trained in two phases, with one optimizer and one schedule over both:

1. pretraining (`pretrain_steps` steps), on the project's own texts (P, in every step, and the train dialogues
   rendered by the chat template): autoencoding, [slots(c); [AE]] -> c's tokens, plus language modelling,
   [slots(c[:s])] -> c[s:] for a split s drawn per step; each term a per-token mean, weighted 1/2 each (the paper
   mixes the two about evenly);
2. fine-tuning (`epochs` over the train rows, or `max_steps` steps): [slots(P); the dialogue without P] -> the
   teacher's agent turns (L_SFT's labels), as the paper fine-tuned ICAE on AgentBench's dialogues.

Trained: the encoder's LoRA, the k memory-token embeddings and the [AE] embedding (float32 parameters, cast to the
embeddings' dtype where they enter the model). Gradients reach the encoder through the frozen decoder.

The adapter folder (`Icae.save`), beside genpi.json (method "icae"):

    encoder/            the encoder's LoRA (PEFT files): in a subfolder, so that nothing loads it as a LoRA of the
                        decoder; `genpi serve` refuses an ICAE folder
    icae.safetensors    `memory` [k, hidden] and `ae` [1, hidden]
    slots.safetensors   {prompt sha256: slots [k, hidden]} (float32): P's slots, computed once (at the end of
                        training) and read by the evaluations (`prompt_slots`), which compute and add them when missing

The held-out figures are those of every method: the decoder's NLL of the held-out agent tokens given the slots, and
KL(teacher with P || decoder with the slots) on them (what write_best and the evaluations compare).

Over 400 lines on purpose: one method whose encoder, two training phases, checkpoints and slot cache share
its model and state, read as one flow like genpi.train.recipe.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from genpi.catalog import PromptEntry
from genpi.train.examples import IGNORE, Example
from genpi.train.losses import kld_loss, prediction_mask, response_targets, teacher_logits
from genpi.train.qlora import add_lora, default_dtype, load_base, save_adapter

ENCODER = "encoder"  # the encoder's LoRA, a subfolder of the adapter folder
ICAE_FILE = "icae.safetensors"  # memory [k, hidden], ae [1, hidden]
SLOTS_FILE = "slots.safetensors"  # {prompt sha256: slots [k, hidden]}
PRETRAIN_AE_WEIGHT = 0.5  # pretraining's loss: 0.5 · L_AE + 0.5 · L_LM


class Icae(torch.nn.Module):
    """The encoder and decoder on one PeftModel (the adapter on: encoder; off: decoder), the memory-token
    embeddings [k, hidden] and the [AE] embedding [1, hidden]."""

    def __init__(self, model, memory: torch.Tensor, ae: torch.Tensor):
        super().__init__()
        self.model = model
        self.memory = torch.nn.Parameter(memory.float())
        self.ae = torch.nn.Parameter(ae.float())
        self.prompts: dict[str, list[int]] = {}  # {sha256: P's ids}: the prompts whose slots `save` caches

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def k(self) -> int:
        return self.memory.shape[0]

    def encode(self, contexts: list[list[int]]) -> torch.Tensor:
        """[B, k, hidden] memory slots of each context (token ids): the encoder's last hidden states at the k
        memory tokens that follow it. Right-padded after the memory tokens (every row's positions from 0)."""
        embed, k = self.model.get_input_embeddings(), self.k
        width = max(len(c) for c in contexts) + k
        rows, mask = [], []
        for ids in contexts:
            tokens = embed(torch.tensor(ids, dtype=torch.long, device=self.device))
            row = torch.cat([tokens, self.memory.to(tokens.dtype)])
            rows.append(F.pad(row, (0, 0, 0, width - row.shape[0])))
            mask.append([1] * row.shape[0] + [0] * (width - row.shape[0]))
        body = self.model.get_base_model().get_decoder()
        hidden = body(
            inputs_embeds=torch.stack(rows),
            attention_mask=torch.tensor(mask, device=self.device),
            use_cache=False,
        ).last_hidden_state
        return torch.stack([hidden[b, len(c) : len(c) + k] for b, c in enumerate(contexts)])

    def save(self, folder: str | Path, prompts: dict[str, list[int]] | None = None) -> Path:
        """Write the encoder LoRA, the memory and AE embeddings and the slots of `prompts` ({sha256: P's ids};
        default: the prompt it was trained for)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_adapter(self.model, folder / ENCODER)
        tensors = {"memory": self.memory, "ae": self.ae}
        save_file({n: t.detach().float().cpu().contiguous() for n, t in tensors.items()}, str(folder / ICAE_FILE))
        for sha, ids in (self.prompts if prompts is None else prompts).items():
            write_slots(folder, sha, self.slots(ids))
        return folder

    @torch.no_grad()
    def slots(self, prompt_ids: list[int]) -> torch.Tensor:
        """[k, hidden] float32 slots of one prompt, in eval mode (no dropout)."""
        training = self.training
        self.eval()
        try:
            return self.encode([prompt_ids])[0].float()
        finally:
            self.train(training)


def prompt_ids(tokenizer, entry: PromptEntry) -> list[int]:
    """P's tokens as the teacher reads them: its messages through the chat template, no generation prompt."""
    text = tokenizer.apply_chat_template(entry.messages(), tokenize=False, add_generation_prompt=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------ the decoder with slots in P's place


def slot_inputs(model, slots: torch.Tensor, batch: dict) -> dict:
    """The decoder's inputs for a collated batch with `slots` ([k, hidden] or [B, k, hidden]) in front of every row:
    input embeddings [slots; the tokens' embeddings], its attention mask and labels (the slots carry none). The
    slots are cast to the embeddings' device and dtype here, so a caller's float32 CPU slots fit any model."""
    embeds = model.get_input_embeddings()(batch["input_ids"])
    slots = slots.to(device=embeds.device, dtype=embeds.dtype)
    if slots.dim() == 2:
        slots = slots[None]
    slots = slots.expand(embeds.shape[0], -1, -1)
    k, rows = slots.shape[1], embeds.shape[0]
    mask = batch.get("attention_mask")
    if mask is None:
        mask = torch.ones(batch["input_ids"].shape, dtype=torch.long, device=embeds.device)
    return {
        "inputs_embeds": torch.cat([slots, embeds], 1),
        "attention_mask": torch.cat([mask.new_ones(rows, k), mask], 1),
        "labels": torch.cat([batch["labels"].new_full((rows, k), IGNORE), batch["labels"]], 1),
    }


def slot_response_logits(model, batch: dict, slots: torch.Tensor, labels: bool = False):
    """[N, V] the decoder's logits at the prediction positions of `batch` with the slots in front of every row; the
    decoder is the base: any LoRA adapter disabled. The same logits, order and targets as `response_logits` where
    a row's first token carries no label (a chat-rendered dialogue); else the last slot predicts that token too:
    `labels` returns ([N, V] logits, [N] their targets) for that case."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    with model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext():
        inputs = slot_inputs(model, slots, batch)
        out = base.get_decoder()(
            inputs_embeds=inputs["inputs_embeds"], attention_mask=inputs["attention_mask"], use_cache=False
        )
    logits = base.get_output_embeddings()(out.last_hidden_state[prediction_mask(inputs["labels"])])
    return (logits, response_targets(inputs)) if labels else logits


def slot_loss(model, batch: dict, slots: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy of the labelled tokens given the slots, their number)."""
    logits, targets = slot_response_logits(model, batch, slots, labels=True)
    return F.cross_entropy(logits.float(), targets, reduction="sum"), targets.numel()


# ------------------------------------------------------------------ the slots cache of an adapter folder


def read_slots(folder: str | Path, sha256: str) -> torch.Tensor | None:
    from safetensors import safe_open

    path = Path(folder) / SLOTS_FILE
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        return f.get_tensor(sha256) if sha256 in f.keys() else None


def write_slots(folder: str | Path, sha256: str, slots: torch.Tensor) -> None:
    """Add a prompt's slots to the folder's cache (replaced whole, never half-written)."""
    from safetensors.torch import load_file, save_file

    path = Path(folder) / SLOTS_FILE
    cached = load_file(str(path)) if path.is_file() else {}
    cached[sha256] = slots.detach().float().cpu().contiguous()
    tmp = path.with_name(f".{SLOTS_FILE}.{os.getpid()}.tmp")
    save_file(cached, str(tmp))
    os.replace(tmp, path)


def load_icae(base_path: str | Path, folder: str | Path, dtype: torch.dtype | None = None) -> Icae:
    """The trained ICAE of an adapter folder on the unquantized base (eval mode, frozen)."""
    from peft import PeftModel
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / ENCODER / "adapter_config.json").is_file() or not (folder / ICAE_FILE).is_file():
        raise ValueError(f"{folder}: not an ICAE adapter folder ({ENCODER}/ and {ICAE_FILE})")
    model = PeftModel.from_pretrained(load_base(base_path, quantize=False, dtype=dtype), str(folder / ENCODER))
    saved = load_file(str(folder / ICAE_FILE))
    icae = Icae(model, saved["memory"].to(model.device), saved["ae"].to(model.device))
    icae.requires_grad_(False)
    return icae.eval()


def prompt_slots(folder: str | Path, entry: PromptEntry, base_path: str | Path) -> torch.Tensor:
    """[k, hidden] float32 slots of the prompt `entry` from the folder's cache; computed with the folder's encoder
    and cached when missing (the base loads then, float32 on CPU)."""
    from transformers import AutoTokenizer

    cached = read_slots(folder, entry.sha256)
    if cached is not None:
        return cached
    icae = load_icae(base_path, folder, dtype=default_dtype())
    slots = icae.slots(prompt_ids(AutoTokenizer.from_pretrained(str(base_path)), entry))
    write_slots(folder, entry.sha256, slots)
    return slots


# ------------------------------------------------------------------ training


def pretrain_contexts(entry: PromptEntry, rows: list[dict], tokenizer, max_length: int) -> list[list[int]]:
    """The texts pretraining autoencodes and continues: P first (whole), then each train dialogue (its input and
    turns through the chat template), cut to `max_length` tokens; texts of fewer than 2 tokens left out."""
    texts = [prompt_ids(tokenizer, entry)]
    for row in rows:
        messages = [{"role": "user", "content": row["input"]}] + [
            {"role": t["role"], "content": t["content"]} for t in row["turns"]
        ]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        texts.append(tokenizer(text, add_special_tokens=False)["input_ids"][:max_length])
    return [t for t in texts if len(t) >= 2]


def pretrain_batch(contexts: list[list[int]], size: int, rng: random.Random) -> list[tuple[list[int], int]]:
    """One pretraining step's (context, LM split) pairs: P always, then contexts drawn from all of them."""
    chosen = [contexts[0]] + [rng.choice(contexts) for _ in range(max(0, size - 1))]
    return [(c, rng.randint(max(1, len(c) // 4), max(1, 3 * len(c) // 4))) for c in chosen]


def _example(ids: list[int]) -> Example:
    return Example(list(ids), list(ids))


def pretrain_step_loss(icae: Icae, step: list[tuple[list[int], int]], micro_batch: int, pad_id: int) -> float:
    """Forward and backward of one pretraining step: 0.5 · AE + 0.5 · LM, each a per-token mean over the step."""
    from genpi.train.recipe import collate

    n_ae = sum(len(c) for c, _ in step)
    n_lm = sum(len(c) - s for c, s in step)
    total = 0.0
    for i in range(0, len(step), micro_batch):
        chunk = step[i : i + micro_batch]
        # AE: [slots(c); AE] -> c, the [AE] embedding appended as one more slot; LM: [slots(c[:s])] -> c[s:]
        slots = icae.encode([c for c, _ in chunk])
        with_ae = torch.cat([slots, icae.ae[None].to(slots.dtype).expand(len(chunk), -1, -1)], 1)
        ae_sum, _ = slot_loss(icae.model, collate([_example(c) for c, _ in chunk], pad_id, icae.device), with_ae)
        prefixes = icae.encode([c[:s] for c, s in chunk])
        lm_sum, _ = slot_loss(icae.model, collate([_example(c[s:]) for c, s in chunk], pad_id, icae.device), prefixes)
        loss = PRETRAIN_AE_WEIGHT * ae_sum / n_ae + (1 - PRETRAIN_AE_WEIGHT) * lm_sum / n_lm
        loss.backward()
        total += loss.item()
    return total


def finetune_step_loss(icae: Icae, p_ids: list[int], step: list[Example], micro_batch: int, pad_id: int) -> float:
    """Forward and backward of one fine-tuning step: the teacher's agent tokens given P's slots, a per-token mean
    over the step (P encoded anew for every micro-batch: its gradient reaches the encoder)."""
    from genpi.train.recipe import collate, micro_batches

    n = sum(e.loss_token_count for e in step)
    total = 0.0
    for chunk in micro_batches(step, micro_batch):
        loss_sum, _ = slot_loss(icae.model, collate(chunk, pad_id, icae.device), icae.encode([p_ids])[0])
        loss = loss_sum / max(n, 1)
        loss.backward()
        total += loss.item()
    return total


@torch.no_grad()
def heldout_figures(icae: Icae, p_ids, examples, pairs, pad_id: int, micro_batch: int) -> tuple[float | None, ...]:
    """(mean NLL of the held-out agent tokens given P's slots, mean KL(teacher with P || decoder with the slots)
    on them), in eval mode; None where there are no rows."""
    from genpi.train.recipe import collate, micro_batches

    training = icae.training
    icae.eval()
    try:
        slots = icae.encode([p_ids])[0]
        loss = kl = None
        if examples:
            loss_sum, n = 0.0, 0
            for chunk in micro_batches(examples, micro_batch):
                s, k = slot_loss(icae.model, collate(chunk, pad_id, icae.device), slots)
                loss_sum, n = loss_sum + float(s), n + k
            loss = loss_sum / max(n, 1)
        if pairs:
            kl_sum, n = 0.0, 0
            ordered = sorted(pairs, key=lambda r: len(r.teacher.input_ids))
            for i in range(0, len(ordered), micro_batch):
                chunk = ordered[i : i + micro_batch]
                student = slot_response_logits(
                    icae.model, collate([r.student for r in chunk], pad_id, icae.device), slots
                )
                teacher = teacher_logits(icae.model, collate([r.teacher for r in chunk], pad_id, icae.device))
                kl_sum, n = kl_sum + float(kld_loss(student, teacher)) * student.size(0), n + student.size(0)
            kl = kl_sum / max(n, 1)
        return loss, kl
    finally:
        icae.train(training)


def init_embeddings(model, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Memory and AE embeddings started as copies of k + 1 random vocabulary embeddings: the scale of real
    inputs, different from each other."""
    weight = model.get_input_embeddings().weight
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, weight.shape[0], (k + 1,), generator=generator).to(weight.device)
    rows = weight.detach()[ids].float().clone()
    return rows[:k], rows[k:]


def train_icae(
    base: str,
    entry: PromptEntry,
    train_rows: list[dict],
    heldout_rows: list[dict],
    settings,
    report=None,
    checkpoint_steps: int = 0,
    resume: dict | None = None,
):
    """Fit one prompt's ICAE; returns (Icae, metrics), as `genpi.train.recipe.train_adapter` returns its model
    and metrics (the same keys). `report(metrics, state)`: after every step, with `state` at the end of
    pretraining, of every fine-tuning epoch and every `checkpoint_steps` steps; `resume`, such a state, continues
    from it (each step's data is drawn from the seed and the step, so a resumed run takes the same steps)."""
    from transformers import AutoTokenizer

    from genpi.train.recipe import build_examples, make_optimizer, optimizer_step

    torch.manual_seed(settings.seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sft = dataclasses.replace(settings, method="sft")
    made, report_data = build_examples(train_rows, entry, tokenizer, sft)
    rows = [r.student for r in made]
    if not rows:
        raise ValueError(f"prompt {entry.id!r}: no usable train rows ({report_data['rows']} rows)")
    held, heldout_report = build_examples(heldout_rows, entry, tokenizer, sft)
    heldout = [r.student for r in held]
    pairs, _ = build_examples(heldout_rows, entry, tokenizer, dataclasses.replace(settings, method="kld"))
    p_ids = prompt_ids(tokenizer, entry)
    contexts = pretrain_contexts(entry, train_rows, tokenizer, settings.max_length)

    dtype = default_dtype() if settings.dtype == "auto" else getattr(torch, settings.dtype)
    checkpointing = (
        torch.cuda.is_available() if settings.gradient_checkpointing is None else settings.gradient_checkpointing
    )
    model = add_lora(
        load_base(base, quantize=settings.quantize, dtype=dtype), settings.lora, gradient_checkpointing=checkpointing
    )
    icae = Icae(model, *init_embeddings(model, settings.memory_tokens, settings.seed))  # on the embeddings' device
    steps_per_epoch = math.ceil(len(rows) / settings.batch_size)
    finetune_steps = settings.max_steps or steps_per_epoch * settings.epochs
    steps = settings.pretrain_steps + finetune_steps
    optimizer, scheduler, optimizer_name = make_optimizer(icae, settings, steps)
    trainable = {name: p for name, p in icae.named_parameters() if p.requires_grad}
    if resume is None:
        before, kl_before = heldout_figures(icae, p_ids, heldout, pairs, pad_id, settings.micro_batch)
        run = {
            "losses": [],
            "norms": [],
            "heldout_losses": [],
            "heldout_kls": [],
            "seconds": 0.0,
            "heldout_loss_before": before,
            "heldout_kl_before": kl_before,
        }
    else:
        run = {k: v for k, v in resume.items() if k not in ("params", "optimizer", "scheduler", "torch_rng")}
        with torch.no_grad():
            for name, value in resume["params"].items():
                trainable[name].copy_(value)
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        torch.set_rng_state(resume["torch_rng"])

    def state() -> dict:
        return {
            **run,
            "params": {name: p.detach().cpu().clone() for name, p in trainable.items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }

    started = time.perf_counter() - run["seconds"]
    icae.train()
    while len(run["losses"]) < steps:
        step = len(run["losses"])
        if step < settings.pretrain_steps:
            batch = pretrain_batch(contexts, settings.batch_size, random.Random(f"{settings.seed}-pretrain-{step}"))
            loss = pretrain_step_loss(icae, batch, settings.micro_batch, pad_id)
            epoch, epoch_end = 0.0, step + 1 == settings.pretrain_steps
        else:
            k = step - settings.pretrain_steps
            done_epochs, in_epoch = divmod(k, steps_per_epoch)
            order = list(range(len(rows)))
            random.Random(f"{settings.seed}-epoch-{done_epochs}").shuffle(order)
            chosen = [rows[i] for i in order[in_epoch * settings.batch_size : (in_epoch + 1) * settings.batch_size]]
            loss = finetune_step_loss(icae, p_ids, chosen, settings.micro_batch, pad_id)
            epoch = done_epochs + (in_epoch + 1) / steps_per_epoch
            epoch_end = in_epoch + 1 == steps_per_epoch or step + 1 == steps
        lr = scheduler.get_last_lr()[0]  # the learning rate this step takes
        run["norms"].append(optimizer_step(icae, optimizer, scheduler, settings))
        run["losses"].append(loss)
        metrics = {
            "step": step + 1,
            "steps": steps,
            "loss": loss,
            "lr": lr,
            "grad_norm": run["norms"][-1],
            "epoch": epoch,
        }
        if epoch_end and step >= settings.pretrain_steps:  # a fine-tuning epoch (or the run) is done
            loss_h, kl_h = heldout_figures(icae, p_ids, heldout, pairs, pad_id, settings.micro_batch)
            run["heldout_losses"].append(loss_h)
            run["heldout_kls"].append(kl_h)
            metrics.update(heldout_loss=loss_h, heldout_kl=kl_h)
        run["seconds"] = time.perf_counter() - started
        checkpoint = epoch_end or (checkpoint_steps and (step + 1) % checkpoint_steps == 0)
        if report:
            report(metrics, state if checkpoint else None)
    icae.eval()
    icae.prompts = {entry.sha256: p_ids}  # what `save` caches the slots of
    metrics = {
        "train_loss_first": run["losses"][0],
        "train_loss_last": run["losses"][-1],
        "train_losses": run["losses"],
        "grad_norm_first": run["norms"][0],
        "grad_norm_last": run["norms"][-1],
        "steps": steps,
        "pretrain_steps": settings.pretrain_steps,
        "train_examples": len(rows),
        "pretrain_contexts": len(contexts),
        "prompt_tokens": len(p_ids),
        "memory_tokens": icae.k,
        "heldout_examples": len(heldout),
        "heldout_loss_before": run["heldout_loss_before"],
        "heldout_loss": run["heldout_losses"][-1] if run["heldout_losses"] else None,
        "heldout_loss_per_epoch": run["heldout_losses"],
        "heldout_kl_examples": len(pairs),
        "heldout_kl_before": run["heldout_kl_before"],
        "heldout_kl": run["heldout_kls"][-1] if run["heldout_kls"] else None,
        "heldout_kl_per_epoch": run["heldout_kls"],
        "seconds": time.perf_counter() - started,
        **{f"data_{k}": v for k, v in report_data.items()},
        **{f"heldout_data_{k}": v for k, v in heldout_report.items()},
        "effective": {
            "device": str(icae.device),
            "dtype": str(dtype).removeprefix("torch."),
            "compute_dtype_4bit": str(dtype).removeprefix("torch.") if settings.quantize else None,
            "gradient_checkpointing": model.get_base_model().is_activation_checkpointing,
            "optimizer": optimizer_name,
        },
    }
    return icae, metrics
