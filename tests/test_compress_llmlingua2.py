"""The LLMLingua-2 token-classifier path of `--compressed` (genpi.eval.compressed), run offline on tiny random
classifiers built here: an XLM-RoBERTa and a BERT `ForTokenClassification` (2 labels: drop, keep) with tokenizers
trained on the prompt's own texts, saved in folders named like the published models and in a local Hugging Face
cache laid out as `huggingface_hub` writes it. No classifier is on this machine and nothing may be downloaded."""

import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from test_compress import LONG_CALC, offline  # noqa: F401 (offline: the fixture that blocks the network)

from genpi import InputError
from genpi.eval.compressed import LLMLINGUA2, LLMLINGUA2_MODELS, Compressions, action_keywords, spaced_as_in
from genpi.eval.systems import compressed_specs

XLMR, BERT = LLMLINGUA2_MODELS  # the published names: llmlingua picks its word-piece rules by them
# P with shots: the system and every turn are compressed, each alone
PROMPT = replace(
    LONG_CALC,
    shots=[
        [
            {
                "role": "user",
                "content": "The clerk bought three boxes of paper at twelve dollars each; what was spent?",
            },
            {"role": "assistant", "content": "Act: compute(3 * 12)"},
            {"role": "user", "content": "Result: 36"},
            {"role": "assistant", "content": "Act: answer(36)"},
        ]
    ],
)
KEPT = ["\n", "Act", "compute", "answer", "(", ")", ":"]  # newlines and the prompt's action keywords


def train_tokenizer(family: str, texts: list[str], size: int = 300):
    """A fast tokenizer of the family's own kind (transformers builds the published models' pipelines from a
    vocabulary: SentencePiece-style Unigram for XLM-RoBERTa, cased WordPiece for multilingual BERT), its vocabulary
    trained on `texts`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import BertTokenizer, XLMRobertaTokenizer

    if family == "xlm-roberta":
        # XLMRobertaTokenizer's fixed ids: <s> 0, <pad> 1, </s> 2, <unk> 3
        specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
        trained = Tokenizer(models.Unigram())
        trained.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace()])
        trained.train_from_iterator(
            texts, trainers.UnigramTrainer(vocab_size=size, special_tokens=specials, unk_token="<unk>")
        )
        vocab = [(piece, score) for piece, score in json.loads(trained.to_str())["model"]["vocab"]]
        assert [p for p, _ in vocab[:5]] == specials
        return XLMRobertaTokenizer(vocab=vocab)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    trained = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    trained.normalizer = normalizers.BertNormalizer(lowercase=False)
    trained.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trained.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=size, special_tokens=specials))
    return BertTokenizer(vocab=trained.get_vocab(), do_lower_case=False)


def build_classifier(folder: Path, family: str, seed: int = 0) -> Path:
    """A tiny random token classifier of `family` (its config's model_type), with its tokenizer, in `folder`."""
    import torch
    from transformers import AutoConfig, AutoModelForTokenClassification

    texts = [m["content"] for m in PROMPT.messages()]
    tokenizer = train_tokenizer(family, texts)
    ids = {"xlm-roberta": {"pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2}, "bert": {"pad_token_id": 0}}
    config = AutoConfig.for_model(
        family,
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=514 if family == "xlm-roberta" else 512,  # llmlingua feeds 512 tokens
        num_labels=2,
        initializer_range=0.5,  # large: the keep probabilities spread, so the rate picks a real threshold
        **ids[family],
    )
    torch.manual_seed(seed)
    AutoModelForTokenClassification.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory) -> dict[str, Path]:
    """Each family's tiny classifier in a folder named like the published model (the name llmlingua reads)."""
    root = tmp_path_factory.mktemp("llmlingua2")
    return {
        family: build_classifier(root / repo.split("/")[1], family)
        for family, repo in (("xlm-roberta", XLMR), ("bert", BERT))
    }


def put_in_cache(hub: Path, repo: str, folder: Path) -> Path:
    """`folder` as `repo`'s snapshot in a Hugging Face cache (blobs by content, the snapshot's files linking to them,
    refs/main naming the snapshot): what a download would have left."""
    cached = hub / f"models--{repo.replace('/', '--')}"
    commit = hashlib.sha1(repo.encode()).hexdigest()
    snapshot = cached / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (cached / "blobs").mkdir()
    for file in sorted(folder.iterdir()):
        blob = cached / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob.name))
    (cached / "refs").mkdir()
    (cached / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """An empty local Hugging Face cache (HF_HOME/hub), the one `huggingface_hub` looks in."""
    import huggingface_hub.constants

    home = tmp_path / "hf"
    (home / "hub").mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(home))  # read once, at import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))
    return home / "hub"


def counting_tokenizer() -> str:
    from genpi.models import resolve_model

    return resolve_model("smollm2")  # the target model's tokenizer counts the rates


