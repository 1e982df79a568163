"""`python -m genpi.synth CATALOG --out DIR`: synthesize GenPI training dialogues for a catalog.

The driver holds no model. It starts engine actors on Ray (the local machine,
or the cluster this process was submitted to), generates each prompt's pseudo
inputs, then runs the dialogues of many shards concurrently and writes every
finished shard as one Parquet file. `OUT/manifest.json` records the catalog,
models, settings and finished shards, so the same command, rerun after a crash
or a kill, does only the work that is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from genpi import InputError
from genpi.catalog import PromptEntry, load_catalog
from genpi.engines import EngineConfig
from genpi.synth import store
from genpi.synth.pipeline import (
    AsyncEngine,
    SynthSettings,
    generate_inputs,
    heldout_ids,
    stable_seed,
    synthesize_dialogue,
)

MANIFEST_VERSION = 1


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How the work is spread; may change between a run and its resumption."""

    shard_size: int = 32
    shards_in_flight: int = 4  # per target replica
    target_replicas: int = 1
    progress: bool = True


def new_manifest(catalog: Path, entries: list[PromptEntry], generator: EngineConfig, target: EngineConfig, settings: SynthSettings, shard_size: int) -> dict:
    return {
        "version": MANIFEST_VERSION,
        "catalog": {"path": str(catalog), "prompts": {e.id: e.to_json() for e in entries}},
        "generator": {"kind": generator.kind, "model": generator.model},
        "target": {"kind": target.kind, "model": target.model},
        "settings": dataclasses.asdict(settings),
        "shard_size": shard_size,
        "prompts": {
            e.id: {
                "prompt_sha256": e.sha256,
                "gold_turns": e.gold_turns,
                "max_turns": settings.turn_limit(e),
                "samples": settings.samples,
                "inputs": None,
                "input_errors": [],
                "shards": {},
            }
            for e in entries
        },
    }


def reconcile_manifest(old: dict, new: dict, out: Path) -> dict:
    """The manifest to continue with: the old one when the run is the same, else a clear refusal."""
    for key in ("generator", "target", "settings", "shard_size"):
        if old.get(key) != new[key]:
            raise InputError(
                f"{out} holds a run with a different {key} ({json.dumps(old.get(key))}); "
                "rerun with the same options to resume it, or choose another --out"
            )
    for prompt_id, fresh in new["prompts"].items():
        before = old["prompts"].get(prompt_id)
        if before is None:  # a prompt added to the catalog since: just more work
            old["prompts"][prompt_id] = fresh
            old["catalog"]["prompts"][prompt_id] = new["catalog"]["prompts"][prompt_id]
        elif before["prompt_sha256"] != fresh["prompt_sha256"] or old["catalog"]["prompts"][prompt_id] != new["catalog"]["prompts"][prompt_id]:
            raise InputError(
                f"{out}: prompt {prompt_id!r} changed in the catalog since this run started; "
                "choose another --out for the new version"
            )
    return old


