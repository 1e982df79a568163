"""The precision training's forward passes run in: bfloat16 autocast on CUDA, as the reference trains.

`peft.prepare_model_for_kbit_training` (genpi.train.qlora.add_lora) upcasts a bfloat16 base's norms, embeddings and
LM head to float32, and PEFT makes the LoRA weights float32: without autocast the hidden states leave the first
(float32) embedding in float32, and every activation, attention and LoRA product after it runs in float32 on the
GPU, twice the memory and far slower than the bfloat16 the paper trained in. The reference re-casts the LoRA layers,
embeddings and head to bfloat16 and trains under the transformers Trainer's bf16 autocast; genpi keeps the LoRA
weights float32 (the optimizer's master copy) and runs the forward passes under torch's bfloat16 autocast, which
keeps what needs float32 (softmax, log-softmax, cross-entropy, norms) in float32. The step's backward passes run in
the same context (genpi.train.recipe.step_loss does forward and backward per micro-batch); backward ops run in the
dtype autocast chose for their forward ops either way, and gradient checkpointing recomputes under the forward's
autocast state.

On CPU nothing changes: float32 throughout (bfloat16 compute is slower on CPUs without bf16 dot products, and less
exact). float16 gets no autocast: it would need loss scaling, which genpi does not do.
"""

from __future__ import annotations

import contextlib

import torch


def autocast_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype | None:
    """The dtype the training step autocasts to on `device_type` with weights in `dtype`: bfloat16 on CUDA with a
    bfloat16 base, else None (no autocast)."""
    return torch.bfloat16 if device_type == "cuda" and dtype == torch.bfloat16 else None


def training_autocast(device_type: str, dtype: torch.dtype | None):
    """A context that autocasts to `dtype` on `device_type` (`autocast_dtype`'s answer); none for None."""
    return torch.autocast(device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def dtype_name(dtype: torch.dtype | None) -> str | None:
    """ "bfloat16" for torch.bfloat16, None for None: as genpi.json records it."""
    return str(dtype).removeprefix("torch.") if dtype is not None else None
