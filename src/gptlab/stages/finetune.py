"""GPT-1 supervised fine-tuning: a linear head on the hidden state at ``[extract]``.

    gptlab finetune --task classification --model runs/base --train train.jsonl --val val.jsonl \\
        --out runs/clf [--lm-coef 0.5 --max-steps N --batch-size 16 --lr 2.5e-4]
    gptlab predict --model runs/clf --input test.jsonl --out predictions.jsonl

Inputs are rewritten as token sequences exactly as in GPT-1 (``transform``)::

    classification   [start] text [extract]
    entailment       [start] premise [delim] hypothesis [extract]
    similarity       [start] a [delim] b [extract]  and  [start] b [delim] a [extract];
                     the two [extract] states are added before the head
    multiple_choice  [start] context [delim] choice_i [extract] for each choice;
                     one scalar per sequence, softmax over the choices

The objective is ``L3 = L2 + lm_coef * L1``: the head's loss (cross-entropy;
MSE for graded similarity) plus the language-modelling loss on the same input
sequences (``lm_coef`` 0 skips the LM head entirely). The special tokens are
added to the tokenizer when missing; new ids grow the embedding (and the tied
LM head) with N(0, 0.02) rows that train with everything else.

A fine-tuned run directory is an ordinary run directory (``load_run`` /
``gptlab generate`` read its backbone, grown vocabulary included) plus
``head.safetensors`` (``weight``, ``bias``) and a ``finetune`` section in
``config.json``: task_type, labels, lm_coef, n_classes (the head's outputs:
1 for graded similarity and multiple choice), clf_dropout, max_len (the
sequence length trained with, used by ``predict``) and the head file's name,
sha256 and size (checked on load).

Defaults (``FINETUNE_TRAIN``) follow GPT-1 scaled for small models: 3 epochs,
batch 16, peak lr 2.5e-4 (GPT-1's 6.25e-5 barely moves small models), warmup
over the first 10% of steps then cosine decay to 0 (GPT-1 decays linearly; the
shared trainer's schedule is cosine), weight decay 0.01, classifier dropout 0.1,
and 10 evaluations/checkpoints per run.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..atomic import atomic_write_text
from ..config import Config
from ..errors import CheckpointError, ConfigError, DataError, TokenizerError, UserError, naming
from ..heads import CLF_DROPOUT, TaskModel, TaskModelConfig
from ..hf import HFHead
from ..lora import add_lora
from ..model import GPT, with_tokens
from ..runs import load_run, load_with_head, save_model
from ..tasks import Task, load_task
from ..tokenizer import DELIM, EXTRACT, START, Tokenizer
from ..train.config import Given
from ..train.dist import DistEnv, resolve_device
from ..train.loop import Stage, TrainResult
from .common import StageRun, TrainDefaults, draw_weighted

__all__ = ["FINETUNE_TYPES", "HEAD_FILE", "FINETUNE_TRAIN", "FinetuneConfig", "FinetuneStage", "check_task_type",
           "Example", "transform", "special_ids", "add_finetune_tokens", "encode_task", "collate", "classifier_loss",
           "classification_metrics", "regression_metrics", "run_finetune", "head_outputs", "save_finetuned",
           "load_finetuned", "predict"]

FINETUNE_TYPES = ("classification", "entailment", "similarity", "multiple_choice")
HEAD_FILE = "head.safetensors"
# GPT-1 scaled for small models: 3 epochs, batch 16, lr 2.5e-4 (GPT-1's 6.25e-5 barely moves small models).
FINETUNE_TRAIN = TrainDefaults({"batch_size": 16, "lr": 2.5e-4, "min_lr": 0.0, "weight_decay": 0.01}, epochs=3)


@dataclass
class FinetuneConfig(Config):
    """GPT-1 fine-tuning's own settings (config.json's ``finetune`` section)."""

    section: ClassVar[str] = "finetune"

    task_type: str = "classification"
    """classification, entailment, similarity or multiple_choice"""
    lm_coef: float = 0.5
    """λ: weight of the auxiliary LM loss (L3 = L2 + λ·L1; 0 disables it)"""

    def validate(self) -> None:
        check_task_type(self.task_type)
        self.need(self.lm_coef >= 0, f"lm_coef={self.lm_coef} must be >= 0 (0 disables the auxiliary LM loss)")


def check_task_type(task_type: str) -> None:
    if task_type == "completion":
        raise UserError("task type 'completion' has no classifier to fine-tune (it is scored in context: "
                        f"gptlab eval icl); use one of {', '.join(FINETUNE_TYPES)}")
    if task_type not in FINETUNE_TYPES:
        raise UserError(f"unknown task type {task_type!r}; use one of {', '.join(FINETUNE_TYPES)}")


# ============================================================ transformations
def special_ids(tokenizer: Tokenizer) -> tuple[int, int, int]:
    """The ids of ``[start]``, ``[delim]``, ``[extract]``; they must exist (see ``add_finetune_tokens``)."""
    specials = tokenizer.special_tokens
    missing = [t for t in (START, DELIM, EXTRACT) if t not in specials]
    if missing:
        raise TokenizerError(f"the tokenizer has no {', '.join(missing)}: add them with add_finetune_tokens "
                             f"(gptlab finetune does)")
    return specials[START], specials[DELIM], specials[EXTRACT]


def _fit_pair(a: list[int], b: list[int], budget: int) -> tuple[list[int], list[int]]:
    """Keep both texts' beginnings within ``budget``: the shorter stays whole if it fits in half."""
    keep_a = min(len(a), max(budget - len(b), (budget + 1) // 2))
    return a[:keep_a], b[: min(len(b), budget - keep_a)]


def transform(task_type: str, row: Mapping[str, Any], tokenizer: Tokenizer, max_len: int) -> list[list[int]]:
    """GPT-1's input transformation of one task row: token ids per sequence, each at most ``max_len``.

    Only text is truncated, never the special tokens: a classification text
    and similarity texts lose their ends (similarity shortens the longer text
    first); entailment premises and multiple-choice contexts lose their
    beginnings first (the part nearest the hypothesis/choice matters most),
    then the hypothesis/choice its end. One context length serves every choice.
    """
    check_task_type(task_type)
    start, delim, extract = special_ids(tokenizer)
    n_special = 2 if task_type == "classification" else 3
    if max_len < n_special:
        raise ConfigError(f"max_len={max_len} cannot hold the {n_special} special tokens of a {task_type} input")
    budget = max_len - n_special
    enc = tokenizer.encode
    if task_type == "classification":
        return [[start, *enc(row["text"])[:budget], extract]]
    if task_type == "similarity":
        a, b = _fit_pair(enc(row["text_a"]), enc(row["text_b"]), budget)
        return [[start, *a, delim, *b, extract], [start, *b, delim, *a, extract]]
    if task_type == "entailment":
        context, options = enc(row["premise"]), [enc(row["hypothesis"])]
    else:
        context, options = enc(row["context"]), [enc(c) for c in row["choices"]]
    keep = min(len(context), max(0, budget - max(map(len, options))))
    context = context[len(context) - keep:]
    return [[start, *context, delim, *opt[: budget - keep], extract] for opt in options]


def add_finetune_tokens(gpt: GPT, tokenizer: Tokenizer, dropout: float | None = None) -> GPT:
    """Ensure ``[start]``/``[delim]``/``[extract]`` exist; ``gpt`` grown to hold them (``model.with_tokens``)."""
    return with_tokens(gpt, tokenizer, [START, DELIM, EXTRACT], dropout)


def classifier_loss(out: torch.Tensor, labels: torch.Tensor, regression: bool) -> torch.Tensor:
    return F.mse_loss(out.float(), labels.float()) if regression else F.cross_entropy(out.float(), labels)


# ======================================================================= data
class Example(NamedTuple):
    seqs: list[list[int]]  # token ids per sequence
    label: float | int | None  # class / choice index, a graded score, or None (unlabelled)


def encode_task(task: Task, tokenizer: Tokenizer, max_len: int, labelled: bool = True) -> list[Example]:
    """``transform`` every row; an unencodable row is reported as ``file:line``."""
    out = []
    for row, line in zip(task.rows, task.lines):
        with naming(f"{task.path}:{line}"):
            seqs = transform(task.type, row, tokenizer, max_len)
        label = None
        if labelled:
            label = float(row["label"]) if task.graded else task.label_index(row)
        out.append(Example(seqs, label))
    return out


def collate(examples: Sequence[Example], regression: bool) -> dict[str, torch.Tensor]:
    """Right-padded ``idx`` (N, T), ``lengths`` (N,), ``slot`` (B, K) and ``labels`` (B,) when labelled."""
    seqs = [s for ex in examples for s in ex.seqs]
    idx = np.zeros((len(seqs), max(map(len, seqs))), dtype=np.int64)
    for i, s in enumerate(seqs):
        idx[i, : len(s)] = s
    slot = np.full((len(examples), max(len(ex.seqs) for ex in examples)), -1, dtype=np.int64)
    n = 0
    for r, ex in enumerate(examples):
        slot[r, : len(ex.seqs)] = np.arange(n, n + len(ex.seqs))
        n += len(ex.seqs)
    batch = {"idx": torch.from_numpy(idx), "lengths": torch.tensor([len(s) for s in seqs]),
             "slot": torch.from_numpy(slot)}
    if examples[0].label is not None:
        batch["labels"] = torch.tensor([ex.label for ex in examples],
                                       dtype=torch.float32 if regression else torch.long)
    return batch


@torch.no_grad()
def head_outputs(model: TaskModel, examples: Sequence[Example], batch_size: int) -> list[torch.Tensor]:
    """The head's output per example (float32, CPU); multiple-choice rows keep only their choices."""
    device = next(model.parameters()).device
    out: list[torch.Tensor] = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i: i + batch_size]
        b = collate([Example(ex.seqs, None) for ex in chunk], model.config.regression)
        res, _ = model(b["idx"].to(device), b["lengths"].to(device), b["slot"].to(device))
        res = res.float().cpu()
        out.extend(res[r, : len(ex.seqs)] if model.config.task_type == "multiple_choice" else res[r]
                   for r, ex in enumerate(chunk))
    return out


# ==================================================================== metrics
def classification_metrics(pred: Sequence[int], gold: Sequence[int], n_classes: int | None) -> dict[str, float]:
    """Accuracy; with 2 classes the F1 of class 1, with more the macro-F1 over the classes that occur.

    ``n_classes`` None (multiple choice: classes are positions) gives accuracy only.
    """
    p, g = np.asarray(pred), np.asarray(gold)
    out = {"accuracy": float((p == g).mean())}

    def f1(c: int) -> float:
        tp, fp, fn = (int(((p == c) & (g == c)).sum()), int(((p == c) & (g != c)).sum()),
                      int(((p != c) & (g == c)).sum()))
        return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0

    if n_classes == 2:
        out["f1"] = f1(1)
    elif n_classes is not None:
        out["macro_f1"] = float(np.mean([f1(c) for c in np.union1d(p, g)]))
    return out


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1, ties sharing their mean rank (what Spearman's rho needs)."""
    ranks = np.empty(len(x))
    ranks[np.argsort(x, kind="stable")] = np.arange(len(x))
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(inverse, weights=ranks) / counts)[inverse]


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum()) / denom if denom > 0 else 0.0  # a constant side has no correlation


