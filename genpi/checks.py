"""Behaviour checks: does a reply do what the prompt P asks? (the catalog's `checks`)

An entry's checks are `PromptEntry.all_checks`: `format` (the `actions.valid` regex, unless the catalog names
a check `format` itself), then the catalog's own. Each gives True or False for a reply, None where there is no
reply to check (an episode without an agent turn). The rules:

- regex: `re.search` of the pattern in the stripped reply, as `PromptEntry.in_action_space`: the match may be
  preceded or followed by more text; anchor the pattern (`^...$`) to demand the whole reply.
- language (an ISO 639-1 code), with lingua-language-detector (its models ship in the wheel; nothing is
  downloaded):
  1. The reply's words are its runs of letters (digits, punctuation and code symbols do not count); a Chinese
     or Japanese character counts as one word.
  2. A looping reply is judged on its de-duplicated text: every immediate repetition of a word n-gram (n up
     to 8, case ignored) is collapsed to one copy, and when that removes at least half of the words the reply
     is a loop ("No, no, no, no" is "no"; a French sentence repeated to the token limit is that sentence).
     Whether a system loops is the degeneracy statistic's question, not this check's.
  3. Fewer than 3 words (after de-duplication) fail: too short to tell a language, and lingua guesses wildly
     on them ("No, no, no" comes out Italian among all its languages).
  4. The detector is restricted to a few candidates: the target, English and four other widespread languages
     of Latin script (CONTRAST: en, es, fr, de, it, pt), every language that a check of the entry names, and
     the `languages` the caller adds (fidelity adds those of the whole catalog). The reply passes when the
     target is the most likely candidate; a reply in a script no candidate uses passes nothing. Why not the
     target and English alone: a Spanish reply then passes a French check ("Claro que sí, puedo ayudarte con
     eso." comes out French among {fr, en}, and 3 of 5 short Spanish sentences did), and a French one a
     Spanish check (2 of 5); among CONTRAST, 18 of 19 test sentences in these languages and Italian and
     Portuguese came out right (the one miss: the garbled "La cena de lasagna es el cine de la casa", Italian).
     A reply in a language outside the candidates is judged as its nearest candidate: name the languages to
     tell apart in the catalog. One detector is built per candidate set
     and kept; its models load on first use (about a second).
- json_schema: the stripped reply, or the body of a reply that is exactly one fenced block (```json ... ```
  or ``` ... ```), parses as JSON and validates against the schema (jsonschema, the schema's own draft;
  `format` keywords are not asserted).
"""

from __future__ import annotations

import json
import re
from functools import cache, lru_cache

from genpi.catalog import Check, PromptEntry, supported_language

MIN_WORDS = 3  # fewer words of letters: not enough to tell a language
MAX_LOOP_N = 8  # the longest repeated word n-gram collapsed
LOOP_SHARE = 0.5  # a reply whose collapsed repeats are at least this share of its words is a loop
CONTRAST = ("en", "es", "fr", "de", "it", "pt")  # every language check is judged among these (and its own)
WORD = re.compile(
    r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[^\W\d_]+"
)  # a CJK/kana character, or a run of letters
FENCED = re.compile(r"```(?:json)?[ \t]*\n(.*?)\n?[ \t]*```", re.DOTALL | re.IGNORECASE)


def letter_words(text: str) -> list[str]:
    return WORD.findall(text)


def collapse_repeats(words: list[str], max_n: int = MAX_LOOP_N) -> list[str]:
    """The words, lower-cased, with every immediate repetition of an n-gram (n <= max_n) kept once."""
    out = [w.lower() for w in words]
    changed = True
    while changed:
        changed = False
        for n in range(1, max_n + 1):
            i = 0
            while i + 2 * n <= len(out):
                if out[i : i + n] == out[i + n : i + 2 * n]:
                    del out[i + n : i + 2 * n]
                    changed = True
                else:
                    i += 1
    return out


def language_text(reply: str) -> str | None:
    """The text a language check judges: the reply, its de-duplicated words if it loops; None if too short."""
    words = letter_words(reply)
    collapsed = collapse_repeats(words)
    looping = len(words) - len(collapsed) >= LOOP_SHARE * len(words)
    if len(collapsed) < MIN_WORDS:
        return None
    return " ".join(collapsed) if looping else reply.strip()


def candidates(target: str, languages=()) -> frozenset[str]:
    return frozenset({target, *CONTRAST, *languages})


@cache
def detector(codes: frozenset[str]):
    """One lingua detector per candidate set (building and loading its models is the slow part)."""
    from lingua import LanguageDetectorBuilder

    return LanguageDetectorBuilder.from_languages(*(supported_language(c) for c in sorted(codes))).build()


def detect(text: str, codes: frozenset[str]) -> str | None:
    """The most likely of the candidate languages (ISO 639-1), None where lingua finds none (another script)."""
    found = detector(codes).detect_language_of(text)
    return found.iso_code_639_1.name.lower() if found is not None else None


def json_reply(reply: str):
    """The JSON value of the reply (or of its one fenced block); raises ValueError if it does not parse."""
    text = reply.strip()
    fenced = FENCED.fullmatch(text)
    return json.loads(fenced.group(1) if fenced else text)


@lru_cache(maxsize=64)
def _validator(schema_json: str):
    from jsonschema.validators import validator_for

    schema = json.loads(schema_json)
    return validator_for(schema)(schema)


def run_check(check: Check, reply: str | None, languages=()) -> bool | None:
    """One check on one reply (None: no reply); `languages` are candidates for a language check beyond its own and
    CONTRAST."""
    if reply is None:
        return None
    if check.kind == "regex":
        return bool(re.search(check.spec, reply.strip()))
    if check.kind == "language":
        text = language_text(reply)
        return text is not None and detect(text, candidates(check.spec, languages)) == check.spec
    if check.kind == "json_schema":
        try:
            value = json_reply(reply)
        except ValueError:  # json.JSONDecodeError included
            return False
        return _validator(json.dumps(check.spec, sort_keys=True)).is_valid(value)
    raise ValueError(f"unknown check kind {check.kind!r}")


def entry_languages(entry: PromptEntry) -> tuple[str, ...]:
    return tuple(sorted({c.spec for c in entry.all_checks if c.kind == "language"}))


def catalog_languages(entries: list[PromptEntry]) -> tuple[str, ...]:
    """Every language a check of these entries names: the candidates each language check is judged among."""
    return tuple(sorted({code for e in entries for code in entry_languages(e)}))


def run_checks(entry: PromptEntry, reply: str | None, languages=()) -> dict[str, bool | None]:
    """Every check of the entry on one reply, by name (the entry's languages and `languages` as candidates)."""
    named = tuple(sorted({*entry_languages(entry), *languages}))
    return {c.name: run_check(c, reply, named) for c in entry.all_checks}


__all__ = ["catalog_languages", "collapse_repeats", "language_text", "run_check", "run_checks"]
