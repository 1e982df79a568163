"""Degenerate teacher turns: loops of every shape are found, prose, code and shell commands are not."""

import pytest
from conftest import REPO

from genpi.catalog import load_catalog
from genpi.synth.quality import behaviour_check, degenerate, first_degenerate_agent_turn, repetition_share

LOOPS = {
    "one word": "No, no, no, no, no, no, no, no, no, no, no, no, no, no",
    "one word cut at the token limit": "No, no, no, no, no, no, no, n",
    "a short sentence": "I can help. I can help. I can help. I can help. I can help. I can",
    "a long sentence (no short n-gram covers half)": "I am sorry, but I cannot help with that request right now. " * 6,
    "numbered lines": "1. Check the file. 2. Check the file. 3. Check the file. 4. Check the file. 5. Check the file.",
    "a loop after a good start": "Act: bash\nls -la\n" + "Wait, wait, wait. " * 12,
    "a command repeated": "Act: bash\necho hi\necho hi\necho hi\necho hi\necho hi",
    "two alternating words": "yes no yes no yes no yes no yes no",
    "laughter": "ha ha ha ha ha ha ha ha",
}

NORMAL = {
    "prose": "The quick brown fox jumps over the lazy dog. The dog did not care about the fox, and the fox went on to "
    "the river, where the water was cold and the fish were quick to hide under the stones.",
    "a short reply": "No, no, no.",
    "an empty reply": "",
    "a shell command": 'Act: bash\n```bash\nfind . -name "*.txt" | xargs wc -l | sort -n | tail -n 1\n```',
    "a shell loop": "for i in 1 2 3 4 5; do echo $i; done",
    "assignments": "x = 1\nx = 2\nx = 3\nx = 4\nx = 5\nx = 6",
    "calls": "print(a)\nprint(b)\nprint(c)\nprint(d)\nprint(e)",
    "python": "def f(x):\n    if x > 0:\n        return x\n    return -x\n\n\nfor i in range(10):\n    print(f(i))\n",
    "json": '[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, '
    '{"role": "user", "content": "bye"}]',
    "an action": "Act: answer(42)",
}


@pytest.mark.parametrize("name", LOOPS)
def test_loops_are_degenerate(name):
    assert degenerate(LOOPS[name]), (name, repetition_share(LOOPS[name]))
    assert repetition_share(LOOPS[name]) > 0.5


@pytest.mark.parametrize("name", NORMAL)
def test_normal_text_and_code_are_not(name):
    assert not degenerate(NORMAL[name]), (name, repetition_share(NORMAL[name]))


def test_repetition_share_values():
    assert repetition_share("no no no no") == 1.0
    assert repetition_share("no no no yes") == 0.0  # 3 repeats: under the 4 needed
    assert repetition_share("a b a c a d a e") == 0.5  # "a" 4 times among 8 words: half, not most
    assert repetition_share("stop stop stop stop and think about what the task asks") == pytest.approx(4 / 11)
    # greedy non-overlapping count: "no no" covers the 5 words' first 4, twice, under 4 repeats; "no" covers all 5
    assert repetition_share("no no no no no", max_n=2) == 1.0


def test_first_degenerate_agent_turn_skips_environment_turns():
    turns = [
        {"role": "assistant", "content": "Act: ls"},
        {"role": "user", "content": "ok ok ok ok ok ok"},  # a looping environment is not the teacher's loop
        {"role": "assistant", "content": "ls ls ls ls ls ls"},
    ]
    assert first_degenerate_agent_turn(turns) == 2
    assert first_degenerate_agent_turn(turns[:2]) is None and first_degenerate_agent_turn([]) is None


def test_behaviour_check_is_actions_valid():
    import dataclasses

    calc, _ = load_catalog(REPO / "tests" / "data" / "tiny.yaml")
    check = behaviour_check(calc)
    assert check("Act: answer(3)") and not check("The answer is 3.")
    assert behaviour_check(dataclasses.replace(calc, valid_action=None, final_action=None)) is None
