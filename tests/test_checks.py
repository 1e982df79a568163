"""Behaviour checks (genpi.checks) on hand-made replies, and their fidelity rates on hand-made episodes."""

import json

import pyarrow.parquet as pq
import pytest
from test_eval_metrics import episode
from test_recipe import row

from genpi.catalog import Check, entry_from_json
from genpi.checks import collapse_repeats, detector, language_text, run_check, run_checks
from genpi.data.store import write_table
from genpi.eval.check_rates import check_rates
from genpi.eval.fidelity import EVAL_SCHEMA, format_summary, reply_rows, retention, summarize
from genpi.eval.systems import System

FRENCH, SPANISH, ENGLISH = (
    Check("french", "language", "fr"),
    Check("spanish", "language", "es"),
    Check("english", "language", "en"),
)
SCHEMA = {"type": "object", "required": ["answer"], "properties": {"answer": {"type": "integer"}}}
JSON = Check("json", "json_schema", SCHEMA)

FR = [
    "Bonjour, je suis ravi de vous aider aujourd'hui.",
    "La capitale de la France est Paris.",
    "Je ne sais pas, désolé.",
    "Voici la réponse : la tour Eiffel mesure 330 mètres.",
]
ES = [
    "Hola, ¿cómo estás? Me llamo Juan y vivo en Madrid.",
    "Claro que sí, puedo ayudarte con eso.",
    "No lo sé, lo siento mucho.",
    "La respuesta es cuarenta y dos.",
]
EN = [
    "The capital of France is Paris.",
    "Sure! Here is the answer: 42",
    "I don't know, sorry.",
    "Thank you for your question.",
]


def test_regex_searches_the_stripped_reply():
    check = Check("act", "regex", r"^Act: \w+\(")
    assert run_check(check, "  Act: ls(-la)\n") is True
    assert run_check(check, "Sure. Act: ls(-la)") is False  # anchored: the reply must open with it
    assert run_check(Check("act", "regex", r"Act: \w+\("), "Sure. Act: ls(-la)") is True  # unanchored: anywhere
    assert run_check(check, "") is False and run_check(check, None) is None


@pytest.mark.parametrize(
    "check, passing, failing", [(FRENCH, FR, ES + EN), (SPANISH, ES, FR + EN), (ENGLISH, EN, FR + ES)]
)
def test_language_tells_french_spanish_and_english_apart(check, passing, failing):
    assert [run_check(check, r) for r in passing] == [True] * len(passing)
    assert [run_check(check, r) for r in failing] == [False] * len(failing)


def test_language_of_other_languages_and_scripts():
    italian = "Ciao, come stai? Mi chiamo Giovanni e abito a Roma."
    assert not run_check(FRENCH, italian) and not run_check(SPANISH, italian)  # Italian is among the candidates
    assert run_check(Check("italian", "language", "it"), italian)
    assert not run_check(
        ENGLISH, "你好，我今天很高兴见到你，谢谢你的帮助。"
    )  # a script no candidate uses passes nothing
    assert run_check(Check("chinese", "language", "zh"), "你好，我今天很高兴见到你，谢谢你的帮助。")
    russian = Check("russian", "language", "ru")
    assert run_check(russian, "Привет, как у тебя дела сегодня?") and not run_check(russian, EN[0])


def test_language_short_and_looping_replies():
    for short in ["Oui.", "Oui, merci.", "42", "ls /tmp", "", "...!", "x = 42; y = 7"]:
        assert language_text(short) is None
        assert run_check(FRENCH, short) is False and run_check(ENGLISH, short) is False
    for loop in [
        "No, no, no, no",
        "No, no, no, no, no, no, no, no, no, no, no",
        "Sí sí sí sí sí sí",
        "yes yes yes yes yes",
    ]:
        assert language_text(loop) is None  # one word repeated: too short to tell, whichever language it is
        assert not any(run_check(c, loop) for c in (FRENCH, SPANISH, ENGLISH))
    loop = "Bonjour ! " + "Je suis là pour vous aider. " * 12
    assert language_text(loop) == "bonjour je suis là pour vous aider"  # judged on the de-duplicated text
    assert run_check(FRENCH, loop) and not run_check(ENGLISH, loop)
    assert run_check(ENGLISH, "I can help. " + "no, no, " * 30 + "thanks a lot") is True  # the loop collapses to "no"
    assert collapse_repeats("a b a b a b c c d".split()) == ["a", "b", "c", "d"]
    assert collapse_repeats("the cat sat on the mat".split()) == "the cat sat on the mat".split()
    assert (
        language_text("La la la, je chante une chanson.") == "La la la, je chante une chanson."
    )  # a small repeat is no loop


