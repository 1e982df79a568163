"""On-policy internalization: the reverse KL by hand, the sampler as an engine user, and training that closes the
gap."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch
from conftest import REPO, build_tiny_llama
from test_recipe import HELDOUT, TRAIN

from genpi.catalog import load_catalog
from genpi.engines import ChatRequest, Sampling
from genpi.engines.hf import TransformersEngine
from genpi.train.losses import reverse_kl_loss
from genpi.train.onpolicy import OnPolicySampler, mean_reverse_kl, reply_views, sample_seed
from genpi.train.plan import recorded_settings
from genpi.train.qlora import LoraSettings, save_adapter
from genpi.train.recipe import JOINT_METHODS, METHODS, TrainSettings, collate, train_adapter
from genpi.train.run import build_parser, check_init_adapter

CALC, _ = load_catalog(REPO / "tests" / "data" / "tiny.yaml")
LORA = LoraSettings(r=4, alpha=8, dropout=0.0)
ONPOLICY = TrainSettings(
    method="onpolicy",
    epochs=1,
    lr=1e-2,
    batch_size=4,
    micro_batch=4,
    max_length=512,
    quantize=False,
    lora=LORA,
    onpolicy_max_tokens=8,
    refresh_steps=1,
    schedule="constant",
    warmup_ratio=0.0,
)
INPUTS = [f"What is {a} plus {b}?" for a in range(1, 5) for b in range(2, 5)]  # 12 training inputs
ROWS = [{"input": x, "turns": []} for x in INPUTS]  # on-policy needs only the inputs


def hand_reverse_kl(student: list[float], teacher: list[float]) -> float:
    zs, zt = sum(math.exp(v) for v in student), sum(math.exp(v) for v in teacher)
    return sum(math.exp(s) / zs * (s - math.log(zs) - t + math.log(zt)) for s, t in zip(student, teacher))


def test_reverse_kl_matches_a_hand_computation():
    student = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.5, 0.5, 3.0, 0.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, 1.0, 2.0, 0.0], [0.5, 0.5, 3.0, 0.0]])
    expected = (
        hand_reverse_kl([2.0, 1.0, 0.0, -1.0], [0.0, 1.0, 2.0, 0.0]) + 0.0
    ) / 2  # the second token: same logits, KL 0
    loss = reverse_kl_loss(student, teacher)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert reverse_kl_loss(teacher, student.detach()).item() != pytest.approx(
        expected, rel=1e-3
    )  # not symmetric: the direction matters
    loss.backward()
    assert student.grad.abs().sum() > 0 and torch.allclose(student.grad[1], torch.zeros(4), atol=1e-7)
    assert reverse_kl_loss(student[:0], teacher[:0]).item() == 0.0
    with pytest.raises(ValueError, match="differ in shape"):
        reverse_kl_loss(student, teacher[:, :3])


def test_top_k_reverse_kl_is_the_kl_over_the_students_top_k_and_the_rest():
    student = torch.tensor([[3.0, 2.0, 0.0, -1.0, 0.5]])
    teacher = torch.tensor([[0.0, 2.5, 1.0, 1.0, -2.0]])
    p_s, p_t = student.softmax(-1)[0].tolist(), teacher.softmax(-1)[0].tolist()
    top = [0, 1]  # the student's two most likely tokens; the rest (2, 3, 4) is one outcome
    rest_s, rest_t = 1 - sum(p_s[i] for i in top), 1 - sum(p_t[i] for i in top)
    expected = sum(p_s[i] * math.log(p_s[i] / p_t[i]) for i in top) + rest_s * math.log(rest_s / rest_t)
    assert reverse_kl_loss(student, teacher, topk=2).item() == pytest.approx(expected, rel=1e-5)
    full = reverse_kl_loss(student, teacher).item()
    assert 0 < expected < full  # merging outcomes lowers a KL: a lower bound of the full one
    assert reverse_kl_loss(student, teacher, topk=5).item() == pytest.approx(full, rel=1e-6)  # k = V: exact
    assert reverse_kl_loss(student, student, topk=2).item() == pytest.approx(0.0, abs=1e-6)
    # nearly all of the mass on the top k (rounding makes it 1): finite, with finite gradients
    peaked = torch.tensor([[60.0, 0.0, 0.0], [0.0, 0.0, 0.0]], requires_grad=True)
    loss = reverse_kl_loss(peaked, torch.tensor([[0.0, 60.0, 0.0], [1.0, 0.0, 0.0]]), topk=1)
    loss.backward()
    assert math.isfinite(loss.item()) and loss.item() > 25 and torch.isfinite(peaked.grad).all()
    with pytest.raises(ValueError, match="topk must be 0"):
        reverse_kl_loss(student, teacher, topk=-1)


@pytest.fixture(scope="module")
def shifted_model(tmp_path_factory) -> str:
    """A tiny random Llama whose replies P shifts clearly (reverse KL about 0.4 nats per token at the start) but not
    wildly (the larger init of `tiny_model` puts it near 11 nats, which a few steps cannot close)."""
    return str(build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-shifted"), initializer_range=0.1))


class SpyEngine:
    """A TransformersEngine that records what the sampler asks of it."""

    def __init__(self, path: str):
        self.inner = TransformersEngine(path, dtype="float32", max_batch=8)
        self.model_name, self.added, self.removed, self.asked = "spy", [], [], []

    def add_adapters(self, adapters):
        self.added += list(adapters)
        self.inner.add_adapters(adapters)

    def remove_adapters(self, names):
        self.removed += names
        self.inner.remove_adapters(names)

    def generate(self, requests, adapters=None):
        self.asked.append((len(requests), set(adapters), requests[0].sampling, [r.seed for r in requests]))
        return self.inner.generate(requests, adapters)

    def count_tokens(self, messages):
        return self.inner.count_tokens(messages)

    def close(self):
        self.inner.close()


def fixed_replies(path: str, n: int = 6) -> list[str]:
    """Replies of the untrained student (the base without P) to held-out inputs, sampled at temperature 1."""
    engine = TransformersEngine(path, dtype="float32", max_batch=n)
    requests = [
        ChatRequest(
            [{"role": "user", "content": f"What is {i} times {i + 2}?"}],
            Sampling(temperature=1.0, max_tokens=8),
            seed=i,
        )
        for i in range(n)
    ]
    return [c.text for c in engine.generate(requests)]


def test_onpolicy_training_lowers_the_reverse_kl_and_refreshes_the_sampler_every_n_steps(shifted_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(shifted_model)
    pairs = [
        reply_views(CALC, f"What is {i} times {i + 2}?", reply, tokenizer, 512, None)
        for i, reply in enumerate(fixed_replies(shifted_model))
    ]
    spy = SpyEngine(shifted_model)
    settings = dataclasses.replace(ONPOLICY, epochs=4, refresh_steps=2)  # 3 steps an epoch, 12 in all
    model, metrics = train_adapter(shifted_model, CALC, ROWS, [], settings, engine=spy)
    losses = metrics["train_losses"]
    assert len(losses) == 12 and sum(losses[-3:]) < 0.5 * sum(losses[:3]), losses

    batch = lambda examples: collate(examples, tokenizer.pad_token_id, model.device)  # noqa: E731
    after = mean_reverse_kl(model, pairs, batch, 4)
    with model.disable_adapter():  # the untrained student: the base without P
        before = mean_reverse_kl(model, pairs, batch, 4)
    assert before > 0.2 and after < 0.5 * before, (before, after)

    # the sampler: a fresh adapter every 2 steps (steps 0, 2, ..., 10), the previous one dropped; the replies of the
    # steps up to the next refresh sampled in one batch, which an epoch's end (every 3 steps) also ends
    assert spy.added == [f"onpolicy-{k}" for k in range(6)] and spy.removed == spy.added[:-1]
    windows = [
        (2, 0),
        (1, 1),
        (1, 1),
        (2, 2),
        (2, 3),
        (1, 4),
        (1, 4),
        (2, 5),
    ]  # (steps, adapter) of each call: steps 0-1, 2, 3, 4-5, ...
    assert [(n, adapters) for n, adapters, _, _ in spy.asked] == [
        (4 * steps, {f"onpolicy-{a}"}) for steps, a in windows
    ]
    assert all(s.temperature == 1.0 and s.max_tokens == 8 for _, _, s, _ in spy.asked)
    assert spy.asked[0][3] == [sample_seed(0, step, i) for step in (0, 1) for i in range(4)]
    assert len({s for *_, seeds in spy.asked for s in seeds}) == 48
    assert metrics["onpolicy_refreshes"] == 6 and metrics["onpolicy_requests"] == 48 and metrics["onpolicy_failed"] == 0
    assert (
        metrics["onpolicy_reply_tokens"] > 0
        and metrics["onpolicy_sample_seconds"] > 0
        and metrics["onpolicy_refresh_seconds"] > 0
    )


def test_the_sampler_samples_from_the_live_adapter(shifted_model, tmp_path):
    """After a refresh the engine's replies are those of the base with the trained adapter, not of the base."""
    model, _ = train_adapter(shifted_model, CALC, ROWS[:4], [], dataclasses.replace(ONPOLICY, lr=5e-2))
    engine = TransformersEngine(shifted_model, dtype="float32", max_batch=4)
    sampler = OnPolicySampler(engine, max_tokens=8, temperature=0.0)  # greedy: comparable token for token
    sampler.refresh(lambda folder: save_adapter(model, folder))
    sampled = [c.text for c in sampler.sample(INPUTS[:4], [0, 1, 2, 3])]
    greedy = TransformersEngine(shifted_model, dtype="float32", max_batch=4)
    plain = [
        c.text
        for c in greedy.generate(
            [ChatRequest([{"role": "user", "content": x}], Sampling(max_tokens=8)) for x in INPUTS[:4]]
        )
    ]
    save_adapter(model, tmp_path / "adapter")
    greedy.add_adapters({"trained": str(tmp_path / "adapter")})
    with_adapter = [
        c.text
        for c in greedy.generate(
            [ChatRequest([{"role": "user", "content": x}], Sampling(max_tokens=8)) for x in INPUTS[:4]],
            adapters=["trained"] * 4,
        )
    ]
    assert sampled == with_adapter != plain
    sampler.close()
    with pytest.raises(ValueError, match="loads LoRA adapters"):
        OnPolicySampler(object(), max_tokens=8)