class Synthesis:
    def __init__(self, out: Path, entries: list[PromptEntry], manifest: dict, settings: SynthSettings, options: RunOptions):
        self.out = out
        self.entries = entries
        self.manifest = manifest
        self.settings = settings
        self.options = options
        self.engines: list = []
        self.failed = 0
        self.bar = None

    async def run(self, generator: AsyncEngine, targets: list[AsyncEngine]) -> None:
        from tqdm import tqdm

        self.engines = list({id(e): e for e in [generator, *targets]}.values())
        prompts = self.manifest["prompts"]
        total = sum(prompts[e.id]["inputs"] or self.settings.samples for e in self.entries)
        done = sum(s["rows"] for e in self.entries for s in prompts[e.id]["shards"].values())
        self.started = time.monotonic()
        self.bar = tqdm(total=total, initial=done, unit="dlg", desc="dialogues", disable=not self.options.progress, file=sys.stderr)
        limits = [asyncio.Semaphore(self.options.shards_in_flight) for _ in targets]
        await asyncio.gather(*(self.run_prompt(e, generator, targets, limits, i) for i, e in enumerate(self.entries)))
        self.bar.close()

    @property
    def generated_tokens(self) -> int:
        return sum(e.generated_tokens for e in self.engines)

    def pending_shards(self, entry: PromptEntry) -> list[tuple[int, list[int]]]:
        """(shard, sample ids) still to do; empty until the prompt's inputs exist."""
        n = self.manifest["prompts"][entry.id]["inputs"]
        if n is None:
            return []
        size = self.manifest["shard_size"]
        done = self.manifest["prompts"][entry.id]["shards"]
        return [
            (k, list(range(start, min(start + size, n))))
            for k, start in enumerate(range(0, n, size))
            if store.shard_path(self.out, entry.id, k).name not in done
        ]

    async def ensure_inputs(self, entry: PromptEntry, generator: AsyncEngine) -> list[dict]:
        path = store.inputs_path(self.out, entry.id)
        record = self.manifest["prompts"][entry.id]
        if record["inputs"] is not None and path.exists():
            return store.read_rows(path)
        texts, errors = await generate_inputs(entry, generator, self.settings)
        heldout = heldout_ids(entry.id, len(texts), self.settings)
        samples = [
            {
                "sample_id": i,
                "seed": stable_seed(self.settings.seed, entry.id, i),
                "split": "heldout" if i in heldout else "train",
                "input": text,
            }
            for i, text in enumerate(texts)
        ]
        store.write_table(path, samples, store.INPUT_SCHEMA)
        record["inputs"] = len(samples)
        record["input_errors"] = errors[:20]
        self.save_manifest()
        if len(samples) < self.settings.samples:
            self.log(
                f"{entry.id}: only {len(samples)} distinct inputs of {self.settings.samples} requested "
                f"after {self.settings.input_rounds} generator rounds ({len(errors)} generator errors)"
            )
            self.bar.total -= self.settings.samples - len(samples)
            self.bar.refresh()
        return samples

    async def run_prompt(self, entry, generator, targets, limits, offset: int) -> None:
        samples = await self.ensure_inputs(entry, generator)
        self.adopt_orphan_shards(entry)
        jobs = []
        for k, sample_ids in self.pending_shards(entry):
            replica = (k + offset) % len(targets)
            jobs.append(self.run_shard(entry, k, [samples[i] for i in sample_ids], targets[replica], generator, limits[replica]))
        await asyncio.gather(*jobs)

    def adopt_orphan_shards(self, entry: PromptEntry) -> None:
        """A shard renamed into place just before a kill, but not yet in the manifest, is finished work."""
        for k, sample_ids in self.pending_shards(entry):
            path = store.shard_path(self.out, entry.id, k)
            if not path.exists():
                continue
            try:
                rows = store.read_rows(path)
            except Exception:
                path.unlink()
                continue
            if [r["sample_id"] for r in rows] == sample_ids and all(r["prompt_sha256"] == entry.sha256 for r in rows):
                self.record_shard(entry, path, rows)
                self.bar.update(len(rows))
            else:
                path.unlink()

    async def run_shard(self, entry, k, samples, target, generator, limit) -> None:
        async with limit:
            rows = await asyncio.gather(*(self.dialogue(entry, s, target, generator) for s in samples))
            path = store.shard_path(self.out, entry.id, k)
            store.write_table(path, rows, store.DIALOGUE_SCHEMA)
            self.record_shard(entry, path, rows)

    async def dialogue(self, entry, sample, target, generator) -> dict:
        row = await synthesize_dialogue(entry, sample, target, generator, self.settings)
        self.failed += row["error"] is not None
        elapsed = max(time.monotonic() - self.started, 1e-9)
        self.bar.set_postfix(tok_s=f"{self.generated_tokens / elapsed:.1f}", failed=self.failed, refresh=False)
        self.bar.update(1)
        return row

    def record_shard(self, entry: PromptEntry, path: Path, rows: list[dict]) -> None:
        self.manifest["prompts"][entry.id]["shards"][path.name] = {
            "rows": len(rows),
            "failed": sum(r["error"] is not None for r in rows),
            "first_sample": rows[0]["sample_id"],
            "last_sample": rows[-1]["sample_id"],
        }
        self.save_manifest()

    def save_manifest(self) -> None:
        store.write_manifest(self.out, self.manifest)

    def log(self, message: str) -> None:
        (self.bar.write if self.bar is not None else print)(message, file=sys.stderr)


def synthesize(
    catalog: str | Path,
    out: str | Path,
    settings: SynthSettings = SynthSettings(),
    generator: EngineConfig = EngineConfig(),
    target: EngineConfig = EngineConfig(),
    options: RunOptions = RunOptions(),
    prompts: list[str] | None = None,
) -> dict:
    """Run (or resume) a synthesis of the catalog's prompts (or of those named); returns the final manifest."""
    catalog, out = Path(catalog), Path(out)
    entries = load_catalog(catalog, prompts)  # every catalog problem surfaces before any model loads
    if settings.samples < 1:
        raise InputError(f"--samples must be at least 1, got {settings.samples}")
    if settings.max_turns is not None and settings.max_turns < 1:
        raise InputError(f"--max-turns must be at least 1, got {settings.max_turns}")
    if options.shard_size < 1:
        raise InputError(f"--shard-size must be at least 1, got {options.shard_size}")
    manifest = new_manifest(catalog, entries, generator, target, settings, options.shard_size)
    old = store.read_manifest(out)
    if old is not None:
        manifest = reconcile_manifest(old, manifest, out)
    out.mkdir(parents=True, exist_ok=True)
    store.remove_stale_temporaries(out)
    store.write_manifest(out, manifest)

    import ray

    from genpi.synth.actors import start_engine

    if not ray.is_initialized():
        ray.init(log_to_driver=False, configure_logging=False)
    shared = generator == target and options.target_replicas == 1
    target_actors = [start_engine(target, f"target-{i}") for i in range(options.target_replicas)]
    generator_actor = target_actors[0] if shared else start_engine(generator, "generator")
    run = Synthesis(out, entries, manifest, settings, options)
    try:
        asyncio.run(run.run(generator_actor[1], [engine for _, engine in target_actors]))
    finally:
        for handle, _ in {id(a[0]): a for a in [*target_actors, generator_actor]}.values():
            ray.kill(handle)  # free the CPUs/GPUs now, for whatever this driver does next
    return run.manifest


