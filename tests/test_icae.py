"""`genpi train --method icae`: the In-context Autoencoder baseline (genpi.train.icae), its slots as a prefix in the
transformers engine, and its folder as an evaluation system."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from test_recipe import CALC, FAST, HELDOUT, TRAIN, ReachedTheModel, meta_model, on_the_model_device, row

from genpi import InputError
from genpi.engines import ChatRequest, Sampling
from genpi.train.icae import (
    ENCODER,
    ICAE_FILE,
    SLOTS_FILE,
    Icae,
    finetune_step_loss,
    init_embeddings,
    pretrain_step_loss,
    prompt_ids,
    prompt_slots,
    read_slots,
    slot_inputs,
    slot_loss,
    slot_response_logits,
    train_icae,
)
from genpi.train.qlora import LoraSettings, add_lora, load_base
from genpi.train.recipe import TrainSettings, build_examples, collate, make_optimizer, optimizer_step

K = 4
ICAE = dataclasses.replace(
    FAST, method="icae", epochs=1, quantize=False, memory_tokens=K, pretrain_steps=2, lora=LoraSettings(r=4, alpha=8)
)


def fresh_icae(path: str, k: int = K, seed: int = 0) -> Icae:
    torch.manual_seed(seed)  # the LoRA initialisation
    model = add_lora(load_base(path, quantize=False, dtype=torch.float32), LoraSettings(r=8, alpha=16, dropout=0.0))
    return Icae(model, *init_embeddings(model, k, seed))


@torch.no_grad()
def reconstruction_loss(icae: Icae, ids: list[int], pad_id: int) -> float:
    """Per-token NLL of `ids` from [slots(ids); AE], in eval mode."""
    from genpi.train.examples import Example

    icae.eval()
    slots = icae.encode([ids])
    with_ae = torch.cat([slots, icae.ae[None].to(slots.dtype)], 1)
    loss_sum, n = slot_loss(icae.model, collate([Example(ids, ids)], pad_id, icae.device), with_ae)
    icae.train()
    return float(loss_sum) / n


def test_autoencoding_lowers_the_reconstruction_loss(tiny_model):
    """On the tiny Llama with large random weights (its logits can move far from uniform, unlike the small-init
    one's) a dozen pretraining steps on P lower P's reconstruction loss from [slots; AE] by over a nat (19.0 ->
    17.2 when written); nothing but the slots, computed by the encoder, tells the frozen decoder what P is."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    icae, p = fresh_icae(tiny_model, k=8), prompt_ids(tokenizer, CALC)
    settings = dataclasses.replace(ICAE, lr=1e-2, warmup_ratio=0.0, schedule="constant")
    optimizer, scheduler, _ = make_optimizer(icae, settings, 12)
    before = reconstruction_loss(icae, p, tokenizer.pad_token_id)
    for _ in range(12):
        pretrain_step_loss(icae, [(p, len(p) // 2)], 1, tokenizer.pad_token_id)
        optimizer_step(icae, optimizer, scheduler, settings)
    after = reconstruction_loss(icae, p, tokenizer.pad_token_id)
    assert after < before - 1.0, (before, after)
    # what trained: the encoder's LoRA and the memory and AE embeddings, never the base (the frozen decoder)
    assert {n for n, p in icae.named_parameters() if p.requires_grad} >= {"memory", "ae"}
    assert all("lora_" in n for n, p in icae.model.named_parameters() if p.requires_grad)


def p_only_ids(tokenizer) -> set[int]:
    """Token ids of P that no dialogue (nor the template's default system turn) has: they reach the model only
    through P."""
    p = set(prompt_ids(tokenizer, CALC))
    elsewhere = set()
    for r in TRAIN + HELDOUT + [row(i) for i in range(20)]:
        messages = [{"role": "user", "content": r["input"]}] + r["turns"]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        elsewhere |= set(tokenizer(text, add_special_tokens=False)["input_ids"])
    only = p - elsewhere
    assert len(only) >= 3  # "calculator", "EXPR", "VALUE", ...
    return only


def lora_off(model) -> bool:
    return any(getattr(m, "disable_adapters", False) for m in model.modules() if hasattr(m, "lora_A"))


def test_the_decoder_reads_the_slots_never_p(tiny_trainable_model):
    """In training and held-out scoring, every embedding lookup with the LoRA off (the decoder) is of the
    conversation's tokens: P's own token ids reach only the encoder (LoRA on)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_trainable_model)
    only = p_only_ids(tokenizer)
    icae, p = fresh_icae(tiny_trainable_model), prompt_ids(tokenizer, CALC)
    seen = {"encoder": set(), "decoder": set()}

    def record(module, args):
        seen["decoder" if lora_off(icae.model) else "encoder"] |= set(args[0].flatten().tolist())

    icae.model.get_input_embeddings().register_forward_pre_hook(record)
    rows, _ = build_examples(TRAIN[:4], CALC, tokenizer, dataclasses.replace(ICAE, method="sft"))
    finetune_step_loss(icae, p, [r.student for r in rows], 2, tokenizer.pad_token_id)
    batch = collate([rows[0].student], tokenizer.pad_token_id, icae.device)
    logits = slot_response_logits(icae.model, batch, icae.slots(p))
    assert only <= seen["encoder"]  # the hook sees P where it is read
    assert seen["decoder"] and not (only & seen["decoder"])
    assert logits.shape[0] == (batch["labels"][:, 1:] != -100).sum()


def test_every_icae_tensor_is_made_on_the_model_device(tiny_trainable_model):
    """On the meta device a tensor made on the CPU fails the pre-hook (or the meta read): the memory tokens,
    the slots and the batches follow the model."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_trainable_model)
    model = meta_model(tiny_trainable_model)
    icae = Icae(model, *init_embeddings(model, K, 0))
    assert icae.memory.device.type == "meta"
    rows, _ = build_examples(TRAIN[:2], CALC, tokenizer, dataclasses.replace(ICAE, method="sft"))
    p = prompt_ids(tokenizer, CALC)
    assert on_the_model_device(lambda: icae.encode([p])) is ReachedTheModel
    assert (
        on_the_model_device(lambda: finetune_step_loss(icae, p, [r.student for r in rows], 2, tokenizer.pad_token_id))
        is ReachedTheModel
    )
    # the decoder's slots come in any dtype (float32 from the cache, float64 here): cast to the model's, where a
    # bfloat16 model would fail at its first matmul (torch.cat alone would promote to float64 silently)
    bf16 = load_base(tiny_trainable_model, quantize=False, dtype=torch.bfloat16)
    batch = collate([rows[0].student], tokenizer.pad_token_id, bf16.device)
    inputs = slot_inputs(bf16, torch.zeros(K, bf16.config.hidden_size, dtype=torch.float64), batch)
    assert (
        inputs["inputs_embeds"].dtype == torch.bfloat16
        and inputs["inputs_embeds"].shape[1] == K + batch["input_ids"].shape[1]
    )
    assert slot_response_logits(bf16, batch, torch.zeros(K, bf16.config.hidden_size)).dtype == torch.bfloat16


def greedy_by_hand(model, slots: torch.Tensor, ids: list[int], n: int) -> list[int]:
    """n greedy tokens of the model given [slots; ids] as input embeddings, without a cache."""
    out = []
    with torch.no_grad():
        for _ in range(n):
            embeds = model.get_input_embeddings()(torch.tensor([ids + out]))
            logits = model(inputs_embeds=torch.cat([slots[None].float(), embeds], 1)).logits
            out.append(int(logits[0, -1].argmax()))
    return out


def test_the_engine_takes_slots_as_the_prefix(tiny_model):
    """Generation with prefix_embeds is the model's own on [slots; tokens], batched rows of different slots
    included; the slots' cache is made once and reused; float64 CPU slots reach a float32 model as float32 (a
    missing cast would fail the forward)."""
    from genpi.engines.hf import TransformersEngine

    engine = TransformersEngine(tiny_model, dtype="float32")
    hidden = engine.model.config.hidden_size
    generator = torch.Generator().manual_seed(0)
    slots = [torch.randn(K, hidden, generator=generator, dtype=torch.float64) * 0.5 for _ in range(2)]
    seen = []
    engine.model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["inputs_embeds"]) if kw.get("inputs_embeds") is not None else None,
        with_kwargs=True,
    )
    messages = [[{"role": "user", "content": "What is 2 plus 3?"}], [{"role": "user", "content": "Hi"}]]
    sampling = Sampling(max_tokens=6)
    requests = [ChatRequest(m, sampling, prefix_embeds=s) for m, s in zip(messages, slots)]
    try:
        completions = engine.generate(requests + [ChatRequest(messages[0], sampling, prefix_embeds=slots[0])])
        fed = list(seen)  # the engine's forwards (greedy_by_hand's below pass embeddings too)
        for request, completion in zip(requests, completions):
            ids = engine.encode(request.messages)
            assert completion.error is None
            expected = greedy_by_hand(engine.model, request.prefix_embeds, ids, 6)
            assert engine.tokenizer.decode(expected, skip_special_tokens=True).startswith(completion.text)
            assert completion.prompt_tokens == K + len(ids)
        assert completions[2].text == completions[0].text
        assert engine.prefix_misses == 2 and engine.prefix_hits == 1  # one cache per slots, reused
        assert all(e.dtype == torch.float32 and e.device == engine.model.device for e in fed)
        assert [tuple(e.shape) for e in fed] == [(1, K, hidden)] * 2
        bad = engine.generate([ChatRequest(messages[0], sampling, prefix_embeds=torch.zeros(K, hidden + 1))])
        assert "prefix_embeds: expected" in bad[0].error
    finally:
        engine.close()


@pytest.fixture(scope="module")
def trained(tiny_trainable_model, tmp_path_factory):
    """An ICAE for calc trained in process (2 pretraining steps, 2 fine-tuning steps), saved as a folder."""
    reports = []
    icae, metrics = train_icae(
        tiny_trainable_model, CALC, TRAIN, HELDOUT, ICAE, report=lambda m, state: reports.append((m, state))
    )
    folder = icae.save(tmp_path_factory.mktemp("icae") / "calc")
    return icae, metrics, reports, folder


def test_training_runs_both_phases_and_saves_the_folder(trained):
    icae, metrics, reports, folder = trained
    assert metrics["steps"] == 4 and metrics["pretrain_steps"] == 2 and metrics["memory_tokens"] == K
    # checkpoints: at the end of pretraining and of the fine-tuning epoch; held-out figures after fine-tuning
    assert [m["step"] for m, state in reports if state is not None] == [2, 4]
    assert metrics["heldout_kl"] is not None and metrics["heldout_kl"] != metrics["heldout_kl_before"]
    assert (folder / ENCODER / "adapter_config.json").is_file() and (folder / ICAE_FILE).is_file()
    assert not (folder / "adapter_config.json").exists()  # nothing takes it for a LoRA of the decoder
    cached = read_slots(folder, CALC.sha256)
    assert cached.shape == (K, icae.model.config.hidden_size) and cached.dtype == torch.float32


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tiny_trainable_model, trained):
    _, expected, reports, _ = trained
    state = next(state for m, state in reports if state is not None and m["step"] == 2)()
    _, metrics = train_icae(tiny_trainable_model, CALC, TRAIN, HELDOUT, ICAE, resume=state)
    assert metrics["train_losses"] == pytest.approx(expected["train_losses"], rel=1e-5)
    assert metrics["heldout_kl"] == pytest.approx(expected["heldout_kl"], rel=1e-5)


def test_slots_are_cached_and_reused(trained, tiny_trainable_model, tmp_path, monkeypatch):
    import shutil

    import genpi.train.icae as icae_module

    icae, _, _, saved = trained
    folder = shutil.copytree(saved, tmp_path / "calc")
    cached = prompt_slots(folder, CALC, tiny_trainable_model)
    assert torch.equal(cached, read_slots(saved, CALC.sha256))
    (folder / SLOTS_FILE).unlink()  # a miss: computed with the folder's encoder, then cached
    loads = []
    real = icae_module.load_icae
    monkeypatch.setattr(icae_module, "load_icae", lambda *a, **kw: loads.append(1) or real(*a, **kw))
    computed = prompt_slots(folder, CALC, tiny_trainable_model)
    assert loads == [1] and torch.allclose(computed, cached, atol=1e-5)
    assert torch.equal(read_slots(folder, CALC.sha256), computed)
    monkeypatch.setattr(icae_module, "load_icae", lambda *a, **kw: pytest.fail("the cache was not read"))
    assert torch.equal(prompt_slots(folder, CALC, tiny_trainable_model), computed)


def test_bad_settings_and_folders_are_refused(trained, tiny_trainable_model, tmp_path):
    with pytest.raises(ValueError, match="memory_tokens must be at least 1"):
        TrainSettings(method="icae", memory_tokens=0)
    result = subprocess.run(
        [sys.executable, "-m", "genpi.cli", "train", str(tmp_path), "--catalog", str(REPO / "tests/data/tiny.yaml")]
        + ["--out", str(tmp_path / "a"), "--method", "icae", "--memory-tokens", "0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "memory_tokens must be at least 1" in result.stderr
    from genpi.serve.scheduler import load_adapters

    root = tmp_path / "adapters"
    write_manifest(trained[3], root / "calc", tiny_trainable_model)
    with pytest.raises(InputError, match="ICAE system .* genpi serve cannot serve it"):
        load_adapters(root, REPO / "tests/data/tiny.yaml", None)


def write_manifest(folder, out, base):
    import shutil

    from genpi.data.adapters import AdapterManifest, write_adapter

    manifest = AdapterManifest("calc", CALC.sha256, base, "icae", None, {"r": 4}, "test")
    write_adapter(out, manifest, lambda tmp: shutil.copytree(folder, tmp, dirs_exist_ok=True))


@pytest.mark.slow
def test_genpi_train_method_icae_and_its_fidelity(tiny_trainable_model, calc_dialogues, tmp_path, capsys):
    """`genpi train --method icae` writes an ICAE folder; `genpi eval fidelity --adapters icae=DIR` scores it as a
    system: its replies and teacher-forced figures come from the base given the slots (they differ from the
    base's), the on-policy and collateral figures are left null."""
    from test_train_run import train

    from genpi.cli import main

    adapters = tmp_path / "adapters"
    result = train(
        calc_dialogues,
        adapters,
        "--base",
        tiny_trainable_model,
        "--method",
        "icae",
        "--no-4bit",
        "--memory-tokens",
        str(K),
        "--pretrain-steps",
        "2",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["calc"]["status"] == "trained"
    folder = adapters / "calc"
    manifest = json.loads((folder / "genpi.json").read_text())
    assert manifest["method"] == "icae" and manifest["settings"]["memory_tokens"] == K
    assert read_slots(folder, CALC.sha256).shape[0] == K
    out = tmp_path / "eval"
    argv = ["eval", "fidelity", calc_dialogues, "--catalog", REPO / "tests/data/tiny.yaml", "--adapters"]
    argv += [f"icae={adapters}", "--base", tiny_trainable_model, "--max-new-tokens", "8", "--max-turns", "1"]
    capsys.readouterr()
    # in process: a subprocess costs seconds of imports (the command's exit status: test_eval.py)
    assert main([str(a) for a in [*argv, "--out", out, "--json"]]) == 0
    [calc] = [r for r in json.loads(capsys.readouterr().out)["results"] if r["prompt_id"] == "calc"]
    systems = calc["systems"]
    assert set(systems) == {"teacher", "base", "icae"}
    assert systems["icae"]["nll"] is not None and systems["icae"]["nll"] != systems["base"]["nll"]
    assert systems["icae"]["kl"] != systems["base"]["kl"]
    assert calc["adapters"] == {"icae": str(folder)}
    assert "fidelity" in json.loads((folder / "genpi.json").read_text())["eval_metrics"]


def test_efficiency_counts_the_k_slots_as_the_prefix(trained, tiny_trainable_model, tmp_path):
    """`genpi eval efficiency --adapters` of an ICAE folder adds the icae-slots system: the conversation without
    P behind k prefix positions (fewer than P's tokens, not zero)."""
    from genpi.eval.cost import ICAE as SLOTS
    from genpi.eval.cost import MERGED, WITH_P
    from genpi.eval.efficiency import evaluate

    root = tmp_path / "adapters"
    write_manifest(trained[3], root / "calc", tiny_trainable_model)
    result = evaluate(
        REPO / "tests/data/tiny.yaml",
        "calc",
        adapters=str(root),
        turns=2,
        model_config=tiny_trainable_model,
        base=tiny_trainable_model,
    )
    systems = result["systems"]
    slots, merged = systems[SLOTS], systems[MERGED]
    assert slots["prefix_tokens"] == merged["prefix_tokens"] + K < systems[WITH_P]["prefix_tokens"]
    assert slots["contexts"] == [c + K for c in merged["contexts"]] and slots["generated"] == merged["generated"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_icae_trains_and_its_slots_serve_on_cuda(tiny_trainable_model):
    """The CUDA defaults (bf16, 4-bit, gradient checkpointing): the memory tokens, slots and batches on the GPU;
    the engine takes the (CPU, float32) cached slots onto its bf16 CUDA model."""
    from genpi.engines.hf import TransformersEngine

    settings = dataclasses.replace(ICAE, quantize=True, pretrain_steps=1)
    icae, metrics = train_icae(tiny_trainable_model, CALC, TRAIN[:4], HELDOUT, settings)
    assert metrics["effective"]["device"] == "cuda:0" and metrics["effective"]["dtype"] == "bfloat16"
    assert metrics["effective"]["gradient_checkpointing"] and icae.memory.is_cuda
    assert all(map(torch.isfinite, map(torch.tensor, metrics["train_losses"]))) and metrics["heldout_kl"] is not None
    slots = icae.slots(icae.prompts[CALC.sha256]).cpu()
    engine = TransformersEngine(tiny_trainable_model, dtype="bfloat16")
    try:
        [done] = engine.generate(
            [ChatRequest([{"role": "user", "content": "Hi"}], Sampling(max_tokens=4), 0, 0, slots)]
        )
        assert done.error is None and done.prompt_tokens > K
    finally:
        engine.close()
