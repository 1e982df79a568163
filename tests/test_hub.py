"""The hub: models named by hub id from the local Hugging Face cache (never downloaded unless allowed), hub-ready
adapter folders (a model card, a portable adapter_config.json) and `genpi push` up to the upload (HfApi's methods
replaced by ones that record the calls and copy what would go up)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from genpi import InputError
from genpi.catalog import load_catalog
from genpi.cli import main as genpi_main
from genpi.data.adapters import (
    ADAPTER,
    MODEL,
    AdapterManifest,
    check_base,
    read_adapter_manifest,
    record_eval,
    weights_digest,
    write_adapter,
)
from genpi.data.model_card import card_metadata, card_text, hub_ready
from genpi.models import BUNDLED_HUB_ID, hub_id, portable_model, resolve_model

CALC, GREET = load_catalog(REPO / "tests" / "data" / "tiny.yaml")
REPO_ID = "genpi-test/tiny-llama"


def cache_model(hub: Path, repo_id: str, source: Path, commit: str) -> Path:
    """`source`'s files as huggingface_hub caches a download: blobs by content hash, the snapshot's files as links
    to them, refs/main naming the commit. Returns the snapshot folder."""
    storage = hub / ("models--" + repo_id.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for file in sorted(p for p in Path(source).iterdir() if p.is_file()):
        blob = storage / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        if not blob.exists():
            shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob.name))
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    """An empty Hugging Face home for the test: HF_HOME set, the other cache variables unset, no download allowed,
    and any call to the hub an error."""
    import huggingface_hub

    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("GENPI_ALLOW_DOWNLOAD", raising=False)

    def no_network(*args, **kwargs):
        raise AssertionError("a call to the hub")

    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", no_network)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_tree", no_network)
    return home


@pytest.fixture
def cached(hf_home, tiny_model):
    """The tiny Llama cached as the hub model genpi-test/tiny-llama."""
    return cache_model(hf_home / "hub", REPO_ID, Path(tiny_model), "a" * 40)


# ---------------------------------------------------------------- models by hub id


def test_a_hub_id_resolves_to_its_cached_snapshot_and_loads(cached):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(REPO_ID)
    assert Path(path) == cached
    assert AutoModelForCausalLM.from_pretrained(path).config.hidden_size == 64
    assert AutoTokenizer.from_pretrained(path)("hi")["input_ids"]


def test_an_engine_loads_a_hub_id_and_names_it_by_it(cached):
    """--generator and --target: the engine's model is the snapshot, its name the id (not the commit hash the
    snapshot folder is named by; synthesis writes it into every row)."""
    from genpi.engines import EngineConfig, make_engine

    engine = make_engine(EngineConfig(model=REPO_ID, max_batch=1, dtype="float32"))
    try:
        assert engine.model_name == REPO_ID and engine.model.config.hidden_size == 64
    finally:
        engine.close()


def test_hf_hub_cache_wins_over_hf_home(cached, tmp_path, monkeypatch, tiny_model):
    other = cache_model(tmp_path / "other-cache", REPO_ID, Path(tiny_model), "b" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "other-cache"))
    assert Path(resolve_model(REPO_ID)) == other


def test_a_missing_hub_id_is_an_input_error_naming_it_and_the_cache(hf_home):
    with pytest.raises(InputError) as e:
        resolve_model("genpi-test/not-cached")
    message = str(e.value)
    assert "'genpi-test/not-cached'" in message and str(hf_home / "hub") in message
    assert "GENPI_ALLOW_DOWNLOAD=1" in message


def test_a_snapshot_without_config_is_refused(hf_home, tmp_path):
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    cache_model(hf_home / "hub", "genpi-test/tokenizer-only", tmp_path / "tok", "c" * 40)
    with pytest.raises(InputError, match="no config.json"):
        resolve_model("genpi-test/tokenizer-only")


def test_the_cli_exits_2_on_a_missing_hub_id(hf_home, tmp_path, capsys):
    from genpi.train.run import main

    data = tmp_path / "data"
    data.mkdir()
    code = main(
        [str(data), "--catalog", str(REPO / "tests" / "data" / "tiny.yaml"), "--out", str(tmp_path / "a")]
        + ["--base", "genpi-test/not-cached"]
    )
    assert code == 2 and "genpi-test/not-cached" in capsys.readouterr().err


def downloads(monkeypatch, hub_dir: Path, source: Path) -> list[dict]:
    """snapshot_download replaced by one that records its arguments and 'downloads' `source` into the cache."""
    import huggingface_hub

    calls = []

    def fake(repo_id, **kwargs):
        calls.append({"repo_id": repo_id, **kwargs})
        if kwargs["local_files_only"]:
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        return str(cache_model(Path(kwargs["cache_dir"]), repo_id, source, "d" * 40))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    return calls


def test_a_download_only_when_allowed_and_not_offline(hf_home, tiny_model, monkeypatch):
    calls = downloads(monkeypatch, hf_home / "hub", Path(tiny_model))
    with pytest.raises(InputError, match="GENPI_ALLOW_DOWNLOAD"):
        resolve_model(REPO_ID)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("GENPI_ALLOW_DOWNLOAD", "1")
    with pytest.raises(InputError, match="HF_HUB_OFFLINE"):
        resolve_model(REPO_ID)
    assert [c["local_files_only"] for c in calls] == [True, True]
    monkeypatch.delenv("HF_HUB_OFFLINE")
    path = resolve_model(REPO_ID)
    assert calls[-1]["local_files_only"] is False and Path(calls[-1]["cache_dir"]) == hf_home / "hub"
    assert "*.safetensors" in calls[-1]["allow_patterns"] and (Path(path) / "config.json").is_file()


def test_a_local_folder_wins_and_other_names_are_refused(tmp_path, monkeypatch, hf_home, tiny_model):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_model, tmp_path / "genpi-test" / "tiny-llama")
    assert resolve_model(REPO_ID) == REPO_ID  # the local folder of that spelling, not the cache
    (tmp_path / "org" / "empty").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="neither"):  # a folder without config.json is no hub id
        resolve_model("org/empty")
    with pytest.raises(FileNotFoundError, match="neither"):
        resolve_model("not an id")


def test_the_portable_name_of_a_base(cached, tiny_model):
    assert hub_id("smollm2") == BUNDLED_HUB_ID == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_id(REPO_ID) == REPO_ID and hub_id(str(cached)) == REPO_ID  # a cache snapshot knows its id
    assert hub_id(tiny_model) is None and portable_model(tiny_model) == Path(tiny_model).name  # no machine path
    assert portable_model(str(cached)) == REPO_ID


# ---------------------------------------------------------------- stale checks against the recorded base


def test_an_adapter_is_held_to_the_snapshot_it_trained_on(cached, hf_home, tiny_model, tiny_trainable_model, tmp_path):
    trained_on = resolve_model(REPO_ID)
    manifest = AdapterManifest(
        "calc", CALC.sha256, REPO_ID, "sft", None, {}, "x", base_path=trained_on, base_digest=weights_digest(trained_on)
    )
    check_base(tmp_path, manifest, resolve_model(REPO_ID))  # the same snapshot
    check_base(tmp_path, manifest, tiny_model)  # another folder with the same weights
    # the hub model was updated: refs/main now names a commit with other weights
    cache_model(hf_home / "hub", REPO_ID, Path(tiny_trainable_model), "e" * 40)
    moved = resolve_model(REPO_ID)
    assert Path(moved).name == "e" * 40
    with pytest.raises(InputError, match="other config and weights"):
        check_base(tmp_path, manifest, moved)
    # a manifest written before the digest was recorded: the old check (the name resolves to the same folder)
    old = AdapterManifest("calc", CALC.sha256, REPO_ID, "sft", None, {}, "x")
    check_base(tmp_path, old, moved)


# ---------------------------------------------------------------- hub-ready adapter folders


def lora_model(base: str):
    import torch
    from transformers import AutoModelForCausalLM

    from genpi.train.qlora import LoraSettings, add_lora

    model = add_lora(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), LoraSettings(r=4, alpha=8))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.01)
    return model


class Trial:
    """What write_best reads of a ray.tune.Result."""

    def __init__(self, lam, folder):
        self.config, self.error, self.folder = {"trial": {"prompt_id": "calc", "lam": lam}}, None, folder
        self.metrics = {"finished": True, "effective": {"device": "cpu"}, "steps": 2, "heldout_loss": 1.5}
        self.metrics["heldout_kl"] = 0.25
        self.checkpoint = self

    @contextlib.contextmanager
    def as_directory(self):
        yield self.folder


def front_matter(path: Path) -> dict:
    text = path.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


@pytest.fixture
def trained(cached, tmp_path):
    """genpi train's writing of the best trial (write_best) of a real LoRA adapter on the cached hub model."""
    from genpi.train.plan import Plan, write_best
    from genpi.train.qlora import LoraSettings, save_adapter
    from genpi.train.recipe import TrainSettings

    base_path = resolve_model(REPO_ID)
    trial = tmp_path / "trial"
    save_adapter(lora_model(base_path), trial / "adapter")
    saved = json.loads((trial / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == base_path  # what PEFT writes: this machine's folder
    settings = TrainSettings(method="genpi", epochs=2, lora=LoraSettings(r=4, alpha=8))
    plan = Plan(CALC, [], [], settings, [0.5], {}, "print", None)
    outcome = write_best(
        plan, [Trial(0.5, trial)], tmp_path / "adapters", REPO_ID, base_path, weights_digest(base_path)
    )
    assert outcome["status"] == "trained"
    return tmp_path / "adapters" / "calc"


def test_training_writes_a_model_card_and_a_portable_adapter_config(trained, cached):
    config = json.loads((trained / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == REPO_ID  # the hub id, not this machine's path
    manifest = read_adapter_manifest(trained)
    assert manifest.base_model == REPO_ID and manifest.base_path == str(cached)  # genpi.json: the local folder
    assert manifest.base_digest == weights_digest(cached)
    meta = front_matter(trained / "README.md")
    assert meta["base_model"] == REPO_ID and meta["library_name"] == "peft"
    assert {"genpi", "prompt-internalization", "lora"} <= set(meta["tags"])
    genpi = meta["genpi"]
    assert genpi["prompt_id"] == "calc" and genpi["prompt_sha256"] == CALC.sha256
    assert genpi["method"] == "genpi" and genpi["lambda"] == 0.5 and genpi["heldout_kl"] == 0.25
    assert genpi["training"]["epochs"] == 2 and genpi["training"]["effective"] == {"device": "cpu"}
    assert genpi["lora"]["r"] == 4 and "fidelity" not in genpi
    text = (trained / "README.md").read_text()
    assert str(cached) not in text and CALC.sha256 in text and 'PeftModel.from_pretrained(base, "ORG/NAME")' in text


def test_genpi_loads_the_adapter_whatever_its_config_names(trained, cached):
    """genpi's loaders pass the base they checked: the portable name in adapter_config.json is never looked up."""
    import torch

    from genpi.train.qlora import load_adapter

    model = load_adapter(str(cached), trained)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(torch.allclose(p.float(), torch.full(p.shape, 0.01), atol=1e-3) for p in lora_b)


def test_an_evaluation_refreshes_the_card_with_its_summary(trained):
    before = (trained / "README.md").read_text()
    fidelity = {
        "system": "calc",
        "served_as": "merged",
        "inputs": 10,
        "eval_out": "/somewhere/on/this/machine",
        "heldout_used_for_lambda": False,
        "metrics": {"action_agreement": 0.8, "rouge_l": 0.5, "kinds": {"act": 3}, "kl": None},
        "retention": {"action_agreement": 0.9},
        "teacher": {"action_agreement": 0.9, "rouge_l": 0.7},
        "base": {"action_agreement": 0.1, "rouge_l": 0.2},
    }
    leakage = {"system": "calc", "metrics": {"span": 0.05}, "teacher": {"span": 0.9}, "base": {"span": 0.0}}
    hub_ready(trained, record_eval(trained, {"fidelity": fidelity}), configs=False)  # as genpi.eval.evaluate does
    meta = front_matter(trained / "README.md")
    assert meta["genpi"]["fidelity"]["metrics"] == {"action_agreement": 0.8, "rouge_l": 0.5, "kl": None}
    assert meta["genpi"]["fidelity"]["teacher"]["rouge_l"] == 0.7 and "leakage" not in meta["genpi"]
    hub_ready(trained, record_eval(trained, {"leakage": leakage}), configs=False)
    after = (trained / "README.md").read_text()
    assert after != before and "## Fidelity" in after and "## Leakage" in after
    assert "| action_agreement | 0.8 | 0.9 | 0.1 |" in after and "| span | 0.05 | 0.9 | 0 |" in after
    assert "/somewhere/on/this/machine" not in after  # no local path on the card
    assert front_matter(trained / "README.md")["genpi"]["fidelity"]["inputs"] == 10  # both kept


def test_cards_of_a_full_model_and_of_the_bundled_base(tmp_path, tiny_model):
    model = AdapterManifest("greet", GREET.sha256, tiny_model, "kld", None, {}, "x", kind=MODEL)

    def save(tmp):  # as genpi.train.plan.write_best saves: the weights, then the card
        shutil.copytree(tiny_model, tmp, dirs_exist_ok=True)
        hub_ready(tmp, model, configs=True)

    folder = write_adapter(tmp_path / "greet", model, save)
    meta = front_matter(folder / "README.md")
    assert meta["library_name"] == "transformers" and "full-finetune" in meta["tags"] and "lora" not in meta["tags"]
    assert "base_model" not in meta  # a local folder has no hub id
    assert meta["genpi"]["base_model"] == Path(tiny_model).name and meta["genpi"]["kind"] == MODEL
    bundled = AdapterManifest("greet", GREET.sha256, "smollm2", "sft", None, {"r": 8}, "x", kind=ADAPTER)
    assert card_metadata(bundled)["base_model"] == BUNDLED_HUB_ID
    assert "dequantized" in card_text(bundled) and "--base smollm2`" in card_text(bundled)


# ---------------------------------------------------------------- genpi push


@pytest.fixture
def hub_calls(tmp_path, monkeypatch):
    """HfApi.create_repo and upload_folder replaced: the calls recorded, the folder that would go up copied."""
    import huggingface_hub

    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs, self.token))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        copy = tmp_path / "uploaded" / str(len(calls))
        shutil.copytree(folder_path, copy, symlinks=True)
        calls.append(("upload_folder", repo_id, kwargs, copy))

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    return calls


def files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def adapters_with_leftovers(trained: Path) -> Path:
    """ADAPTERS with calc, what a training leaves beside it (the trials' storage, a lock, a killed run's folder) and
    a checkpoint folder inside the adapter."""
    root = trained.parent
    (root / ".tune" / "exp" / "checkpoint_000001").mkdir(parents=True)
    (root / ".tune" / "exp" / "checkpoint_000001" / "state.pt").write_bytes(b"x")
    (root / "train.lock").write_text("{}")
    (root / ".calc-abc123").mkdir()
    (root / ".calc-abc123" / "adapter_model.safetensors").write_bytes(b"half")
    (trained / "checkpoint-10").mkdir()
    (trained / "checkpoint-10" / "optimizer.pt").write_bytes(b"x")
    return root


def test_push_refuses_without_a_token(trained, monkeypatch, tmp_path, capsys, hub_calls):
    from huggingface_hub import constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    assert genpi_main(["push", str(trained), "--repo", "org/calc"]) == 2
    assert "HF_TOKEN" in capsys.readouterr().err and hub_calls == []


def test_push_one_adapter_uploads_it_with_its_card_and_nothing_else(trained, hub_calls, capsys):
    adapters_with_leftovers(trained)
    local_card = (trained / "README.md").read_text()
    assert genpi_main(["push", str(trained), "--repo", "org/calc", "--private"]) == 0
    assert "https://huggingface.co/org/calc" in capsys.readouterr().out
    (create, repo, kwargs, token), (upload, _, upload_kwargs, sent) = hub_calls
    assert create == "create_repo" and repo == "org/calc" and token == "hf_test_token"
    assert kwargs["private"] is True and kwargs["repo_type"] == "model" and kwargs["exist_ok"] is True
    assert upload_kwargs["repo_type"] == "model"
    assert files(sent) == {"README.md", "adapter_config.json", "adapter_model.safetensors", "genpi.json"}
    assert 'PeftModel.from_pretrained(base, "org/calc")' in (sent / "README.md").read_text()
    assert json.loads((sent / "adapter_config.json").read_text())["base_model_name_or_path"] == REPO_ID
    assert (trained / "README.md").read_text() == local_card  # the local folder is left as it was
    assert (sent / "adapter_model.safetensors").read_bytes() == (trained / "adapter_model.safetensors").read_bytes()


def test_push_an_adapters_folder_one_subfolder_per_prompt(trained, hub_calls, tmp_path):
    root = adapters_with_leftovers(trained)
    # an adapter trained before genpi wrote cards: PEFT's card and this machine's path in adapter_config.json
    shutil.copytree(trained, root / "greet", ignore=shutil.ignore_patterns("checkpoint-*"))
    peft_card = "---\nbase_model: /local/x\nlibrary_name: peft\n---\n# Model Card for Model ID\n"
    (root / "greet" / "README.md").write_text(peft_card)
    manifest = json.loads((root / "greet" / "genpi.json").read_text())
    manifest.update(prompt_id="greet", prompt_sha256=GREET.sha256)
    (root / "greet" / "genpi.json").write_text(json.dumps(manifest))
    config = json.loads((root / "greet" / "adapter_config.json").read_text())
    (root / "greet" / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "/local/x"}))
    assert genpi_main(["push", str(root), "--repo", "org/agents"]) == 0
    sent = hub_calls[-1][3]
    per_adapter = {"README.md", "adapter_config.json", "adapter_model.safetensors", "genpi.json"}
    assert files(sent) == {"README.md"} | {f"{p}/{f}" for p in ("calc", "greet") for f in per_adapter}
    index = front_matter(sent / "README.md")
    assert index["base_model"] == REPO_ID and [a["subfolder"] for a in index["genpi"]["adapters"]] == ["calc", "greet"]
    assert 'subfolder="greet"' in (sent / "greet" / "README.md").read_text()
    assert json.loads((sent / "greet" / "adapter_config.json").read_text())["base_model_name_or_path"] == REPO_ID
    assert front_matter(sent / "greet" / "README.md")["genpi"]["prompt_id"] == "greet"
    assert (root / "greet" / "README.md").read_text() == peft_card  # staged, not written into the local folder