def engine_config(args, role: str) -> EngineConfig:
    get = lambda name: getattr(args, f"{role}_{name}")  # noqa: E731
    kind = get("engine") or args.engine
    tp = get("tp")
    cpus = get("cpus")
    if cpus is None:  # one machine, one or two engines: share its cores
        cpus = 1 if kind == "vllm" else max(1, (os.cpu_count() or 1) // (1 if args.generator == args.target else 2))
    gpus = get("gpus")
    if gpus is None:
        gpus = tp if kind == "vllm" else 0
    return EngineConfig(
        kind=kind,
        model=getattr(args, role),
        max_batch=args.max_batch,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        tensor_parallel_size=tp,
        num_cpus=cpus,
        num_gpus=gpus,
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m genpi.synth", description=__doc__.splitlines()[0])
    p.add_argument("catalog", help="prompt catalog (.yaml or .jsonl)")
    p.add_argument("--out", required=True, help="run folder: dialogues/, inputs/, manifest.json")
    p.add_argument("--prompts", default=None, help="comma-separated prompt ids to run (default: all)")
    d = SynthSettings()
    p.add_argument("--samples", type=int, default=d.samples, help="dialogues per prompt (default %(default)s)")
    p.add_argument("--heldout", type=float, default=d.heldout, help="held-out share (default %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--max-new-tokens", type=int, default=d.max_agent_tokens, help="per generated text: input, turn, answer, reason")
    p.add_argument("--max-turns", type=int, default=None, help="cap on every prompt's max_turns (default: the catalog's)")
    p.add_argument("--shard-size", type=int, default=RunOptions.shard_size)
    p.add_argument("--shards-in-flight", type=int, default=RunOptions.shards_in_flight, help="per target replica")
    p.add_argument("--engine", choices=["transformers", "vllm"], default="transformers")
    p.add_argument("--generator", default="smollm2", help="generator model: local folder or 'smollm2'")
    p.add_argument("--target", default="smollm2", help="target model: local folder or 'smollm2'")
    for role in ("generator", "target"):
        p.add_argument(f"--{role}-engine", choices=["transformers", "vllm"], default=None)
        p.add_argument(f"--{role}-tp", type=int, default=1, help="tensor-parallel size (vllm)")
        p.add_argument(f"--{role}-gpus", type=float, default=None, help="GPUs per actor (default: tp for vllm, else 0)")
        p.add_argument(f"--{role}-cpus", type=float, default=None, help="CPUs per actor")
    p.add_argument("--target-replicas", type=int, default=1, help="target engine actors")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-stats", action="store_true", help="skip the quality table at the end")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = dataclasses.replace(
        SynthSettings(),
        samples=args.samples,
        heldout=args.heldout,
        seed=args.seed,
        max_input_tokens=args.max_new_tokens,
        max_agent_tokens=args.max_new_tokens,
        max_environment_tokens=args.max_new_tokens,
        max_student_tokens=args.max_new_tokens,
        max_reason_tokens=args.max_new_tokens,
        max_turns=args.max_turns,
    )
    options = RunOptions(
        shard_size=args.shard_size,
        shards_in_flight=args.shards_in_flight,
        target_replicas=args.target_replicas,
        progress=not args.no_progress,
    )
    try:
        manifest = synthesize(
            args.catalog,
            args.out,
            settings,
            engine_config(args, "generator"),
            engine_config(args, "target"),
            options,
            prompts=args.prompts.split(",") if args.prompts else None,
        )
    except InputError as e:
        print(f"genpi: error: {e}", file=sys.stderr)
        return 2
    shards = [s for p in manifest["prompts"].values() for s in p["shards"].values()]
    rows, failed = sum(s["rows"] for s in shards), sum(s["failed"] for s in shards)
    print(f"{rows} dialogues in {args.out} ({failed} failed)", file=sys.stderr)
    if rows and not args.no_stats:
        from genpi.synth.stats import format_stats, quality_stats

        print(format_stats(quality_stats(args.out)))
    return 0 if rows else 1
