"""On-policy internalization: the student samples its own replies, the teacher scores those tokens.

After On-Policy Context Distillation (Ye et al., 2026, arXiv 2602.12275) and GKD (Agarwal et al., 2024):
the student (base + the adapter being trained, without P) samples first-turn agent replies to the
training inputs at temperature 1; on exactly those tokens the loss is the per-token reverse
KL(student ‖ teacher), the teacher being the same base with the adapter disabled and P in front
(`genpi.train.losses.reverse_kl_loss`). The recipe (`genpi.train.recipe`, methods `onpolicy` and
`genpi+onpolicy`) has the sampler refresh its copy of the adapter every `refresh_steps` optimizer steps
and sample the replies of those steps' inputs in one batch.

The sampler is an engine user, not a loop around `model.generate`: at a refresh the adapter is saved to
a folder (`save_adapter`: PEFT files that vLLM loads too) and loaded into the engine under a fresh name
(`add_adapters`), and requests name it (`generate(requests, adapters=[name, ...])`). A fresh name per
refresh, because an engine may cache by adapter name (the transformers engine's prefix cache; vLLM's
LoRA cache keys on the LoRA's name and id), so reusing a name could serve stale weights.

- On CPU, `train_adapter` builds the project's `TransformersEngine` in the training process on the same
  base folder, float32: the replies come from the unquantized base + the adapter, which is also how the
  adapter is served afterwards (a 4-bit QLoRA base only saves memory while training). Its
  `remove_adapters` drops the previous refresh's adapter, so memory does not grow with the steps.
- On a GPU cluster, a vLLM engine with LoRA enabled serves the same protocol: `add_adapters({name:
  folder})` keeps `LoRARequest(name, next_int_id, folder)` per name (the folder must be readable by
  the vLLM workers: a shared filesystem), and `generate(requests, adapters)` passes each request's
  `lora_request=` to `AsyncLLM.generate`; `remove_adapters` calls `engine.remove_lora(int_id)`. Pass
  such an engine to `train_adapter(..., engine=...)`. Nothing here depends on transformers.

Multi-turn on-policy episodes against the environment persona (as in synthesis) are not done: every
sampled reply is the first agent turn.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from genpi.catalog import PromptEntry
from genpi.engines import ChatRequest, Completion, Sampling
from genpi.train.examples import IGNORE, Example, build_sft, cut_to_labels
from genpi.train.losses import response_logits, reverse_kl_loss, teacher_logits


def sample_seed(seed: int, step: int, index: int) -> int:
    """The sampling seed of request `index` at optimizer step `step` (0-based) of a run seeded `seed`: the same
    run samples the same replies, a resumed one too, and no two requests share a seed (63 bits: vLLM takes it)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{step}:{index}".encode()).digest()[:8], "big") >> 1


class OnPolicySampler:
    """The student's replies through an engine that serves LoRA adapters by name.

    The engine needs, beyond the `Engine` protocol, `add_adapters({name: folder})` and
    `generate(requests, adapters=[name, ...])`; `remove_adapters([name])` is used when it has one.
    `refresh(save)` has `save(folder)` write the current adapter there (PEFT files) and loads it;
    `sample(inputs, seeds)` returns one Completion per input. Counts and times are in `stats()`.
    """

    def __init__(self, engine, max_tokens: int, temperature: float = 1.0):
        if not hasattr(engine, "add_adapters"):
            raise ValueError(
                f"on-policy sampling needs an engine that loads LoRA adapters (add_adapters); "
                f"{type(engine).__name__} has none"
            )
        self.engine, self.sampling = engine, Sampling(temperature=temperature, max_tokens=max_tokens)
        self.adapter: str | None = None
        self._folders = tempfile.TemporaryDirectory(prefix="genpi-onpolicy-")
        self.refreshes = self.requests = self.reply_tokens = self.cut = self.failed = 0
        self.refresh_seconds = self.sample_seconds = 0.0

    def refresh(self, save: Callable[[Path], object]) -> Path:
        """Load the adapter that `save(folder)` writes under a fresh name; the previous one is dropped.
        Returns the folder (its files are what a checkpoint keeps to load the same adapter again)."""
        started = time.perf_counter()
        name = f"onpolicy-{self.refreshes}"
        folder = Path(self._folders.name) / name
        save(folder)
        self.engine.add_adapters({name: str(folder)})
        previous, self.adapter = self.adapter, name
        if previous is not None:
            if hasattr(self.engine, "remove_adapters"):
                self.engine.remove_adapters([previous])
            shutil.rmtree(Path(self._folders.name) / previous, ignore_errors=True)
        self.refreshes += 1
        self.refresh_seconds += time.perf_counter() - started
        return folder

    def sample(self, inputs: list[str], seeds: list[int]) -> list[Completion]:
        """The student's first agent turn for each input ([user: input], no P), sampled with its own seed."""
        if self.adapter is None:
            raise RuntimeError("OnPolicySampler.sample before the first refresh: no adapter loaded")
        started = time.perf_counter()
        requests = [
            ChatRequest([{"role": "user", "content": x}], self.sampling, seed=s)
            for x, s in zip(inputs, seeds, strict=True)
        ]
        completions = self.engine.generate(requests, adapters=[self.adapter] * len(requests))
        self.sample_seconds += time.perf_counter() - started
        self.requests += len(requests)
        self.reply_tokens += sum(c.completion_tokens for c in completions)
        self.cut += sum(c.cut for c in completions)
        self.failed += sum(c.error is not None for c in completions)
        return completions

    def stats(self) -> dict:
        return {
            "refreshes": self.refreshes,
            "requests": self.requests,
            "reply_tokens": self.reply_tokens,
            "replies_cut": self.cut,
            "failed": self.failed,
            "refresh_seconds": self.refresh_seconds,
            "sample_seconds": self.sample_seconds,
        }

    def close(self) -> None:
        self._folders.cleanup()


