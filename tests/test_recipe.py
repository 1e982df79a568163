"""One prompt's training loop on the tiny Llama: every method runs, and learning happens."""

import dataclasses
import math

import pytest
import torch
from conftest import REPO

from genpi.catalog import load_catalog
from genpi.train.qlora import LoraSettings, add_lora, load_base
from genpi.train.recipe import (
    METHODS,
    TrainSettings,
    build_examples,
    heldout_kl,
    heldout_loss,
    make_optimizer,
    optimizer_step,
    step_loss,
    train_adapter,
)

CALC, _ = load_catalog(REPO / "tests" / "data" / "tiny.yaml")


def row(i):
    a, b = i % 7 + 1, i % 5 + 2
    return {
        "input": f"What is {a} plus {b}?",
        "turns": [
            {"role": "assistant", "content": f"Act: compute({a}+{b})"},
            {"role": "user", "content": f"Result: {a + b}"},
            {"role": "assistant", "content": f"Act: answer({a + b})"},
        ],
        "student_output": f"The answer is {a + b}.",
        "reason": "The prompt asks for compute and answer actions instead of prose.",
    }


def write_calc_dialogues(out, n: int, heldout_from: int, off_format: frozenset[int] = frozenset()):
    """A synthesis folder written by hand: n calc dialogue rows, held out from sample `heldout_from` on;
    in the samples `off_format` the agent's last turn is prose, outside the action space."""
    from genpi.data import store

    rows = []
    for i in range(n):
        r = dict.fromkeys(store.DIALOGUE_COLUMNS)
        r.update(
            row(i),
            prompt_id="calc",
            prompt_sha256=CALC.sha256,
            sample_id=i,
            seed=i,
            split="heldout" if i >= heldout_from else "train",
        )
        if i in off_format:
            r["turns"] = r["turns"][:2] + [{"role": "assistant", "content": "The answer is probably right."}]
        rows.append(r)
    store.write_table(store.shard_path(out, "calc", 0), rows, store.DIALOGUE_SCHEMA)
    return out


TRAIN = [row(i) for i in range(8)]
HELDOUT = [row(i) for i in range(8, 10)]
FAST = TrainSettings(
    epochs=4, lr=1e-2, batch_size=4, micro_batch=2, max_length=512, lora=LoraSettings(r=4, alpha=8, dropout=0.0)
)


def test_genpi_qlora_lowers_the_training_and_heldout_loss(tiny_trainable_model):
    reports = []
    model, metrics = train_adapter(
        tiny_trainable_model, CALC, TRAIN, HELDOUT, FAST, report=lambda m, state: reports.append((m, state))
    )
    assert metrics["steps"] == 8 and [m["step"] for m, _ in reports] == list(range(1, 9))
    # a checkpoint and the held-out loss at the end of every epoch (2 steps each), nowhere else
    assert [m["step"] for m, state in reports if state is not None] == [2, 4, 6, 8]
    assert [m.get("heldout_loss") for m, _ in reports][1::2] == metrics["heldout_loss_per_epoch"] and len(
        metrics["heldout_loss_per_epoch"]
    ) == 4
    assert [m.get("heldout_kl") for m, _ in reports][1::2] == metrics["heldout_kl_per_epoch"] and metrics[
        "heldout_kl_examples"
    ] == 2
    assert all(kl > 0 for kl in metrics["heldout_kl_per_epoch"]) and metrics["heldout_kl_before"] > 0
    assert metrics["train_loss_last"] < metrics["train_loss_first"]
    assert metrics["heldout_loss"] < metrics["heldout_loss_before"]
    assert metrics["data_skipped"] == 0 and metrics["train_examples"] == 8
    base = model.get_base_model()
    assert base.is_loaded_in_4bit


