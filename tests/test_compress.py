"""`--compressed NAME=llmlingua2:RATE`: the base model given P compressed by llmlingua (genpi.eval.compressed)."""

import json
import socket
from dataclasses import replace

import pytest
from conftest import REPO
from test_recipe import write_calc_dialogues

from genpi import InputError
from genpi.catalog import load_catalog
from genpi.eval.compressed import (
    LLMLINGUA,
    Compressions,
    CompressSpec,
    action_keywords,
)
from genpi.eval.systems import compressed_specs

CATALOG = REPO / "tests" / "data" / "tiny.yaml"
CALC, GREET = load_catalog(CATALOG)
# A longer calc prompt: enough words for a rate to mean something
LONG_CALC = replace(
    CALC,
    system=(
        "You are a careful calculator agent that works for a small accounting office.\n"
        "Every question is an arithmetic task written in plain English by a busy clerk.\n"
        'Reply with exactly one line "Act: compute(EXPR)" to compute a value, where EXPR is a Python expression.\n'
        'When the result is known, reply with "Act: answer(VALUE)" and nothing else on that line.\n'
        "Never explain your reasoning, never greet the clerk, and never write more than one action in a reply."
    ),
)


def test_specs_parse_and_bad_ones_are_named():
    assert compressed_specs(["a=llmlingua2:0.3", "b=llmlingua2:1", "c=llmlingua2:0.7:/some/folder"]) == [
        CompressSpec("a", 0.3),
        CompressSpec("b", 1.0),
        CompressSpec("c", 0.7, "/some/folder"),
    ]
    for bad in (
        "a=llmlingua2:0",
        "a=llmlingua2:1.5",
        "a=llmlingua2:x",
        "a=llmlingua2",
        "a=lingua:0.5",
        "llmlingua2:0.5",
        "teacher=llmlingua2:0.5",
        "bad name=llmlingua2:0.5",
        "sft=llmlingua2:0.5",  # an adapter's name
    ):
        with pytest.raises(InputError, match=f"--compressed {bad}"):
            compressed_specs([bad], taken=["sft"])
    with pytest.raises(InputError, match="repeated"):
        compressed_specs(["a=llmlingua2:0.5", "a=llmlingua2:0.3"])
    with pytest.raises(InputError, match="neither a folder nor in the local Hugging Face cache"):
        Compressions(compressed_specs(["a=llmlingua2:0.5:/no/such/model"]), "unused")


def test_action_keywords_are_the_literal_parts_of_the_action_patterns():
    assert action_keywords(CALC) == ["compute", "answer", "Act", "(", ")", ":"]
    assert action_keywords(GREET) == ["Answer", ":"]


