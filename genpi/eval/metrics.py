"""Plain metric functions over texts, shared by fidelity, leakage and their tests.

Texts are compared as word tokens (`words`: runs of letters/digits, or single other
non-space characters), so the metrics do not depend on a model's tokenizer.

    action(entry, reply)            (in the action space, kind, action text)
    rouge_l(candidate, reference)   ROUGE-L precision, recall and F1 (LCS of word tokens)
    longest_common_span(a, b)       the longest run of words `a` shares with `b`
    verbatim_span(text, source, n)  `text` holds some n-character span of `source` verbatim
"""

from __future__ import annotations

import re
from difflib import SequenceMatcher

from genpi.catalog import PromptEntry

WORD = re.compile(r"\w+|[^\w\s]")
NO_ACTION = "(none)"  # the kind of a reply outside the action space


def words(text: str) -> list[str]:
    return WORD.findall(text)


def action(entry: PromptEntry, reply: str) -> tuple[bool, str, str]:
    """(in the action space, kind, action) of a reply under `actions.valid`.

    The kind is the regex's group named `kind`, else its first group, else the whole match; the action
    is the reply from the match on (the kind with its argument). Outside the space: (False, NO_ACTION, "").
    """
    text = reply.strip()
    match = re.search(entry.valid_action, text) if entry.valid_action else None
    if match is None:
        return False, NO_ACTION, ""
    groups = match.re.groupindex
    kind = match.group("kind") if "kind" in groups else match.group(1) if match.re.groups else match.group(0)
    return True, (kind or match.group(0)).strip(), text[match.start() :].strip()


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (O(len(a)·len(b)) time, O(len(b)) memory)."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(candidate: str, reference: str) -> dict[str, float]:
    """ROUGE-L on word tokens: LCS / candidate length (precision), / reference length (recall), and F1."""
    c, r = words(candidate), words(reference)
    if not c or not r:
        same = float(c == r)  # two empty texts agree; one empty text shares nothing
        return {"precision": same, "recall": same, "f": same}
    lcs = lcs_length(c, r)
    p, rec = lcs / len(c), lcs / len(r)
    return {"precision": p, "recall": rec, "f": 2 * p * rec / (p + rec) if lcs else 0.0}


def longest_common_span(text: str, source: str) -> int:
    """The most consecutive words of `source` that `text` reproduces in order."""
    a, b = words(text), words(source)
    return SequenceMatcher(None, a, b, autojunk=False).find_longest_match(0, len(a), 0, len(b)).size


def verbatim_span(text: str, source: str, n: int = 50) -> bool:
    """`text` contains some n-character span of `source` exactly (a source shorter than n: the whole)."""
    if len(source) <= n:
        return bool(source) and source in text
    spans = {source[i : i + n] for i in range(len(source) - n + 1)}
    return any(text[i : i + n] in spans for i in range(len(text) - n + 1))


def ratio(value: float | None, reference: float | None) -> float | None:
    """value / reference: retention of a metric against the teacher's (None where undefined)."""
    if value is None or not reference:
        return None
    return value / reference


def present_mean(values) -> float | None:
    """The mean of the values that are not None (a rate: of booleans); None when there are none."""
    values = [float(v) for v in values if v is not None]
    return sum(values) / len(values) if values else None
