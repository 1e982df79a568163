"""The adapter contract: `ADAPTERS/ID/` is a PEFT adapter folder plus `genpi.json`.

A full fine-tune (`genpi train --full-finetune`) writes a whole model folder there instead (safetensors, config,
tokenizer), its genpi.json saying `kind: "model"` (`MODEL`): the evaluations and the server load it as a model of
its own, not as an adapter on the base (`is_model`). Everything else about the folder is the same contract.

An adapter folder is built under a temporary name and renamed into place with
`genpi.json` already inside, so a folder named after a prompt is always
complete; anything else under ADAPTERS is a leftover of a killed run. Whatever
loads an adapter for a prompt (training's skip of a finished prompt, the
evaluations, the server) checks it here first: `check_adapter` against the
catalog's prompt (`prompt_sha256`), `check_base` against the base model it is
served on, and `fingerprint` is what training compares to retrain or skip.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from genpi import InputError
from genpi.catalog import PromptEntry
from genpi.models import resolve_model

MANIFEST = "genpi.json"
ADAPTER, MODEL = "adapter", "model"  # AdapterManifest.kind: a PEFT adapter on the base, or a whole model


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
    data_fingerprint: str  # what the adapter was trained on: fingerprint() below
    train_metrics: dict = dataclasses.field(default_factory=dict)
    eval_metrics: dict = dataclasses.field(default_factory=dict)
    genpi_version: str = ""
    # every training setting (TrainSettings whole), the λ values tried, and under "effective" what
    # "auto" settings became where it trained (device, dtypes, gradient checkpointing, optimizer)
    settings: dict = dataclasses.field(default_factory=dict)
    kind: str = ADAPTER  # MODEL: a fully fine-tuned model folder (absent from manifests written before it: adapter)
    # the base folder it trained on here (a hub id's cache snapshot) and weights_digest of it: what check_base compares
    # (base_model is the name it was given, a hub id or a folder; the model card and adapter_config.json carry its
    # portable form, genpi.models.portable_model); empty in manifests written before them
    base_path: str = ""
    base_digest: str = ""


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
    """The manifest of a complete adapter folder, or None if there is none; InputError naming the file if it is
    corrupt."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_bytes())
        if not isinstance(data, dict):
            raise ValueError(f"a JSON {type(data).__name__}, not an object")
        manifest = AdapterManifest(**data)
        wrong = [
            name
            for name in ("prompt_id", "prompt_sha256", "base_model", "method")
            if not isinstance(getattr(manifest, name), str)
        ]
        if wrong:
            raise ValueError(f"field {wrong[0]} is not a string")
        if manifest.kind not in (ADAPTER, MODEL):
            raise ValueError(f"field kind is {manifest.kind!r}, expected {ADAPTER!r} or {MODEL!r}")
        return manifest
    except (
        OSError,
        ValueError,
        TypeError,
    ) as e:  # unreadable, not JSON (UnicodeDecodeError too), wrong or missing fields
        reason = " ".join(str(e).split()) or type(e).__name__
        raise InputError(
            f"{path}: not a valid genpi adapter manifest ({reason}); retrain the adapter or restore the file"
        ) from None


def is_model(manifest: AdapterManifest | None) -> bool:
    """Whether a genpi.json describes a whole fine-tuned model (loaded as its own model), not a LoRA adapter."""
    return manifest is not None and manifest.kind == MODEL


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
            f"{folder}: stale adapter: trained for prompt {manifest.prompt_id!r} "
            f"sha256 {manifest.prompt_sha256[:12]}…, "
            f"but the catalog's {entry.id!r} is now sha256 {entry.sha256[:12]}…; retrain it"
        )
    return manifest


def fingerprint(train: list[dict], heldout: list[dict], settings: dict, base: str) -> str:
    """What an adapter depends on: its data, every training setting, the λ values tried and its base.
    `settings`: genpi.train.plan.fingerprint_settings (TrainSettings with the λ values); its `init_adapter`
    folder's weights count too, not only their folder's name."""
    digest = hashlib.sha256()
    for row in train + heldout:
        digest.update(
            json.dumps(
                [row["sample_id"], row["split"], row["input"], row["turns"], row["student_output"], row["reason"]],
                sort_keys=True,
                default=str,
            ).encode()
        )
    digest.update(json.dumps({**settings, "base": base}, sort_keys=True, default=str).encode())
    if settings.get("init_adapter"):
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            path = Path(settings["init_adapter"]) / name
            digest.update(path.read_bytes() if path.is_file() else b"")
    return digest.hexdigest()


def weights_digest(path: str | Path) -> str:
    """sha256 over a model folder's config.json and weight files (to tell two copies of one model apart)."""
    digest = hashlib.sha256()
    folder = Path(path)
    for file in sorted([folder / "config.json", *folder.glob("*.safetensors"), *folder.glob("*.bin")]):
        if file.exists():
            digest.update(file.name.encode())
            with open(file, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def check_base(folder: Path, manifest: AdapterManifest, base_path: str) -> None:
    """Refuse an adapter trained on another base model: same folder, or same config and weights. A manifest that
    recorded the folder and digest it trained on is held to them: a hub id whose cached snapshot moved to another
    commit names other weights."""
    if manifest.base_digest:
        if manifest.base_path and Path(manifest.base_path).resolve() == Path(base_path).resolve():
            return
        if weights_digest(base_path) == manifest.base_digest:
            return
        raise InputError(
            f"{folder}: trained on base model {manifest.base_model!r} ({manifest.base_path}), but the evaluated base "
            f"{base_path!r} has other config and weights; pass the adapter's base with --base"
        )
    try:
        trained_on = resolve_model(manifest.base_model)
    except Exception:
        trained_on = manifest.base_model
    if Path(trained_on).resolve() == Path(base_path).resolve():
        return
    if Path(trained_on).is_dir() and weights_digest(trained_on) == weights_digest(base_path):
        return
    raise InputError(
        f"{folder}: trained on base model {manifest.base_model!r}, but the evaluated base is {base_path!r} "
        "(another path with other weights); pass the adapter's base with --base"
    )
