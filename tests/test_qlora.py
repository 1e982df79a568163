"""QLoRA on the tiny random Llama: 4-bit NF4 base, LoRA on all linear layers, save/load."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from genpi.train.losses import IGNORE, token_loss
from genpi.train.qlora import (
    LoraSettings,
    add_lora,
    keep_differentiable_4bit_layout,
    load_adapter,
    load_base,
    save_adapter,
    trainable_share,
    vllm_problems,
)

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path(os.environ.get("GENPI_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def fixed_batch() -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 2000, (2, 24), generator=g)
    labels = ids.clone()
    labels[:, :8] = IGNORE
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def train(model, batch, steps: int = 6) -> list[float]:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(steps):
        loss_sum, n = token_loss(model, batch)
        (loss_sum / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss_sum.item() / n)
    model.eval()
    return losses


def eval_logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    """A 4-bit QLoRA model trained a few steps and saved; the saved folder."""
    model = add_lora(load_base(tiny_model, quantize=True), LoraSettings())
    batch = fixed_batch()
    losses = train(model, batch)
    folder = save_adapter(model, tmp_path_factory.mktemp("adapter") / "tiny", base_model=tiny_model)
    return model, losses, folder


def test_base_is_nf4_double_quant(trained):
    import bitsandbytes as bnb

    model, _, _ = trained
    base_layers = {
        name: module.base_layer
        for name, module in model.named_modules()
        if hasattr(module, "base_layer") and hasattr(module, "lora_A")
    }
    assert base_layers
    for name, layer in base_layers.items():
        assert isinstance(layer, bnb.nn.Linear4bit), name
        assert layer.weight.quant_type == "nf4"
        assert layer.weight.quant_state.nested  # double quantization: the absmax is quantized too
        assert layer.compute_dtype == torch.float32
        assert layer.weight.device.type == "cpu"


def test_lora_on_all_linear_layers(trained):
    model, _, _ = trained
    wrapped = [
        name for name, module in model.named_modules() if hasattr(module, "lora_A") and hasattr(module, "base_layer")
    ]
    assert {name.rsplit(".", 1)[-1] for name in wrapped} == LINEAR
    assert len(wrapped) == len(LINEAR) * 2  # two layers
    assert not any("lm_head" in name or "embed_tokens" in name for name in wrapped)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout) == (16, 32, 0.05)
    n_train, n_all, share = trainable_share(model)
    # per layer: r * (in + out) summed over the 7 projections (hidden 64, kv 32, mlp 128)
    per_layer = 16 * ((64 + 64) + (64 + 32) * 2 + (64 + 64) + (64 + 128) * 2 + (128 + 64))
    assert n_train == 2 * per_layer and 0 < share < 0.02


def test_training_lowers_loss(trained):
    _, losses, _ = trained
    assert losses[-1] < losses[0] - 0.1, losses


def test_saved_config_is_vllm_safe(trained):
    from safetensors import safe_open

    _, _, folder = trained
    assert (folder / "adapter_model.safetensors").exists()
    config = json.loads((folder / "adapter_config.json").read_text())
    assert vllm_problems(config) == []
    assert config["r"] == 16 and config["lora_alpha"] == 32
    assert sorted(config["target_modules"]) == sorted(LINEAR)
    assert config["modules_to_save"] is None
    assert config["bias"] == "none"
    assert config["use_dora"] is False
    assert not config.get("layers_to_transform")
    assert not config.get("lora_bias")
    assert config["init_lora_weights"] is True
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    # vLLM strips base_model.model., wants ...<module>.lora_A/B.weight with a supported module suffix.
    assert len(keys) == len(LINEAR) * 2 * 2
    for key in keys:
        assert key.startswith("base_model.model.model.layers.")
        assert key.endswith((".lora_A.weight", ".lora_B.weight"))
        assert key.rsplit(".", 3)[-3] in LINEAR


def test_vllm_problems_flags_rejected_fields():
    good = {"r": 16, "lora_alpha": 32, "target_modules": sorted(LINEAR), "bias": "none"}
    assert vllm_problems(good) == []
    for bad in (
        {"use_dora": True},
        {"bias": "all"},
        {"modules_to_save": ["lm_head"]},
        {"r": 1024},
        {"init_lora_weights": "pissa"},
        {"target_modules": "all-linear"},
    ):
        assert vllm_problems({**good, **bad}), bad


def test_adapter_roundtrip_on_4bit_base(trained, tiny_model):
    model, _, folder = trained
    batch = fixed_batch()
    expected = eval_logits(model, batch)
    loaded = load_adapter(tiny_model, folder, quantize=True)
    keep_differentiable_4bit_layout(
        loaded
    )  # the trained model's 4-bit compute path (bitsandbytes' inference repacking rounds in bf16)
    assert torch.allclose(eval_logits(loaded, batch), expected, rtol=0, atol=1e-5)
    with loaded.disable_adapter():
        base = eval_logits(loaded, batch)
    assert not torch.allclose(base, expected, atol=1e-3)  # the adapter does something


def test_adapter_loads_on_unquantized_base(trained, tiny_model):
    model, _, folder = trained
    loaded = load_adapter(tiny_model, folder, quantize=False)
    assert type(loaded.get_base_model().model.layers[0].self_attn.q_proj.base_layer) is torch.nn.Linear
    trained_lora = {n.replace(".default", ""): p for n, p in model.named_parameters() if "lora_" in n}
    loaded_lora = {n.replace(".default", ""): p for n, p in loaded.named_parameters() if "lora_" in n}
    assert trained_lora.keys() == loaded_lora.keys()
    for name, p in trained_lora.items():
        assert torch.equal(p.detach(), loaded_lora[name].detach()), name
    logits = eval_logits(loaded, fixed_batch())
    assert torch.isfinite(logits).all()


def test_unquantized_path(tiny_model, tmp_path):
    model = add_lora(load_base(tiny_model, quantize=False), LoraSettings())
    assert type(model.get_base_model().model.layers[0].mlp.down_proj.base_layer) is torch.nn.Linear
    batch = fixed_batch()
    losses = train(model, batch, steps=4)
    assert losses[-1] < losses[0] - 0.1, losses
    folder = save_adapter(model, tmp_path / "plain")
    loaded = load_adapter(tiny_model, folder, quantize=False)
    assert torch.allclose(eval_logits(loaded, batch), eval_logits(model, batch), rtol=0, atol=1e-5)


VLLM_CHECK = """
import sys
from vllm.config.lora import LoRAConfig
from vllm.lora.lora_model import LoRAModel
from vllm.lora.peft_helper import PEFTHelper