def test_compression_shortens_p_toward_the_rate_and_keeps_the_forced_parts(tiny_model):
    [half, whole] = Compressions(
        compressed_specs([f"half=llmlingua2:0.5:{tiny_model}", "whole=llmlingua2:1"]), tiny_model
    )(LONG_CALC)
    assert half.compressor == LLMLINGUA and half.model == tiny_model
    assert half.original_tokens > 100 and 0.3 < half.achieved_rate < 0.75  # requested 0.5
    assert half.achieved_rate == half.compressed_tokens / half.original_tokens
    assert [m["role"] for m in half.messages()] == [m["role"] for m in LONG_CALC.messages()]  # the turns stay
    for short, full in zip(half.messages(), LONG_CALC.messages()):
        for kept in ["\n", "Act", "compute", "answer", "(", ")", ":"]:  # newlines and the action keywords
            assert short["content"].count(kept) == full["content"].count(kept), (kept, short, full)
    assert half.messages()[0]["content"] != LONG_CALC.system
    # rate 1: P itself, no compressor (the degenerate row: it is the teacher)
    assert whole.messages() == LONG_CALC.messages() and whole.achieved_rate == 1.0 and whole.model is None


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No network: HF_HUB_OFFLINE, an empty tiktoken cache and every socket connection refused."""
    cache = tmp_path / "tiktoken"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    monkeypatch.setenv("DATA_GYM_CACHE_DIR", str(cache))

    def refuse(*args, **kwargs):
        raise OSError("test: no network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return cache


def test_the_bundled_compressor_runs_offline(offline):
    import tiktoken

    with pytest.raises(Exception):  # what llmlingua's constructor does: a download, refused here
        tiktoken.encoding_for_model("gpt-3.5-turbo")
    from genpi.models import resolve_model

    entry = replace(CALC, shots=[], system=LONG_CALC.system)
    [c] = Compressions(compressed_specs(["c=llmlingua2:0.5"]), resolve_model("smollm2"))(entry)
    assert c.compressor in ("llmlingua causal LM", "llmlingua-2 token classifier")  # the latter if cached locally
    assert c.compressed_tokens < c.original_tokens and c.messages()[0]["content"].count("\n") == 4
    assert not any(offline.iterdir())  # nothing fetched into tiktoken's cache


@pytest.fixture
def received(monkeypatch):
    """Every chat request the transformers engine gets, as its messages."""
    from genpi.engines.hf import TransformersEngine

    seen: list[list[dict]] = []
    submit, generate = TransformersEngine.submit, TransformersEngine.generate

    def submitting(self, request, *args, **kwargs):
        seen.append(request.messages)
        return submit(self, request, *args, **kwargs)

    def generating(self, requests, *args, **kwargs):
        seen.extend(r.messages for r in requests)
        return generate(self, requests, *args, **kwargs)

    monkeypatch.setattr(TransformersEngine, "submit", submitting)
    monkeypatch.setattr(TransformersEngine, "generate", generating)
    return seen


@pytest.mark.slow
def test_fidelity_plays_the_compressed_prompt(tiny_model, tmp_path, received):
    from genpi.eval.fidelity import evaluate_catalog, format_summary
    from genpi.eval.settings import FidelitySettings, SystemsSettings

    data = write_calc_dialogues(tmp_path / "run", 6, heldout_from=4)
    out = tmp_path / "eval"
    systems = SystemsSettings(
        catalog=str(CATALOG), base=tiny_model, compressed=(f"half=llmlingua2:0.5:{tiny_model}", "whole=llmlingua2:1")
    )
    settings = FidelitySettings(max_new_tokens=6, max_turns=1, out=str(out), collateral=False, progress=False)
    summary = evaluate_catalog(data, systems, settings)
    [calc] = [r for r in summary["results"] if r["prompt_id"] == "calc"]
    m = calc["systems"]
    assert set(m) == {"teacher", "base", "half", "whole"}
    stored = json.loads((out / "compressed" / "half" / "calc.json").read_text())
    assert stored["compressor"] == LLMLINGUA and stored["rate"] == 0.5 and stored["achieved_rate"] < 1.0
    assert m["half"]["compressed"]["achieved_rate"] == stored["achieved_rate"]
    short = stored["messages"]
    assert short != CALC.messages() and [t["role"] for t in short] == [t["role"] for t in CALC.messages()]
    # the engine got the compressed P in front of the inputs: the system's prompt really is the compressed text
    with_short = [r for r in received if r[: len(short)] == short]
    assert len(with_short) >= 2 and all(r[len(short)]["role"] == "user" for r in with_short)
    # rate 1 is the teacher: the same replies, and no KL from it
    assert m["whole"]["kl"] == 0.0 and m["whole"]["format_rate"] == m["teacher"]["format_rate"]
    assert m["half"]["kl"] > 0
    text = format_summary(summary)
    assert "compressed: half: rate 0.50 requested" in text and "llmlingua causal LM" in text


@pytest.mark.slow
def test_efficiency_counts_the_compressed_prompt(tiny_model, tmp_path):
    from genpi.eval.cost import MERGED, WITH_P
    from genpi.eval.efficiency import evaluate, format_summary

    out = tmp_path / "eval"
    result = evaluate(
        CATALOG,
        "calc",
        turns=1,
        base=tiny_model,
        repeats=1,
        out=out,
        compressed=[f"half=llmlingua2:0.5:{tiny_model}", "whole=llmlingua2:1"],
    )
    systems = result["systems"]
    # its prompt tokens are the compressed P's: fewer than P's, not none
    assert systems[MERGED]["prefix_tokens"] < systems["half"]["prefix_tokens"] < systems[WITH_P]["prefix_tokens"]
    assert systems["whole"]["prefix_tokens"] == systems[WITH_P]["prefix_tokens"]
    assert result["compressed"]["half"]["compressor"] == LLMLINGUA
    assert (out / "compressed" / "half" / "calc.json").exists()
    assert "compressed: half: rate 0.50 requested" in format_summary(result)
