"""Task files: the five downstream formats, their validator, and three tasks derived from any plain text.

A task file is JSON lines (optionally ``.gz``), one example per line. The same
files feed GPT-1 fine-tuning and GPT-2/3 in-context evaluation, so a task is
written once and run both ways. ``load_task`` checks every row and names the
file and line of the first bad one; ``make_tasks`` derives ``cloze``,
``same_source`` and ``lastword`` from a corpus so that everything runs offline::

    gptlab tasks check data/sst2/train.jsonl
    gptlab tasks make --corpus plays/*.txt --out tasks/

The formats and the exact derivation rules are in docs/TASKS.md.
"""

from __future__ import annotations

import functools
import math
import os
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from .atomic import atomic_write_jsonl
from .corpus import expand_inputs, json_lines, text_chunks
from .jsonsafe import json_type
from .errors import DataError

__all__ = ["TASK_TYPES", "TASK_FIELDS", "DERIVED_TASKS", "SPLITS", "Task", "load_task", "make_tasks"]

TASK_TYPES = ("classification", "entailment", "similarity", "multiple_choice", "completion")
TASK_FIELDS: dict[str, tuple[str, ...]] = {
    "classification": ("text", "label"),
    "entailment": ("premise", "hypothesis", "label"),
    "similarity": ("text_a", "text_b", "label"),
    "multiple_choice": ("context", "choices", "label"),
    "completion": ("prompt", "answer"),
}
DERIVED_TASKS = {"cloze": "multiple_choice", "same_source": "similarity", "lastword": "completion"}
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Task:
    """A validated task file: its rows, the line of each row, and the label classes.

    ``labels`` are the classes as strings for classification/entailment (sorted: integers
    numerically, then other strings, unless the caller passed the training split's),
    ``["0", "1"]`` for binary similarity, None for graded similarity, multiple choice and
    completion; ``label_values`` are the same classes as the rows write them (``1``, not
    ``"1"``), so that what gptlab writes back compares equal to the rows' labels.
    """

    type: str
    path: str
    rows: list[dict[str, Any]]
    lines: list[int]
    labels: list[str] | None
    label_values: list[Any] | None = None

    @property
    def graded(self) -> bool:
        """A similarity task scored on a scale: a regression target rather than classes."""
        return self.type == "similarity" and self.labels is None

    def label_index(self, row: dict[str, Any]) -> int:
        """The class of ``row``: its label's index in ``labels``, or the index of a multiple-choice row's answer."""
        if self.type == "multiple_choice":
            return int(row["label"])
        if self.labels is None:
            raise ValueError(f"{self.path}: a {'graded ' if self.graded else ''}{self.type} task has no classes")
        return self.labels.index(str(row["label"]))


# ================================================================== reading
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fields_of(task_type: str) -> str:
    return ", ".join(TASK_FIELDS[task_type])


def _infer_type(row: dict[str, Any], where: str) -> str:
    fits = [t for t in TASK_TYPES if set(TASK_FIELDS[t]) <= row.keys()]
    if len(fits) == 1:
        return fits[0]
    kinds = "; ".join(f"{t}: {_fields_of(t)}" for t in TASK_TYPES)
    if fits:
        raise DataError(f"{where}: the fields fit {' and '.join(fits)}; pass --type to choose ({kinds})")
    raise DataError(f"{where}: cannot tell the task type from the fields {', '.join(sorted(row)) or '(none)'}; "
                    f"rename them or pass --type ({kinds})")


def _check_text(value: Any, what: str, where: str) -> None:
    if not isinstance(value, str):
        raise DataError(f"{where}: {what} is {json_type(value)}, not a string; write the text in quotes")
    if not value.strip():
        raise DataError(f"{where}: {what} is empty; give it some text or drop the row")


def _shown(labels: Sequence[str]) -> str:
    shown = ", ".join(repr(x) for x in labels[:10])
    return shown + f", ... ({len(labels)} labels)" if len(labels) > 10 else shown