def test_genpi_onpolicy_trains_with_the_pg_term_and_chooses_lambda(shifted_model):
    assert "genpi+onpolicy" in JOINT_METHODS and {"onpolicy", "genpi+onpolicy"} <= set(METHODS)
    settings = dataclasses.replace(ONPOLICY, method="genpi+onpolicy", lam=0.3, onpolicy_topk=16)
    _, metrics = train_adapter(shifted_model, CALC, TRAIN[:4], HELDOUT[:1], settings)  # one step
    _, alone = train_adapter(shifted_model, CALC, TRAIN[:4], [], dataclasses.replace(settings, method="onpolicy"))
    _, pg = train_adapter(shifted_model, CALC, TRAIN[:4], [], dataclasses.replace(settings, method="pg"))
    assert metrics["steps"] == 1 and metrics["onpolicy_requests"] == 4 and math.isfinite(metrics["heldout_loss"])
    # (1 − λ)·L_onpolicy + λ·L_PG: the first step samples the same replies (same seeds, the adapter still 0) on the
    # same rows
    assert metrics["train_loss_first"] == pytest.approx(
        0.7 * alone["train_loss_first"] + 0.3 * pg["train_loss_first"], rel=1e-4
    )
    assert alone["train_loss_first"] > 0 and pg["train_loss_first"] > 1.0
    assert alone["data_skipped"] == 0 and alone["data_truncated_examples"] == 0
    recorded = json.loads(json.dumps(recorded_settings(settings, [0.3, 0.7])))  # genpi.json's settings: JSON, whole
    assert recorded["lambdas"] == [0.3, 0.7] and recorded["method"] == "genpi+onpolicy"
    assert (
        recorded["refresh_steps"] == 1
        and recorded["onpolicy_max_tokens"] == 8
        and recorded["onpolicy_topk"] == 16
        and recorded["init_adapter"] is None
    )
    assert (
        recorded_settings(dataclasses.replace(settings, method="onpolicy"), [0.3])["lambdas"] is None
    )  # one loss term: no λ


