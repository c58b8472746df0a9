"""Task files: exact round trips of the five formats, type inference, file:line errors, `gptlab tasks check/make`."""

from __future__ import annotations

import gzip
import json
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from gptlab.cli import main
from gptlab.errors import DataError
from gptlab.tasks import DERIVED_TASKS, SPLITS, TASK_TYPES, load_task, make_tasks


def write_rows(path: Path, rows: list[Any], blank_every: int = 0) -> Path:
    """One JSON value per line (raw Unicode, not escaped); a blank line after every ``blank_every`` rows."""
    lines = []
    for i, row in enumerate(rows, 1):
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
        if blank_every and i % blank_every == 0:
            lines.append("\n")
    path.write_text("".join(lines), encoding="utf-8", newline="")
    return path


def label_order(label: str) -> tuple[int, int, str]:
    """The documented order of classification labels: integers numerically, then other strings."""
    return (0, int(label), label) if re.fullmatch(r"-?[0-9]{1,18}", label) else (1, 0, label)


# Any Unicode but lone surrogates, including newlines and U+2028 inside strings; never only whitespace.
texts = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30).filter(str.strip)


@st.composite
def task_rows(draw: Any, task_type: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(rows as written, rows as ``load_task`` must return them): labels normalised, extra fields kept."""
    graded = draw(st.booleans())
    written, expected = [], []
    for i in range(draw(st.integers(1, 8))):
        row: dict[str, Any] = {"id": i, "note": draw(st.none() | texts)}
        if task_type == "classification":
            row |= {"text": draw(texts), "label": draw(st.integers(-3, 12) | texts)}
        elif task_type == "entailment":
            row |= {"premise": draw(texts), "hypothesis": draw(texts),
                    "label": draw(st.sampled_from(["entailment", "neutral", "contradiction", 0, 1, 2]))}
        elif task_type == "similarity":
            score = st.floats(-1e6, 1e6, allow_nan=False) if graded else st.sampled_from([0, 1])
            row |= {"text_a": draw(texts), "text_b": draw(texts), "label": draw(score)}
        elif task_type == "multiple_choice":
            choices = draw(st.lists(texts, min_size=2, max_size=5))
            row |= {"context": draw(texts), "choices": choices, "label": draw(st.integers(0, len(choices) - 1))}
        else:
            row |= {"prompt": draw(texts), "answer": draw(texts)}
        written.append(row)
        expected.append(dict(row))
    if task_type == "similarity":
        binary = all(row["label"] in (0, 1) for row in expected)
        for row in expected:
            row["label"] = int(row["label"]) if binary else float(row["label"])
    return written, expected


@pytest.mark.parametrize("task_type", TASK_TYPES)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_rows_round_trip_exactly(tmp_path_factory, task_type, data):
    written, expected = data.draw(task_rows(task_type))
    gz, blank_every = data.draw(st.booleans()), data.draw(st.integers(0, 3))
    path = write_rows(tmp_path_factory.mktemp("rt") / "t.jsonl", written, blank_every)
    if gz:
        path = path.with_suffix(".jsonl.gz")
        path.write_bytes(gzip.compress(path.with_suffix("").read_bytes()))
    task = load_task(path)
    assert task.type == task_type and task.path == str(path)
    assert task.rows == expected
    assert task.lines == [i + 1 + (i // blank_every if blank_every else 0) for i in range(len(written))]
    assert load_task(path, task_type) == task
    if task_type in ("classification", "entailment"):
        assert task.labels == sorted({str(row["label"]) for row in expected}, key=label_order)
        assert [str(v) for v in task.label_values] == task.labels  # each class as the rows write it
    elif task_type == "similarity":
        binary = all(isinstance(row["label"], int) for row in expected)
        assert task.labels == (["0", "1"] if binary else None) and task.graded == (not binary)
    else:
        assert task.labels is None and not task.graded
    if task_type == "completion" or task.graded:
        with pytest.raises(ValueError, match="has no classes"):
            task.label_index(expected[0])
    else:
        for row in task.rows:
            index = task.label_index(row)
            assert index == row["label"] if task.labels is None else task.labels[index] == str(row["label"])


def test_type_is_inferred_from_the_first_row(tmp_path):
    both = {"premise": "It rains.", "hypothesis": "It is wet.", "text": "It rains.", "label": "yes"}
    path = write_rows(tmp_path / "both.jsonl", [both])
    with pytest.raises(DataError) as e:
        load_task(path)
    assert str(e.value).startswith(f"{path}:1: the fields fit classification and entailment; pass --type to "
                                   "choose (classification: text, label; entailment: premise, hypothesis, label;")
    task = load_task(path, "entailment")
    assert task.type == "entailment" and task.rows == [both] and task.labels == ["yes"]
    path = write_rows(tmp_path / "qa.jsonl", [{"question": "Who?", "answer": "Me"}])
    with pytest.raises(DataError, match=re.escape(f"{path}:1: cannot tell the task type from the fields "
                                                  "answer, question; rename them or pass --type (")):
        load_task(path)
    # the first row decides; a later row of another type is an error at its line
    path = write_rows(tmp_path / "mixed.jsonl", [{"text": "a", "label": 1}, {"premise": "p", "hypothesis": "h",
                                                                             "label": 1}])
    with pytest.raises(DataError, match=re.escape(f"{path}:2: missing field 'text' for a classification task")):
        load_task(path)


ENT = {"premise": "A man sleeps.", "hypothesis": "Nobody sleeps.", "label": "contradiction"}
MC = {"context": "The sky is", "choices": ["blue", "green", "loud"], "label": 0}
BAD_ROWS = [
    ("entailment", {"premise": "p", "label": "neutral"},
     "missing field 'hypothesis' for an entailment task; every row needs premise, hypothesis, label "
     "(see docs/TASKS.md)"),
    ("classification", {"text": 5, "label": "pos"},
     "field 'text' is a number, not a string; write the text in quotes"),
    ("completion", {"prompt": "2 + 2 =", "answer": " \n"},
     "field 'answer' is empty; give it some text or drop the row"),
    ("entailment", {**ENT, "premise": ["a"]}, "field 'premise' is a list, not a string; write the text in quotes"),
    ("multiple_choice", {**MC, "label": "0"}, "label is a string; give the index of the right choice (0 to 2)"),
    ("multiple_choice", {**MC, "label": True}, "label is a boolean; give the index of the right choice (0 to 2)"),
    ("multiple_choice", {**MC, "label": 3}, "label 3 is out of range for 3 choices; give an index from 0 to 2"),
    ("multiple_choice", {**MC, "label": -1}, "label -1 is out of range for 3 choices; give an index from 0 to 2"),
    ("multiple_choice", {**MC, "choices": ["blue"]}, "1 choice(s); a multiple_choice row needs at least 2"),
    ("multiple_choice", {**MC, "choices": "blue"}, "field 'choices' is a string; give a list of strings"),
    ("multiple_choice", {**MC, "choices": ["blue", None]}, "choice 1 is null, not a string; write the text in quotes"),
    ("classification", {"text": "t", "label": 0.5}, "label is a number; write it as a string or an integer"),
    ("classification", {"text": "t", "label": ""}, "label is empty; give it some text or drop the row"),
    ("entailment", {**ENT, "label": None}, "label is null; write it as a string or an integer"),
    ("similarity", {"text_a": "a", "text_b": "b", "label": "1"},
     "label is a string; a similarity label is a number (0/1, or a graded score)"),
    ("similarity", {"text_a": "a", "text_b": "b", "label": float("nan")},
     "not valid JSON (NaN is not a number JSON allows); each line must be one JSON object"),
    ("completion", [1, 2], "a row is a JSON object, not a list; write one {...} per line"),
]


@pytest.mark.parametrize("task_type, bad, message", BAD_ROWS)
def test_bad_rows_name_file_and_line(tmp_path, task_type, bad, message):
    good = {"classification": {"text": "fine", "label": "pos"}, "entailment": ENT, "multiple_choice": MC,
            "similarity": {"text_a": "a", "text_b": "b", "label": 1},
            "completion": {"prompt": "2 + 2 =", "answer": "4"}}[task_type]
    path = write_rows(tmp_path / "t.jsonl", [good, good, bad, good], blank_every=1)
    with pytest.raises(DataError) as e:
        load_task(path, task_type)
    assert str(e.value) == f"{path}:5: {message}"


def test_bad_bytes_json_and_empty_files(tmp_path):
    path = tmp_path / "t.jsonl"
    cases = [
        (b'{"text": "a", "label": 1}\n{"text": "caf\xe9", "label": 1}\n',
         f"{path}:2: not UTF-8 text (bad byte at column 14); save the file as UTF-8"),
        (b'{"text": "a", "label": 1}\n\n{"text": "a",}\n',
         f"{path}:3: not valid JSON (Expecting property name enclosed in double quotes); "
         "each line must be one JSON object"),
        (b"", f"{path}: no rows; a task file holds one JSON object per line (see docs/TASKS.md)"),
        (b"\n  \n\r\n", f"{path}: no rows; a task file holds one JSON object per line (see docs/TASKS.md)"),
    ]
    for content, message in cases:
        path.write_bytes(content)
        with pytest.raises(DataError) as e:
            load_task(path)
        assert str(e.value) == message
    path.write_bytes('\ufeff{"prompt": "Windows", "answer": "BOM"}\r\n'.encode())
    assert load_task(path).rows == [{"prompt": "Windows", "answer": "BOM"}]
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'nope.jsonl'}: file not found")):
        load_task(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="unknown task type 'qa'; use one of classification, entailment, "):
        load_task(path, "qa")


def test_val_labels_must_come_from_the_training_split(tmp_path):
    train = load_task(write_rows(tmp_path / "train.jsonl", [{"text": t, "label": lab} for t, lab in
                                                            (("a", "pos"), ("b", "neg"), ("c", "pos"))]))
    assert train.labels == ["neg", "pos"]
    val = load_task(write_rows(tmp_path / "val.jsonl", [{"text": "d", "label": "pos"}]), labels=train.labels)
    assert val.labels == ["neg", "pos"] and val.label_index(val.rows[0]) == 1
    bad = write_rows(tmp_path / "bad.jsonl", [{"text": "d", "label": "pos"}, {"text": "e", "label": "neu"}])
    with pytest.raises(DataError) as e:
        load_task(bad, labels=train.labels)
    assert str(e.value) == (f"{bad}:2: label 'neu' is not one of 'neg', 'pos' (the training split's labels); "
                            "fix the label or add examples of it to the training split")
    graded = write_rows(tmp_path / "graded.jsonl", [{"text_a": "a", "text_b": "b", "label": x} for x in (1, 0.5)])
    with pytest.raises(DataError, match=re.escape(f"{graded}:2: label '0.5' is not one of '0', '1'")):
        load_task(graded, labels=["0", "1"])
    mixed = [{"text": "t", "label": x} for x in (10, "b", 2, "1", "a", "01")]
    numbers = load_task(write_rows(tmp_path / "n.jsonl", mixed))
    assert numbers.labels == ["01", "1", "2", "10", "a", "b"]
    with pytest.raises(ValueError, match="labels apply to classification, entailment and similarity"):
        load_task(write_rows(tmp_path / "mc.jsonl", [MC]), labels=["0"])


def test_cli_check_prints_one_line(tmp_path, capsys):
    files = {
        "cls.jsonl": [{"text": t, "label": lab} for t, lab in (("a", "pos"), ("b", "neg"), ("c", "pos"))],
        "mc.jsonl": [MC, {**MC, "label": 2}, MC],
        "sts.jsonl": [{"text_a": "a", "text_b": "b", "label": x} for x in (0.5, 4, 2)],
        "lm.jsonl": [{"prompt": str(i), "answer": "x"} for i in range(1234)],
    }
    for name, rows in files.items():
        assert main(["tasks", "check", str(write_rows(tmp_path / name, rows))]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"{tmp_path / 'cls.jsonl'}: 3 classification rows, OK; labels: neg 1, pos 2",
        f"{tmp_path / 'mc.jsonl'}: 3 multiple_choice rows, OK; labels: 0 2, 2 1",
        f"{tmp_path / 'sts.jsonl'}: 3 similarity rows, OK; graded labels from 0.5 to 4",
        f"{tmp_path / 'lm.jsonl'}: 1,234 completion rows, OK",
    ]
    both = write_rows(tmp_path / "both.jsonl", [{**ENT, "text": "x"}])
    assert main(["tasks", "check", str(both), "--type", "entailment"]) == 0
    assert capsys.readouterr().out == f"{both}: 1 entailment rows, OK; labels: contradiction 1\n"
    bad = write_rows(tmp_path / "bad.jsonl", [ENT, {"premise": "p", "label": "neutral"}])
    assert main(["tasks", "check", str(bad)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (f"gptlab tasks: error: {bad}:2: missing field 'hypothesis' for an entailment task; "
                            "every row needs premise, hypothesis, label (see docs/TASKS.md)\n")


# ============================================================ derived tasks
@pytest.fixture(scope="module")
def made(tmp_path_factory, shakespeare_files) -> dict[str, dict[str, Path]]:
    return make_tasks(shakespeare_files, tmp_path_factory.mktemp("tasks") / "a", seed=0)


@pytest.fixture(scope="module")
def plays(shakespeare_files) -> dict[str, list[str]]:
    """Each play's lines as in the file (1-based: ``plays[name][line - 1]``)."""
    return {Path(f).name: Path(f).read_text(encoding="utf-8").split("\n") for f in shakespeare_files}


def rows_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def source_line(plays: dict[str, list[str]], row: dict[str, Any]) -> tuple[str, int, str]:
    name, line = row["source"].rsplit(":", 1)
    return name, int(line), plays[name][int(line) - 1].strip()


def test_make_writes_valid_splits_of_the_default_sizes(made, tmp_path, shakespeare_files, capsys):
    assert list(made) == list(DERIVED_TASKS)
    for name, paths in made.items():
        assert list(paths) == list(SPLITS)
        train = load_task(paths["train"])
        assert train.type == DERIVED_TASKS[name]
        sizes = [len(load_task(paths[s], train.type, train.labels if train.labels else None).rows) for s in SPLITS]
        assert sizes == [1000, 200, 500]
        rows = {s: {json.dumps(r, sort_keys=True) for r in rows_of(paths[s])} for s in SPLITS}
        assert sum(map(len, rows.values())) == 1700  # no row twice, within or across splits
    # same seed through the CLI: byte-identical files; another seed: every file differs
    out = tmp_path / "b"
    assert main(["tasks", "make", "--corpus", *shakespeare_files, "--out", str(out), "--seed", "0"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"{out / name}: {DERIVED_TASKS[name]}, train 1,000, val 200, test 500" for name in DERIVED_TASKS]
    other = make_tasks(shakespeare_files, tmp_path / "c", seed=1)
    for name, paths in made.items():
        for split, path in paths.items():
            assert (out / name / f"{split}.jsonl").read_bytes() == path.read_bytes()
            assert other[name][split].read_bytes() != path.read_bytes()


def test_splits_come_from_disjoint_parts_of_each_play(made):
    for name in ("cloze", "lastword"):
        lines: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
        for split in SPLITS:
            for row in rows_of(made[name][split]):
                play, line = row["source"].rsplit(":", 1)
                lines[play][split].append(int(line))
        for play, by_split in lines.items():
            spans = [(min(by_split[s]), max(by_split[s])) for s in SPLITS if by_split[s]]
            assert all(a[1] < b[0] for a, b in zip(spans, spans[1:])), (name, play, spans)
    passages = {s: {t for r in rows_of(made["same_source"][s]) for t in (r["text_a"], r["text_b"])} for s in SPLITS}
    assert sum(map(len, passages.values())) == 2 * 1700  # every passage used once, in one split


def test_cloze_rows_are_story_cloze_style(made, plays):
    for split in SPLITS:
        rows = rows_of(made["cloze"][split])
        for row in rows:
            name, line, text = source_line(plays, row)
            assert row["choices"][row["label"]] == text
            assert len(row["choices"]) == len(set(row["choices"])) == 4
            assert all(len(c) >= 20 for c in row["choices"])
            before = [s.strip() for s in plays[name][:line - 1] if s.strip()]
            assert row["context"] == "\n".join(before[-4:])
    counts = Counter(r["label"] for r in rows_of(made["cloze"]["train"]))
    assert sorted(counts) == [0, 1, 2, 3] and all(200 <= c <= 300 for c in counts.values()), counts


def test_same_source_is_balanced_and_labelled_by_play(made, plays):
    where = defaultdict(set)  # each two-line passage -> the plays it occurs in
    for name, lines in plays.items():
        kept = [s.strip() for s in lines if s.strip()]
        for i in range(len(kept) - 1):
            where[f"{kept[i]}\n{kept[i + 1]}"].add(name)
    for split, size in zip(SPLITS, (1000, 200, 500)):
        rows = rows_of(made["same_source"][split])
        assert Counter(r["label"] for r in rows) == {0: size // 2, 1: size // 2}
        for r in rows:
            assert where[r["text_a"]] and where[r["text_b"]]
            assert bool(where[r["text_a"]] & where[r["text_b"]]) == (r["label"] == 1)


def test_lastword_answers_are_the_last_words(made, plays):
    for split in SPLITS:
        for row in rows_of(made["lastword"][split]):
            _, _, text = source_line(plays, row)
            answer = row["answer"]
            m = re.fullmatch(rf"(.*\S) {answer}\W*", text)
            assert m and row["prompt"].endswith("\n" + m[1]) and row["prompt"].count("\n") == 4
            assert answer.isalpha() and len(answer) >= 3 and not text.isupper()
            assert answer.casefold() not in {"the", "and", "you", "him", "her", "not"}  # no top-100 corpus word
            assert re.search(rf"\b{answer}\b", row["prompt"], re.IGNORECASE)  # the context names it


def test_one_file_labels_same_source_by_position(tmp_path, shakespeare_files):
    play = shakespeare_files[0]
    paths = make_tasks([play], tmp_path / "one", seed=3, n=200)["same_source"]
    kept = [s.strip() for s in Path(play).read_text(encoding="utf-8").split("\n") if s.strip()]
    position = {f"{kept[i]}\n{kept[i + 1]}": i for i in range(len(kept) - 1)}
    for split, size in zip(SPLITS, (200, 40, 100)):
        rows = rows_of(paths[split])
        assert Counter(r["label"] for r in rows) == {0: size // 2, 1: size // 2}
        for r in rows:
            gap = abs(position[r["text_a"]] - position[r["text_b"]])
            assert gap <= 20 if r["label"] else gap >= 200


def test_make_refuses_small_or_unsuitable_corpora(tmp_path, capsys):
    small = [tmp_path / f"small{k}.txt" for k in (1, 2)]
    for k, path in enumerate(small):
        path.write_text("".join(f"This is line number {i} of small corpus {k}.\n" for i in range(30)))
    # 18 lines of each file for train, 3 for val: too few for a window of 4 + 1 lines
    with pytest.raises(DataError, match=r"^the corpus is too small for the val split of cloze \(60 non-empty "
                                        r"lines\); pass more text to --corpus$"):
        make_tasks(small, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(DataError, match="blank.txt: the file has no text; leave it out of --corpus"):
        make_tasks([tmp_path / "blank.txt"], tmp_path / "out")
    rows = write_rows(tmp_path / "rows.jsonl", [{"text": "x"}])
    assert main(["tasks", "make", "--corpus", str(rows), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (f"gptlab tasks: error: {rows}: tasks are made from plain-text files "
                                       "(.txt/.md, optionally .gz); pass those to --corpus\n")
    with pytest.raises(DataError, match="--size 0: give at least 1 training row per task"):
        make_tasks(small, tmp_path / "out", n=0)


def test_unlabelled_rows_only_when_asked(tmp_path):
    path = tmp_path / "new.jsonl"
    path.write_text('{"text": "a new text"}\n{"text": "another", "label": "pos"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"new\.jsonl:1: missing field 'label'"):
        load_task(path, "classification")
    task = load_task(path, "classification", labels=["neg", "pos"], require_label=False)
    assert task.rows[0] == {"text": "a new text"} and task.labels == ["neg", "pos"]
    with pytest.raises(DataError, match=r"new\.jsonl:2: label 'pos' is not one of 'neg'"):
        load_task(path, "classification", labels=["neg"], require_label=False)