def _similarity_key(score: float) -> str:
    return str(int(score)) if score in (0, 1) else str(float(score))


def _check_row(row: dict[str, Any], task_type: str, where: str, known: Sequence[str] | None,
               require_label: bool = True) -> None:
    """Raise a ``where:``-prefixed DataError for the first problem; classification labels become strings."""
    for field in TASK_FIELDS[task_type]:
        if field not in row and (require_label or field != "label"):
            article = "an" if task_type[0] in "aeiou" else "a"
            raise DataError(f"{where}: missing field {field!r} for {article} {task_type} task; every row needs "
                            f"{_fields_of(task_type)} (see docs/TASKS.md)")
    for field in TASK_FIELDS[task_type]:
        if field not in ("label", "choices"):
            _check_text(row[field], f"field {field!r}", where)
    if task_type == "completion":
        return
    if task_type == "multiple_choice" and not isinstance(row["choices"], list):
        raise DataError(f"{where}: field 'choices' is {json_type(row['choices'])}; give a list of strings")
    if "label" not in row:  # an unlabelled row, accepted only with require_label=False
        return
    label = row["label"]
    if task_type == "multiple_choice":
        choices = row["choices"]
        if not isinstance(choices, list):
            raise DataError(f"{where}: field 'choices' is {json_type(choices)}; give a list of strings")
        if len(choices) < 2:
            raise DataError(f"{where}: {len(choices)} choice(s); a multiple_choice row needs at least 2")
        for i, choice in enumerate(choices):
            _check_text(choice, f"choice {i}", where)
        if not _is_int(label):
            raise DataError(f"{where}: label is {json_type(label)}; give the index of the right choice "
                            f"(0 to {len(choices) - 1})")
        if not 0 <= label < len(choices):
            raise DataError(f"{where}: label {label} is out of range for {len(choices)} choices; "
                            f"give an index from 0 to {len(choices) - 1}")
        return
    if task_type == "similarity":
        if isinstance(label, bool) or not isinstance(label, (int, float)) or not math.isfinite(label):
            what = label if isinstance(label, float) else json_type(label)  # NaN and Infinity parse as floats
            raise DataError(f"{where}: label is {what}; "
                            "a similarity label is a number (0/1, or a graded score)")
        key = _similarity_key(label)
    else:
        if isinstance(label, str):
            _check_text(label, "label", where)
        elif not _is_int(label):
            raise DataError(f"{where}: label is {json_type(label)}; write it as a string or an integer")
        key = str(label)
    if known is not None and key not in known:
        raise DataError(f"{where}: label {key!r} is not one of {_shown(known)} (the training split's labels); "
                        "fix the label or add examples of it to the training split")


def _label_order(label: str) -> tuple[int, int, str]:
    """Integers first, numerically (so "10" follows "9"), then other labels alphabetically; a total order."""
    return (0, int(label), label) if re.fullmatch(r"-?[0-9]{1,18}", label) else (1, 0, label)