def assert_kept(compressed, original=PROMPT):
    assert [m["role"] for m in compressed.messages()] == [m["role"] for m in original.messages()]
    for short, full in zip(compressed.messages(), original.messages()):
        for kept in KEPT:
            assert short["content"].count(kept) == full["content"].count(kept), (kept, short, full)
        if full["role"] == "assistant":  # the shots' actions keep their format (P's spacing, not the tokenizer's)
            assert short["content"].startswith(full["content"].partition("(")[0] + "("), (short, full)
    assert compressed.messages() != original.messages()


def test_kept_words_are_spaced_as_in_p():
    text = 'Reply with "Act: answer(VALUE)" and\nnothing else.\n\nNever explain.'
    words = ["Reply", "with", '"', "Act", ":", "answer", "(", "VALUE", ")", '"', "and", "\n", "nothing", "else", "."]
    words += ["\n", "\n", "Never", "explain", "."]
    keep = lambda kept: [(w, w in kept) for w in words]  # noqa: E731
    assert spaced_as_in(text, keep(set(words))) == text
    assert spaced_as_in(text, keep({"Act", ":", "answer", "(", ")"})) == "Act: answer()\n\n\n"
    # a dropped quote leaves two words apart; a dropped word before punctuation leaves none; newlines stay
    assert spaced_as_in(text, keep({"with", "Act", "else", "."})) == "with Act\nelse.\n\n."
    assert spaced_as_in(text, keep({"Never"})) == "\n\n\nNever"
    assert spaced_as_in(text, [("Reply", True), ("wiht", True)]) is None  # not P's words: the package's text


def test_the_classifier_in_the_local_cache_runs_offline(classifiers, hub, offline):  # noqa: F811
    # only the BERT classifier cached: found (the second of LLMLINGUA2_MODELS)
    bert = put_in_cache(hub, BERT, classifiers["bert"])
    specs = compressed_specs(["c3=llmlingua2:0.3", "c7=llmlingua2:0.7", "whole=llmlingua2:1"])
    c3, c7, whole = Compressions(specs, counting_tokenizer())(PROMPT)
    assert c3.compressor == c7.compressor == LLMLINGUA2 and c3.model == str(bert)
    # the achieved rate follows the requested one (the forced parts are a floor), counted by the target tokenizer
    assert 0.15 < c3.achieved_rate < 0.5 < c7.achieved_rate < 0.9
    assert c3.achieved_rate == c3.compressed_tokens / c3.original_tokens and c3.original_tokens > 100
    assert c3.force_tokens[:2] == ("\n", ":") and set(action_keywords(PROMPT)) <= set(c3.force_tokens)
    assert_kept(c3)
    assert_kept(c7)
    # rate 1: P itself, no classifier
    assert whole.messages() == PROMPT.messages() and whole.achieved_rate == 1.0 and whole.model is None
    assert not any(offline.iterdir())  # nothing fetched into tiktoken's cache

    # the XLM-RoBERTa one cached too: it is the first choice
    xlmr = put_in_cache(hub, XLMR, classifiers["xlm-roberta"])
    [c3] = Compressions(specs[:1], counting_tokenizer())(PROMPT)
    assert c3.compressor == LLMLINGUA2 and c3.model == str(xlmr)
    assert 0.15 < c3.achieved_rate < 0.5
    assert_kept(c3)
    # a Hugging Face id names a cached classifier as MODEL
    [by_id] = Compressions(compressed_specs([f"c=llmlingua2:0.3:{BERT}"]), counting_tokenizer())(PROMPT)
    assert by_id.compressor == LLMLINGUA2 and by_id.model == str(bert)


@pytest.mark.parametrize("family", ["xlm-roberta", "bert"])
def test_a_classifier_folder_of_any_name_compresses_as_its_family(classifiers, family, tmp_path, offline):  # noqa: F811
    named = classifiers[family]
    other = shutil.copytree(named, tmp_path / "my-compressor")  # llmlingua cannot tell the family from this name
    specs = lambda folder: compressed_specs([f"c=llmlingua2:0.5:{folder}"])  # noqa: E731
    [by_name] = Compressions(specs(named), counting_tokenizer())(PROMPT)
    [by_type] = Compressions(specs(other), counting_tokenizer())(PROMPT)
    assert by_name.compressor == by_type.compressor == LLMLINGUA2 and by_type.model == str(other)
    assert 0.3 < by_name.achieved_rate < 0.75
    assert_kept(by_name)
    # the family read from the config's model_type: the same words kept as under the published name
    assert by_type.messages() == by_name.messages()


def test_a_classifier_of_another_family_is_refused(tmp_path, offline):  # noqa: F811
    import torch
    from transformers import DistilBertConfig, DistilBertForTokenClassification

    folder = tmp_path / "distil-compressor"
    tokenizer = train_tokenizer("bert", [m["content"] for m in PROMPT.messages()])
    config = DistilBertConfig(vocab_size=len(tokenizer), dim=32, n_layers=1, n_heads=2, hidden_dim=64, num_labels=2)
    torch.manual_seed(0)
    DistilBertForTokenClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with pytest.raises(InputError, match="distilbert classifier; LLMLingua-2 is xlm-roberta or bert"):
        Compressions(compressed_specs([f"c=llmlingua2:0.5:{folder}"]), "unused")  # before any model loads