@pytest.mark.parametrize("method", [m for m in METHODS if m not in ("genpi", "icae")])  # icae: test_icae.py
def test_every_baseline_trains(tiny_trainable_model, method):
    from transformers import AutoTokenizer

    from genpi.train.examples import build_sft

    settings = dataclasses.replace(FAST, method=method, epochs=1, quantize=False, onpolicy_max_tokens=8)
    train = TRAIN
    if "topk" in method:  # a teacher top-k that puts 0.6 on the token itself: the student's own tokens
        tok = AutoTokenizer.from_pretrained(tiny_trainable_model)
        turns = lambda r: [[e.input_ids[p] for p in t] for e in [build_sft(r, tok, 512)] for t in e.agent_tokens]  # noqa: E731

        def topk(ids):
            return {"token_ids": ids, "topk_ids": [[t, 0] for t in ids], "topk_logprobs": [[-0.5, -3.0]] * len(ids)}

        train = [dict(r, teacher_topk=[topk(ids) for ids in turns(r)]) for r in TRAIN]
    model, metrics = train_adapter(tiny_trainable_model, CALC, train, HELDOUT, settings)
    assert metrics["steps"] == 2 and metrics["train_loss_first"] > 0
    assert metrics["heldout_loss"] != metrics["heldout_loss_before"]  # the adapter changed the student
    assert metrics.get("data_topk_unaligned_turns", 0) == 0


def test_bad_method_and_no_usable_rows(tiny_trainable_model):
    with pytest.raises(ValueError, match="unknown method 'distill'"):
        TrainSettings(method="distill")
    no_agent = [dict(row(0), turns=[])]
    with pytest.raises(ValueError, match="no usable train rows"):
        train_adapter(tiny_trainable_model, CALC, no_agent, [], dataclasses.replace(FAST, epochs=1))


def test_gradient_checkpointing_changes_memory_not_results(tiny_trainable_model):
    plain = dataclasses.replace(FAST, epochs=1, quantize=False)
    _, expected = train_adapter(tiny_trainable_model, CALC, TRAIN, HELDOUT, plain)
    model, metrics = train_adapter(
        tiny_trainable_model, CALC, TRAIN, HELDOUT, dataclasses.replace(plain, gradient_checkpointing=True)
    )
    assert model.get_base_model().is_activation_checkpointing
    for key in ("train_loss_first", "train_loss_last", "heldout_loss"):
        assert metrics[key] == pytest.approx(expected[key], rel=1e-4), key


class ReachedTheModel(Exception):
    """Raised by the pre-hook once the inputs were checked: nothing runs on the meta device."""


def meta_model(path: str):
    """The tiny Llama with LoRA on the `meta` device; every module checks, before it runs, that
    every tensor it is given sits on the model's device, then stops the forward."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    model = add_lora(model, LoraSettings(r=4, alpha=8))

    def check(module, args, kwargs):
        tensors = [t for t in (*args, *kwargs.values()) if torch.is_tensor(t)]
        wrong = {str(t.device) for t in tensors if t.device != model.device}
        assert tensors and not wrong, f"{type(module).__name__} got tensors on {wrong}, the model is on {model.device}"
        raise ReachedTheModel

    for module in model.modules():
        module.register_forward_pre_hook(check, with_kwargs=True)
    return model


def on_the_model_device(run):
    """`run()` stopped at the model with every input on the model's (meta) device. token_loss reads
    the labels (token count, positions to keep) before the forward; on meta that read fails, which
    shows the batch was made there: a CPU batch would pass it and fail the pre-hook's check."""
    with pytest.raises(Exception) as stopped:
        run()
    assert stopped.type is ReachedTheModel or "cannot be called on meta tensors" in str(stopped.value), stopped.value
    return stopped.type


@pytest.mark.parametrize("method", ["genpi", "kld"])  # kld reaches the model through the teacher's logits first
def test_every_batch_is_made_on_the_model_device(tiny_trainable_model, method):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_trainable_model)
    settings = dataclasses.replace(FAST, method=method)
    rows, _ = build_examples(TRAIN[:2], CALC, tokenizer, settings)
    model = meta_model(tiny_trainable_model)
    stopped = on_the_model_device(lambda: step_loss(model, rows, settings, tokenizer.pad_token_id))
    assert stopped is ReachedTheModel or method != "kld"  # the teacher's forward comes first and reads nothing
    on_the_model_device(lambda: heldout_loss(model, [r.student for r in rows], tokenizer.pad_token_id, 2))
    if method == "kld":
        assert on_the_model_device(lambda: heldout_kl(model, rows, tokenizer.pad_token_id, 2)) is ReachedTheModel


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_one_qlora_step_and_heldout_loss_on_cuda(tiny_trainable_model):
    settings = dataclasses.replace(FAST, epochs=1)  # defaults: bf16, gradient checkpointing on CUDA
    model, metrics = train_adapter(tiny_trainable_model, CALC, TRAIN[:4], HELDOUT, settings)
    assert (
        metrics["steps"] == 1 and math.isfinite(metrics["heldout_loss"]) and math.isfinite(metrics["train_loss_first"])
    )
    assert (
        math.isfinite(metrics["heldout_kl"]) and metrics["heldout_kl_before"] > 0
    )  # the teacher pass on CUDA, bf16, 4-bit
    assert metrics["effective"] == {
        "device": "cuda:0",
        "dtype": "bfloat16",
        "compute_dtype_4bit": "bfloat16",
        "gradient_checkpointing": True,
        "optimizer": "paged_adamw_32bit",
    }
    assert model.get_base_model().is_loaded_in_4bit


