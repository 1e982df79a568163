"""What makes a synthesized row a poor teacher: loops, and inputs that already show the behaviour.

    repetition_share(text)   share of the text's words covered by its most repeated unit
    degenerate(text)         a loop: one repeated unit covers more than half of the words
    behaviour_check(entry)   the test "a reply already shows what P asks for": the entry's checks (None: no check)

At this scale many teacher turns are loops: a small model with P repeats one phrase to the token
limit ("No, no, no, no, …", "I can help. I can help. …"). Trained on, they teach the adapter the
loop. Plain functions over text: synthesis statistics (genpi.synth.stats) and training
(genpi.train.recipe) both import them.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable

MAX_N = 4  # word n-grams of 1..MAX_N words
MIN_REPEATS = 4  # a unit must occur at least this often to count as a loop
MAX_PERIOD = 64  # longest unit (in words) looked for repeated back to back
DEGENERATE_SHARE = 0.5  # more than this share of the words: a loop

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """Lowercased word tokens: punctuation and spacing do not hide a repeat ("No, no. NO!")."""
    return [w.lower() for w in _WORD.findall(text or "")]


def _ngram_share(tokens: list[str], n: int, min_repeats: int) -> float:
    """Share of the words covered by the most repeated n-gram, counting non-overlapping occurrences;
    0.0 when no n-gram occurs `min_repeats` times."""
    grams = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    best = 0.0
    for gram, count in grams.most_common():
        if count < min_repeats or count * n / len(tokens) <= best:  # counts only fall from here
            break
        covered, i = 0, 0
        while i <= len(tokens) - n:  # greedy left to right: "no no no no" holds 2 bigrams "no no", not 3
            if tuple(tokens[i : i + n]) == gram:
                covered, i = covered + 1, i + n
            else:
                i += 1
        if covered >= min_repeats:
            best = max(best, covered * n / len(tokens))
    return best


def _tandem_share(tokens: list[str], min_repeats: int, max_period: int) -> float:
    """Share of the words covered by the longest block repeated back to back (`min_repeats` times or
    more), for blocks of 1..max_period words: loops of a whole sentence, which no short n-gram covers."""
    best, size = 0.0, len(tokens)
    for period in range(1, min(max_period, size // min_repeats) + 1):
        run = 0  # positions i with tokens[i] == tokens[i + period], in a row
        for i in range(size - period):
            run = run + 1 if tokens[i] == tokens[i + period] else 0
            span = run + period  # words covered by the repeats so far
            if span >= period * min_repeats:
                best = max(best, span / size)
    return best


def repetition_share(
    text: str, max_n: int = MAX_N, min_repeats: int = MIN_REPEATS, max_period: int = MAX_PERIOD
) -> float:
    """The share (0..1) of the text's words covered by its most repeated unit: one word n-gram
    (1..max_n words) occurring at least `min_repeats` times anywhere, or one block of up to
    `max_period` words repeated back to back at least `min_repeats` times. 0.0 when none repeats so."""
    tokens = words(text)
    if len(tokens) < min_repeats:
        return 0.0
    shares = [_ngram_share(tokens, n, min_repeats) for n in range(1, max_n + 1)]
    return max(shares + [_tandem_share(tokens, min_repeats, max_period)])


def degenerate(text: str) -> bool:
    """A loop: one repeated unit covers more than half of the text's words (repetition_share).
    "No, no, no, no, no" and "I can help. I can help. I can help. I can help." are; prose, code and
    shell commands, whose repeats are short words spread out ("x = 1; x = 2": "x" covers half), are not."""
    return repetition_share(text) > DEGENERATE_SHARE


def first_degenerate_agent_turn(turns: list[dict]) -> int | None:
    """Index in `turns` of the first agent ("assistant") turn that is degenerate; None if none is."""
    for i, turn in enumerate(turns or []):
        if turn["role"] == "assistant" and degenerate(turn["content"]):
            return i
    return None


def behaviour_check(entry) -> Callable[[str], bool] | None:
    """The test of "this reply already shows the behaviour P asks for", for an input whose reply without P
    passes it and so cannot teach P: the reply passes every check of the entry (genpi.checks: `format` from
    `actions.valid`, then the catalog's own), or None when the entry has no check."""
    from genpi.checks import run_checks

    if not entry.all_checks:
        return None
    return lambda reply: all(run_checks(entry, reply).values())
