"""`python -m genpi.synth CATALOG --out DIR`: synthesize GenPI training dialogues for a catalog.

The driver holds no model. It starts engine actors on Ray (the local machine,
or the cluster this process was submitted to), generates each prompt's pseudo
inputs, then runs the dialogues of many shards concurrently and writes every
finished shard as one Parquet file (genpi.data.store). `OUT/manifest.json` (genpi.data.manifest) records the catalog,
models, settings and finished shards, so the same command, rerun after a crash
or a kill, does only the work that is missing: shards not written, and the
samples of written shards that met an engine or internal failure.

OUT must be a path on a filesystem that the driver can write (on a cluster, a
shared one); `OUT/synth.lock` keeps two runs from writing the same OUT at once.

Over 400 lines on purpose: one resumable driver and its command, whose rules for what a rerun redoes (manifest,
shards, retries) are read together.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
import time
from pathlib import Path

from genpi import InputError, exits_2_on_input_error
from genpi.catalog import PromptEntry, load_catalog
from genpi.cluster import init_ray
from genpi.data import store
from genpi.data.manifest import acquire_lock, new_manifest, read_manifest, reconcile_manifest, write_manifest
from genpi.data.runfolder import check_out, release_lock
from genpi.engines import AsyncEngine, EngineConfig
from genpi.engines.openai import PREFIX as OPENAI_PREFIX
from genpi.engines.openai import split_spec
from genpi.flags import add_settings, from_args, setting
from genpi.synth.estimate import add_flags as add_dry_run_flags
from genpi.synth.estimate import dry_run
from genpi.synth.pipeline import (
    GeneratedInputs,
    SynthSettings,
    generate_inputs,
    heldout_ids,
    input_token_limit,
    instruction_texts,
    is_retryable,
    stable_seed,
    synthesize_dialogue,
)
from genpi.tracking import DEFAULT as TRACKING
from genpi.tracking import HELP as TRACKING_HELP
from genpi.tracking import Tracker, open_tracker


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How the work is spread; may change between a run and its resumption."""

    shard_size: int = setting(32, "dialogues per Parquet shard")
    shards_in_flight: int = setting(4, "shards synthesized at once, per target replica")
    target_replicas: int = setting(1, "target engine actors")
    progress: bool = setting(True, "no progress bar", flag="--no-progress")
    dashboard: bool = setting(False, "start the Ray dashboard with a local Ray (its processes slow a small machine)")
    engine_restarts: int = setting(3, "times Ray may restart a dead engine actor over the run")
    # per engine call: it queues behind others and may wait through a restart (model load)
    call_timeout_s: float = setting(1800.0, "seconds an engine call may take, queueing included", flag="--call-timeout")
    tracking: str = setting(TRACKING, f"{TRACKING_HELP}; under OUT/.tracking/")


def retryable_count(rows: list[dict]) -> int:
    return sum(r["error"] is not None and is_retryable(r["error"]) for r in rows)