def test_cpu_defaults_are_recorded(tiny_trainable_model):
    _, metrics = train_adapter(
        tiny_trainable_model, CALC, TRAIN[:4], [], dataclasses.replace(FAST, epochs=1, quantize=False)
    )
    assert metrics["effective"] == {
        "device": "cpu",
        "dtype": "float32",
        "compute_dtype_4bit": None,
        "gradient_checkpointing": False,
        "autocast": None,  # CPU: no autocast (bfloat16 on CUDA: tests/test_cuda_path.py)
        "optimizer": "adamw_torch",
    }
    assert metrics["heldout_loss"] is None and metrics["heldout_examples"] == 0


def test_heldout_rows_too_long_are_cut_and_counted_not_fatal(tiny_trainable_model):
    long_input = dict(row(8), input="What is " + "one plus " * 400 + "two?")  # the input alone exceeds max_length
    long_dialogue = dict(row(9), turns=row(9)["turns"] * 30)  # trailing turns are cut
    settings = dataclasses.replace(FAST, epochs=1, quantize=False)
    _, metrics = train_adapter(tiny_trainable_model, CALC, TRAIN[:4], [long_input, long_dialogue, row(10)], settings)
    assert metrics["heldout_examples"] == 2 and metrics["heldout_data_skipped"] == 1
    assert metrics["heldout_data_truncated_examples"] == 1 and metrics["heldout_data_truncated_tokens"] > 0
    assert math.isfinite(metrics["heldout_loss"])


def test_loss_form_weighs_the_sft_term(tiny_trainable_model):
    """convex: (1 − λ)·L_SFT + λ·L_PG; additive: L_SFT + λ·L_PG; they differ by λ·L_SFT."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_trainable_model)
    model = add_lora(load_base(tiny_trainable_model, quantize=False), FAST.lora)
    lam, totals = 0.3, {}
    for method, form in (("genpi", "convex"), ("genpi", "additive"), ("sft", "convex")):
        settings = dataclasses.replace(FAST, method=method, lam=lam, loss_form=form)
        rows, _ = build_examples(TRAIN[:4], CALC, tokenizer, settings)
        totals[method, form] = step_loss(model, rows, settings, tokenizer.pad_token_id)
    assert totals["genpi", "additive"] - totals["genpi", "convex"] == pytest.approx(
        lam * totals["sft", "convex"], rel=1e-4
    )
    with pytest.raises(ValueError, match="unknown loss form 'mean'"):
        TrainSettings(loss_form="mean")


def lr_and_clipped_norms(path, settings, steps):
    """Runs `steps` optimizer steps on one row each: (lr used by every step, gradient norm the
    optimizer saw, gradient norm before clipping) per step."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = add_lora(load_base(path, quantize=False), settings.lora)
    rows, _ = build_examples(TRAIN, CALC, tokenizer, settings)
    optimizer, scheduler, _ = make_optimizer(model, settings, steps)
    assert all(group["weight_decay"] == settings.weight_decay for group in optimizer.param_groups)
    seen, before = [], []

    def check(optimizer, args, kwargs):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        seen.append(
            (
                optimizer.param_groups[0]["lr"],
                float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))),
            )
        )

    optimizer.register_step_pre_hook(check)
    for k in range(steps):
        step_loss(model, rows[k % len(rows) : k % len(rows) + 1], settings, tokenizer.pad_token_id)
        before.append(optimizer_step(model, optimizer, scheduler, settings))
    return [lr for lr, _ in seen], [norm for _, norm in seen], before


