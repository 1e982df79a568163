"""Training speed, measured side by side in one run. Prints four ratios:

(a) QLoRA (4-bit NF4 base) training tokens/s divided by plain LoRA tokens/s, same data and settings;
(b) wall time of training two prompts in parallel (`genpi train`: a Ray Tune experiment, one CPU
    per trial) divided by training them one after the other in one process (all CPUs);
(c) the cost of one checkpoint (training state built, saved, copied to the experiment's storage as
    Tune does) as a share of one optimizer step;
(d) wall time of the Tune experiment in (b) divided by plain Ray tasks (one per prompt, one CPU
    each, no reporting or checkpoints) training the same trials.

The data are the example catalog's own shot dialogues, as dialogue rows.

    .venv/bin/python benchmarks/train_throughput.py [--base smollm2] [--rows 4] [--max-length 2048]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from genpi.catalog import load_catalog
from genpi.data import store
from genpi.models import resolve_model
from genpi.train.qlora import LoraSettings
from genpi.train.recipe import TrainSettings, build_examples, train_adapter
from genpi.train.run import train_catalog

REPO = Path(__file__).resolve().parents[1]
CATALOG = REPO / "examples" / "agents.yaml"


def shot_rows(entry, n: int) -> list[dict]:
    """Dialogue rows made of the prompt's shots (cycled): real lengths, no synthesis needed."""
    rows = []
    for i in range(n):
        shot = entry.shots[i % len(entry.shots)]
        row = dict.fromkeys(store.DIALOGUE_COLUMNS)
        row.update(
            prompt_id=entry.id,
            prompt_sha256=entry.sha256,
            sample_id=i,
            seed=i,
            split="train",
            input=shot[0]["content"],
            turns=shot[1:],
            student_output="I am not sure what to do.",
            reason="The prompt defines the action format and the steps; the answer must follow them.",
        )
        rows.append(row)
    return rows


def tokens_per_second(base: str, entry, rows, settings: TrainSettings) -> float:
    from transformers import AutoTokenizer

    examples, _ = build_examples(rows, entry, AutoTokenizer.from_pretrained(base), settings)
    tokens = sum(len(e.input_ids) for r in examples for e in (r.student, r.pg) if e is not None) * settings.epochs
    _, metrics = train_adapter(base, entry, rows, [], settings)
    return tokens / metrics["seconds"]


def checkpoint_cost(base: str, entry, rows, settings: TrainSettings, storage: Path) -> tuple[float, float]:
    """(seconds per checkpoint, seconds per step) of one run that checkpoints after every step, as a trial does."""
    spent = []

    def report(metrics, state):
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as folder:
            torch.save(state(), Path(folder) / "state.pt")
            shutil.copytree(
                folder, storage / f"checkpoint_{metrics['step']:06d}"
            )  # what Tune does with a local storage path
        spent.append(time.perf_counter() - started)

    _, metrics = train_adapter(base, entry, rows, [], settings, report=report, checkpoint_steps=1)
    per_checkpoint = sum(spent) / len(spent)
    return per_checkpoint, (metrics["seconds"] - sum(spent)) / metrics["steps"]


def plain_tasks(base: str, pair, rows_per_prompt: int, settings: TrainSettings) -> float:
    """Seconds to train the pair as plain Ray tasks, one CPU each."""
    import ray

    task = ray.remote(num_cpus=1)(
        lambda e: train_adapter(base, e, shot_rows(e, rows_per_prompt), [], settings)[1]["steps"]
    )
    start = time.perf_counter()
    ray.get([task.remote(e) for e in pair])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="smollm2")
    parser.add_argument("--rows", type=int, default=4, help="dialogue rows per prompt")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = resolve_model(args.base)
    entries = {e.id: e for e in load_catalog(CATALOG)}
    # micro-batch 1: two trials side by side must fit in memory (a ~1,800-token PG example pair peaks near 19 GB)
    settings = TrainSettings(
        epochs=1, batch_size=args.rows, micro_batch=1, max_length=args.max_length, lora=LoraSettings()
    )

    entry = entries["os-shell"]
    rows = shot_rows(entry, args.rows)
    qlora = tokens_per_second(base, entry, rows, settings)
    lora = tokens_per_second(base, entry, rows, dataclasses.replace(settings, quantize=False))
    with tempfile.TemporaryDirectory() as storage:
        per_checkpoint, per_step = checkpoint_cost(
            base, entry, rows, dataclasses.replace(settings, batch_size=1), Path(storage)
        )

    pair = [entries["os-shell"], entries["web-shop"]]
    with tempfile.TemporaryDirectory() as work:
        data, catalog = Path(work) / "data", Path(work) / "two.jsonl"
        catalog.write_text("".join(json.dumps(e.to_json()) + "\n" for e in pair))
        for e in pair:
            store.write_table(store.shard_path(data, e.id, 0), shot_rows(e, args.rows), store.DIALOGUE_SCHEMA)
        start = time.perf_counter()
        for e in pair:
            train_adapter(base, e, shot_rows(e, args.rows), [], settings)
        sequential = time.perf_counter() - start
        import ray

        ray.init(address="local", num_cpus=args.threads, include_dashboard=False, log_to_driver=False)
        start = time.perf_counter()
        train_catalog(
            data, catalog, Path(work) / "adapters", base, settings, [settings.lam], num_cpus=1, progress=False
        )
        parallel = time.perf_counter() - start
        plain = plain_tasks(base, pair, args.rows, settings)
        ray.shutdown()

    result = {
        "qlora_tok_s": qlora,
        "lora_tok_s": lora,
        "qlora_over_lora": qlora / lora,
        "sequential_s": sequential,
        "parallel_s": parallel,
        "parallel_over_sequential": parallel / sequential,
        "checkpoint_s": per_checkpoint,
        "step_s": per_step,
        "checkpoint_over_step": per_checkpoint / per_step,
        "plain_tasks_s": plain,
        "tune_over_plain_tasks": parallel / plain,
    }
    print(json.dumps(result, indent=2))
    print(f"(a) QLoRA tok/s / LoRA tok/s: {qlora / lora:.2f}  ({qlora:.0f} vs {lora:.0f} tok/s)")
    print(
        f"(b) two prompts in parallel on Ray Tune / one after the other: {parallel / sequential:.2f}  "
        f"({parallel:.0f} s vs {sequential:.0f} s)"
    )
    print(
        f"(c) one checkpoint / one step: {per_checkpoint / per_step:.3f}  ({per_checkpoint:.2f} s vs {per_step:.1f} s)"
    )
    print(
        f"(d) the Tune experiment / plain Ray tasks, same trials: {parallel / plain:.2f}  "
        f"({parallel:.0f} s vs {plain:.0f} s)"
    )


if __name__ == "__main__":
    main()
