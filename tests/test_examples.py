"""Example builders: which tokens carry loss, in which chat layout, and truncation."""

import pytest
from transformers import AutoTokenizer

from genpi.catalog import PromptEntry, render_prompt_text
from genpi.models import resolve_model
from genpi.train.examples import IGNORE, PG_VARIANTS, build_pg, build_sft, loss_spans, loss_tokens

# A Llama-2-style template: no system prompt, no special end-of-turn token.
LLAMA2 = (
    "{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %} {{ m['content'] }}</s>{% endif %}{% endfor %}"
)

ROW = {
    "prompt_id": "agent.v1",
    "sample_id": 0,
    # the input contains the first agent turn's text: the search must not label it
    "input": "List the files. Hint: Act: ls",
    "turns": [
        {"role": "assistant", "content": "Act: ls"},
        {"role": "user", "content": "a.txt b.txt"},
        {"role": "assistant", "content": "Act: cat a.txt"},
        {"role": "user", "content": "hello world"},
        {"role": "assistant", "content": "Act: answer(hello world)"},
        {"role": "user", "content": "[TERMINATE]"},
    ],
    "student_output": "I am a language model and cannot list files.",
    "reason": "The prompt turns the model into a shell agent. It must answer with one action per turn.",
    "error": None,
    "split": "train",
}
AGENT = ["Act: ls", "Act: cat a.txt", "Act: answer(hello world)"]
ENTRY = PromptEntry(
    id="agent.v1",
    system="You are a shell agent. Answer with one action per turn.",
    shots=[[{"role": "user", "content": "count files"}, {"role": "assistant", "content": "Act: ls | wc -l"}]],
    input_examples=["count files"],
)
P = render_prompt_text(ENTRY)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model("smollm2"))


@pytest.fixture(scope="module")
def llama2_tokenizer():
    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2"))  # a separate copy
    tok.chat_template = LLAMA2
    return tok


def check_consistent(example):
    assert len(example.input_ids) == len(example.labels)
    assert all(label in (IGNORE, tok) for tok, label in zip(example.input_ids, example.labels))
    assert example.loss_token_count > 0


def unlabelled_text(example, tokenizer):
    return tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label == IGNORE])


def test_sft_labels_exactly_agent_turns_and_end_marker(tokenizer):
    ex = build_sft(ROW, tokenizer, 4096)
    check_consistent(ex)
    assert ex.kind == "sft" and ex.truncated_tokens == 0
    assert loss_spans(ex, tokenizer) == [a + "<|im_end|>" for a in AGENT]
    assert loss_tokens(ex, tokenizer) == "".join(a + "<|im_end|>" for a in AGENT)
    rest = unlabelled_text(ex, tokenizer)
    for text in ("You are a helpful AI assistant", ROW["input"], "a.txt b.txt", "hello world<|im_end|>"):
        assert text in rest
    assert "[TERMINATE]" not in tokenizer.decode(ex.input_ids)  # trailing environment turn dropped
    assert "<|im_start|>" not in loss_tokens(ex, tokenizer)
    # the same layout as the chat template renders it
    messages = [{"role": "user", "content": ROW["input"]}] + ROW["turns"][:5]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert ex.input_ids == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_sft_masks_do_not_depend_on_chatml(llama2_tokenizer):
    tok = llama2_tokenizer
    ex = build_sft(ROW, tok, 4096)
    check_consistent(ex)
    text = tok.decode(ex.input_ids)
    assert text.startswith("[INST] List the files.") and "[/INST] Act: ls</s>[INST] a.txt b.txt [/INST]" in text
    spans = loss_spans(ex, tok)
    assert len(spans) == 3
    # the space before the answer is template text merged into the answer's first token
    assert [s.removeprefix(" ") for s in spans] == [a + "</s>" for a in AGENT]
    assert "[INST]" not in loss_tokens(ex, tok) and "[/INST]" not in loss_tokens(ex, tok)


def test_sft_truncation_cuts_whole_trailing_turns(tokenizer):
    full = build_sft(ROW, tokenizer, 4096)
    two = build_sft(dict(ROW, turns=ROW["turns"][:3]), tokenizer, 4096)
    one = build_sft(dict(ROW, turns=ROW["turns"][:1]), tokenizer, 4096)
    ex = build_sft(ROW, tokenizer, len(full.input_ids) - 1)
    assert ex.input_ids == two.input_ids and ex.labels == two.labels
    assert ex.truncated_tokens == len(full.input_ids) - len(two.input_ids)
    ex = build_sft(ROW, tokenizer, len(one.input_ids))
    assert loss_spans(ex, tokenizer) == ["Act: ls<|im_end|>"]
    assert ex.truncated_tokens == len(full.input_ids) - len(one.input_ids)
    # even the first agent turn does not fit: it is cut from its end
    ex = build_sft(ROW, tokenizer, len(one.input_ids) - 2)
    check_consistent(ex)
    assert ex.input_ids == one.input_ids[:-2] and ex.truncated_tokens == len(full.input_ids) - len(ex.input_ids)
    assert "Act: ls".startswith(loss_tokens(ex, tokenizer))
    # the input alone does not fit: no loss token possible
    first = next(i for i, label in enumerate(one.labels) if label != IGNORE)
    assert build_sft(ROW, tokenizer, first + 1).loss_token_count == 1
    with pytest.raises(ValueError, match="input alone"):
        build_sft(ROW, tokenizer, first)
    with pytest.raises(ValueError, match="no agent turn"):
        build_sft(dict(ROW, turns=[]), tokenizer, 4096)