def test_cli_flags_reach_the_settings(tmp_path):
    args = build_parser().parse_args(
        [
            "DATA",
            "--catalog",
            "C",
            "--out",
            "O",
            "--method",
            "onpolicy",
            "--refresh-steps",
            "8",
            "--onpolicy-max-tokens",
            "64",
            "--onpolicy-topk",
            "20",
            "--init-adapter",
            str(tmp_path),
        ]
    )
    assert (args.refresh_steps, args.onpolicy_max_tokens, args.onpolicy_topk, args.init_adapter) == (
        8,
        64,
        20,
        str(tmp_path),
    )
    for bad in ({"refresh_steps": 0}, {"onpolicy_max_tokens": 0}, {"onpolicy_topk": -1}):
        with pytest.raises(ValueError, match="refresh_steps and onpolicy_max_tokens must be positive"):
            TrainSettings(**bad)


def test_init_adapter_starts_where_a_run_stopped_and_a_wrong_shape_is_refused(tiny_trainable_model, tmp_path):
    from genpi import InputError

    sft = TrainSettings(
        method="sft",
        epochs=1,
        lr=1e-2,
        batch_size=4,
        micro_batch=2,
        max_length=512,
        quantize=False,
        lora=LORA,
        schedule="constant",
        warmup_ratio=0.0,
    )
    rows = TRAIN[:4]
    first, _ = train_adapter(tiny_trainable_model, CALC, rows, [], sft)  # one step on all 4 rows
    save_adapter(first, tmp_path / "first")
    _, continued = train_adapter(tiny_trainable_model, CALC, rows, [], dataclasses.replace(sft, epochs=2))
    _, warm = train_adapter(
        tiny_trainable_model, CALC, rows, [], dataclasses.replace(sft, init_adapter=str(tmp_path / "first"))
    )
    # a step sees all 4 rows: the warm start's first loss is the uninterrupted run's second
    assert warm["train_loss_first"] == pytest.approx(continued["train_losses"][1], rel=1e-4)
    assert warm["train_loss_first"] < continued["train_losses"][0] - 0.1

    wide = dataclasses.replace(sft, lora=LoraSettings(r=8, alpha=8, dropout=0.0), init_adapter=str(tmp_path / "first"))
    with pytest.raises(ValueError, match=r"its rank r is 4, this run's LoRA has 8: the LoRA shapes must match"):
        train_adapter(tiny_trainable_model, CALC, rows, [], wide)
    with pytest.raises(InputError, match=r"rank 4, alpha 8; this run's LoRA is rank 8, alpha 8"):
        check_init_adapter(wide)
    with pytest.raises(ValueError, match="not a PEFT adapter folder"):
        train_adapter(tiny_trainable_model, CALC, rows, [], dataclasses.replace(sft, init_adapter=str(tmp_path)))
    with pytest.raises(InputError, match="not a PEFT adapter folder"):
        check_init_adapter(dataclasses.replace(sft, init_adapter=str(tmp_path)))
    # the same rank, another base (hidden size 64 vs 32): the tensors' shapes differ
    small = tmp_path / "small-base"
    _small_llama(small)
    other, _ = train_adapter(str(small), CALC, TRAIN[:2], [], dataclasses.replace(sft, batch_size=2))
    save_adapter(other, tmp_path / "other")
    with pytest.raises(
        ValueError, match=r"lora_A.weight has shape \[4, 32\], this model's is \[4, 64\]: another base model"
    ):
        train_adapter(
            tiny_trainable_model, CALC, rows, [], dataclasses.replace(sft, init_adapter=str(tmp_path / "other"))
        )