def regression_metrics(pred: Sequence[float], gold: Sequence[float]) -> dict[str, float]:
    p, g = np.asarray(pred, dtype=np.float64), np.asarray(gold, dtype=np.float64)
    return {"pearson": _pearson(p, g), "spearman": _pearson(_ranks(p), _ranks(g)),
            "mse": float(((p - g) ** 2).mean())}


# ====================================================================== stage
class FinetuneStage(Stage[TaskModel]):
    """Random train rows per micro batch (stateless in ``(seed, step, micro_step)``), L3 loss, full-val metrics."""

    name = "finetune"

    def __init__(self, train: Sequence[Example], val: Sequence[Example], config: TaskModelConfig, *,
                 batch_size: int, seed: int, lm_coef: float = 0.5, rank: int = 0, world_size: int = 1,
                 tokenizer: Tokenizer | None = None, save_extra: dict[str, Any] | None = None) -> None:
        if not train:
            raise DataError("the train file has no rows")
        self.train, self.val, self.config = list(train), list(val), config
        self.lm_targets = [sum(len(s) - 1 for s in ex.seqs) for ex in self.train]  # the LM loss's tokens per row
        self.batch_size, self.seed, self.lm_coef = batch_size, seed, lm_coef
        self.rank, self.world_size = rank, world_size
        self.tokenizer, self.save_extra = tokenizer, save_extra or {}

    def batch(self, step: int, micro_step: int) -> dict[str, torch.Tensor]:
        mine, lm_weight = draw_weighted((self.seed, step, micro_step), self.lm_targets, self.batch_size, self.rank,
                                        self.world_size)
        return {**collate([self.train[i] for i in mine], self.config.regression), "lm_weight": torch.tensor(lm_weight)}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        out, lm_loss = model(batch["idx"], batch["lengths"], batch["slot"], lm=self.lm_coef > 0)
        clf = classifier_loss(out, batch["labels"], self.config.regression)  # a mean over rows: equal shares
        if lm_loss is None:
            return clf, {"clf_loss": clf.detach()}
        lm_loss = lm_loss * batch.get("lm_weight", 1.0)  # a mean over tokens: this rank's share of the global one
        return clf + self.lm_coef * lm_loss, {"clf_loss": clf.detach(), "lm_loss": lm_loss.detach()}

    def num_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["lengths"].sum())

    def evaluate(self, model: TaskModel) -> dict[str, float]:
        """Metrics over the whole val file; every rank scores all of it (same forwards, as FSDP needs)."""
        if not self.val:
            return {}
        out = head_outputs(model, self.val, self.batch_size)
        gold = [ex.label for ex in self.val if ex.label is not None]  # all of them: encode_task labels val rows
        if self.config.regression:
            metrics = regression_metrics([float(o) for o in out], gold)
        else:
            n = None if self.config.task_type == "multiple_choice" else self.config.n_classes
            metrics = classification_metrics([int(o.argmax()) for o in out], [int(g) for g in gold], n)
        return {f"val_{k}": v for k, v in metrics.items()}

    def save(self, run_dir: Path, model: TaskModel) -> None:
        save_finetuned(run_dir, model, self.tokenizer, self.save_extra)