def load_task(path: str | os.PathLike[str], task_type: str | None = None,
              labels: Sequence[str] | None = None, require_label: bool = True) -> Task:
    """Read and validate every row of a task file.

    ``task_type`` None infers the type from the first row's fields. ``labels`` is
    the training split's label set: pass it when loading val/test so that an
    unseen label is an error at its line and ``label_index`` agrees with training.
    ``require_label=False`` accepts rows without a label (new data to predict).
    """
    path = os.fspath(path)
    if task_type is not None and task_type not in TASK_TYPES:
        raise DataError(f"unknown task type {task_type!r}; use one of {', '.join(TASK_TYPES)}")
    known = [str(x) for x in labels] if labels is not None else None
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    for lineno, row in json_lines(path):
        where = f"{path}:{lineno}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: a row is a JSON object, not {json_type(row)}; write one {{...}} per line")
        task_type = task_type or _infer_type(row, where)
        _check_row(row, task_type, where, known, require_label)
        rows.append(row)
        lines.append(lineno)
    if not rows or task_type is None:
        raise DataError(f"{path}: no rows; a task file holds one JSON object per line (see docs/TASKS.md)")
    if known is not None and task_type in ("multiple_choice", "completion"):
        raise ValueError(f"labels apply to classification, entailment and similarity, not {task_type}")
    classes: list[str] | None
    if task_type in ("classification", "entailment"):
        classes = known if known is not None else sorted({str(r["label"]) for r in rows if "label" in r},
                                                         key=_label_order)
    elif task_type == "similarity":
        labelled = [r for r in rows if "label" in r]
        binary = all(r["label"] in (0, 1) for r in labelled) and (bool(labelled) or known is not None)
        for r in labelled:
            r["label"] = int(r["label"]) if binary else float(r["label"])
        classes = (known if known is not None else ["0", "1"]) if binary else None
    else:
        classes = None
    typed = {str(r["label"]): r["label"] for r in reversed(rows) if "label" in r}  # the first row's wins
    values = [typed.get(c, int(c) if task_type == "similarity" else c) for c in classes] if classes else None
    return Task(task_type, path, rows, lines, classes, values)


# ============================================================ derived tasks
# Each document's non-empty lines are cut by position: the first 60% feed train, the next 10%
# val, the last 30% test, so no line of one split appears in another (of any derived task).
SPLIT_CUTS = {"train": (0.0, 0.6), "val": (0.6, 0.7), "test": (0.7, 1.0)}
CLOZE_CONTEXT = 4       # lines of context before the line to pick
CLOZE_CHOICES = 4       # the true next line and 3 distractors
MIN_CHOICE_CHARS = 20   # shorter lines ("Ham.", "[Exit.]") are never the answer or a distractor
FAR_LINES = 100         # a distractor from the same document lies at least this far from the answer
PAIR_LINES = 2          # a same_source passage: 2 consecutive lines ...
MIN_PAIR_CHARS = 40     # ... of at least 40 characters together
NEAR_LINES, APART_LINES = 20, 200  # one document: same region vs far apart (in lines)
LASTWORD_LINES = 5      # a lastword passage: 5 consecutive lines
COMMON_WORDS = 100      # a lastword answer is none of the corpus's 100 most frequent words ("the", "you")
_LAST_WORD = re.compile(r"(.*\S) ([^\W\d_]{3,})\W*")  # a last line ending in a word of >= 3 letters
_WORD = re.compile(r"[^\W\d_]+")


@dataclass(frozen=True)
class _Doc:
    name: str
    lines: list[tuple[int, str]]  # (line number in the file, stripped text) of the non-empty lines


Block = tuple[int, int, int]  # (document index, first line, end line) of one split's part of a document
Builder = Callable[[list[_Doc], list[Block], random.Random, int], list[dict[str, Any]]]  # n rows of a task


def _read_docs(corpus_files: Sequence[str | os.PathLike[str]]) -> list[_Doc]:
    docs = []
    for src in expand_inputs(corpus_files):
        if src.kind != "text":
            raise DataError(f"{src.path}: tasks are made from plain-text files (.txt/.md, optionally .gz); "
                            "pass those to --corpus")
        text = "".join(chunk for _, chunk in text_chunks(src.path))
        lines = [(i, s) for i, line in enumerate(text.split("\n"), 1) if (s := line.strip())]
        if not lines:
            raise DataError(f"{src.path}: the file has no text; leave it out of --corpus")
        docs.append(_Doc(Path(src.path).name, lines))
    return docs


def _blocks(docs: list[_Doc], split: str) -> list[Block]:
    lo, hi = SPLIT_CUTS[split]
    return [(d, round(lo * len(doc.lines)), round(hi * len(doc.lines))) for d, doc in enumerate(docs)]


def _source(doc: _Doc, i: int) -> str:
    return f"{doc.name}:{doc.lines[i][0]}"