def _small_llama(folder):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(build_tiny_llama(folder.with_name("tok")))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        initializer_range=0.02,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def test_a_run_resumed_between_two_refreshes_ends_with_the_same_adapter(shifted_model):
    """The checkpoint keeps the sampler's adapter: resumed at step 3 (refreshed at 2, next at 4) it samples what the
    uninterrupted run sampled, and ends with the same weights."""
    settings = dataclasses.replace(
        ONPOLICY, epochs=2, batch_size=2, micro_batch=2, refresh_steps=2, onpolicy_max_tokens=4
    )
    rows = ROWS[:6]  # 3 steps an epoch
    states = []

    def keep(metrics, state):
        if state is not None:
            states.append((metrics["step"], copy.deepcopy(state())))

    whole, metrics = train_adapter(shifted_model, CALC, rows, [], settings, report=keep, checkpoint_steps=1)
    step, state = states[2]
    assert step == 3 and state["onpolicy"]["refreshes"] == 2 and state["onpolicy_adapter"]
    resumed, resumed_metrics = train_adapter(shifted_model, CALC, rows, [], settings, resume=state)
    for (name, p), (_, q) in zip(whole.named_parameters(), resumed.named_parameters()):
        if p.requires_grad:
            assert torch.equal(p, q), name
    assert resumed_metrics["train_losses"] == metrics["train_losses"]
    assert resumed_metrics["onpolicy_refreshes"] == metrics["onpolicy_refreshes"] == 3  # steps 0, 2, 4
    assert resumed_metrics["onpolicy_requests"] == metrics["onpolicy_requests"] == 12