# ================================================================ run dirs
def save_finetuned(run_dir: str | os.PathLike[str], model: TaskModel, tokenizer: Tokenizer | None,
                   extra: dict[str, Any]) -> Path:
    """``head.safetensors``, then the backbone run directory whose ``finetune`` section records the head."""
    return save_model(run_dir, model.gpt, tokenizer, FinetuneStage.name, extra, head=("finetune", HEAD_FILE, model.head))


def load_finetuned(run_dir: str | os.PathLike[str],
                   device: str | torch.device = "cpu") -> tuple[TaskModel, Tokenizer, dict[str, Any]]:
    """(model in eval mode, tokenizer, the config's ``finetune`` section) of a fine-tuned run."""
    def task_model(gpt: GPT, ft: dict[str, Any]) -> TaskModel:
        return TaskModel(TaskModelConfig(gpt.config, ft["task_type"], int(ft["n_classes"]),
                                         float(ft.get("clf_dropout", CLF_DROPOUT))), gpt)

    model, tokenizer, config = load_with_head(run_dir, "finetune", task_model, "fine-tuned",
                                              "fine-tune one with gptlab finetune", device)
    assert isinstance(model, TaskModel)
    return model, tokenizer, config["finetune"]


def hf_head(run_dir: str | os.PathLike[str]) -> tuple[GPT, Tokenizer, HFHead]:
    """A fine-tuned run's backbone, tokenizer and head as transformers applies it (``convert --to-hf``).

    Classification and entailment: ``*ForSequenceClassification`` (one sequence, pooled at ``[extract]``,
    its last token that is not ``[start]``: ``pad_token_id`` is ``[start]``'s id, which only begins a
    sequence). Similarity: the same class, run on both orders and the two logits added (each carries half
    the bias). Multiple choice: ``*DoubleHeadsModel``, one sequence per choice, ``mc_token_ids`` at each
    ``[extract]``. docs/TASKS.md says why.
    """
    model, tokenizer, ft = load_finetuned(run_dir)
    task_type = model.config.task_type
    labels = ft.get("labels")
    head = HFHead(model.head, "choice" if task_type == "multiple_choice" else "sequence",
                  pad_id=special_ids(tokenizer)[0], regression=model.config.regression,
                  labels=tuple(str(x) for x in labels) if labels and not model.config.regression else None,
                  bias_share=0.5 if task_type == "similarity" else 1.0)
    return model.gpt, tokenizer, head