def test_warmup_cosine_schedule_and_gradient_clipping_are_applied(tiny_trainable_model):
    settings = dataclasses.replace(
        FAST, lr=1e-3, warmup_ratio=0.15, max_grad_norm=1e-3, micro_batch=1
    )  # ceil(0.15 · 10) = 2 warmup steps
    lrs, seen, before = lr_and_clipped_norms(tiny_trainable_model, settings, 10)
    cosine = [1e-3 * 0.5 * (1 + math.cos(math.pi * (k - 2) / 8)) for k in range(2, 10)]
    assert lrs == pytest.approx([0.0, 0.5e-3, *cosine])
    assert all(b > 1e-3 for b in before) and all(s <= 1e-3 * 1.001 for s in seen)  # clipped to the max norm

    constant = dataclasses.replace(settings, schedule="constant", warmup_ratio=0.5, max_grad_norm=0.0)
    lrs, seen, before = lr_and_clipped_norms(tiny_trainable_model, constant, 4)
    assert lrs == pytest.approx([0.0, 0.5e-3, 1e-3, 1e-3])
    assert seen == pytest.approx(before, rel=1e-5)  # 0: no clipping


# prepend draws from torch's generator at every step; 4-bit: bitsandbytes computes differently after a first
# inference pass
@pytest.mark.parametrize("method, quantize", [("genpi", True), ("prepend", False)])
def test_a_run_resumed_from_any_checkpoint_ends_with_the_same_adapter(tiny_trainable_model, method, quantize):
    import copy

    settings = dataclasses.replace(
        FAST, method=method, epochs=2, batch_size=2, quantize=quantize, lora=LoraSettings(r=4, alpha=8, dropout=0.1)
    )
    states = []

    def keep(metrics, state):
        if state is not None:
            states.append((metrics["step"], copy.deepcopy(state())))

    whole, whole_metrics = train_adapter(
        tiny_trainable_model, CALC, TRAIN, HELDOUT, settings, report=keep, checkpoint_steps=3
    )
    expected = {n: p.detach().clone() for n, p in whole.named_parameters() if p.requires_grad}
    assert [step for step, _ in states] == [3, 4, 6, 8]  # every 3 steps and at each epoch's end (4 steps)
    for step, state in states[:2]:  # mid-epoch and at an epoch's end
        later = []
        resumed, metrics = train_adapter(
            tiny_trainable_model,
            CALC,
            TRAIN,
            HELDOUT,
            settings,
            resume=state,
            report=lambda m, s: later.append(m["step"]),
        )
        assert later == list(range(step + 1, 9))  # no step done twice
        for name, p in resumed.named_parameters():
            if p.requires_grad:
                assert torch.equal(p, expected[name]), (step, name)
        assert (
            metrics["heldout_loss"] == whole_metrics["heldout_loss"]
            and metrics["train_loss_first"] == whole_metrics["train_loss_first"]
        )


@pytest.mark.slow
def test_heldout_loss_does_not_rise_epoch_over_epoch_at_the_reference_settings():
    """Issue 22: at the reference's optimisation (cosine, 3% warmup, clipping 1.0, convex λ 0.5, 4-bit) a run on the
    bundled SmolLM2 at lr 1e-3 rose from epoch 2 on (held-out 3.42, 2.05, 2.45; train loss 2.15 up to 3.0): the first
    held-out pass had broken the 4-bit gradients. Fixed, it learns the calc format (held-out 0.005 after one epoch).
    Two epochs (16 steps) show both: the broken run missed the tenfold drop after epoch 1 and rose in epoch 2."""
    from genpi.models import resolve_model

    settings = TrainSettings(epochs=2, lr=1e-3, batch_size=1, micro_batch=1, max_length=512, lam=0.5)
    _, metrics = train_adapter(resolve_model("smollm2"), CALC, TRAIN, HELDOUT, settings)
    curve = [metrics["heldout_loss_before"], *metrics["heldout_loss_per_epoch"]]
    assert all(b <= a + 0.01 for a, b in zip(curve, curve[1:])), curve
    assert curve[-1] < 0.1 * curve[0], curve
    losses = metrics["train_losses"]
    assert sum(losses[-8:]) < 0.1 * sum(losses[:8]), losses


LOOP = "no no no no no no no no no no no no"