def test_push_refuses_what_is_not_an_adapter(trained, hub_calls, capsys):
    (trained.parent / "notes").mkdir()
    assert genpi_main(["push", str(trained.parent), "--repo", "org/agents"]) == 2
    assert "notes: not a finished genpi adapter" in capsys.readouterr().err
    assert genpi_main(["push", str(trained), "--repo", "not a repo"]) == 2
    assert hub_calls == []


def test_push_a_dataset(tmp_path, hub_calls, capsys):
    export = tmp_path / "export"
    (export / "data").mkdir(parents=True)
    (export / "data" / "train.parquet").write_bytes(b"PAR1")
    (export / ".cache").mkdir()
    (export / ".cache" / "x").write_text("x")
    assert genpi_main(["push", str(export), "--repo", "org/dialogues", "--dataset"]) == 2
    assert "no README.md dataset card" in capsys.readouterr().err and hub_calls == []
    (export / "README.md").write_text("---\nlicense: other\n---\n# dialogues\n")
    assert genpi_main(["push", str(export), "--repo", "org/dialogues", "--dataset"]) == 0
    (_, _, kwargs, _), (_, _, upload_kwargs, sent) = hub_calls
    assert kwargs["repo_type"] == "dataset" == upload_kwargs["repo_type"]
    assert files(sent) == {"README.md", "data/train.parquet"}