class Synthesis:
    def __init__(
        self,
        out: Path,
        entries: list[PromptEntry],
        manifest: dict,
        settings: SynthSettings,
        options: RunOptions,
        tracker: Tracker | None = None,
    ):
        self.out = out
        self.tracker = tracker
        self.entries = entries
        self.manifest = manifest
        self.settings = settings
        self.options = options
        self.engines: list = []
        self.failed = 0
        self.bar = None
        self.shards_verified = False  # finished() verifies before Ray starts; run() then need not hash them again

    async def run(self, generator: AsyncEngine, targets: list[AsyncEngine]) -> None:
        from tqdm import tqdm

        self.engines = list({id(e): e for e in [generator, *targets]}.values())
        self.verify_finished_shards()
        prompts = self.manifest["prompts"]
        total = sum(prompts[e.id]["inputs"] or self.settings.samples for e in self.entries)
        done = sum(s["rows"] - s.get("retryable", 0) for e in self.entries for s in prompts[e.id]["shards"].values())
        self.started, self.done, self.done_before = time.monotonic(), done, done  # a disabled bar counts nothing
        self.bar = tqdm(
            total=total, initial=done, unit="dlg", desc="dialogues", disable=not self.options.progress, file=sys.stderr
        )
        limits = [asyncio.Semaphore(self.options.shards_in_flight) for _ in targets]
        # One prompt's inputs at a time, in catalog order: the first prompt's dialogues start on the targets
        # while the generator writes the next prompt's inputs, where generating every prompt's inputs at once
        # would keep the targets idle until all of them were done.
        self.input_slot = asyncio.Semaphore(1)
        await asyncio.gather(*(self.run_prompt(e, generator, targets, limits, i) for i, e in enumerate(self.entries)))
        self.track()
        self.bar.close()

    def track(self) -> None:
        """The run's throughput so far, logged at the count of dialogues done (genpi.tracking)."""
        if self.tracker is None:
            return
        seconds = max(time.monotonic() - self.started, 1e-9)
        done = self.done - self.done_before  # this session's, as generated_tokens
        figures = {"dialogues": self.done, "failed": self.failed, "generated_tokens": self.generated_tokens}
        figures.update(seconds=seconds, dialogues_per_s=done / seconds, tokens_per_s=self.generated_tokens / seconds)
        self.tracker.log({"throughput": figures}, step=self.done)

    @property
    def generated_tokens(self) -> int:
        return sum(e.generated_tokens for e in self.engines)

    def verify_finished_shards(self) -> None:
        """Shards the manifest lists but whose files are gone (deleted, or lost with a disk) or differ from the
        SHA-256 recorded when they were written (corrupted, truncated, changed) are redone, never trusted."""
        if self.shards_verified:
            return
        for entry in self.entries:
            shards = self.manifest["prompts"][entry.id]["shards"]
            folder = store.shard_path(self.out, entry.id, 0).parent
            for name in list(shards):
                path = folder / name
                if not path.exists():
                    self.log(f"{entry.id}: shard {name} is listed in the manifest but missing; it will be redone")
                elif store.file_sha256(path) != shards[name].get("sha256"):
                    self.log(
                        f"{entry.id}: shard {name} does not match the SHA-256 the manifest recorded for it "
                        "(corrupted or changed since it was written); it will be redone"
                    )
                    path.unlink()
                else:
                    continue
                del shards[name]
        self.save_manifest()
        self.shards_verified = True

    def finished(self) -> bool:
        """Nothing left to generate: every prompt's inputs intact, every shard written, intact and without
        retryable failures, no write error recorded. A rerun of a finished synthesis then starts no engine (on a
        cluster, loading the generator and the target takes minutes)."""
        self.verify_finished_shards()
        prompts = self.manifest["prompts"]
        return all(
            self.inputs_intact(e) and not self.pending_shards(e) and not prompts[e.id].get("write_errors")
            for e in self.entries
        )

    def inputs_intact(self, entry: PromptEntry) -> bool:
        """The prompt's inputs were made and their file is the one the manifest recorded."""
        record, path = self.manifest["prompts"][entry.id], store.inputs_path(self.out, entry.id)
        return record["inputs"] is not None and path.exists() and store.file_sha256(path) == record.get("inputs_sha256")

    def pending_shards(self, entry: PromptEntry) -> list[tuple[int, list[int]]]:
        """(shard, sample ids) still to do, including shards with retryable failures; empty until the
        prompt's inputs exist."""
        n = self.manifest["prompts"][entry.id]["inputs"]
        if n is None:
            return []
        size = self.manifest["shard_size"]
        done = self.manifest["prompts"][entry.id]["shards"]
        pending = []
        for k, start in enumerate(range(0, n, size)):
            record = done.get(store.shard_path(self.out, entry.id, k).name)
            if record is None or record.get("retryable", 0) > 0:
                pending.append((k, list(range(start, min(start + size, n)))))
        return pending

    async def ensure_inputs(self, entry: PromptEntry, generator: AsyncEngine, target: AsyncEngine) -> list[dict]:
        path = store.inputs_path(self.out, entry.id)
        record = self.manifest["prompts"][entry.id]
        if self.inputs_intact(entry):
            return store.read_rows(path)
        if record["inputs"] is not None and path.exists():
            self.log(
                f"{entry.id}: {path} does not match the SHA-256 the manifest recorded for it; "
                "its inputs (and dialogues) will be made again"
            )
        # New inputs: any shard of this prompt was made from other inputs and must go.
        for shard in store.shard_path(self.out, entry.id, 0).parent.glob("*.parquet"):
            shard.unlink()
        record["shards"], record["inputs"] = {}, None
        limit = await input_token_limit(entry, target, self.settings)
        got = await generate_inputs(entry, generator, self.settings, limit.tokens)
        heldout = heldout_ids(entry.id, len(got.inputs), self.settings)
        samples = [
            {
                "prompt_id": entry.id,
                "sample_id": i,
                "seed": stable_seed(self.settings.seed, entry.id, i),
                "split": "heldout" if i in heldout else "train",
                "input": text,
            }
            for i, text in enumerate(got.inputs)
        ]
        record["inputs_sha256"] = store.write_table(path, samples, store.INPUT_SCHEMA)
        record["inputs"] = len(samples)
        record["input_limit"] = dataclasses.asdict(limit)
        record["input_generation"] = {
            "rounds": got.rounds,
            "asked": got.asked,
            "cut": got.cut,
            "duplicates": got.duplicates,
            "empty": got.empty,
            "errors": len(got.errors),
        }
        record["input_errors"] = got.errors[:20]
        record["shortfall"] = (
            shortfall(entry.id, len(samples), self.settings, got) if len(samples) < self.settings.samples else None
        )
        self.save_manifest()
        if record["shortfall"]:
            self.log(f"genpi: {record['shortfall']}")
            self.bar.total -= self.settings.samples - len(samples)
            self.bar.refresh()
        return samples

    async def run_prompt(self, entry, generator, targets, limits, offset: int) -> None:
        async with self.input_slot:
            try:
                samples = await self.ensure_inputs(entry, generator, targets[offset % len(targets)])
            except OSError as e:  # disk full, I/O error: this prompt waits for a rerun, the others go on
                self.write_failed(entry, store.inputs_path(self.out, entry.id), e)
                return
        self.manifest["prompts"][entry.id].setdefault("write_errors", {}).pop(
            self.name(store.inputs_path(self.out, entry.id)), None
        )
        self.adopt_orphan_shards(entry)
        jobs = []
        for k, sample_ids in self.pending_shards(entry):
            replica = (k + offset) % len(targets)
            jobs.append(
                self.run_shard(entry, k, [samples[i] for i in sample_ids], targets[replica], generator, limits[replica])
            )
        await asyncio.gather(*jobs)

    def adopt_orphan_shards(self, entry: PromptEntry) -> None:
        """A shard renamed into place just before a kill, but not yet in the manifest, is finished work."""
        listed = self.manifest["prompts"][entry.id]["shards"]
        for k, sample_ids in self.pending_shards(entry):
            path = store.shard_path(self.out, entry.id, k)
            if path.name in listed or not path.exists():
                continue
            try:
                rows = store.read_rows(path)
            except Exception:
                path.unlink()
                continue
            if [r["sample_id"] for r in rows] == sample_ids and all(r["prompt_sha256"] == entry.sha256 for r in rows):
                self.record_shard(entry, path, rows, store.file_sha256(path))
                self.bar.update(len(rows) - retryable_count(rows))
            else:
                path.unlink()

    async def run_shard(self, entry, k, samples, target, generator, limit) -> None:
        """Synthesize a shard's samples, or on a rerun only those that met a retryable failure; the shard
        is rewritten whole (atomically), every sample once, in sample order."""
        async with limit:
            path = store.shard_path(self.out, entry.id, k)
            kept = {}
            if path.name in self.manifest["prompts"][entry.id]["shards"]:
                kept = {r["sample_id"]: r for r in store.read_rows(path) if not retryable_count([r])}
            todo = [s for s in samples if s["sample_id"] not in kept]
            fresh = await asyncio.gather(*(self.dialogue(entry, s, target, generator) for s in todo))
            rows = sorted([*kept.values(), *fresh], key=lambda r: r["sample_id"])
            try:
                digest = store.write_table(path, rows, store.DIALOGUE_SCHEMA)
            except OSError as e:  # disk full, I/O error: only this shard fails; the file and manifest are as before
                self.write_failed(entry, path, e)
                return
            self.record_shard(entry, path, rows, digest)

    async def dialogue(self, entry, sample, target, generator) -> dict:
        row = await synthesize_dialogue(entry, sample, target, generator, self.settings)
        self.failed += row["error"] is not None
        self.done += 1
        elapsed = max(time.monotonic() - self.started, 1e-9)
        self.bar.set_postfix(tok_s=f"{self.generated_tokens / elapsed:.1f}", failed=self.failed, refresh=False)
        self.bar.update(1)
        return row

    def record_shard(self, entry: PromptEntry, path: Path, rows: list[dict], sha256: str) -> None:
        record = self.manifest["prompts"][entry.id]
        record["shards"][path.name] = {
            "rows": len(rows),
            "failed": sum(r["error"] is not None for r in rows),
            "retryable": retryable_count(rows),  # engine/internal failures: the shard is not finished
            "first_sample": rows[0]["sample_id"],
            "last_sample": rows[-1]["sample_id"],
            "sha256": sha256,  # a resumed run redoes the shard when its file no longer matches
        }
        record.setdefault("write_errors", {}).pop(self.name(path), None)
        self.save_manifest()
        self.track()

    def write_failed(self, entry: PromptEntry, path: Path, error: OSError) -> None:
        """A file that could not be written: said now, recorded for the run's closing lines, redone on rerun.
        The manifest may not be writable either (a full disk): then the rerun finds the file unlisted."""
        why = f"{type(error).__name__}: {error}"
        self.manifest["prompts"][entry.id].setdefault("write_errors", {})[self.name(path)] = why
        self.log(f"genpi: {entry.id}: could not write {path} ({why}); rerun the same command to redo it")
        try:
            self.save_manifest()
        except OSError:
            pass

    def name(self, path: Path) -> str:
        """A run file as the manifest's write errors name it: its path inside OUT."""
        return path.relative_to(self.out).as_posix()

    def save_manifest(self) -> None:
        write_manifest(self.out, self.manifest)

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
    tracker: Tracker | None = None,
) -> dict:
    """Run (or resume) a synthesis of the catalog's prompts (or of those named); returns the final manifest.
    Its throughput is logged to `tracker`, by default one of `options.tracking` under OUT/.tracking/."""
    catalog, out = Path(catalog), check_out(out)
    entries = load_catalog(catalog, prompts)  # every catalog problem surfaces before any model loads
    if settings.samples < 1:
        raise InputError(f"--samples must be at least 1, got {settings.samples}")
    if settings.max_input_tokens is not None and settings.max_input_tokens < 1:
        raise InputError(f"--max-input-tokens must be at least 1, got {settings.max_input_tokens}")
    if settings.max_turns is not None and settings.max_turns < 1:
        raise InputError(f"--max-turns must be at least 1, got {settings.max_turns}")
    if settings.teacher_topk < 0:
        raise InputError(f"--teacher-topk must be 0 (off) or more, got {settings.teacher_topk}")
    if options.shard_size < 1:
        raise InputError(f"--shard-size must be at least 1, got {options.shard_size}")
    if options.engine_restarts < 0 or options.call_timeout_s <= 0:
        raise InputError(
            f"--engine-restarts must be 0 or more and --call-timeout above 0, got {options.engine_restarts} "
            f"and {options.call_timeout_s:g}"
        )
    for role, config in (("generator", generator), ("target", target)):
        if config.kind == "vllm" and settings.teacher_topk > config.max_logprobs:
            raise InputError(
                f"--teacher-topk {settings.teacher_topk} is above the {role} engine's max_logprobs "
                f"({config.max_logprobs})"
            )
        if config.kind == "vllm" and config.num_gpus and not 0 < config.gpu_memory_utilization <= 1:
            raise InputError(f"--{role}-gpu-memory-utilization must be in (0, 1], got {config.gpu_memory_utilization}")
    own = tracker is None
    if own:
        tracker = open_tracker(options.tracking, out, "synth", time.strftime("%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    lock = acquire_lock(out)
    try:
        return _synthesize(catalog, out, entries, settings, generator, target, options, tracker)
    finally:
        release_lock(lock)
        if own:
            tracker.close()


def _synthesize(catalog, out, entries, settings, generator, target, options, tracker=None) -> dict:
    manifest = new_manifest(catalog, entries, generator, target, settings, options.shard_size, instruction_texts())
    old = read_manifest(out)
    if old is not None:
        manifest = reconcile_manifest(old, manifest, out)
    store.remove_stale_temporaries(out)
    store.upgrade_layout(out)  # a run begun by a genpi before issue 26 goes on in the plain folders
    upgrade_write_errors(manifest)
    write_manifest(out, manifest)
    run = Synthesis(out, entries, manifest, settings, options, tracker)
    if run.finished():
        run.log(f"genpi: every dialogue in {out} is written already; no engine started")
        return run.manifest

    import ray

    from genpi.synth.actors import start_engine

    # log_to_driver: errors logged inside engine actors reach this driver's stderr.
    init_ray(log_to_driver=True, include_dashboard=options.dashboard)
    cluster_gpus = ray.cluster_resources().get("GPU", 0)
    generator, target = engine_gpus(generator, "generator", cluster_gpus), engine_gpus(target, "target", cluster_gpus)
    shared = generator == target and options.target_replicas == 1
    actor_options = {"restarts": options.engine_restarts, "timeout_s": options.call_timeout_s}
    target_actors = [start_engine(target, f"target-{i}", **actor_options) for i in range(options.target_replicas)]
    generator_actor = target_actors[0] if shared else start_engine(generator, "generator", **actor_options)
    try:
        asyncio.run(run.run(generator_actor[1], [engine for _, engine in target_actors]))
    finally:
        for handle, _ in {id(a[0]): a for a in [*target_actors, generator_actor]}.values():
            ray.kill(handle)  # free the CPUs/GPUs now, for whatever this driver does next
    return run.manifest


def upgrade_write_errors(manifest: dict) -> None:
    """The write errors of a legacy run name its files in the `prompt_id=ID/` folders: named as the files they
    are now (store.upgrade_layout), so that writing a file clears its error."""
    legacy = f"dialogues/{store.LEGACY_PROMPT}"
    for record in manifest["prompts"].values():
        errors = record.get("write_errors") or {}
        record["write_errors"] = {name.replace(legacy, "dialogues/", 1): why for name, why in errors.items()}


def shortfall(prompt_id: str, n: int, settings: SynthSettings, got: GeneratedInputs) -> str:
    """e.g. "web-select: 3 of 4 dialogues (13 generated inputs over the 512-token input limit, 2 duplicates;
    16 inputs asked in 4 generator rounds, at most 4)"."""
    line = (
        f"{prompt_id}: {n} of {settings.samples} dialogues ({got.why_short()}; {got.asked} inputs asked in "
        f"{got.rounds} generator round{'s' * (got.rounds != 1)}, at most {settings.input_rounds})"
    )
    if got.cut and got.cut >= got.duplicates + got.empty + len(got.errors):
        line += "; --max-input-tokens sets a larger input limit"
    return line


def closing_lines(manifest: dict) -> list[str]:
    """The run's last words beyond the dialogue count: each prompt that got fewer dialogues than asked and
    why, and each file that could not be written."""
    lines = []
    for prompt_id, record in manifest["prompts"].items():
        if record.get("shortfall"):
            lines.append(f"genpi: {record['shortfall']}")
        for name, why in (record.get("write_errors") or {}).items():
            lines.append(f"genpi: {prompt_id}: {name} could not be written ({why}); rerun the same command to redo it")
    return lines


def engine_gpus(config: EngineConfig, role: str, cluster_gpus: float) -> EngineConfig:
    """`config` with the GPUs its actor asks Ray for on a cluster with `cluster_gpus`. The transformers engine
    runs on the GPU it is given, or on the CPU: Ray hides the GPUs from an actor that asks for none, so on a
    cluster with GPUs it takes one unless told otherwise (num_gpus None: not chosen), and 0 there is refused, as
    training refuses --gpus-per-trial 0, rather than generating on the CPU, silently and slowly."""
    if config.kind != "transformers":
        return config
    if config.num_gpus is None:
        return dataclasses.replace(config, num_gpus=1 if cluster_gpus else 0)
    if config.num_gpus == 0 and cluster_gpus:
        raise InputError(
            f"--{role}-gpus 0 with the transformers engine on a Ray cluster with {cluster_gpus:g} GPUs: Ray hides the "
            f"GPUs from an actor that asks for none, so it would generate on the CPU; leave --{role}-gpus out "
            "(one GPU per engine actor) or give a GPU share"
        )
    return config


def engine_config(args, role: str) -> EngineConfig:
    get = lambda name: getattr(args, f"{role}_{name}")  # noqa: E731
    model = getattr(args, role)
    remote = model.startswith(OPENAI_PREFIX)  # a server elsewhere does the work
    kind = "openai" if remote else get("engine") or args.engine
    if remote:
        try:
            split_spec(model)
        except ValueError as e:
            raise InputError(f"--{role} {e}") from e
        model = model.removeprefix(OPENAI_PREFIX)
    tp = get("tp")
    cpus = get("cpus")
    if cpus is None:  # one machine, one or two engines: share its cores
        local = {m for m in (args.generator, args.target) if not m.startswith(OPENAI_PREFIX)}
        cpus = 0.25 if remote else 1 if kind == "vllm" else max(1, (os.cpu_count() or 1) // len(local))
    gpus = get("gpus")
    if gpus is None:  # the transformers engine's: None until the Ray cluster is known (engine_gpus)
        gpus = tp if kind == "vllm" else None if kind == "transformers" else 0
    # An actor given a share of a GPU (--target-gpus 0.5) must keep vLLM to that share of its memory.
    memory = get("gpu_memory_utilization")
    if memory is None:
        memory = (
            round(EngineConfig.gpu_memory_utilization * min(1.0, gpus / tp), 4)
            if gpus and kind == "vllm"
            else EngineConfig.gpu_memory_utilization
        )
    return EngineConfig(
        kind=kind,
        model=model,
        max_batch=args.max_batch,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        tensor_parallel_size=tp,
        gpu_memory_utilization=memory,
        max_logprobs=max(EngineConfig.max_logprobs, args.teacher_topk),
        num_cpus=cpus,
        num_gpus=gpus,
    )


# --max-new-tokens: every role's token limit at once (genpi run passes it); a role's own flag after it wins
TURN_TOKEN_FIELDS = ("max_agent_tokens", "max_environment_tokens", "max_student_tokens", "max_reason_tokens")


class AllTurnTokens(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        for name in TURN_TOKEN_FIELDS:
            setattr(namespace, name, values)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m genpi.synth", description=__doc__.splitlines()[0])
    p.add_argument("catalog", help="prompt catalog (.yaml or .jsonl)")
    p.add_argument("--out", required=True, help="run folder: dialogues/, inputs/, manifest.json")
    p.add_argument("--prompts", default=None, help="comma-separated prompt ids to run (default: all)")
    add_settings(p, SynthSettings)
    p.add_argument(
        "--max-new-tokens",
        type=int,
        action=AllTurnTokens,
        metavar="N",
        help=f"sets {', '.join('--' + n.replace('_', '-') for n in TURN_TOKEN_FIELDS)} at once; "
        "a role's own flag after it wins",
    )
    add_settings(p, RunOptions)
    p.add_argument("--engine", choices=["transformers", "vllm"], default="transformers")
    p.add_argument(
        "--generator",
        default="smollm2",
        help="generator model: local folder, hub id in the local cache, 'smollm2', or openai:BASE_URL/MODEL "
        "(an OpenAI-compatible server)",
    )
    p.add_argument("--target", default="smollm2", help="target model: as --generator")
    for role in ("generator", "target"):
        p.add_argument(f"--{role}-engine", choices=["transformers", "vllm"], default=None)
        p.add_argument(f"--{role}-tp", type=int, default=1, help="tensor-parallel size (vllm)")
        p.add_argument(
            f"--{role}-gpus",
            type=float,
            default=None,
            help="GPUs per actor (default: tp for vllm; transformers: 1 on a Ray cluster with GPUs, else 0)",
        )
        p.add_argument(f"--{role}-cpus", type=float, default=None, help="CPUs per actor")
        p.add_argument(
            f"--{role}-gpu-memory-utilization",
            type=float,
            default=None,
            help=f"vllm: share of each GPU's memory "
            f"(default: {EngineConfig.gpu_memory_utilization} x the actor's GPU share)",
        )
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--no-stats", action="store_true", help="skip the quality table at the end")
    add_dry_run_flags(p)
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


@exits_2_on_input_error
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:  # the calls and tokens this would cost; nothing generated or written
        return dry_run(args)
    options = from_args(RunOptions, args)
    # one tracked run for the throughput and the quality table
    with open_tracker(options.tracking, args.out, "synth", time.strftime("%Y%m%d-%H%M%S")) as tracker:
        return finish(args, options, tracker)


def finish(args: argparse.Namespace, options: RunOptions, tracker: Tracker) -> int:
    """The synthesis, its closing lines and its quality table (printed, and logged to `tracker`); the exit status."""
    manifest = synthesize(
        args.catalog,
        args.out,
        from_args(SynthSettings, args),
        engine_config(args, "generator"),
        engine_config(args, "target"),
        options,
        prompts=args.prompts.split(",") if args.prompts else None,
        tracker=tracker,
    )
    shards = [s for p in manifest["prompts"].values() for s in p["shards"].values()]
    rows, failed = sum(s["rows"] for s in shards), sum(s["failed"] for s in shards)
    retryable = sum(s.get("retryable", 0) for s in shards)
    print(f"{rows} dialogues in {args.out} ({failed} failed)", file=sys.stderr)
    for line in closing_lines(manifest):
        print(line, file=sys.stderr)
    if retryable:
        print(
            f"genpi: {retryable} dialogues met engine or internal failures; rerun the same command to redo them",
            file=sys.stderr,
        )
    if rows and not args.no_stats:
        from genpi.synth.stats import format_stats, quality_stats

        stats = quality_stats(args.out)
        print(format_stats(stats))
        tracker.log({"quality": {s["prompt_id"]: s for s in stats}}, step=rows)
    unwritten = any(p.get("write_errors") for p in manifest["prompts"].values())
    return 0 if rows and not retryable and not unwritten else 1