# ====================================================================== runs
def run_finetune(model_spec: str, train_file: str | os.PathLike[str], val_file: str | os.PathLike[str],
                 out_dir: str | os.PathLike[str], train: Given = None, finetune: Given = None, *,
                 lora: Given = None, config_file: str | os.PathLike[str] | None = None, resume: bool = False, progress: bool = True,
                 env: DistEnv | None = None) -> TrainResult:
    """Fine-tune the run directory / ``hf:DIR`` ``model_spec`` on a task file with the shared trainer.

    ``finetune`` (``FinetuneConfig`` or its fields) names the task type and λ; a
    resumed run keeps its own. The train file's labels define the label set (val
    labels outside it are an error naming file:line); ``train.block_size`` caps
    the sequence length (default: the model's context) and ``train.dropout``, when
    set, replaces the backbone's and the classifier's dropout.
    """
    run = StageRun(FinetuneStage.name, out_dir, resume=resume, config_file=config_file,
                   sections=(FinetuneConfig.section,))
    settings = run.settings(FinetuneConfig, finetune)
    task_type = settings.task_type
    train_task = load_task(train_file, task_type)
    val_task = load_task(val_file, task_type, labels=train_task.labels)
    if train_task.graded != val_task.graded:
        raise DataError(f"{val_file}: similarity labels are {'graded' if val_task.graded else 'binary'} but "
                        f"{train_file}'s are {'graded' if train_task.graded else 'binary'}")
    if task_type == "multiple_choice" or train_task.graded:
        n_classes = 1
    else:
        n_classes = len(train_task.labels or [])
        if n_classes < 2:
            raise DataError(f"{train_file}: needs at least two distinct labels to train a classifier, "
                            f"found {n_classes}")
    train_cfg = run.train(train, FINETUNE_TRAIN.values, FINETUNE_TRAIN.derive(len(train_task.rows)))
    lora_cfg = run.lora(lora, train_cfg)
    with run.joined(env, train_cfg) as env:
        gpt, tokenizer, _ = load_run(model_spec)
        if tokenizer is None:
            raise UserError(f"{model_spec}: has no tokenizer gptlab can use; fine-tuning needs one")
        gpt = add_finetune_tokens(gpt, tokenizer, train_cfg.dropout)
        max_len = train_cfg.block_size or gpt.config.block_size
        if max_len > gpt.config.block_size:
            raise ConfigError(f"block_size {max_len} exceeds the model's context {gpt.config.block_size}")
        train_examples = encode_task(train_task, tokenizer, max_len)  # before anything is written
        val_examples = encode_task(val_task, tokenizer, max_len)
        clf_dropout = CLF_DROPOUT if train_cfg.dropout is None else train_cfg.dropout
        config = TaskModelConfig(gpt.config, task_type, n_classes, clf_dropout)
        extra = {"finetune": {**settings.to_dict(), "labels": train_task.label_values, "n_classes": n_classes,
                              "clf_dropout": clf_dropout, "max_len": max_len},
                 "train": train_cfg.to_dict(),
                 "data": {"train": os.path.abspath(train_file), "val": os.path.abspath(val_file),
                          "base_model": os.fspath(model_spec)}, **lora_cfg.record()}
        run.begin(env, gpt.config, tokenizer, extra)
        stage = FinetuneStage(train_examples, val_examples, config, batch_size=train_cfg.batch_size,
                              seed=train_cfg.seed, lm_coef=settings.lm_coef, rank=env.rank, world_size=env.world_size,
                              tokenizer=tokenizer, save_extra=extra)
        return run.trainer(TaskModel(config, add_lora(gpt, lora_cfg)), stage, train_cfg, env, progress).fit()