@pytest.mark.slow
def test_genpi_train_on_a_hub_id_writes_a_hub_ready_adapter(
    calc_dialogues, tiny_trainable_model, tiny_model, hf_home, tmp_path
):
    """`genpi train --base ORG/NAME` end to end (a subprocess, Ray): the base from the cache, the adapter hub-ready,
    genpi.json holding the snapshot it trained on; then evaluating on the updated hub model is refused."""
    import os
    import subprocess
    import sys

    snapshot = cache_model(hf_home / "hub", REPO_ID, Path(tiny_trainable_model), "f" * 40)
    adapters = tmp_path / "adapters"
    command = [sys.executable, "-m", "genpi.cli", "train", str(calc_dialogues), "--catalog"]
    command += [str(REPO / "tests" / "data" / "tiny.yaml"), "--out", str(adapters), "--base", REPO_ID, "--epochs", "1"]
    command += ["--lambdas", "0.5"]  # one trial: the λ choice is test_train_run's
    command += ["--batch-size", "4", "--micro-batch", "2", "--max-length", "512", "--rank", "4", "--no-progress"]
    env = dict(os.environ, RAY_ADDRESS="local", HF_HOME=str(hf_home), PYTHONPATH=str(REPO))
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = adapters / "calc"
    manifest = read_adapter_manifest(folder)
    assert manifest.base_model == REPO_ID and Path(manifest.base_path) == snapshot
    assert manifest.base_digest == weights_digest(snapshot)
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == REPO_ID
    meta = front_matter(folder / "README.md")
    assert meta["base_model"] == REPO_ID and meta["genpi"]["prompt_sha256"] == CALC.sha256
    assert meta["genpi"]["training"]["epochs"] == 1 and meta["genpi"]["lora"]["r"] == 4
    check_base(folder, manifest, resolve_model(REPO_ID))
    cache_model(hf_home / "hub", REPO_ID, Path(tiny_model), "9" * 40)  # the hub model updated since
    with pytest.raises(InputError, match="other config and weights"):
        check_base(folder, manifest, resolve_model(REPO_ID))
