"""The adapter contract: `ADAPTERS/ID/` is a PEFT adapter folder plus `genpi.json`.

An adapter folder is built under a temporary name and renamed into place with
`genpi.json` already inside, so a folder named after a prompt is always
complete; anything else under ADAPTERS is a leftover of a killed run. Whatever
loads an adapter for a prompt checks `prompt_sha256` against the catalog first.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from genpi import InputError
from genpi.catalog import PromptEntry

MANIFEST = "genpi.json"


class StaleAdapterError(InputError):
    pass


@dataclasses.dataclass
class AdapterManifest:
    prompt_id: str
    prompt_sha256: str
    base_model: str
    method: str
    lam: float | None  # λ of the PG loss; None for methods without it
    lora: dict  # rank, alpha, dropout, target modules, 4-bit or not
    data_fingerprint: str  # what the adapter was trained on (see genpi.train)
    train_metrics: dict = dataclasses.field(default_factory=dict)
    eval_metrics: dict = dataclasses.field(default_factory=dict)
    genpi_version: str = ""
    # every training setting (TrainSettings whole), the λ values tried, and under "effective" what
    # "auto" settings became where it trained (device, dtypes, gradient checkpointing, optimizer)
    settings: dict = dataclasses.field(default_factory=dict)


def write_adapter(folder: str | Path, manifest: AdapterManifest, save: Callable[[Path], None]) -> Path:
    """Build the adapter in a private folder (`save` writes the PEFT files), then rename it into place."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        save(tmp)
        (tmp / MANIFEST).write_text(_manifest_json(manifest))
        if folder.exists():  # replaced by a newer training of the same prompt
            old = folder.with_name(f".{folder.name}-old-{os.getpid()}")
            os.rename(folder, old)
            os.rename(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _manifest_json(manifest: AdapterManifest) -> str:
    return json.dumps(dataclasses.asdict(manifest), indent=2, sort_keys=True)


def read_adapter_manifest(folder: str | Path) -> AdapterManifest | None:
    """The manifest of a complete adapter folder, or None if there is none; InputError naming the file if it is corrupt."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_bytes())
        if not isinstance(data, dict):
            raise ValueError(f"a JSON {type(data).__name__}, not an object")
        manifest = AdapterManifest(**data)
        wrong = [name for name in ("prompt_id", "prompt_sha256", "base_model", "method") if not isinstance(getattr(manifest, name), str)]
        if wrong:
            raise ValueError(f"field {wrong[0]} is not a string")
        return manifest
    except (OSError, ValueError, TypeError) as e:  # unreadable, not JSON (UnicodeDecodeError too), wrong or missing fields
        reason = " ".join(str(e).split()) or type(e).__name__
        raise InputError(f"{path}: not a valid genpi adapter manifest ({reason}); retrain the adapter or restore the file") from None


def _finished_manifest(folder: str | Path) -> AdapterManifest:
    manifest = read_adapter_manifest(folder)
    if manifest is None:
        raise InputError(f"{folder}: not a finished genpi adapter (no {MANIFEST})")
    return manifest


def record_eval(folder: str | Path, metrics: dict) -> AdapterManifest:
    """Merge evaluation metrics into a finished adapter's genpi.json (replaced whole, never half-written)."""
    manifest = _finished_manifest(folder)
    manifest.eval_metrics = {**manifest.eval_metrics, **metrics}
    path = Path(folder) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.{os.getpid()}.tmp")
    tmp.write_text(_manifest_json(manifest))
    os.replace(tmp, path)
    return manifest


def check_adapter(folder: str | Path, entry: PromptEntry) -> AdapterManifest:
    """The adapter's manifest, if it was trained for exactly this prompt; a clear refusal otherwise."""
    manifest = _finished_manifest(folder)
    if manifest.prompt_id != entry.id or manifest.prompt_sha256 != entry.sha256:
        raise StaleAdapterError(
            f"{folder}: stale adapter: trained for prompt {manifest.prompt_id!r} sha256 {manifest.prompt_sha256[:12]}…, "
            f"but the catalog's {entry.id!r} is now sha256 {entry.sha256[:12]}…; retrain it"
        )
    return manifest