def adapter_files(folder: Path) -> dict[str, bytes]:
    """An adapter folder's files, for a checkpoint: the sampler's adapter is restored from them exactly."""
    return {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}


def write_files(files: dict[str, bytes]) -> Callable[[Path], None]:
    """A `save` for `OnPolicySampler.refresh` that writes files kept by `adapter_files`."""

    def save(folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (folder / name).write_bytes(data)

    return save


def reply_views(
    entry: PromptEntry, x: str, reply: str, tokenizer, max_length: int, max_turn_tokens: int | None
) -> tuple[Example, Example]:
    """(student's view, teacher's view) of one sampled reply to input `x`: [user: x, assistant: reply] without P
    and with P in front, labelled on the reply's tokens and its end-of-turn marker, the same tokens in both (P makes
    the teacher's view longer; if it must cut the reply, the student's is cut alike). ValueError if it cannot be
    built (nothing of the reply fits). The end-of-turn marker is labelled even for a reply cut by the token limit:
    the reverse KL at a position is over the distributions there, whichever token was sampled next."""
    row = {"input": x, "turns": [{"role": "assistant", "content": reply}]}
    teacher = build_sft(row, tokenizer, max_length, entry.messages(), max_turn_tokens)
    student = cut_to_labels(
        build_sft(row, tokenizer, max_length, max_turn_tokens=max_turn_tokens), teacher.loss_token_count
    )
    if [t for t in student.labels if t != IGNORE] != [t for t in teacher.labels if t != IGNORE]:
        raise ValueError("on-policy example: the views with and without P label different tokens")
    return student, teacher


def reverse_kl_sums(model, pairs: list[tuple[Example, Example]], collate: Callable, micro_batch: int, topk: int = 0):
    """Yields (summed reverse KL, tokens) per micro-batch of (student, teacher) pairs: the student's logits with the
    adapter and gradients, the teacher's with the adapter disabled and without. `collate(examples)` makes a batch
    on the model's device. Backward each sum before the next is computed: only one micro-batch's graph is held."""
    ordered = sorted(pairs, key=lambda p: len(p[1].input_ids))
    for i in range(0, len(ordered), micro_batch):
        chunk = ordered[i : i + micro_batch]
        s_logits = response_logits(model, collate([s for s, _ in chunk]))
        t_logits = teacher_logits(model, collate([t for _, t in chunk]))
        n = s_logits.size(0)
        yield reverse_kl_loss(s_logits, t_logits, topk) * n, n


@torch.no_grad()
def mean_reverse_kl(
    model, pairs: list[tuple[Example, Example]], collate: Callable, micro_batch: int, topk: int = 0
) -> float | None:
    """Mean reverse KL(student ‖ teacher) per reply token over fixed replies (eval mode, no dropout), e.g. to watch
    it fall over training; None without tokens."""
    training = model.training
    model.eval()
    total, n = 0.0, 0
    for loss_sum, k in reverse_kl_sums(model, pairs, collate, micro_batch, topk):
        total, n = total + float(loss_sum), n + k
    model.train(training)
    return total / n if n else None


__all__ = [
    "OnPolicySampler",
    "adapter_files",
    "mean_reverse_kl",
    "reply_views",
    "reverse_kl_sums",
    "sample_seed",
    "write_files",
]
