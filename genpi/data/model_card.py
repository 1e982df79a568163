"""The hub face of an adapter folder: a model card (README.md) and an adapter_config.json that names its base the
way another machine can find it.

The card is made from genpi.json alone (`card_text`), so it is rewritten whenever the manifest changes: by
`write_adapter` when training writes the folder, and by `record_eval` when an evaluation records its figures. Its
YAML front matter is what the hub indexes (`base_model` as a hub id when one is known, `library_name`, `tags`) with
genpi's own record under `genpi:` (the prompt's id and sha256, method, λ, LoRA shape, every training setting, the
fidelity and leakage summaries); the body says the same for a reader, and how to load the folder.

adapter_config.json's `base_model_name_or_path` is what PEFT's AutoPeftModel loads as the base: training writes
this machine's folder there, `portable_configs` replaces it with `genpi.models.portable_model` of the base (its hub
id, else the folder's name). genpi's own loaders never read it (they pass the base they checked with check_base),
and genpi.json keeps the name, folder and digest the stale checks compare.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import yaml

from genpi.data.adapters import MODEL, AdapterManifest
from genpi.models import BUNDLED, hub_id, portable_model

CARD = "README.md"
TAGS = ("genpi", "prompt-internalization")
EVALUATIONS = ("fidelity", "leakage")  # the evaluations whose summaries the card shows (eval_metrics keys)
# settings shown in the body's table (all of them are in the front matter's genpi.training)
SHOWN_SETTINGS = ("epochs", "lr", "batch_size", "max_grad_norm", "max_length", "seed", "quantize", "lambdas", "lam")


def _plain(value):
    """JSON's types only (tuples to lists, NaN to None): what yaml.safe_dump writes and every reader parses."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _scalars(metrics: dict | None) -> dict:
    """The numbers of one system's metrics (nested breakdowns such as kinds and checks left to genpi.json)."""
    return {
        k: v
        for k, v in (metrics or {}).items()
        if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))
    }


def eval_summary(manifest: AdapterManifest, name: str) -> dict | None:
    """The card's summary of one recorded evaluation (EVALUATIONS): this system's numbers beside the teacher's (the
    base with P) and the base's (without P), and the retention where the evaluation computes one; no local paths."""
    recorded = manifest.eval_metrics.get(name)
    if not isinstance(recorded, dict) or not isinstance(recorded.get("metrics"), dict):
        return None
    summary = {
        "system": recorded.get("system"),
        "metrics": _scalars(recorded["metrics"]),
        "teacher": _scalars(recorded.get("teacher")),
        "base": _scalars(recorded.get("base")),
    }
    for key in ("inputs", "heldout_used_for_lambda", "served_as"):
        if key in recorded:
            summary[key] = recorded[key]
    if isinstance(recorded.get("retention"), dict):
        summary["retention"] = _scalars(recorded["retention"])
    return _plain(summary)


def card_metadata(manifest: AdapterManifest) -> dict:
    """The card's YAML front matter."""
    base = hub_id(manifest.base_model)
    whole = manifest.kind == MODEL
    meta: dict = {}
    if base:
        meta["base_model"] = base
    meta["library_name"] = "transformers" if whole else "peft"
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = [*TAGS, "full-finetune" if whole else "lora"]
    training = {k: v for k, v in manifest.settings.items() if k != "init_adapter" or not v}
    if manifest.settings.get("init_adapter"):  # a local folder: its name only
        training["init_adapter"] = Path(manifest.settings["init_adapter"]).name
    genpi = {
        "prompt_id": manifest.prompt_id,
        "prompt_sha256": manifest.prompt_sha256,
        "kind": manifest.kind,
        "method": manifest.method,
        "lambda": manifest.lam,
        "base_model": portable_model(manifest.base_model),
        "lora": manifest.lora,
        "training": training,
        "heldout_kl": manifest.eval_metrics.get("heldout_kl"),
        "heldout_loss": manifest.eval_metrics.get("heldout_loss"),
        "lambda_rule": manifest.eval_metrics.get("lambda_rule"),
        "genpi_version": manifest.genpi_version,
    }
    for name in EVALUATIONS:
        summary = eval_summary(manifest, name)
        if summary is not None:
            genpi[name] = summary
    meta["genpi"] = genpi
    return _plain(meta)