def _pick(rng: random.Random, candidates: Sequence[int], ok: Callable[[int], bool]) -> int | None:
    """A random candidate that passes ``ok``, trying a bounded number of times (the corpus may have none)."""
    for _ in range(100 if candidates else 0):
        c = rng.choice(candidates)
        if ok(c):
            return c
    return None


def _distractors(docs: list[_Doc], pool: list[tuple[int, int]], d: int, j: int,
                 rng: random.Random) -> list[str] | None:
    """Lines of ``pool`` from another document or FAR_LINES from line ``j`` of document ``d``, all different."""
    picked = [docs[d].lines[j][1]]

    def fits(k: int) -> bool:
        e, i = pool[k]
        return (e != d or abs(i - j) >= FAR_LINES) and docs[e].lines[i][1] not in picked

    for _ in range(CLOZE_CHOICES - 1):
        k = _pick(rng, range(len(pool)), fits)
        if k is None:
            return None
        picked.append(docs[pool[k][0]].lines[pool[k][1]][1])
    return picked[1:]


def _cloze(docs: list[_Doc], blocks: list[Block], rng: random.Random, n: int) -> list[dict[str, Any]]:
    """Four lines of context; the true next line among three distractor lines from elsewhere."""
    pool = [(d, i) for d, lo, hi in blocks for i in range(lo, hi) if len(docs[d].lines[i][1]) >= MIN_CHOICE_CHARS]
    windows = []  # context + answer windows, not overlapping
    for d, lo, hi in blocks:
        i = lo
        while i + CLOZE_CONTEXT < hi:
            if len(docs[d].lines[i + CLOZE_CONTEXT][1]) >= MIN_CHOICE_CHARS:
                windows.append((d, i))
                i += CLOZE_CONTEXT + 1
            else:
                i += 1
    rng.shuffle(windows)
    made: list[tuple[tuple[int, int], dict[str, Any]]] = []
    for d, i in windows:
        if len(made) == n:
            break
        j = i + CLOZE_CONTEXT
        answer = docs[d].lines[j][1]
        distractors = _distractors(docs, pool, d, j, rng)
        if distractors is None:
            continue
        label = rng.randrange(CLOZE_CHOICES)
        made.append(((d, i), {"context": "\n".join(s for _, s in docs[d].lines[i:j]),
                              "choices": distractors[:label] + [answer] + distractors[label:],
                              "label": label, "source": _source(docs[d], j)}))
    return [row for _, row in sorted(made, key=lambda m: m[0])]


def _is_pair(a: tuple[int, int, str], b: tuple[int, int, str], same: bool, one_doc: bool) -> bool:
    """The labelling rule: same document (one document: within NEAR_LINES) vs another (APART_LINES away)."""
    if one_doc:
        return abs(a[1] - b[1]) <= NEAR_LINES if same else abs(a[1] - b[1]) >= APART_LINES
    return (a[0] == b[0]) == same


def _same_source(docs: list[_Doc], blocks: list[Block], rng: random.Random, n: int) -> list[dict[str, Any]]:
    """Two passages; 1 when they come from the same document (one document: the same region), else 0."""
    passages: list[tuple[int, int, str]] = []  # (document, first line, text), not overlapping
    for d, lo, hi in blocks:
        i = lo
        while i + PAIR_LINES <= hi:
            text = "\n".join(s for _, s in docs[d].lines[i:i + PAIR_LINES])
            if len(text) >= MIN_PAIR_CHARS:
                passages.append((d, i, text))
                i += PAIR_LINES
            else:
                i += 1
    by_doc: dict[int, list[int]] = {}
    for p, (d, _, _) in enumerate(passages):
        by_doc.setdefault(d, []).append(p)
    one_doc = len(docs) == 1
    order = list(range(len(passages)))
    rng.shuffle(order)
    used: set[int] = set()
    rows: list[dict[str, Any]] = []
    want = 1  # alternate the wanted label: balanced to within one row
    for a in order:
        if len(rows) == n:
            break
        if a in used:
            continue
        if want and one_doc:  # one document: passages are in line order, so neighbours are near
            candidates: Sequence[int] = range(max(0, a - NEAR_LINES), min(len(passages), a + NEAR_LINES + 1))
        else:
            candidates = by_doc[passages[a][0]] if want else range(len(passages))
        b = _pick(rng, candidates, lambda b: b != a and b not in used
                  and _is_pair(passages[a], passages[b], bool(want), one_doc))
        if b is None:
            continue
        used |= {a, b}
        rows.append({"text_a": passages[a][2], "text_b": passages[b][2], "label": want})
        want = 1 - want
    return rows


