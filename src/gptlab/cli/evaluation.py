"""Commands that measure a model: ``gptlab eval ppl``, ``gptlab eval icl``, ``gptlab predict``."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ..atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from ..data import TokenData
from ..errors import UserError
from ..evaluate import evaluate_ppl
from ..icl import evaluate_icl, markdown_table, plot_accuracy
from ..runs import load_run
from ..stages.finetune import predict
from ..tasks import load_task
from ..tokenizer import check_tokenizers_match
from ..train.dist import resolve_device
from .args import add_group, unescape

__all__ = ["COMMANDS"]


def cmd_eval_ppl(args: argparse.Namespace) -> None:
    data = TokenData(args.data)
    if not args.no_verify:
        data.verify()
    model, tokenizer, config = load_run(args.model, device=resolve_device(args.device))
    vocab = data.meta.get("vocab_size")
    check_tokenizers_match(tokenizer, data.tokenizer(), model_vocab=model.config.vocab_size,
                           data_vocab=int(vocab) if isinstance(vocab, int) else -1,
                           model_name=os.fspath(args.model), data_name=os.fspath(args.data),
                           model_spec=tokenizer.spec if tokenizer is not None else None, data_spec=data.meta.get("tokenizer"))
    r = evaluate_ppl(model, data, split=args.split, batch_size=args.batch_size, block_size=args.block_size,
                     max_batches=args.max_batches)
    if args.json:
        print(json.dumps(r))
    else:
        print(f"{args.split}: {r['tokens']:,} tokens  loss {r['loss']:.4f}  perplexity {r['perplexity']:.3f}  "
              f"bits/byte {r['bits_per_byte']:.4f}")


def add_eval_ppl(esub: argparse._SubParsersAction) -> None:
    p = esub.add_parser("ppl", help="loss, perplexity and bits per byte on a data split")
    p.add_argument("--model", required=True, help="run directory or hf:DIR")
    p.add_argument("--data", required=True, help="data directory prepared with the model's tokenizer")
    p.add_argument("--split", default="val")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--block-size", type=int, default=None, help="window length (default: the model's context)")
    p.add_argument("--max-batches", type=int, default=None, help="score only the first N batches")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-verify", action="store_true", help="skip checking the data's shards against meta.json")
    p.set_defaults(func=cmd_eval_ppl)


def _shot_counts(text: str) -> list[int]:
    try:
        shots = [int(s) for s in text.split(",")]
    except ValueError:
        raise UserError(f"--shots {text!r}: give comma-separated counts such as 0,1,4,16") from None
    if min(shots) < 0 or len(set(shots)) != len(shots):
        raise UserError(f"--shots {text!r}: counts must be >= 0 and distinct")
    return sorted(shots)


def cmd_eval_icl(args: argparse.Namespace) -> None:
    shots = _shot_counts(args.shots)
    if len(set(args.model)) != len(args.model):
        raise UserError("a --model is given twice; name each model once")
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory; choose another --out")
    train = load_task(args.train) if args.train else None
    task = load_task(args.task, labels=train.labels if train is not None else None)  # the training classes
    device = resolve_device(args.device)
    by_model = {}
    for spec in args.model:
        model, tokenizer, _ = load_run(spec, device=device)
        by_model[spec] = evaluate_icl(model, tokenizer, task, shots, train=train, seed=args.seed,
                                      max_examples=args.max_examples, batch_size=args.batch_size,
                                      model_name=spec, template=unescape(args.template) if args.template else None)
    table = markdown_table(by_model)
    atomic_write_json(out / "results.json", {
        "task": str(args.task), "type": task.type, "train": args.train, "seed": args.seed, "shots": shots,
        "max_examples": args.max_examples, "template": next(iter(by_model.values()))["template"],
        "models": {m: r["results"] for m, r in by_model.items()}})
    atomic_write_text(out / "results.md", f"# In-context evaluation: {args.task} ({task.type})\n\n{table}")
    atomic_write_bytes(out / "accuracy_vs_shots.png", plot_accuracy(by_model, title=f"{args.task} ({task.type})"))
    print(table, end="")
    print(f"wrote {out / 'results.json'}, results.md, accuracy_vs_shots.png")


def add_eval_icl(esub: argparse._SubParsersAction) -> None:
    p = esub.add_parser("icl", help="zero/one/few-shot accuracy on a task file (GPT-3 protocol)")
    p.add_argument("--model", action="append", required=True, help="run directory or hf:DIR (repeatable)")
    p.add_argument("--task", required=True, help="task file to evaluate (see gptlab.tasks)")
    p.add_argument("--train", default=None, help="task file to draw demonstrations from (default: the "
                                                   "task's other rows)")
    p.add_argument("--shots", default="0,1,4,16", help="comma-separated demonstration counts (default 0,1,4,16)")
    p.add_argument("--out", required=True, help="directory for results.json, results.md, accuracy_vs_shots.png")
    p.add_argument("--seed", type=int, default=0, help="seed of the demonstration draws")
    p.add_argument("--max-examples", type=int, default=None, help="evaluate only the first N rows")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    p.add_argument("--template", default=None,
                   help="the example's context as a format string over the row's fields, e.g. "
                        "'{text}\\nSentiment:' (\\n reads as a newline; default: gptlab.icl.TEMPLATES for the "
                        "task type)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_eval_icl)


def add_eval(sub: argparse._SubParsersAction) -> None:
    add_group(sub, "eval", "evaluate a model (ppl: perplexity / bits per byte; icl: few-shot accuracy)",
              [add_eval_ppl, add_eval_icl])


def cmd_predict(args: argparse.Namespace) -> None:
    n, metrics = predict(args.model, args.input, args.out, batch_size=args.batch_size, device=args.device)
    scores = "" if metrics is None else "; " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
    print(f"wrote {n} predictions to {args.out}{scores}")


def add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="predictions of a fine-tuned run on a task file, as JSONL")
    p.add_argument("--model", required=True, help="run directory written by gptlab finetune")
    p.add_argument("--input", required=True, help="task file of the run's task type")
    p.add_argument("--out", required=True, help="JSONL file: each row plus prediction and probabilities/score")
    p.add_argument("--batch-size", type=int, default=32, help="rows per forward pass")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_predict)


COMMANDS = [add_eval, add_predict]
