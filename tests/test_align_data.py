"""InstructGPT data files: both forms of each, file:line errors naming the field, the rankings round trip."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptlab.align_data import Ranking, load_prompts, load_rankings, load_sft, write_rankings
from gptlab.chat import Message, render
from gptlab.errors import DataError
from gptlab.tokenizer import CharTokenizer

GOOD_SFT = {"prompt": "p", "response": "r"}
GOOD_RANKING = {"prompt": "p", "chosen": "a", "rejected": "b"}


def write_rows(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def msgs(*turns: tuple[Any, Any]) -> dict[str, Any]:
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


SFT_BAD = [
    ("not-object", "hi", "a row is a JSON object, not a string"),
    ("neither", {"text": "x"}, "neither 'prompt'+'response' nor 'messages'"),
    ("both", {**GOOD_SFT, **msgs(("assistant", "x"))}, "both 'messages' and 'prompt'"),
    ("prompt-type", {"prompt": 3, "response": "r"}, "field 'prompt' is a number, not a string"),
    ("prompt-empty", {"prompt": " \n", "response": "r"}, "field 'prompt' is empty"),
    ("response-missing", {"prompt": "p"}, "missing field 'response'"),
    ("response-type", {"prompt": "p", "response": None}, "field 'response' is null, not a string"),
    ("response-empty", {"prompt": "p", "response": ""}, "field 'response' is empty"),
    ("messages-type", {"messages": "hi"}, "field 'messages' is a string"),
    ("messages-empty", {"messages": []}, "field 'messages' is an empty list"),
    ("message-type", {"messages": [{"role": "user", "content": "u"}, "hi"]}, "messages[1] is a string, not an object"),
    ("role-unknown", msgs(("user", "u"), ("bot", "b")), "messages[1]: role 'bot' is not one of 'system', 'user', 'assistant'"),
    ("role-missing", {"messages": [{"content": "u"}]}, "messages[0]: role None is not one of"),
    ("role-unhashable", msgs((["user"], "u")), "messages[0]: role ['user'] is not one of"),
    ("content-type", msgs(("user", 5), ("assistant", "a")), "messages[0]: field 'content' is a number"),
    ("no-assistant", msgs(("system", "s"), ("user", "u")), "no assistant message"),
    ("assistant-empty", msgs(("user", "u"), ("assistant", "  ")), "messages[1]: the assistant content is empty"),
]


def ranked(responses: Any, ranking: Any, prompt: Any = "p") -> dict[str, Any]:
    return {"prompt": prompt, "responses": responses, "ranking": ranking}


RANKINGS_BAD = [
    ("not-object", [1, 2], "a row is a JSON object, not a list"),
    ("neither", {"prompt": "p"}, "neither 'responses'+'ranking' nor 'chosen'+'rejected'"),
    ("both", {**ranked(["a", "b"], [0, 1]), "chosen": "a"}, "mixes 'responses'/'ranking' with 'chosen'/'rejected'"),
    ("prompt-missing", {"chosen": "a", "rejected": "b"}, "missing field 'prompt'"),
    ("prompt-type", ranked(["a", "b"], [0, 1], prompt=["p"]), "field 'prompt' is a list, not a string"),
    ("prompt-empty", ranked(["a", "b"], [0, 1], prompt="\t"), "field 'prompt' is empty"),
    ("responses-missing", {"prompt": "p", "ranking": [0, 1]}, "missing field 'responses'"),
    ("responses-type", ranked("ab", [0, 1]), "field 'responses' is a string"),
    ("k-too-small", ranked(["a"], [0]), "field 'responses' has 1 text(s); a ranking needs 2 to 9"),
    ("k-too-large", ranked([str(i) for i in range(10)], list(range(10))), "has 10 text(s); a ranking needs 2 to 9"),
    ("response-type", ranked(["a", 3], [0, 1]), "response 1 is a number, not a string"),
    ("response-empty", ranked(["a", "b", " "], [0, 1, 2]), "response 2 is empty"),
    ("responses-identical", ranked(["a", "b", "a"], [0, 1, 2]), "responses 0 and 2 are identical"),
    ("ranking-missing", {"prompt": "p", "responses": ["a", "b"]}, "missing field 'ranking'"),
    ("ranking-type", ranked(["a", "b"], "01"), "field 'ranking' is a string, not a list"),
    ("ranking-float", ranked(["a", "b"], [0, 1.0]), "ranking[1] is a number, not an integer index"),
    ("ranking-bool", ranked(["a", "b"], [True, 0]), "ranking[0] is a boolean, not an integer index"),
    ("ranking-range", ranked(["a", "b"], [0, 2]), "ranking[1] = 2 is out of range for 2 responses"),
    ("ranking-negative", ranked(["a", "b"], [-1, 0]), "ranking[0] = -1 is out of range"),
    ("ranking-duplicate", ranked(["a", "b", "c"], [2, 0, 2]), "field 'ranking' lists index 2 more than once; list each index 0..2"),
    ("ranking-short", ranked(["a", "b", "c"], [2, 0]), "field 'ranking' leaves out index 1 (2 entries for 3 responses)"),
    ("ranking-long", ranked(["a", "b"], [1, 0, 1]), "lists index 1 more than once (3 entries for 2 responses)"),
    ("chosen-missing", {"prompt": "p", "rejected": "b"}, "missing field 'chosen'"),
    ("rejected-empty", {"prompt": "p", "chosen": "a", "rejected": ""}, "field 'rejected' is empty"),
    ("chosen-identical", {"prompt": "p", "chosen": "a", "rejected": "a"}, "'chosen' and 'rejected' are identical"),
]

PROMPTS_BAD = [
    ("not-object", ["p"], "a row is a JSON object, not a list"),
    ("prompt-missing", msgs(("user", "u"), ("assistant", "a")), "missing field 'prompt'"),
    ("prompt-type", {"prompt": {"text": "p"}}, "field 'prompt' is an object, not a string"),
    ("prompt-empty", {"prompt": ""}, "field 'prompt' is empty"),
]

CASES = (
    [pytest.param(load_sft, GOOD_SFT, row, msg, id=f"sft-{name}") for name, row, msg in SFT_BAD]
    + [pytest.param(load_rankings, GOOD_RANKING, row, msg, id=f"rankings-{name}") for name, row, msg in RANKINGS_BAD]
    + [pytest.param(load_prompts, {"prompt": "p"}, row, msg, id=f"prompts-{name}") for name, row, msg in PROMPTS_BAD]
)


@pytest.mark.parametrize("load, good, bad, message", CASES)
def test_bad_row_names_file_line_and_field(tmp_path, load: Callable[[Path], Any], good: Any, bad: Any, message: str):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n" + json.dumps(good) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        load(path)
    text = str(e.value)
    assert text.startswith(f"{path}:3: ")
    assert message in text
    assert "\n" not in text and "; " in text  # one line: the problem, then the fix


@pytest.mark.parametrize("load", [load_sft, load_rankings, load_prompts])
def test_empty_file_and_bad_json(tmp_path, load):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(DataError, match=r"empty\.jsonl: no rows"):
        load(path)
    path.write_text('{"prompt": "p"}\n{"prompt": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"empty\.jsonl:2: not valid JSON"):
        load(path)


def test_sft_forms_render_identically(tmp_path):
    rows = [
        {"prompt": "ab", "response": "ba", "id": 7},
        msgs(("user", "ab"), ("assistant", "ba")),
        msgs(("system", "c"), ("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "")),
    ]
    rows[2]["messages"][-1]["content"] = "cab"
    examples = load_sft(write_rows(tmp_path / "sft.jsonl", rows))
    assert [ex.line for ex in examples] == [1, 2, 3]
    tok = CharTokenizer.from_text("abc")
    assert render(examples[0].messages, tok) == render(examples[1].messages, tok)
    assert examples[0].messages == [Message("user", "ab"), Message("assistant", "ba")]
    assert [m.role for m in examples[2].messages] == ["system", "user", "assistant", "user", "assistant"]


def test_rankings_mixed_forms_are_ordered_best_first(tmp_path):
    path = write_rows(tmp_path / "r.jsonl", [ranked(["a", "b", "c"], [2, 0, 1]), {"prompt": "q", "chosen": "x", "rejected": "y"}])
    assert load_rankings(path) == [Ranking("p", ["c", "a", "b"], 1), Ranking("q", ["x", "y"], 2)]


def test_prompts_read_from_sft_rankings_and_gzip_files(tmp_path):
    sft = write_rows(tmp_path / "sft.jsonl", [{"prompt": "one", "response": "r"}, {"prompt": " two ", "response": "r"}])
    ranks = write_rows(tmp_path / "r.jsonl", [ranked(["a", "b"], [1, 0], prompt="three")])
    gz = tmp_path / "p.jsonl.gz"
    gz.write_bytes(gzip.compress(b'{"prompt": "four", "source": "x"}\n'))
    assert load_prompts(sft) == ["one", " two "]
    assert load_prompts(ranks) == ["three"]
    assert load_prompts(gz) == ["four"]


@pytest.mark.parametrize("rankings, message", [
    ([], "no rankings to write"),
    ([Ranking("p", ["a", "b"]), Ranking("p", ["a", "a"])], "ranking 2: responses 0 and 1 are identical"),
    ([Ranking("p", ["a"])], "ranking 1: field 'responses' has 1 text(s)"),
    ([Ranking("", ["a", "b"])], "ranking 1: field 'prompt' is empty"),
])
def test_write_rankings_refuses_what_load_would_refuse(tmp_path, rankings, message):
    path = tmp_path / "r.jsonl"
    with pytest.raises(DataError) as e:
        write_rankings(path, rankings)
    assert message in str(e.value)
    assert not path.exists()


TEXT = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20).filter(str.strip)
RANKING = st.builds(Ranking, TEXT, st.lists(TEXT, min_size=2, max_size=9, unique=True))


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rankings=st.lists(RANKING, min_size=1, max_size=4))
def test_write_then_load_rankings_round_trips(tmp_path, rankings):
    path = tmp_path / "rankings.jsonl"
    write_rankings(path, rankings)
    loaded = load_rankings(path)
    assert [(r.prompt, r.responses) for r in loaded] == [(r.prompt, r.responses) for r in rankings]
    assert [r.line for r in loaded] == list(range(1, len(rankings) + 1))
    assert load_prompts(path) == [r.prompt for r in rankings]