EXPECTED = {  # variant: labelled spans, text only on the input side
    "full": ([P, ROW["reason"] + "<|im_end|>"], []),
    "no_reason": ([P + "<|im_end|>"], []),
    "no_prompt": ([ROW["reason"] + "<|im_end|>"], []),
    "r_to_p": ([P + "<|im_end|>"], [ROW["reason"]]),
    "p_to_r": ([ROW["reason"] + "<|im_end|>"], [P]),
}


@pytest.mark.parametrize("variant", PG_VARIANTS)
def test_pg_variants_label_prompt_and_reason_only(tokenizer, variant):
    ex = build_pg(ROW, ENTRY, tokenizer, 4096, variant)
    check_consistent(ex)
    assert ex.kind == "pg" and ex.truncated_tokens == 0
    spans, given = EXPECTED[variant]
    assert loss_spans(ex, tokenizer) == spans
    loss, rest = loss_tokens(ex, tokenizer), unlabelled_text(ex, tokenizer)
    for text in (
        ROW["input"],
        ROW["student_output"],
        "### Input",
        "### AS-IS",
        "### TO-BE",
        "### Prompt\n",
        "### Reason\n",
    ):
        assert text not in loss
    for text in [ROW["input"], ROW["student_output"], "### TO-BE output (with the prompt)\nAct: ls"] + given:
        assert text in rest
    text = tokenizer.decode(ex.input_ids)
    assert (ROW["reason"] in text) == (variant != "no_reason")
    assert (P in text) == (variant != "no_prompt")


def test_pg_unknown_variant(tokenizer):
    with pytest.raises(ValueError, match="known: full, no_reason, no_prompt, r_to_p, p_to_r"):
        build_pg(ROW, ENTRY, tokenizer, 4096, "reason_first")


def test_pg_missing_fields(tokenizer):
    ex = build_pg(dict(ROW, reason=None), ENTRY, tokenizer, 200, "no_reason")  # the reason is not needed here
    assert loss_spans(ex, tokenizer) == [P + "<|im_end|>"]
    with pytest.raises(ValueError, match="no reason"):
        build_pg(dict(ROW, reason=None), ENTRY, tokenizer, 4096, "full")
    with pytest.raises(ValueError, match="no student_output"):
        build_pg(dict(ROW, student_output=None), ENTRY, tokenizer, 4096, "no_prompt")


def test_pg_truncation_keeps_prompt_and_shortens_reason(tokenizer):
    full = build_pg(ROW, ENTRY, tokenizer, 4096)
    ex = build_pg(ROW, ENTRY, tokenizer, len(full.input_ids) - 5)
    check_consistent(ex)
    assert len(ex.input_ids) <= len(full.input_ids) - 5
    assert ex.truncated_tokens == len(full.input_ids) - len(ex.input_ids) >= 5
    prompt, reason = loss_spans(ex, tokenizer)
    assert prompt == P
    reason = reason.removesuffix("<|im_end|>")
    assert reason and ROW["reason"].startswith(reason) and len(reason) < len(ROW["reason"])
    rest = unlabelled_text(ex, tokenizer)
    assert ROW["input"] in rest and ROW["student_output"] in rest  # untouched while the reason can give


def test_pg_truncation_then_outputs_then_input(tokenizer):
    full = len(build_pg(ROW, ENTRY, tokenizer, 4096).input_ids)
    no_reason = build_pg(dict(ROW, reason=""), ENTRY, tokenizer, 4096)
    ex = build_pg(ROW, ENTRY, tokenizer, len(no_reason.input_ids) - 3)
    assert loss_spans(ex, tokenizer) == [P, "<|im_end|>"]  # reason gone, P whole
    assert ex.truncated_tokens == full - len(ex.input_ids)
    text = tokenizer.decode(ex.input_ids)
    as_is = text.split("### AS-IS output (without the prompt)\n")[1].split("\n\n### TO-BE")[0]
    assert as_is and ROW["student_output"].startswith(as_is) and as_is != ROW["student_output"]  # longer one first
    assert "### TO-BE output (with the prompt)\nAct: ls<|im_end|>" in text and ROW["input"] in text
    # with the reason and both outputs gone, the input is shortened next; P still whole
    bare = build_pg(
        dict(ROW, reason="", student_output="", turns=[{"role": "assistant", "content": ""}]), ENTRY, tokenizer, 4096
    )
    ex = build_pg(ROW, ENTRY, tokenizer, len(bare.input_ids) - 2)
    check_consistent(ex)
    assert loss_spans(ex, tokenizer) == [P, "<|im_end|>"] and ex.truncated_tokens == full - len(ex.input_ids)
    x = tokenizer.decode(ex.input_ids).split("### Input\n")[1].split("\n\n### AS-IS")[0]
    assert ROW["input"].startswith(x) and x != ROW["input"]


def test_pg_prompt_that_cannot_fit_raises(tokenizer):
    for variant in ("full", "r_to_p", "p_to_r"):
        with pytest.raises(ValueError, match="the prompt P does not fit"):
            build_pg(ROW, ENTRY, tokenizer, 60, variant)


def test_pg_reason_is_kept_where_it_is_the_only_target(tokenizer):
    full = build_pg(ROW, ENTRY, tokenizer, 4096, "p_to_r")
    ex = build_pg(ROW, ENTRY, tokenizer, len(full.input_ids) - 40, "p_to_r")
    check_consistent(ex)
    [reason] = loss_spans(ex, tokenizer)
    assert reason.removesuffix("<|im_end|>")  # at least one reason token left
    assert P in unlabelled_text(ex, tokenizer)
