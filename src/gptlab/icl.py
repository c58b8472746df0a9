"""In-context (zero/one/few-shot) evaluation, following the GPT-3 paper's protocol.

    from gptlab.icl import evaluate_icl
    from gptlab.tasks import load_task
    evaluate_icl(model, tokenizer, load_task("hellaswag.jsonl"), shots=[0, 1, 4, 16])
    # {"task": ..., "type": "multiple_choice", "results": {"0": {"acc": .., "acc_norm": .., ...}, ...}}

    gptlab eval icl --model RUN_DIR --task FILE --shots 0,1,4,16 --out DIR

For each example, k demonstrations are drawn at random from ``train`` (or from
the task's other rows), each rendered with its answer, joined by
``DEMO_SEPARATOR`` and followed by the example's context; the model then scores
every candidate continuation with ``Engine.score``. Contexts come from
``TEMPLATES``; an answer follows its context after one space (none when the
context ends in whitespace) and is tokenized on its own, so its tokens are the
same in every prompt.

- multiple choice, and classification / entailment / binary similarity as
  multiple choice over verbalised labels (the label strings; "no"/"yes" for
  similarity): ``acc`` picks the choice with the highest summed log-prob,
  ``acc_norm`` the highest log-prob per token (GPT-3's rule, which does not favour
  short choices), ``acc_norm_chars`` the highest log-prob per character (what
  lm-evaluation-harness calls ``acc_norm``, to compare with its published numbers);
  ``chance`` is the accuracy of guessing (the mean of 1 / choices);
- completion: ``acc`` is exact match of the greedy continuation. Greedy decoding
  of len(answer) tokens reproduces the answer exactly when every answer token is
  the argmax given the prompt and the answer tokens before it, which is
  ``Engine.score``'s is-greedy flag, so no decoding is needed. With one-word
  answers this is LAMBADA's last-word accuracy (like lm-evaluation-harness, what
  the model would generate after the word is not checked).

A prompt that does not fit the model's context loses whole demonstrations, the
ones farthest from the example first (counted as ``truncated``, and ``demos`` is
the mean number of demonstrations that stayed); an example that does not fit even
alone is skipped (counted as ``skipped``, with a warning). ``template`` replaces a
task type's context template (``str.format`` over the row's fields).
"""

from __future__ import annotations

import io
import random
import warnings
from typing import Any, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .engine import Engine
from .errors import UserError, first_line
from .model import GPT
from .tokenizer import Tokenizer
from .tasks import Task

__all__ = ["TEMPLATES", "DEMO_SEPARATOR", "evaluate_icl", "render", "sample_demos", "markdown_table",
           "plot_accuracy"]

# Context of an example, by task type (str.format over the row); its answer follows as a continuation.
TEMPLATES = {
    "classification": "{text}\nLabel:",
    "entailment": "{premise}\nHypothesis: {hypothesis}\nLabel:",
    "similarity": "Sentence 1: {text_a}\nSentence 2: {text_b}\nQuestion: Do both sentences mean the same thing?\n"
                  "Answer:",
    "multiple_choice": "{context}",
    "completion": "{prompt}",
}
DEMO_SEPARATOR = "\n\n"  # between demonstrations, and between the last one and the example
SIMILARITY_WORDS = {"0": "no", "1": "yes"}


def _continuation(context: str, answer: str) -> str:
    """The answer as it follows the context: after one space, unless whitespace is already there."""
    if not context or context[-1].isspace() or answer[:1].isspace():
        return answer
    return " " + answer


def render(task: Task, row: dict[str, Any], template: str | None = None) -> tuple[str, list[str], int]:
    """(context, candidate continuations, index of the correct one) of a row; completion has one candidate."""
    try:
        context = (template or TEMPLATES[task.type]).format(**row)
    except (KeyError, IndexError, ValueError) as e:
        fields = ", ".join("{" + f + "}" for f in row)
        raise UserError(f"template {template!r} does not fit the rows of {task.path} ({first_line(e)}): use "
                        f"their fields, {fields}") from None
    if task.type == "completion":
        return context, [_continuation(context, str(row["answer"]))], 0
    gold = task.label_index(row)
    if task.type == "multiple_choice":
        choices = [str(c) for c in row["choices"]]
    elif task.type == "similarity":
        choices = [SIMILARITY_WORDS[label] for label in task.labels or []]
    else:
        choices = list(task.labels or [])
    return context, [_continuation(context, c) for c in choices], gold