def looping(i: int, turn: int) -> dict:
    """row(i) with its agent turn `turn` (0: the first, 1: the second) a loop."""
    r = row(i)
    turns = [dict(t) for t in r["turns"]]
    turns[2 * turn]["content"] = LOOP
    return dict(r, turns=turns, turn_cut=[False, False, True], teacher_topk=[{"token_ids": [1]}, {"token_ids": [2]}])


def test_degenerate_teacher_turns_are_skipped_or_cut_and_counted(tiny_trainable_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_trainable_model)
    rows = [row(0), looping(1, 0), looping(2, 1), row(3)]
    made, report = build_examples(rows, CALC, tokenizer, FAST)
    assert report["degenerate_rows_skipped"] == 1 and report["degenerate_turns_cut"] == 1 and len(made) == 3
    assert [len(m.student.agent_tokens) for m in made] == [2, 1, 2]  # row 2 keeps its first agent turn only
    assert all(
        LOOP not in tokenizer.decode(m.student.input_ids) and LOOP not in tokenizer.decode(m.pg.input_ids) for m in made
    )
    assert rows[2]["turns"][2]["content"] == LOOP  # the caller's row is not changed
    kept, report = build_examples(rows, CALC, tokenizer, dataclasses.replace(FAST, skip_degenerate=False))
    assert len(kept) == 4 and "degenerate_rows_skipped" not in report
    assert sum(LOOP in tokenizer.decode(m.student.input_ids) for m in kept) == 2

    from genpi.train.recipe import without_degenerate_turns

    cut = without_degenerate_turns(looping(2, 1))
    assert len(cut["turns"]) == 2 and cut["turn_cut"] == [False, False] and cut["teacher_topk"] == [{"token_ids": [1]}]
    assert without_degenerate_turns(looping(1, 0)) is None and without_degenerate_turns(row(0)) == row(0)

    # training counts them in its metrics (genpi.json's train metrics), held-out rows too
    settings = dataclasses.replace(FAST, epochs=1, quantize=False)
    _, metrics = train_adapter(
        tiny_trainable_model, CALC, TRAIN[:3] + [looping(3, 0), looping(4, 1)], [HELDOUT[0], looping(9, 0)], settings
    )
    assert (
        metrics["data_degenerate_rows_skipped"] == 1
        and metrics["data_degenerate_turns_cut"] == 1
        and metrics["train_examples"] == 4
    )
    assert (
        metrics["heldout_data_degenerate_rows_skipped"] == 1
        and metrics["heldout_examples"] == 1
        and metrics["heldout_kl_examples"] == 1
    )
    with pytest.raises(ValueError, match="no usable train rows .*2 looping"):
        train_adapter(tiny_trainable_model, CALC, [looping(1, 0), looping(2, 0)], [], settings)


def kld_pairs(path, entry, rows):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    pairs, _ = build_examples(rows, entry, tokenizer, dataclasses.replace(FAST, method="kld"))
    return pairs, tokenizer.pad_token_id


def test_heldout_kl_by_hand_on_a_copy_of_the_teacher_and_on_a_constant_student(tiny_trainable_model, monkeypatch):
    import torch.nn.functional as F

    from genpi.train import recipe
    from genpi.train.recipe import collate

    model = add_lora(load_base(tiny_trainable_model, quantize=False), FAST.lora)
    with torch.no_grad():  # an adapter that changes the student: LoRA B starts at 0
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    pairs, pad_id = kld_pairs(tiny_trainable_model, CALC, HELDOUT + [row(3)])
    kl = heldout_kl(model, pairs, pad_id, micro_batch=2)
    assert model.training  # back in train mode

    model.eval()
    per_token = []
    with torch.no_grad():
        for pair in pairs:  # one row at a time, full forwards, no padding
            s_batch, t_batch = (collate([e], pad_id, model.device) for e in (pair.student, pair.teacher))
            s_mask, t_mask = (b["labels"][0, 1:] != -100 for b in (s_batch, t_batch))
            student = model(input_ids=s_batch["input_ids"]).logits[0, :-1][s_mask]
            with model.disable_adapter():
                teacher = model(input_ids=t_batch["input_ids"]).logits[0, :-1][t_mask]
            p_t = F.log_softmax(teacher.float(), -1)
            per_token += (p_t.exp() * (p_t - F.log_softmax(student.float(), -1))).sum(-1).tolist()
    assert kl == pytest.approx(sum(per_token) / len(per_token), rel=1e-4) and kl > 0.01

    # a system that copies the teacher: no prompt to internalize, no adapter change: KL 0
    fresh = add_lora(load_base(tiny_trainable_model, quantize=False), FAST.lora)
    no_prompt, _ = kld_pairs(tiny_trainable_model, dataclasses.replace(CALC, system="", shots=[]), HELDOUT)
    assert heldout_kl(fresh, no_prompt, pad_id, 2) == pytest.approx(0.0, abs=1e-5)
    # a student that always gives the same answer (all mass on one token) is far from the teacher
    base_kl = heldout_kl(fresh, pairs, pad_id, 2)

    def constant(model, batch):  # every prediction: token 0 with logit 30, the rest 0
        logits = torch.zeros(int((batch["labels"][:, 1:] != -100).sum()), model.get_base_model().config.vocab_size)
        logits[:, 0] = 30.0
        return logits

    monkeypatch.setattr(recipe, "response_logits", constant)  # the student's; the teacher's stays real
    assert heldout_kl(fresh, pairs, pad_id, 2) > 5 * base_kl