folder = sys.argv[1]
helper = PEFTHelper.from_local_dir(folder, 1024)
helper.validate_legal(LoRAConfig(max_lora_rank=16))
# What vLLM's worker expects for Llama: packed qkv_proj / gate_up_proj unpacked, plus embeddings.
expected = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"}
lora = LoRAModel.from_local_checkpoint(folder, expected, helper, lora_model_id=1, device="cpu", dtype=None)
print(len(lora.loras), lora.rank, helper.vllm_lora_scaling_factor)
"""


@pytest.mark.slow
@pytest.mark.skipif(not VLLM_PYTHON.exists(), reason="no vLLM virtualenv (scripts/setup_vllm_venv.sh)")
def test_vllm_loader_accepts_adapter(trained):
    """vLLM's own config validation and checkpoint loader (no engine start) take the adapter."""
    _, _, folder = trained
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "ERROR"}
    done = subprocess.run(
        [str(VLLM_PYTHON), "-c", VLLM_CHECK, str(folder)], capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    n_modules, rank, scaling = done.stdout.split()[-3:]
    assert (int(n_modules), int(rank), float(scaling)) == (len(LINEAR) * 2, 16, 2.0)


def lora_grads(model, batch) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad(set_to_none=True)
    loss_sum, n = token_loss(model, batch)
    (loss_sum / n).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def test_an_eval_pass_does_not_change_the_4bit_gradients(tiny_model):
    """Issue 22's divergence: bitsandbytes repacked 4-bit weights for CPU inference at the first eval-mode pass
    (a held-out loss), after which no gradient flowed through them. The gradients must not depend on that pass."""
    torch.manual_seed(0)
    model = add_lora(load_base(tiny_model, quantize=True), LoraSettings(dropout=0.0))
    with torch.no_grad():  # lora_B starts at 0; nonzero, every LoRA weight gets a gradient through the layers above it
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    batch = fixed_batch()
    before = lora_grads(model, batch)
    eval_logits(model, batch)
    after = lora_grads(model, batch)
    for name, grad in before.items():
        assert torch.allclose(after[name], grad, rtol=1e-4, atol=1e-7), name
