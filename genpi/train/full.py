"""Full fine-tuning (`genpi train --full-finetune`): every weight of the base trained, no quantization, no LoRA.

The paper's distillation baselines (KLD, SeqKD, SeqKD+KLD) fine-tune the whole model: 4 × A100 80 GB for an 8B
model, batch 64, lr 1e-5, 10 epochs (`PAPER_DEFAULTS`, applied by `paper_defaults` unless a flag sets them). The
trial's loop is the recipe's (`genpi.train.recipe.train_adapter`); what differs lives here:

- `FullModel`: the trained copy of the base (the student) beside a frozen copy (the teacher, with P in its view):
  with LoRA the teacher is the base with the adapter disabled, here it is a second model, switched to by the same
  `disable_adapter()` the recipe's losses call. It stays out of the module tree: not trained, not checkpointed.
- On a GPU cluster a trial drives a Ray Train `TorchTrainer` (`fit_with_trainer`): one worker per GPU of the
  trial, the student sharded over them with FSDP2 (`fully_shard` per decoder layer, then the whole; fp32 master
  weights, bf16 compute), the teacher whole on every GPU in bf16. Each rank trains on its share of a step's rows
  (`rank_rows`); the checkpoints hold the full (gathered) weights and optimizer state, so a resumed run may have
  another number of GPUs.
- On CPU the trial trains the student in-process in float32, as the LoRA methods do.
- The output is a model folder (`save_model`: safetensors, config, generation config, tokenizer) with genpi.json
  saying `kind: "model"` (genpi.data.adapters): eval, serve and efficiency load it as its own model.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

import torch

PAPER_METHODS = ("kld", "seqkd", "seqkd+kld")  # the paper's full-fine-tune rows (Table 1)
PAPER_DEFAULTS = {"batch_size": 64, "lr": 1e-5, "epochs": 10}  # their settings (the paper's appendix)
NOT_FULL = ("onpolicy", "genpi+onpolicy")  # sample through an engine that reloads LoRA adapters, not whole models


def paper_defaults(method: str, given: set[str]) -> dict:
    """The paper's full-fine-tune settings for a distillation method, but for those the user set (`given`: the
    TrainSettings field names whose flag was given); {} for the other methods (they keep genpi's defaults)."""
    if method not in PAPER_METHODS:
        return {}
    return {k: v for k, v in PAPER_DEFAULTS.items() if k not in given}


def _in_group() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def distributed() -> tuple[int, int]:
    """(rank, world size) of the process group this process is in; (0, 1) outside one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class FullModel(torch.nn.Module):
    """The student (every weight trainable) and, beside it, the frozen teacher: `disable_adapter()` switches the
    forward, `get_base_model()` and the logits to the teacher, as a PeftModel's does to the base."""

    def __init__(self, student, teacher, device, sharded: bool = False):
        super().__init__()
        self.student = student
        self._teacher = [teacher]  # a list: not a submodule (no gradients, no state dict, never in train mode)
        self._device, self.sharded, self._teacher_on, self._placed = torch.device(device), sharded, False, False

    @property
    def teacher(self):
        return self._teacher[0]

    @property
    def device(self) -> torch.device:
        return self._device

    def active(self):
        return self.teacher if self._teacher_on else self.student

    def get_base_model(self):
        return self.active()

    @contextmanager
    def disable_adapter(self):
        self._teacher_on = True
        try:
            yield
        finally:
            self._teacher_on = False

    def forward(self, *args, **kwargs):
        return self.active()(*args, **kwargs)

    def response_logits(self, batch: dict, mask: torch.Tensor) -> torch.Tensor:
        """[N, V] logits at the `mask` positions through the model's own forward: a sharded model's root gathers its
        embeddings and head there (calling its decoder and head apart, as `losses.response_logits` does for a
        PeftModel, would meet them sharded). `logits_to_keep` keeps the vocabulary projection to the columns
        that hold a prediction position of some row."""
        if not self._placed:  # once: a batch or a weight elsewhere fails here by name, not deep in a kernel
            check_placement(self, batch)
            self._placed = True
        keep = mask.any(dim=0).nonzero().squeeze(-1)
        logits = self(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            use_cache=False,
            logits_to_keep=keep,
        ).logits
        return logits[mask[:, keep]]


def load_full(base: str, dtype: torch.dtype, gradient_checkpointing: bool = False, device=None) -> FullModel:
    """The student and the teacher from the base folder; sharded with FSDP2 inside a process group (a Ray Train
    worker). The student's weights are float32 whatever `dtype` is (AdamW's lr-1e-5 updates vanish in bf16
    weights); `dtype` is the teacher's and, sharded, the compute dtype."""
    from transformers import AutoModelForCausalLM

    sharded = distributed()[1] > 1 or _in_group()  # inside a process group (a Ray Train worker), even of one
    if device is None:
        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    student = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).to(device)
    teacher = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype).to(device).eval()
    teacher.requires_grad_(False)
    student.requires_grad_(True)
    if gradient_checkpointing:
        student.activation_checkpointing_enable()
    if sharded:
        shard(student, dtype)
    student.train()
    return FullModel(student, teacher, device, sharded=sharded)