def test_kld_training_lowers_the_heldout_kl(tiny_trainable_model):
    settings = dataclasses.replace(FAST, method="kld", epochs=3, quantize=False)
    _, metrics = train_adapter(tiny_trainable_model, CALC, TRAIN, HELDOUT, settings)
    assert len(metrics["heldout_kl_per_epoch"]) == 3 and metrics["heldout_kl"] == metrics["heldout_kl_per_epoch"][-1]
    assert metrics["heldout_kl"] < 0.8 * metrics["heldout_kl_before"], (
        metrics["heldout_kl_before"],
        metrics["heldout_kl_per_epoch"],
    )


def test_the_heldout_teacher_runs_once_per_run_and_gives_the_kl_it_would_recompute(tiny_trainable_model, monkeypatch):
    """The teacher (base with P, adapter off) does not train: its held-out logits are made once, at the KL before
    training, and every epoch's KL equals a run that computes them again (4-bit, as training runs); beyond the size
    budget they are computed again at every epoch end."""
    from genpi.train import recipe

    calls = []
    real_teacher = recipe.teacher_logits
    monkeypatch.setattr(recipe, "teacher_logits", lambda *a: calls.append(1) or real_teacher(*a))
    settings = dataclasses.replace(FAST, method="sft", epochs=3)
    _, kept = train_adapter(tiny_trainable_model, CALC, TRAIN, HELDOUT, settings)
    assert len(calls) == 1  # 2 held-out pairs, micro-batch 2: one teacher pass, for the KL before training
    monkeypatch.setattr(recipe, "HELDOUT_TEACHER_BYTES", 0)
    calls.clear()
    _, again = train_adapter(tiny_trainable_model, CALC, TRAIN, HELDOUT, settings)
    assert len(calls) == 4  # before training and after each of the 3 epochs
    assert (
        kept["heldout_kl_before"] == again["heldout_kl_before"]
        and kept["heldout_kl_per_epoch"] == again["heldout_kl_per_epoch"]
    )
    assert len(set(kept["heldout_kl_per_epoch"])) == 3  # the student moved: not one value read back


def test_the_heldout_kl_pass_keeps_the_4bit_gradients(tiny_trainable_model):
    """The teacher pass runs the 4-bit training model in eval mode, adapter off: bitsandbytes must not repack its
    weights for inference (after which no gradient flows through them, issue 22); the LoRA gradients stay the same."""
    from transformers import AutoTokenizer

    from genpi.train.losses import token_loss
    from genpi.train.recipe import collate

    torch.manual_seed(0)
    model = add_lora(load_base(tiny_trainable_model, quantize=True), LoraSettings(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    pairs, pad_id = kld_pairs(tiny_trainable_model, CALC, HELDOUT)
    batch = collate(
        [
            r.student
            for r in build_examples(TRAIN[:2], CALC, AutoTokenizer.from_pretrained(tiny_trainable_model), FAST)[0]
        ],
        pad_id,
        model.device,
    )

    def grads():
        model.zero_grad(set_to_none=True)
        loss_sum, n = token_loss(model, batch)
        (loss_sum / n).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}

    before = grads()
    assert heldout_kl(model, pairs, pad_id, 2) > 0 and model.training
    after = grads()
    for name, grad in before.items():
        assert torch.allclose(after[name], grad, rtol=1e-4, atol=1e-7), name