def _number(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _eval_table(summary: dict) -> list[str]:
    rows = ["| metric | this system | teacher (base with P) | base (no P) |", "|---|---|---|---|"]
    for key, value in summary["metrics"].items():
        rows.append(
            f"| {key} | {_number(value)} | {_number(summary['teacher'].get(key))} | "
            f"{_number(summary['base'].get(key))} |"
        )
    if summary.get("retention"):
        kept = ", ".join(f"{k} {_number(v)}" for k, v in summary["retention"].items())
        rows += ["", f"Retention (this system against the teacher): {kept}."]
    return rows


def _usage(manifest: AdapterManifest, base: str, repo: str, subfolder: str | None) -> list[str]:
    where = f'"{repo}"' + (f', subfolder="{subfolder}"' if subfolder else "")
    if manifest.method == "icae":
        return [
            "An ICAE system (In-context Autoencoder): an encoder LoRA in `encoder/`, memory tokens and the prompt's",
            "slots; it runs in genpi (`genpi eval --adapters`), not as a plain PEFT adapter.",
        ]
    if manifest.kind == MODEL:
        return [
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f"model = AutoModelForCausalLM.from_pretrained({where})",
            f"tokenizer = AutoTokenizer.from_pretrained({where})",
            "```",
        ]
    return [
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{base}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{base}")',
        f"model = PeftModel.from_pretrained(base, {where})",
        "```",
        "",
        # genpi's bundled SmolLM2 is not the hub's weights (check_base would refuse them): its own name there
        f"genpi serves it too: `genpi serve ADAPTERS --catalog CATALOG --base "
        f"{BUNDLED if manifest.base_model == BUNDLED else base}`.",
    ]


def front_matter(meta: dict) -> list[str]:
    """A card's YAML front matter (the hub reads it: model and dataset cards alike), as its first lines."""
    return ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(), "---", ""]


def card_text(manifest: AdapterManifest, repo: str | None = None, subfolder: str | None = None) -> str:
    """README.md for the folder of `manifest`; `repo` (and `subfolder`) where it will live on the hub, for the
    usage example (default: a placeholder)."""
    meta = card_metadata(manifest)
    base = portable_model(manifest.base_model)
    what = "A fully fine-tuned model" if manifest.kind == MODEL else "A LoRA adapter"
    lines = [
        *front_matter(meta),
        f"# {manifest.prompt_id}: an internalized prompt",
        "",
        f"{what} trained with genpi (Generative Prompt Internalization) so that "
        f"`{base}` behaves as it does with the prompt `{manifest.prompt_id}` in its context, without the prompt. "
        "Send the conversation without the system prompt.",
        "",
        f"- prompt: `{manifest.prompt_id}`, sha256 `{manifest.prompt_sha256}`",
        f"- base model: `{base}`",
        f"- method: `{manifest.method}`" + (f", λ = {manifest.lam}" if manifest.lam is not None else ""),
    ]
    if manifest.lora:
        lora = manifest.lora
        lines.append(
            f"- LoRA: rank {lora.get('r')}, alpha {lora.get('alpha')}, "
            f"modules {lora.get('target_modules')}, " + ("4-bit base" if lora.get("quantize_4bit") else "16-bit base")
        )
    if manifest.base_model == BUNDLED:
        lines.append(
            "- trained on genpi's bundled SmolLM2 (the hub model's weights dequantized from its Q4_1 GGUF): on the "
            "hub's own weights it behaves closely, not identically"
        )
    lines += ["", "## Use", "", *_usage(manifest, base, repo or "ORG/NAME", subfolder), "", "## Training", ""]
    lines += ["| setting | value |", "|---|---|"]
    lines += [f"| {k} | {_number(manifest.settings[k])} |" for k in SHOWN_SETTINGS if k in manifest.settings]
    for key in ("heldout_kl", "heldout_loss", "lambda_rule"):
        if manifest.eval_metrics.get(key) is not None:
            lines.append(f"| {key} | {_number(manifest.eval_metrics[key])} |")
    lines += ["", "Every setting is in the front matter (`genpi.training`) and in genpi.json."]
    for name in EVALUATIONS:
        summary = meta["genpi"].get(name)
        if summary:
            lines += ["", f"## {name.capitalize()}", "", *_eval_table(summary)]
    return "\n".join(lines) + "\n"


def write_card(folder: str | Path, manifest: AdapterManifest) -> Path:
    """Write README.md into the folder, replaced whole (a reader never sees half a card)."""
    path = Path(folder) / CARD
    tmp = path.with_name(f".{CARD}.{os.getpid()}.tmp")
    tmp.write_text(card_text(manifest))
    os.replace(tmp, path)
    return path


def portable_configs(folder: str | Path, manifest: AdapterManifest) -> list[Path]:
    """Point every adapter_config.json in the folder (an ICAE system's sits in encoder/) at the portable name of the
    base instead of this machine's folder; returns the files changed."""
    base, changed = portable_model(manifest.base_model), []
    for path in sorted(Path(folder).rglob("adapter_config.json")):
        config = json.loads(path.read_text())
        if config.get("base_model_name_or_path") != base:
            config["base_model_name_or_path"] = base
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            changed.append(path)
    return changed


def hub_ready(folder: Path, manifest: AdapterManifest, configs: bool) -> None:
    """The model card (README.md) from the manifest, and (`configs`) adapter_config.json naming the base portably."""
    try:
        if configs:
            portable_configs(folder, manifest)
        write_card(folder, manifest)
    except Exception as e:  # the card is for the hub: never lose a trained adapter or an evaluation's record over it
        print(f"genpi: warning: {folder}: no model card written ({type(e).__name__}: {e})", file=sys.stderr)