def test_language_detector_is_built_once_per_candidate_set():
    run_check(FRENCH, FR[0])
    before = detector.cache_info()
    for reply in FR + ES:
        run_check(FRENCH, reply)
    after = detector.cache_info()
    assert after.misses == before.misses and after.hits > before.hits
    assert detector(frozenset({"fr", "en"})) is detector(frozenset({"en", "fr"}))


def test_json_schema():
    assert run_check(JSON, '{"answer": 42}') is True
    assert run_check(JSON, '  {"answer": 42, "why": "sum"}\n') is True
    assert run_check(JSON, '```json\n{"answer": 42}\n```') is True  # one fenced block
    assert run_check(JSON, '```\n{"answer": 42}\n```') is True
    assert run_check(JSON, '{"answer": "42"}') is False  # schema: an integer
    assert run_check(JSON, '{"result": 42}') is False  # schema: required key
    assert run_check(JSON, "[42]") is False
    assert run_check(JSON, '{"answer": 42') is False  # not JSON
    assert run_check(JSON, "The answer is 42.") is False
    assert run_check(JSON, 'Here you are:\n```json\n{"answer": 42}\n```') is False  # prose around the block
    assert run_check(JSON, '```json\n{"answer": 1}\n```\n```json\n{"answer": 2}\n```') is False  # two blocks
    assert run_check(Check("any", "json_schema", {}), "null") is True and run_check(JSON, None) is None


ENTRY = entry_from_json(
    {
        "id": "calc.fr",
        "system": "Calcule avec des actions, et réponds en français.",
        "shots": [
            {"role": "user", "content": "2+3 ?"},
            {"role": "assistant", "content": "Act: compute(2+3) Je calcule."},
        ],
        "actions": {"valid": r"Act: (compute|answer)\(.*\)", "final": r"Act: answer\("},
        "checks": [{"name": "french", "language": "fr"}, {"name": "json", "json_schema": SCHEMA}],
    }
)


def test_run_checks_names_every_check_of_the_entry():
    assert run_checks(ENTRY, "Act: compute(1+2) Je calcule la somme maintenant.") == {
        "format": True,
        "french": True,
        "json": False,
    }
    assert run_checks(ENTRY, '{"answer": 3}') == {"format": False, "french": False, "json": True}
    assert run_checks(ENTRY, None) == {"format": None, "french": None, "json": None}


TEACHER_EPISODES = [
    episode(
        ["Act: compute(1+2) Je calcule la somme maintenant.", "Act: answer(3) La réponse est trois."], "final_action"
    ),
    episode(['{"answer": 5}', "Voilà, la réponse est cinq, merci beaucoup."], "max_turns"),
    episode(["Bonjour, je ne sais pas calculer cela, désolé."], "environment"),
    episode(["No, no, no, no, no, no"], "environment"),
]
ENGLISH_ACTION = "Act: answer(1) The answer is one, I think."
FRENCH_PROSE = "La réponse est un, je pense."


def fidelity_records():
    rows = [dict(row(i), sample_id=i) for i in range(4)]
    systems = [System("teacher", None, True), System("copy"), System("english"), System("french")]
    episodes = {
        "teacher": TEACHER_EPISODES,
        "copy": TEACHER_EPISODES,
        "english": [episode([ENGLISH_ACTION, ENGLISH_ACTION], "max_turns") for _ in rows],
        "french": [episode([FRENCH_PROSE], "environment") for _ in rows],
    }
    forced = {s.name: [(10, 5.0, 0.0)] * 4 for s in systems}
    return reply_rows(ENTRY, rows, systems, episodes, forced)