def predict(ft_run_dir: str | os.PathLike[str], input_file: str | os.PathLike[str],
            output_file: str | os.PathLike[str], *, batch_size: int = 32,
            device: str = "auto") -> tuple[int, dict[str, float] | None]:
    """Write one JSON line per input row: the row plus ``prediction`` and ``probabilities`` or ``score``.

    ``prediction`` is a label as the training file wrote it (classification, entailment,
    binary similarity), a choice index (multiple choice, with ``probabilities`` per
    choice) or the score itself (graded similarity). Rows are read by
    ``tasks.load_task``; a label is optional (new data), but one outside the run's label
    set is an error at its line, and a row's label stays in the output for comparison.
    The file is replaced atomically. Returns (the number of rows, the metrics of the
    predictions when every row has a label, else None).
    """
    model, tokenizer, ft = load_finetuned(ft_run_dir, device=resolve_device(device))
    task = load_task(input_file, ft["task_type"], labels=ft.get("labels"), require_label=False)
    examples = encode_task(task, tokenizer, int(ft.get("max_len", model.config.gpt.block_size)), labelled=False)
    labels = ft.get("labels")
    lines, outputs = [], []
    for row, out in zip(task.rows, head_outputs(model, examples, batch_size)):
        if model.config.regression:
            result: dict[str, Any] = {"prediction": float(out), "score": float(out)}
        else:
            probs = torch.softmax(out, dim=-1).tolist()
            best = int(out.argmax())
            if model.config.task_type == "multiple_choice":
                result = {"prediction": best, "probabilities": probs}
            else:
                if labels is None:
                    raise CheckpointError(f"{ft_run_dir}: config.json's finetune section has no labels")
                result = {"prediction": labels[best], "probabilities": dict(zip(labels, probs))}
        lines.append(json.dumps({**row, **result}, ensure_ascii=False) + "\n")
        outputs.append(out)
    atomic_write_text(output_file, "".join(lines))
    if not task.rows or any("label" not in row for row in task.rows):
        return len(lines), None
    if model.config.regression:
        return len(lines), regression_metrics([float(o) for o in outputs], [float(r["label"]) for r in task.rows])
    n = None if model.config.task_type == "multiple_choice" else model.config.n_classes
    gold = [task.label_index(r) for r in task.rows]
    return len(lines), classification_metrics([int(o.argmax()) for o in outputs], gold, n)
