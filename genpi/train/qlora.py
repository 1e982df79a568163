"""QLoRA: a 4-bit NF4 base model plus LoRA on all linear layers; saving and loading adapters.

Facts checked on this machine (torch 2.13 CPU, transformers 5.23, peft 0.21, bitsandbytes 0.50.2):

- bitsandbytes 0.50's CPU backend quantizes to NF4 with double quantization and runs
  4-bit forward *and* backward through LoRA on CPU; no `device_map` is needed there
  (the weights stay on the CPU). On a GPU the model is placed on the current CUDA device.
- Dtype (`default_dtype`): float32 on CPU (bfloat16 compute is about 2x slower on this
  AVX2 CPU, which has no AVX512-BF16, and less exact); bfloat16 on CUDA, as the reference
  trains. The 4-bit compute dtype follows `dtype` unless given.
- `peft.prepare_model_for_kbit_training` freezes the base, upcasts fp16/bf16 non-4-bit
  parameters (norms, embeddings) to fp32 and, by default, turns on gradient
  checkpointing. Freezing and upcasting cost nothing (the upcast is a no-op for an fp32
  base). Checkpointing trades compute for memory (SmolLM2-135M, 4x256 tokens: peak RSS
  6.5 -> 2.3 GB); a small model on CPU does not need it, so `add_lora` leaves it off
  unless asked (the training recipe turns it on with CUDA). `add_lora` turns it on with
  transformers 5's `activation_checkpointing_enable` (non-reentrant), not through PEFT,
  which still calls the deprecated `gradient_checkpointing_enable`. It only acts in train
  mode, which `add_lora` sets.
- Speed on 2 shared CPU cores, one AdamW step on 4x256 tokens (noisy: other work ran):
  SmolLM2-135M plain LoRA ~60-65 s, 4-bit ~50-80 s (same within the noise), 4-bit with
  bfloat16 compute ~130 s; the tiny test Llama ~250-360 vs ~220 tokens/s. QLoRA buys
  memory, not speed, here.

vLLM 0.32's LoRA loader (`vllm/lora/peft_helper.py`, `lora_model.py`, `worker_manager.py`):

- adapter_config.json must have `r`, `lora_alpha` and `target_modules` (a list or a
  string); unknown keys are ignored.
- Rejected: `modules_to_save` other than None / ["classifier", "score"], `bias` other
  than "none", `use_dora`, `lora_bias`, `init_lora_weights` set to a string that alters
  the base (pissa, olora, corda, loftq ...), `layer_replication`, aLoRA, BD-LoRA, QALoRA.
- `r` (and any `rank_pattern` value) must not exceed the server's `--max-lora-rank`
  (default 16; allowed 1, 8, 16, 32, 64, 128, 256, 320, 512). `rank_pattern`,
  `alpha_pattern` and `use_rslora` are honoured.
- `target_modules` in the config does not select anything: the tensor names in
  adapter_model.safetensors are the source of truth. Names may start with
  `base_model.model.` (PEFT's form, stripped by vLLM) and must end in
  `lora_A.weight` / `lora_B.weight`; the last module-name component must be a module
  the model supports (for Llama: q/k/v/o_proj, gate/up/down_proj, which vLLM packs into
  qkv_proj / gate_up_proj itself, plus embed_tokens / lm_head), else loading fails.
  We still write the explicit names rather than "all-linear" (genpi's own rule, also
  what older tools expect).
- Tensors are cast to the server's `--lora-dtype` (auto = model dtype) on load, so the
  saved dtype (float32 here) does not matter. `layers_to_transform` is not read, but
  PEFT then simply saves fewer tensors, which vLLM accepts; we leave it unset.
- Checked: vLLM's own `PEFTHelper.validate_legal` and `LoRAModel.from_local_checkpoint`
  accept an adapter written by `save_adapter` (tests/test_qlora.py runs them).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# Rank values vLLM's --max-lora-rank accepts (vllm/config/lora.py, MaxLoRARanks).
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# init_lora_weights strings vLLM accepts (they only set initial weights).
_VLLM_OK_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")


@dataclass
class LoraSettings:
    """LoRA hyper-parameters (GenPI: rank 16, alpha 32, all linear layers but the LM head)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"

    def to_dict(self) -> dict:
        return asdict(self)