def sample_demos(example: int, pool_size: int, k: int, seed: int, exclude_example: bool) -> list[int]:
    """Indices of k demonstrations for one example: the first k of a random permutation of the pool.

    Seeded by (seed, example), so each example's draw is reproducible and does
    not depend on the other examples or on which shot counts are run; the k-shot
    draw is a prefix of the (k+1)-shot one, which makes curves over k less noisy.
    With ``exclude_example`` the pool is the task itself minus ``example``.
    """
    rng = random.Random(f"icl:{seed}:{example}")
    n = pool_size - 1 if exclude_example else pool_size
    moved: dict[int, int] = {}  # a lazy Fisher-Yates shuffle: only the first k swaps
    drawn = []
    for j in range(k):
        r = rng.randrange(j, n)
        drawn.append(moved.get(r, r))
        moved[r] = moved.get(j, j)
    return [d + 1 if exclude_example and d >= example else d for d in drawn]


def _check(task: Task, train: Task | None, shots: Sequence[int], max_examples: int | None) -> None:
    for t in (task, train):
        if t is None:
            continue
        if t.type not in TEMPLATES:
            raise UserError(f"{t.path}: task type {t.type!r} has no in-context template")
        if t.graded:
            raise UserError(f"{t.path}: graded similarity (float labels) is not supported in in-context "
                            f"evaluation; give binary labels 0/1")
    if train is not None and train.type != task.type:
        raise UserError(f"--train {train.path} is a {train.type} task but {task.path} is {task.type}")
    if not shots or min(shots) < 0:
        raise UserError(f"shots {list(shots)}: give one or more counts >= 0")
    if max_examples is not None and max_examples < 1:
        raise UserError(f"max_examples={max_examples} must be >= 1")
    pool = len(train.rows) if train is not None else len(task.rows) - 1
    if max(shots) > pool:
        where = f"{train.path} has {pool} rows" if train is not None else \
            f"{task.path} has {pool} other rows to draw from (give a train task, --train)"
        raise UserError(f"{max(shots)} shots need {max(shots)} demonstrations but {where}")