def _common_words(docs: list[_Doc]) -> frozenset[str]:
    counts: Counter[str] = Counter()
    for doc in docs:
        counts.update(_WORD.findall("\n".join(s for _, s in doc.lines).casefold()))
    return frozenset(w for w, _ in counts.most_common(COMMON_WORDS))


def _cut_last_word(lines: list[str], common: frozenset[str]) -> tuple[str, str] | None:
    """``(prompt, word)`` when the passage ends in an uncommon word that also occurs earlier in it, else None.

    The last line must be a line of text (>= MIN_CHOICE_CHARS, not all capitals), not a speaker's name.
    """
    m = _LAST_WORD.fullmatch(lines[-1])
    if not m or len(lines[-1]) < MIN_CHOICE_CHARS or lines[-1].isupper() or m[2].casefold() in common:
        return None
    prompt, word = "\n".join([*lines[:-1], m[1]]), m[2].casefold()
    # the substring test is a cheap filter before splitting the prompt into words
    if word in prompt.casefold() and word in {w.casefold() for w in _WORD.findall(prompt)}:
        return prompt, m[2]
    return None


def _lastword(docs: list[_Doc], blocks: list[Block], rng: random.Random, n: int, *,
              common: frozenset[str]) -> list[dict[str, Any]]:
    """LAMBADA-style: predict a passage's last word, one that occurs earlier so that the context helps."""
    found = []  # passages not overlapping
    for d, lo, hi in blocks:
        i = lo
        while i + LASTWORD_LINES <= hi:
            cut = _cut_last_word([s for _, s in docs[d].lines[i:i + LASTWORD_LINES]], common)
            if cut:
                found.append(((d, i), {"prompt": cut[0], "answer": cut[1],
                                       "source": _source(docs[d], i + LASTWORD_LINES - 1)}))
                i += LASTWORD_LINES
            else:
                i += 1
    return [row for _, row in sorted(rng.sample(found, min(n, len(found))), key=lambda m: m[0])]


def make_tasks(corpus_files: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str], *,
               seed: int = 0, n: int = 1000) -> dict[str, dict[str, Path]]:
    """Write ``out_dir/<task>/{train,val,test}.jsonl`` for cloze, same_source and lastword.

    ``n`` train rows per task, ``n // 5`` val and ``n // 2`` test (at least 1), or fewer
    where the corpus yields fewer. The same corpus and seed give the same files.
    """
    if n < 1:
        raise DataError(f"--size {n}: give at least 1 training row per task")
    sizes = {"train": n, "val": max(1, n // 5), "test": max(1, n // 2)}
    docs = _read_docs(corpus_files)
    builders: dict[str, Builder] = {"cloze": _cloze, "same_source": _same_source,
                                    "lastword": functools.partial(_lastword, common=_common_words(docs))}
    built: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for name, build in builders.items():
        built[name] = {}
        for split in SPLITS:
            rows = build(docs, _blocks(docs, split), random.Random(f"{seed}:{name}:{split}"), sizes[split])
            if not rows:
                raise DataError(f"the corpus is too small for the {split} split of {name} "
                                f"({sum(len(d.lines) for d in docs):,} non-empty lines); pass more text to --corpus")
            built[name][split] = rows
    out = Path(out_dir)
    return {name: {split: atomic_write_jsonl(out / name / f"{split}.jsonl", rows) for split, rows in splits.items()}
            for name, splits in built.items()}
