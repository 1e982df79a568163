"""A synthesis run's manifest and lock: OUT/manifest.json and OUT/synth.lock.

    OUT/manifest.json   catalog, models, settings, instructions, and per prompt its inputs and finished shards
                        (each with its SHA-256): what a resumed run checks and continues, what stats and the
                        evaluations read back (the catalog the run used, gold_turns, max_turns, samples)
    OUT/synth.lock      held while a synthesis run writes OUT (genpi.data.runfolder's lock file)

The manifest is replaced whole (genpi.data.store.write_atomic): a kill leaves the old one or the new one.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from genpi import InputError
from genpi.catalog import PromptEntry
from genpi.data import runfolder
from genpi.data.store import write_atomic
from genpi.engines import EngineConfig

MANIFEST_VERSION = 4  # 3: per-shard SHA-256, the input limit and the account of each prompt's inputs; 4: the role-play
# ends on the end marker or the turn limit only (a version-3 run also stopped at a final action: not resumed with it)
LOCK = "synth.lock"


def new_manifest(
    catalog: Path,
    entries: list[PromptEntry],
    generator: EngineConfig,
    target: EngineConfig,
    settings,
    shard_size: int,
    instructions: dict[str, str],
) -> dict:
    """The manifest of a fresh run. `settings`: the run's genpi.synth.pipeline.SynthSettings (recorded whole; its
    turn_limit gives each prompt's max_turns); `instructions`: the synthesis instruction texts it uses."""
    return {
        "version": MANIFEST_VERSION,
        "catalog": {"path": str(catalog), "prompts": {e.id: e.to_json() for e in entries}},
        "generator": engine_fingerprint(generator),
        "target": engine_fingerprint(target),
        "settings": dataclasses.asdict(settings),
        "instructions": instructions,
        "shard_size": shard_size,
        "prompts": {
            e.id: {
                "prompt_sha256": e.sha256,
                "gold_turns": e.gold_turns,
                "max_turns": settings.turn_limit(e),
                "samples": settings.samples,
                "inputs": None,
                "inputs_sha256": None,
                "input_limit": None,  # {tokens, source, longest_example, note}: pipeline.InputLimit
                "input_generation": None,  # what the generator's replies became: rounds, asked, cut, duplicates, ...
                "input_errors": [],  # the first generator errors
                "shortfall": None,  # why the prompt has fewer inputs (dialogues) than `samples`
                "write_errors": {},  # file name -> why it could not be written in the last run (redone on rerun)
                "shards": {},  # file name -> rows, failures, sample range, sha256
            }
            for e in entries
        },
    }


def engine_fingerprint(config: EngineConfig) -> dict:
    """What of an engine changes its outputs (not where it runs or how much it batches)."""
    keys = ("kind", "model", "dtype", "max_model_len", "tensor_parallel_size")
    return {k: getattr(config, k) for k in keys}


def reconcile_manifest(old: dict, new: dict, out: Path) -> dict:
    """The manifest to continue with: the old one when the run is the same, else a clear refusal."""
    for key in ("version", "generator", "target", "settings", "instructions", "shard_size"):
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
        elif (
            before["prompt_sha256"] != fresh["prompt_sha256"]
            or old["catalog"]["prompts"][prompt_id] != new["catalog"]["prompts"][prompt_id]
        ):
            raise InputError(
                f"{out}: prompt {prompt_id!r} changed in the catalog since this run started; "
                "choose another --out for the new version"
            )
    return old


def acquire_lock(out: Path) -> Path:
    """OUT/synth.lock (genpi.data.runfolder.acquire_lock): InputError naming the holder while another run holds it."""
    return runfolder.acquire_lock(out / LOCK, "synthesis run")


def write_manifest(out: str | Path, manifest: dict) -> None:
    def write(tmp: Path) -> None:
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))

    write_atomic(Path(out) / "manifest.json", write)


def read_manifest(out: str | Path) -> dict | None:
    path = Path(out) / "manifest.json"
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:  # unreadable, not JSON, not UTF-8
        raise InputError(
            f"{path}: not a readable run manifest ({' '.join(str(e).split())}); restore it, or use another folder"
        ) from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("prompts", {}), dict):
        raise InputError(
            f"{path}: not a run manifest (expected a JSON object with prompts); restore it, or use another folder"
        )
    return manifest