def evaluate_icl(model: GPT, tokenizer: Tokenizer | None, task: Task, shots: list[int], *, train: Task | None = None,
                 seed: int = 0, max_examples: int | None = None, batch_size: int = 16,
                 model_name: str | None = None, template: str | None = None) -> dict[str, Any]:
    """Accuracy of ``model`` on ``task`` for each number of shots (see the module docstring).

    ``max_examples`` evaluates the first N rows (demonstrations still come from
    every other row). Returns ``{"task", "type", "model", "seed", "template", "results":
    {"k": {"acc", "acc_norm", "acc_norm_chars", "chance", "n", "skipped", "truncated",
    "demos"}}}``; the normalised accuracies and ``chance`` are None for completion,
    accuracies are None when every example was skipped.
    """
    if tokenizer is None:
        raise UserError(f"model {model_name or '(unnamed)'} has no tokenizer: in-context evaluation needs "
                        f"text; convert or train the model with its tokenizer")
    _check(task, train, shots, max_examples)
    engine = Engine(model, tokenizer)
    room = model.config.block_size + 1  # Engine.score: the last token is predicted, never fed
    pool = train if train is not None else task
    demo_text: dict[int, str] = {}

    def demo(j: int) -> str:
        if j not in demo_text:
            context, conts, gold = render(pool, pool.rows[j], template)
            demo_text[j] = context + conts[gold]
        return demo_text[j]

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text) or [tokenizer.eos_id]  # an empty prompt follows end-of-text

    n_eval = len(task.rows) if max_examples is None else min(max_examples, len(task.rows))
    examples = []  # (row index, context, continuations, their ids, gold) of the examples that fit alone
    skipped = 0
    for i in range(n_eval):
        context, conts, gold = render(task, task.rows[i], template)
        cont_ids = [tokenizer.encode(c) for c in conts]
        if len(encode(context)) + max(map(len, cont_ids)) > room:
            skipped += 1
            continue
        examples.append((i, context, conts, cont_ids, gold))
    if skipped:
        warnings.warn(f"{task.path}: {skipped} of {n_eval} examples do not fit the model's context of "
                      f"{model.config.block_size} tokens even without demonstrations; skipped", stacklevel=2)

    choice = task.type != "completion"
    chance = sum(1 / len(conts) for _, _, conts, _, _ in examples) / len(examples) if examples and choice else None
    results: dict[str, Any] = {}
    for k in shots:
        requests: list[tuple[list[int], list[int]]] = []
        truncated = kept = 0
        for i, context, _, cont_ids, _ in examples:
            demos = [demo(j) for j in sample_demos(i, len(pool.rows), k, seed, exclude_example=train is None)]
            longest = max(map(len, cont_ids))
            ids = encode(DEMO_SEPARATOR.join(demos + [context]))
            while demos and len(ids) + longest > room:  # drop the demonstration farthest from the example
                demos.pop(0)
                ids = encode(DEMO_SEPARATOR.join(demos + [context]))
            truncated += int(len(demos) < k)
            kept += len(demos)
            requests.extend((ids, c) for c in cont_ids)
        scores = iter(engine.score(requests, batch_size=batch_size))
        hits = hits_norm = hits_chars = 0
        for _, _, conts, cont_ids, gold in examples:
            got = [next(scores) for _ in cont_ids]
            if not choice:
                hits += got[0][2]
                continue
            hits += max(range(len(got)), key=lambda c: got[c][0]) == gold
            hits_norm += max(range(len(got)), key=lambda c: got[c][0] / got[c][1]) == gold
            hits_chars += max(range(len(got)), key=lambda c: got[c][0] / max(1, len(conts[c]))) == gold
        n = len(examples)
        results[str(k)] = {
            "acc": hits / n if n else None,
            "acc_norm": hits_norm / n if choice and n else None,
            "acc_norm_chars": hits_chars / n if choice and n else None,
            "chance": chance, "n": n, "skipped": skipped, "truncated": truncated,
            "demos": kept / n if n else None,
        }
    return {"task": str(task.path), "type": task.type, "model": model_name, "seed": seed,
            "template": template or TEMPLATES[task.type], "results": results}


# ------------------------------------------------------------------ reports
def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.4f}"


def markdown_table(by_model: dict[str, dict[str, Any]]) -> str:
    """One row per model and shot count: accuracies, chance, and what the context allowed."""
    lines = ["| model | shots | acc | acc_norm | acc_norm_chars | chance | n | skipped | truncated | demos |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, result in by_model.items():
        for k, r in result["results"].items():
            demos = "–" if r["demos"] is None else f"{r['demos']:.2f}"
            lines.append(f"| {name} | {k} | {_fmt(r['acc'])} | {_fmt(r['acc_norm'])} | {_fmt(r['acc_norm_chars'])} | "
                         f"{_fmt(r['chance'])} | {r['n']} | {r['skipped']} | {r['truncated']} | {demos} |")
    return "\n".join(lines) + "\n"


def plot_accuracy(by_model: dict[str, dict[str, Any]], title: str = "") -> bytes:
    """PNG of accuracy vs shots (GPT-3's figure): one line per model and scoring rule, symlog x so 0 shows."""
    fig = Figure(figsize=(7, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ticks: set[int] = set()
    for n, (name, result) in enumerate(by_model.items()):
        color = f"C{n % 10}"
        for metric, style in (("acc", "o-"), ("acc_norm", "s--")):
            points = sorted((int(k), r[metric]) for k, r in result["results"].items() if r[metric] is not None)
            if points:
                ax.plot(*zip(*points), style, color=color, label=f"{name} {metric}", markersize=4)
                ticks.update(k for k, _ in points)
    chances = {r["chance"] for result in by_model.values() for r in result["results"].values()} - {None}
    for chance in chances:
        ax.axhline(chance, color="0.5", linestyle=":", linewidth=1, label="chance" if len(chances) == 1 else None)
    ax.set_xscale("symlog", linthresh=1)
    if ticks:
        ax.set_xticks(sorted(ticks), [str(k) for k in sorted(ticks)])
        ax.legend(fontsize=8)
    ax.set_xlabel("number of examples in context (K)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)  # the whole scale: chance and the gap to 1 in view
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()