def test_check_rates_a_copy_keeps_every_check_a_constant_gets_its_own_rate(tmp_path):
    records = fidelity_records()
    m = {name: summarize(rs) for name, rs in records.items()}
    kept = {name: retention(metrics, m["teacher"]) for name, metrics in m.items()}

    t = {name: dict(rates) for name, rates in m["teacher"]["checks"].items()}
    assert list(t) == ["format", "french", "json"]
    for rates in t.values():  # the interval holds the rate; a rate of 4 inputs is uncertain
        lo, hi = rates.pop("first_turn_ci")
        assert lo <= rates["first_turn"] <= hi and hi - lo >= 0.25
    assert t["format"] == {"first_turn": 0.25, "all_turns": pytest.approx(2 / 6), "per_turn": [0.25, 0.5]}
    assert t["french"] == {
        "first_turn": 0.5,
        "all_turns": pytest.approx(4 / 6),
        "per_turn": [0.5, 1.0],
    }  # the loop fails
    assert t["json"] == {"first_turn": 0.25, "all_turns": pytest.approx(1 / 6), "per_turn": [0.25, 0.0]}
    assert m["teacher"]["checks"]["format"]["first_turn"] == m["teacher"]["format_rate"]  # `format` is actions.valid
    assert m["teacher"]["checks"]["format"]["all_turns"] == m["teacher"]["action_space_rate"]

    assert m["copy"] == m["teacher"]
    copy_checks = {k: v for k, v in kept["copy"].items() if k.startswith(("checks.", "checks_all_turns."))}
    assert copy_checks == {
        f"{kind}.{name}": 1.0 for kind in ("checks", "checks_all_turns") for name in ("format", "french", "json")
    }
    # per turn: 1.0 wherever the teacher passes at that turn (a turn where it never passes keeps nothing: undefined)
    assert kept["copy"]["checks_per_turn.json"] == [1.0, None] and kept["copy"]["checks_per_turn.french"] == [1.0, 1.0]

    for name, constant in (
        ("english", ENGLISH_ACTION),
        ("french", FRENCH_PROSE),
    ):  # a constant reply: its own result, every turn
        passed = run_checks(ENTRY, constant)
        for check, rates in m[name]["checks"].items():
            assert rates["first_turn"] == rates["all_turns"] == float(passed[check])
            assert rates["per_turn"] == [float(passed[check])] * len(rates["per_turn"])
    assert (
        kept["english"]["checks.french"] == 0.0 and kept["english"]["checks.json"] == 0.0
    )  # it fails the language check
    assert kept["english"]["checks.format"] == 4.0  # a constant action games the format check, as it games format_rate
    assert kept["french"]["checks.french"] == 2.0 and kept["french"]["checks_all_turns.french"] == pytest.approx(1.5)
    assert kept["french"]["checks.format"] == 0.0

    path = tmp_path / "part-00000.parquet"  # the columns fit the schema and read back as written
    write_table(path, records["teacher"], EVAL_SCHEMA)
    back = pq.read_table(path).to_pylist()
    assert [r["checks"] for r in back] == [r["checks"] for r in records["teacher"]]
    assert [r["turn_checks"] for r in back] == [r["turn_checks"] for r in records["teacher"]]
    assert back[0]["checks"] == [
        {"name": "format", "passed": True},
        {"name": "french", "passed": True},
        {"name": "json", "passed": False},
    ]
    assert [len(r["turn_checks"]) for r in back] == [2, 2, 1, 1]


def test_check_rates_exclude_errors_and_missing_replies():
    records = fidelity_records()["teacher"]
    records[0] = dict(records[0], error="RuntimeError: boom")
    rates = check_rates([r for r in records if r["error"] is None])
    assert summarize(records)["checks"] == rates and rates["french"]["first_turn"] == pytest.approx(1 / 3)
    empty = dict(
        records[1], checks=[{"name": "french", "passed": None}], turn_checks=[]
    )  # an episode without an agent turn
    assert check_rates([empty, records[2]])["french"] == {
        "first_turn": 1.0,
        "first_turn_ci": [1.0, 1.0],
        "all_turns": 1.0,
        "per_turn": [1.0],
    }
    assert check_rates([]) == {}


def test_format_summary_shows_each_check():
    records = fidelity_records()
    m = {name: summarize(rs) for name, rs in records.items()}
    result = {
        "prompt_id": ENTRY.id,
        "inputs": 4,
        "first_turn_actions": "scored",
        "missing": [],
        "systems": m,
        "retention": {name: retention(metrics, m["teacher"]) for name, metrics in m.items()},
        "heldout_used_for_lambda": {},
    }
    text = format_summary({"served_as": "test", "results": [result]})
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("check french: pass rate"))
    french = next(
        line for line in lines[start:] if line.split()[0] == "french"
    )  # the system `french` under the check `french`
    assert french.split()[1:] == [
        "100.0%",
        "100.0%",
        "200.0%",
        "150.0%",
        "100.0%",
    ]  # first, all, retention x2, per turn
    assert json.dumps(result)  # the summary stays JSON