def test_the_onpolicy_batches_are_made_on_the_model_device(tiny_trainable_model):
    from test_recipe import ReachedTheModel, meta_model, on_the_model_device
    from transformers import AutoTokenizer

    from genpi.train.recipe import build_examples, step_loss

    tokenizer = AutoTokenizer.from_pretrained(tiny_trainable_model)
    rows, _ = build_examples(ROWS[:2], CALC, tokenizer, ONPOLICY)
    pairs = [reply_views(CALC, r.input, "Act: compute(1+2)", tokenizer, 512, None) for r in rows]
    model = meta_model(tiny_trainable_model)
    assert (
        on_the_model_device(lambda: step_loss(model, rows, ONPOLICY, tokenizer.pad_token_id, pairs)) is ReachedTheModel
    )


def test_the_fingerprint_covers_the_init_adapters_weights(tmp_path):
    from test_recipe import row

    from genpi.data.adapters import fingerprint

    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"weights")
    train = [dict(row(0), sample_id=0, split="train")]
    settings = dataclasses.replace(ONPOLICY, init_adapter=str(tmp_path))
    before = fingerprint(train, [], recorded_settings(settings, [0.5]), "smollm2")
    assert before != fingerprint(train, [], recorded_settings(ONPOLICY, [0.5]), "smollm2")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"other weights")  # the same folder, retrained
    assert fingerprint(train, [], recorded_settings(settings, [0.5]), "smollm2") != before
    assert fingerprint(
        train, [], recorded_settings(dataclasses.replace(settings, refresh_steps=2), [0.5]), "smollm2"
    ) != fingerprint(train, [], recorded_settings(settings, [0.5]), "smollm2")


def test_settings_added_later_keep_old_fingerprints_at_their_defaults():
    """An adapter trained before icae's and --full-finetune's settings existed stays up to date: at their defaults
    they leave the fingerprint as it was; set, they change it."""
    from test_recipe import row

    from genpi.data.adapters import fingerprint
    from genpi.train.plan import ADDED_SINCE_FINGERPRINTS, fingerprint_settings

    train = [dict(row(0), sample_id=0, split="train")]
    before = {k: v for k, v in recorded_settings(ONPOLICY, [0.5]).items() if k not in ADDED_SINCE_FINGERPRINTS}
    now = fingerprint(train, [], fingerprint_settings(ONPOLICY, [0.5]), "smollm2")
    assert now == fingerprint(train, [], before, "smollm2")
    kld = dataclasses.replace(ONPOLICY, method="kld")  # a method --full-finetune takes
    for settings, change in (
        (ONPOLICY, {"memory_tokens": 64}),
        (ONPOLICY, {"pretrain_steps": 3}),
        (kld, {"full_finetune": True}),
    ):
        unchanged = fingerprint(train, [], fingerprint_settings(settings, [0.5]), "smollm2")
        changed = fingerprint(
            train, [], fingerprint_settings(dataclasses.replace(settings, **change), [0.5]), "smollm2"
        )
        assert changed != unchanged, change
