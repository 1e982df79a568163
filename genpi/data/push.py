"""genpi push: adapters (or an exported dataset) to a Hugging Face hub repository, through huggingface_hub.

What goes up is staged first in a private folder (`stage_adapters`, `stage_dataset`) and that folder is uploaded
whole, so what the hub gets is exactly what was staged: never a trial's checkpoints, the Tune experiment (.tune),
the lock of a running training or the leftovers of a killed one (hidden names). Files are hard-linked into the stage
where they can be (a full model's weights are not copied) and the files that change on the way (README.md,
adapter_config.json) are written there new, so the local folders stay as they are.

    ADAPTERS/ID/ (one adapter or model folder)  -> the repository's root, its card naming the repository
    ADAPTERS/ (one folder per prompt)           -> ID/ per adapter, and a README.md at the root listing them
    DIR --dataset (genpi export --to DIR)       -> the folder as it is; its README.md is the dataset card

Without a token (HF_TOKEN, or the login huggingface_hub cached) nothing is staged or sent: InputError.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from genpi import InputError
from genpi.data.adapters import MANIFEST, MODEL, AdapterManifest, read_adapter_manifest
from genpi.data.model_card import CARD, TAGS, card_text, front_matter, portable_configs
from genpi.models import HUB_ID, hub_id, portable_model

REWRITTEN = {CARD, "adapter_config.json"}  # written new into the stage, never through a link to the local file


def uploadable(relative: Path) -> bool:
    """Whether a file (its path inside the pushed folder) goes up: not hidden or inside a hidden folder (.tune, a
    killed run's .ID-xxxx, .cache), not a checkpoint, not a lock."""
    return not any(part.startswith(".") or part.startswith("checkpoint") for part in relative.parts) and not (
        relative.name.endswith(".lock")
    )


def _stage_tree(src: Path, dest: Path) -> list[Path]:
    """Link (else copy) every uploadable file of `src` into `dest`; returns their paths inside `dest`."""
    staged = []
    for path in sorted(src.rglob("*")):
        relative = path.relative_to(src)
        if not path.is_file() or not uploadable(relative):
            continue
        target = dest / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if relative.name in REWRITTEN:
            shutil.copyfile(path, target)  # changed in the stage: its own copy
        else:
            try:
                os.link(path.resolve(), target)  # resolve: a hub cache's symlinks point at its blobs
            except OSError:  # another file system, or links not allowed
                shutil.copyfile(path, target)
        staged.append(relative)
    return staged


def _stage_adapter(folder: Path, manifest: AdapterManifest, dest: Path, repo: str, subfolder: str | None) -> None:
    _stage_tree(folder, dest)
    portable_configs(dest, manifest)
    (dest / CARD).write_text(card_text(manifest, repo, subfolder))


def adapter_folders(root: Path) -> list[tuple[Path, AdapterManifest]]:
    """The finished adapters under an adapters folder, one per ID/; InputError for a folder that is not one (a
    hidden folder is a leftover or the trials' storage, and is left out)."""
    found = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        manifest = read_adapter_manifest(folder)
        if manifest is None:
            raise InputError(
                f"{folder}: not a finished genpi adapter (no {MANIFEST}); move it out of {root} or push the adapters "
                "one by one (genpi push ADAPTERS/ID)"
            )
        found.append((folder, manifest))
    if not found:
        raise InputError(f"{root}: no adapters (expected ADAPTERS/ID/ folders with {MANIFEST}, from genpi train --out)")
    return found


def index_card(adapters: list[tuple[Path, AdapterManifest]], repo: str) -> str:
    """README.md at the root of a repository with one adapter per prompt in ID/."""
    manifests = [m for _, m in adapters]
    bases = {hub_id(m.base_model) for m in manifests}
    kinds = {m.kind for m in manifests}
    meta: dict = {}
    if len(bases) == 1 and None not in bases:
        meta["base_model"] = bases.pop()
    meta["library_name"] = "transformers" if kinds == {MODEL} else "peft"
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = [*TAGS, *sorted({"full-finetune" if m.kind == MODEL else "lora" for m in manifests})]
    meta["genpi"] = {
        "adapters": [
            {"subfolder": f.name, "prompt_id": m.prompt_id, "prompt_sha256": m.prompt_sha256, "method": m.method}
            for f, m in adapters
        ]
    }
    lines = [
        *front_matter(meta),
        f"# {repo}: internalized prompts",
        "",
        "One folder per prompt, each trained with genpi (Generative Prompt Internalization) to behave as its base "
        "does with the prompt in its context, without the prompt. Each folder's README.md says how it was trained "
        "and evaluated, and how to load it (`subfolder=`).",
        "",
        "| folder | prompt sha256 | base model | method | λ |",
        "|---|---|---|---|---|",
    ]
    for folder, m in adapters:
        lam = "–" if m.lam is None else m.lam
        lines.append(
            f"| [{folder.name}]({folder.name}/) | `{m.prompt_sha256[:12]}` | `{portable_model(m.base_model)}` | "
            f"{m.method} | {lam} |"
        )
    return "\n".join(lines) + "\n"


def stage_adapters(path: Path, stage: Path, repo: str) -> list[str]:
    """Stage one adapter folder (at the root) or an adapters folder (ID/ each, an index card at the root) for
    `repo`; returns the prompt ids staged."""
    manifest = read_adapter_manifest(path)
    if manifest is not None:
        _stage_adapter(path, manifest, stage, repo, None)
        return [manifest.prompt_id]
    adapters = adapter_folders(path)
    for folder, m in adapters:
        _stage_adapter(folder, m, stage / folder.name, repo, folder.name)
    (stage / CARD).write_text(index_card(adapters, repo))
    return [m.prompt_id for _, m in adapters]


def stage_dataset(path: Path, stage: Path) -> list[Path]:
    """Stage an exported dataset folder as it is; its README.md (the dataset card of genpi export) must be there."""
    if not (path / CARD).is_file():
        raise InputError(f"{path}: no {CARD} dataset card; push a folder written by genpi export --to DIR")
    staged = _stage_tree(path, stage)
    if not any(p.name != CARD for p in staged):
        raise InputError(f"{path}: nothing to push but its {CARD}")
    return staged


def hub_token() -> str:
    """The Hugging Face token huggingface_hub would send (HF_TOKEN, else the cached login); InputError without."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise InputError(
            "genpi push needs a Hugging Face token with write access: set HF_TOKEN, or log in once with `hf auth login`"
        )
    return token


def push(path: str | Path, repo: str, dataset: bool = False, private: bool = False) -> dict:
    """Create `repo` on the hub if need be (a model repository, or a dataset one) and upload the staged folder in one
    commit; returns {"repo", "url", "staged": what went up}."""
    from huggingface_hub import HfApi

    path = Path(path)
    if not HUB_ID.fullmatch(repo):
        raise InputError(f"--repo {repo!r}: expected ORG/NAME (a hub repository id)")
    if not path.is_dir():
        raise InputError(f"{path}: no such folder")
    token = hub_token()
    repo_type = "dataset" if dataset else "model"
    parent = path.absolute().parent
    # beside the pushed folder where possible: hard links need the same file system
    with tempfile.TemporaryDirectory(prefix=".genpi-push-", dir=parent if os.access(parent, os.W_OK) else None) as tmp:
        stage = Path(tmp)
        if dataset:
            what = f"dataset {path.name}"
            stage_dataset(path, stage)
        else:
            ids = stage_adapters(path, stage, repo)
            what = f"adapters {', '.join(ids)}"
        staged = sorted(str(p.relative_to(stage)) for p in stage.rglob("*") if p.is_file())
        api = HfApi(token=token)
        url = api.create_repo(repo, repo_type=repo_type, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=stage, repo_type=repo_type, commit_message=f"genpi push: {what}")
    return {"repo": repo, "repo_type": repo_type, "url": str(url), "staged": staged}