def shard(student, dtype: torch.dtype) -> None:
    """FSDP2 over the process group: each decoder layer its own unit, then the root (embeddings, norm, head, tied
    or not); parameters kept in float32, computed in `dtype` with gradients reduced in float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for layer in student.get_decoder().layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(student, mp_policy=policy)


def check_placement(model: FullModel, batch: dict) -> None:
    """Every tensor of `batch` and every weight of both models on the model's device, else a ValueError naming
    the first one elsewhere (a CPU tensor fed to a CUDA model fails deep in a kernel, or silently copies)."""
    want = model.device
    named = [(f"batch {k}", v) for k, v in batch.items() if torch.is_tensor(v)]
    for who, m in (("student", model.student), ("teacher", model.teacher)):
        named += [(f"{who} {n}", getattr(p, "_local_tensor", p)) for n, p in m.named_parameters()]
    for name, tensor in named:
        if tensor.device.type != want.type or (want.index is not None and tensor.device.index != want.index):
            raise ValueError(f"{name} is on {tensor.device}, the model on {want}")


def rank_rows(rows: list, micro_batch: int) -> list:
    """This rank's share of a step's rows: every world-th row, when that gives every rank the same number of
    micro-batches (FSDP's collectives run once per forward on every rank: a rank with one forward fewer would
    hang the others); all the rows otherwise (a short last step: each rank computes the same gradient)."""
    rank, world = distributed()
    if world == 1:
        return rows
    counts = {math.ceil(len(rows[r::world]) / micro_batch) for r in range(world)}
    return rows[rank::world] if len(counts) == 1 and 0 not in counts else rows


def trainable_state(model, optimizer, trainable: dict) -> dict:
    """The trained weights (`lora`) and the optimizer's state, whole and on the CPU, for a checkpoint; a sharded
    model's gathered from every rank (a collective: every rank calls it)."""
    if getattr(model, "sharded", False):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        weights, optim = get_state_dict(
            model.student, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        return {"lora": weights, "optimizer": optim}
    return {
        "lora": {name: p.detach().cpu().clone() for name, p in trainable.items()},
        "optimizer": optimizer.state_dict(),
    }


def load_trainable_state(model, optimizer, trainable: dict, state: dict) -> None:
    """Put a checkpoint's weights and optimizer state (`trainable_state`) back."""
    if getattr(model, "sharded", False):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(
            model.student,
            optimizer,
            model_state_dict=state["lora"],
            optim_state_dict=state["optimizer"],
            options=StateDictOptions(full_state_dict=True),
        )
        return
    with torch.no_grad():
        for name, value in state["lora"].items():
            trainable[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])


def save_model(model: FullModel, folder: str | Path, base: str, dtype: torch.dtype | None = None) -> Path:
    """The student as a model folder: safetensors, config, generation config and the base's tokenizer, in `dtype`
    (default: the teacher's, the serving dtype). Sharded: gathered on every rank, written by rank 0."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    dtype = dtype or next(model.teacher.parameters()).dtype
    if model.sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        weights = get_model_state_dict(model.student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        weights = {k: v.detach().cpu() for k, v in model.student.state_dict().items()}
    if distributed()[0] != 0:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
    model.student.config.dtype = dtype
    model.student.save_pretrained(str(folder), state_dict=weights, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(base)).save_pretrained(str(folder))
    return folder


# ------------------------------------------------------------ the GPU path: a Ray Train TorchTrainer per trial


def trainer_scaling(workers: int, use_gpu: bool, cpus_per_worker: float = 1):
    """The trial's TorchTrainer workers: one per GPU (FSDP's ranks), each with its CPUs."""
    from ray.train import ScalingConfig

    if workers < 1 or int(workers) != workers:
        raise ValueError(f"a full fine-tune on GPUs needs a whole number of GPUs per trial (>= 1), got {workers}")
    resources = {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    return ScalingConfig(num_workers=int(workers), use_gpu=use_gpu, resources_per_worker=resources)


def check_gpu_cluster(cluster_gpus: float, gpus_per_trial: float) -> None:
    """A full fine-tune over GPUs needs a cluster with that many GPUs in whole numbers; ValueError naming it."""
    if gpus_per_trial and not cluster_gpus:
        raise ValueError(
            f"--full-finetune --gpus-per-trial {gpus_per_trial:g}: the Ray cluster has no GPUs; on a CPU-only "
            "cluster leave --gpus-per-trial out (the full fine-tune then runs on the CPU)"
        )
    if gpus_per_trial and (gpus_per_trial < 1 or int(gpus_per_trial) != gpus_per_trial):
        raise ValueError(
            f"--full-finetune --gpus-per-trial {gpus_per_trial:g}: FSDP shards over whole GPUs (1, 2, 4, ...)"
        )
    if gpus_per_trial > cluster_gpus:
        raise ValueError(
            f"--full-finetune --gpus-per-trial {gpus_per_trial:g}: the Ray cluster has {cluster_gpus:g} GPUs"
        )