def _quant_config(compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def default_dtype() -> torch.dtype:
    """bfloat16 where CUDA is, float32 on CPU (faster and more exact there)."""
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def load_base(
    path: str | Path,
    quantize: bool = True,
    dtype: torch.dtype | None = None,
    *,
    compute_dtype: torch.dtype | None = None,
    device_map=None,
):
    """The base causal LM at `path`, 4-bit NF4 with double quantization when `quantize`.

    `dtype` (default: `default_dtype()`) is the dtype of the parameters that stay
    unquantized (embeddings, norms, LM head) and, unless `compute_dtype` is given, the
    4-bit compute dtype. On CPU no device map is used; with CUDA the model goes to the
    current device, and the caller puts its inputs there (`model.device`): a device map
    of one device adds no hooks that move them.
    """
    from transformers import AutoModelForCausalLM

    dtype = dtype or default_dtype()
    kwargs: dict = {"dtype": dtype}
    if device_map is None and torch.cuda.is_available():
        device_map = {"": torch.cuda.current_device()}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if quantize:
        kwargs["quantization_config"] = _quant_config(compute_dtype or dtype)
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    return model


def is_quantized(model) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False))


def linear_module_names(model) -> list[str]:
    """Suffixes of all linear layers except the LM head (what "all-linear" means in PEFT)."""
    import bitsandbytes as bnb

    out_emb = model.get_output_embeddings()
    names = set()
    for name, module in model.named_modules():
        if module is out_emb:
            continue
        if isinstance(module, (torch.nn.Linear, bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            names.add(name.rsplit(".", 1)[-1])
    names.discard("lm_head")
    return sorted(names)


def keep_differentiable_4bit_layout(model) -> None:
    """Keep bitsandbytes from repacking a training model's 4-bit weights for CPU inference.

    On a CPU with AVX512-BF16, bitsandbytes 0.50 repacks a `Linear4bit`'s weight the first time it runs in
    eval mode without gradients (a held-out loss, say), for good; from then on its forward goes through
    `gemv_4bit`, which has no backward, so no gradient flows through the frozen 4-bit layers to the LoRA
    weights below them: training diverged after the first held-out pass (issue 22; LoRA gradients off by
    about 100%, tests/test_qlora.py). A training model never takes that path; inference engines still do.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def add_lora(model, settings: LoraSettings | None = None, *, gradient_checkpointing: bool = False):
    """Wrap `model` in a trainable PeftModel with LoRA per `settings`.

    A k-bit base is first prepared with `prepare_model_for_kbit_training` (freeze, upcast
    half-precision non-4-bit parameters to fp32); gradient checkpointing only if asked.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    settings = settings or LoraSettings()
    if is_quantized(model):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        keep_differentiable_4bit_layout(model)
    if gradient_checkpointing:
        model.activation_checkpointing_enable()  # also makes the embeddings' output require grads
    targets = settings.target_modules
    if targets == "all-linear":
        targets = linear_module_names(model)  # explicit names: what vLLM and PEFT both read
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(targets),
        bias="none",
        modules_to_save=None,
        use_dora=False,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    model.train()  # dropout and gradient checkpointing act only in train mode
    return model


def trainable_share(model) -> tuple[int, int, float]:
    """(trainable, all, trainable / all) parameters of a PeftModel; 4-bit weights counted unpacked."""
    trainable, total = model.get_nb_trainable_parameters()
    return trainable, total, trainable / total


def vllm_problems(config: dict, max_lora_rank: int = 512) -> list[str]:
    """What in an adapter_config.json vLLM 0.32 would reject (empty list: fine)."""
    problems = []
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            problems.append(f"missing {key}")
    ranks = [config.get("r", 0), *(config.get("rank_pattern") or {}).values()]
    if max(ranks) > max_lora_rank or min(ranks) <= 0:
        problems.append(f"rank {max(ranks)} outside 1..{max_lora_rank}")
    if config.get("modules_to_save") and any(m not in ("classifier", "score") for m in config["modules_to_save"]):
        problems.append(f"modules_to_save={config['modules_to_save']}")
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config['bias']!r}")
    for flag in ("use_dora", "lora_bias", "use_qalora"):
        if config.get(flag):
            problems.append(f"{flag}=true")
    for key in ("layer_replication", "alora_invocation_tokens", "use_bdlora"):
        if config.get(key):
            problems.append(f"{key} set")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in _VLLM_OK_INITS:
        problems.append(f"init_lora_weights={init!r}")
    if isinstance(config.get("target_modules"), str):
        problems.append("target_modules is a pattern, not explicit names")
    return problems


def save_adapter(model, folder: str | Path, *, base_model: str | None = None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors for PEFT and vLLM.

    Raises ValueError if the config holds anything vLLM's LoRA loader rejects.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.peft_config[model.active_adapter]
    if base_model is not None:
        config.base_model_name_or_path = str(base_model)
    model.save_pretrained(str(folder), safe_serialization=True, save_embedding_layers=False)
    path = folder / "adapter_config.json"
    saved = json.loads(path.read_text())
    problems = vllm_problems(saved)
    if problems:
        raise ValueError(f"adapter in {folder} would not load in vLLM: {'; '.join(problems)}")
    if not saved["target_modules"] or isinstance(saved["target_modules"], str):
        raise ValueError(f"adapter in {folder}: target_modules must be explicit names")
    # Sorted names make the file reproducible (PEFT writes a set in arbitrary order).
    saved["target_modules"] = sorted(saved["target_modules"])
    path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    return folder


def load_lora_weights(model, folder: str | Path) -> None:
    """Copy a saved adapter's LoRA weights into the trainable PeftModel `model` (a warm start, e.g. on-policy
    training from a GenPI adapter). The adapter must have the model's LoRA shape: the same rank, alpha and
    target modules, and a tensor of the same shape for every LoRA weight; ValueError naming the difference
    otherwise (a silent partial load would train something else than asked)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config_path, weights_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise ValueError(
            f"init adapter {folder}: not a PEFT adapter folder (adapter_config.json and adapter_model.safetensors)"
        )
    saved, name = json.loads(config_path.read_text()), model.active_adapter
    ours = model.peft_config[name]
    theirs_targets = saved.get("target_modules")
    theirs_targets = sorted(theirs_targets) if isinstance(theirs_targets, list) else theirs_targets
    for what, theirs, mine in (
        ("rank r", saved.get("r"), ours.r),
        ("lora_alpha", saved.get("lora_alpha"), ours.lora_alpha),
        ("target modules", theirs_targets, sorted(ours.target_modules)),
    ):
        if theirs != mine:
            raise ValueError(
                f"init adapter {folder}: its {what} is {theirs}, this run's LoRA has {mine}: the LoRA shapes must match"
            )
    weights = load_file(str(weights_path))
    # PEFT saves `...q_proj.lora_A.weight` for the parameter `...q_proj.lora_A.<adapter name>.weight`
    params = {n.replace(f".{name}.", "."): p for n, p in model.named_parameters() if "lora_" in n and f".{name}." in n}
    missing, unexpected = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
    if missing or unexpected:
        raise ValueError(
            f"init adapter {folder}: its LoRA weights do not match this model's ({len(missing)} missing, e.g. "
            f"{missing[:1]}; {len(unexpected)} unexpected, e.g. {unexpected[:1]}): another base model?"
        )
    for key, param in params.items():
        if weights[key].shape != param.shape:
            raise ValueError(
                f"init adapter {folder}: {key} has shape {list(weights[key].shape)}, "
                f"this model's is {list(param.shape)}: another base model?"
            )
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(weights[key].to(param.dtype))


def load_adapter(base_path: str | Path, folder: str | Path, quantize: bool = False, dtype: torch.dtype | None = None):
    """A PeftModel (eval mode, frozen) of the base at `base_path` with the adapter in `folder`."""
    from peft import PeftModel

    base = load_base(base_path, quantize=quantize, dtype=dtype)
    model = PeftModel.from_pretrained(base, str(folder), is_trainable=False)
    model.eval()
    return model


__all__ = [
    "LoraSettings",
    "VLLM_MAX_LORA_RANKS",
    "add_lora",
    "default_dtype",
    "is_quantized",
    "linear_module_names",
    "load_adapter",
    "load_base",
    "load_lora_weights",
    "save_adapter",
    "trainable_share",
    "vllm_problems",
]
