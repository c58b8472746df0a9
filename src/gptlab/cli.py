"""`gptlab <command>`: the command-line interface.

Each sub-command maps its flags onto a library function; a ``UserError`` is
printed as one line (no traceback) and exits with code 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from .errors import UserError

Handler = Callable[[argparse.Namespace], int | None]


# ------------------------------------------------------------------ presets
def cmd_presets(args: argparse.Namespace) -> None:
    from .config import PRESETS, GPTConfig
    from .model import GPT

    for name in PRESETS:
        c = GPTConfig.from_preset(name)
        print(f"{name} {c.n_layer} {c.n_embd} {c.n_head} {c.block_size} {c.vocab_size} "
              f"{GPT.count_params(c)}")


def add_presets(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("presets", help="list model presets: NAME n_layer n_embd n_head block_size vocab_size params")
    p.set_defaults(func=cmd_presets)


# ---------------------------------------------------------------- generate
def cmd_generate(args: argparse.Namespace) -> None:
    from .engine import Engine, SamplingParams

    engine = Engine.from_spec(args.model, precision=args.precision)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, stop=args.stop or [], seed=args.seed)
    if args.stream:
        for piece in engine.stream_text(args.prompt, params):
            print(piece, end="", flush=True)
        print()
    else:
        print(engine.complete(args.prompt, params).text)


def add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="continue a prompt with a model (prints only the continuation)")
    p.add_argument("--model", required=True, help="run directory or hf:DIR")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--precision", choices=["fp32", "int8"], default="fp32",
                   help="int8: weights in 8 bits for faster CPU decoding (see docs/BENCHMARKS.md)")
    p.set_defaults(func=cmd_generate)


# ----------------------------------------------------------------- convert
def cmd_convert(args: argparse.Namespace) -> None:
    from .checkpoint import export_hf, import_hf, prepare_out_dir, save_model

    out = prepare_out_dir(args.out, args.force)
    if args.from_hf:
        src = args.from_hf[3:] if args.from_hf.startswith("hf:") else args.from_hf
        model, tok = import_hf(src)
        save_model(out, model, tok, stage="pretrain", extra={"source": f"hf:{src}"})
        kind = "openai-gpt" if model.config.norm_position == "post" else "gpt2"
        print(f"wrote run directory {out} from {kind} {src} ({model.num_params():,} params, "
              f"tokenizer: {tok.spec if tok is not None else 'none'})")
    else:
        export_hf(args.to_hf, out)
        print(f"wrote transformers directory {out} (load with from_pretrained({str(out)!r}))")


def add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="import a Hugging Face GPT-2/OpenAI-GPT directory, or export a run to one")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf", metavar="DIR", help="transformers directory (gpt2 / openai-gpt) to import")
    src.add_argument("--to-hf", metavar="RUN_DIR", help="run directory to export as a transformers directory")
    p.add_argument("--out", required=True, help="output directory (run dir for --from-hf, HF dir for --to-hf)")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out (same-named files are replaced)")
    p.set_defaults(func=cmd_convert)


# --------------------------------------------------------------- tokenizer
def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from .tokenizer import train_tokenizer_files

    tok = train_tokenizer_files(args.input, args.vocab_size, args.out, show_progress=True)
    print(f"trained byte-level BPE: {tok.vocab_size} tokens ({len(tok.special_tokens)} special) -> {args.out}")


def add_tokenizer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True)
    t = tsub.add_parser("train", help="train a byte-level BPE tokenizer on text files")
    t.add_argument("--input", nargs="+", required=True, help="text files")
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--out", required=True, help="output tokenizer directory")
    t.set_defaults(func=cmd_tokenizer_train)


# ----------------------------------------------------------------- prepare
def cmd_prepare(args: argparse.Namespace) -> None:
    from .data import prepare

    if args.train_tokenizer and args.vocab_size is None:
        raise UserError("--train-tokenizer needs --vocab-size N (for example 4096)")
    if args.vocab_size is not None and not args.train_tokenizer:
        raise UserError("--vocab-size only applies with --train-tokenizer")
    meta = prepare(args.input, args.tokenizer, args.out, val_fraction=args.val_fraction, seed=args.seed,
                   text_field=args.text_field, vocab_size=args.vocab_size, dtype=args.dtype, workers=args.workers)
    s = meta["splits"]
    print(f"{args.out}: train {s['train']['tokens']:,} tokens, val {s['val']['tokens']:,} tokens "
          f"({meta['dtype']}, tokenizer {meta['tokenizer']}, vocab {meta['vocab_size']:,})")


def add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="tokenize text into train/val token shards for `gptlab train`")
    p.add_argument("--input", nargs="+", required=True,
                   help="files, directories, globs (.txt/.md/.jsonl, optionally .gz) or hf:NAME[:SPLIT]")
    p.add_argument("--tokenizer", default="gpt2",
                   help="gpt2, char, a tokenizer directory or a .tiktoken file (default gpt2)")
    p.add_argument("--train-tokenizer", action="store_true",
                   help="train a byte-level BPE on the train split first (with --vocab-size)")
    p.add_argument("--vocab-size", type=int, default=None, help="vocabulary size for --train-tokenizer")
    p.add_argument("--out", required=True, help="data directory to create")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of each text file / of records for val")
    p.add_argument("--seed", type=int, default=1337, help="seed of the record-level validation split")
    p.add_argument("--text-field", default="text", help="JSONL / dataset field holding the text")
    p.add_argument("--dtype", choices=["auto", "uint16", "uint32"], default="auto")
    p.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all cores)")
    p.set_defaults(func=cmd_prepare)


# ------------------------------------------------------------------- train
# Flags that map onto TrainConfig fields; None means "not given" (the config file or the run keeps its value).
_TRAIN_FLAGS = ("max_steps", "batch_size", "block_size", "grad_accum", "lr", "min_lr", "warmup_steps",
                "lr_decay_steps", "weight_decay", "dropout", "grad_clip", "eval_every", "eval_batches",
                "checkpoint_every", "keep_last", "sample_every", "sample_tokens", "log_every", "seed",
                "device", "dtype")


def cmd_train(args: argparse.Namespace) -> int:
    from .stages.pretrain import pretrain_configs, run_pretrain

    overrides = {k: getattr(args, k) for k in _TRAIN_FLAGS if getattr(args, k) is not None}
    for flag in ("fsdp", "compile"):
        if getattr(args, flag):
            overrides[flag] = True
    model_cfg, train_cfg = pretrain_configs(args.data, args.out, config_file=args.config, preset=args.preset,
                                            train_overrides=overrides, resume=args.resume)
    result = run_pretrain(args.data, args.out, model_cfg, train_cfg, resume=args.resume)
    return 128 + result.signal if result.signal else 0


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="pretrain a GPT on a prepared data directory (resumable; torchrun for DDP/FSDP)")
    p.add_argument("--data", required=True, help="data directory from `gptlab prepare`")
    p.add_argument("--out", required=True, help="run directory (checkpoints, metrics.jsonl, loss.png, final model)")
    model = p.add_mutually_exclusive_group()
    model.add_argument("--preset", help="model preset (see `gptlab presets`)")
    model.add_argument("--config", help="YAML/JSON file with model: and train: sections")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    for name, typ, hlp in (
            ("max-steps", int, "optimizer steps"), ("batch-size", int, "micro batch per process"),
            ("block-size", int, "context length (overrides the preset's)"),
            ("grad-accum", int, "micro steps per optimizer step"), ("lr", float, "peak learning rate"),
            ("min-lr", float, "floor of the cosine decay"), ("warmup-steps", int, "linear warmup steps"),
            ("lr-decay-steps", int, "step where the cosine reaches --min-lr (default: --max-steps)"),
            ("weight-decay", float, "AdamW weight decay on matrices and embeddings"),
            ("dropout", float, "dropout probability"), ("grad-clip", float, "max gradient norm (0: off)"),
            ("eval-every", int, "evaluate every N steps (0: only at the end)"),
            ("eval-batches", int, "validation batches per evaluation"),
            ("checkpoint-every", int, "checkpoint every N steps (0: only at the end / on Ctrl-C)"),
            ("keep-last", int, "checkpoints to keep"),
            ("sample-every", int, "print a sample every N steps (default: at each evaluation; 0: never)"),
            ("sample-tokens", int, "tokens per sample"), ("log-every", int, "log every N steps"),
            ("seed", int, "random seed"), ("device", str, "auto, cpu, cuda, cuda:N, mps"),
    ):
        p.add_argument(f"--{name}", type=typ, default=None, help=hlp)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default=None,
                   help="auto: bf16 autocast on CUDA when supported, fp32 otherwise")
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (under torchrun)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.set_defaults(func=cmd_train)


# -------------------------------------------------------------------- eval
def cmd_eval_ppl(args: argparse.Namespace) -> None:
    import json
    import os

    from .checkpoint import load_run
    from .data import TokenData
    from .evaluate import check_tokenizers_match, evaluate_ppl
    from .trainer import resolve_device

    data = TokenData(args.data)
    model, tokenizer, config = load_run(args.model, device=resolve_device(args.device))
    vocab = data.meta.get("vocab_size")
    check_tokenizers_match(tokenizer, data.tokenizer(), model_vocab=model.config.vocab_size,
                           data_vocab=int(vocab) if isinstance(vocab, int) else -1,
                           model_name=os.fspath(args.model), data_name=os.fspath(args.data),
                           model_spec=getattr(tokenizer, "spec", None), data_spec=data.meta.get("tokenizer"))
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
    from pathlib import Path

    from .atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
    from .checkpoint import load_run
    from .icl import evaluate_icl, markdown_table, plot_accuracy
    from .tasks import load_task
    from .trainer import resolve_device

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
                                      model_name=spec)
    table = markdown_table(by_model)
    atomic_write_json(out / "results.json", {
        "task": str(args.task), "type": task.type, "train": args.train, "seed": args.seed, "shots": shots,
        "max_examples": args.max_examples, "models": {m: r["results"] for m, r in by_model.items()}})
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
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_eval_icl)


# `gptlab eval <kind>`: each evaluation contributes one add_eval_* function here.
EVAL_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_eval_ppl,
    add_eval_icl,
]


def add_group(sub: argparse._SubParsersAction, name: str, help: str,
              children: list[Callable[[argparse._SubParsersAction], None]]) -> None:
    """A command with sub-commands of its own (``gptlab eval ppl``, ``gptlab tasks make``)."""
    group = sub.add_parser(name, help=help).add_subparsers(dest=f"{name}_command", required=True)
    for add in children:
        add(group)


def add_eval(sub: argparse._SubParsersAction) -> None:
    add_group(sub, "eval", "evaluate a model (ppl: perplexity / bits per byte; icl: few-shot accuracy)",
              EVAL_SUBCOMMANDS)


# -------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(args.out, minutes=args.minutes, corpus=args.corpus, vocab_size=args.vocab_size, seed=args.seed)


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="tokenizer + data + pretraining on Shakespeare within a time budget")
    p.add_argument("--minutes", type=float, default=10.0, help="time budget for the whole demo (default 10)")
    p.add_argument("--corpus", nargs="+", default=None,
                   help="text files to use instead of the shakespeare package's complete works")
    p.add_argument("--out", default=None, help="run directory (default runs/demo-YYYYmmdd-HHMMSS)")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seed", type=int, default=1337)
    p.set_defaults(func=cmd_demo)


# ---------------------------------------------------------------- finetune
TRAIN_FLAG_HELP: dict[str, tuple[type, str]] = {
    "max_steps": (int, "optimizer steps"), "batch_size": (int, "rows per micro batch"),
    "block_size": (int, "max tokens per sequence (default: the model's context)"),
    "grad_accum": (int, "micro steps per optimizer step"), "lr": (float, "peak learning rate"),
    "warmup_steps": (int, "linear warmup steps (default: 10%% of the steps), then cosine decay"),
    "weight_decay": (float, "AdamW weight decay"), "dropout": (float, "dropout (default: the model's)"),
    "eval_every": (int, "evaluate every N steps (default: 10 times per run)"),
    "checkpoint_every": (int, "checkpoint every N steps (default: 10 times per run)"),
    "keep_last": (int, "checkpoints to keep"), "seed": (int, "random seed"),
    "device": (str, "auto, cpu, cuda, cuda:N, mps"),
}


def add_train_flags(p: argparse.ArgumentParser, helps: dict[str, str] | None = None) -> None:
    """The trainer flags of a stage command (None defaults: the stage decides), plus --dtype."""
    for key, (typ, hlp) in TRAIN_FLAG_HELP.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=typ, default=None, help=(helps or {}).get(key, hlp))
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default=None,
                   help="auto: bf16 autocast on CUDA when supported, fp32 otherwise")


def train_overrides(args: argparse.Namespace) -> dict[str, object]:
    return {k: getattr(args, k) for k in (*TRAIN_FLAG_HELP, "dtype")}


def cmd_finetune(args: argparse.Namespace) -> int:
    from .stages.finetune import check_task_type, finetune_configs, run_finetune
    from .tasks import load_task

    check_task_type(args.task)
    n_train = len(load_task(args.train, args.task).rows)
    overrides = train_overrides(args)
    train_cfg, lm_coef = finetune_configs(args.out, n_train, overrides, lm_coef=args.lm_coef, resume=args.resume)
    result = run_finetune(args.task, args.model, args.train, args.val, args.out, train_cfg, lm_coef=lm_coef,
                          resume=args.resume)
    return 128 + result.signal if result.signal else 0


def add_finetune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="GPT-1 supervised fine-tuning of a run on a task file (resumable)")
    p.add_argument("--task", required=True,
                   help="task type: classification, entailment, similarity or multiple_choice")
    p.add_argument("--model", required=True, help="run directory or hf:DIR to fine-tune")
    p.add_argument("--train", required=True, help="train task file (JSONL; its labels define the label set)")
    p.add_argument("--val", required=True, help="validation task file, scored whole at each evaluation")
    p.add_argument("--out", required=True, help="run directory (checkpoints, metrics.jsonl, loss.png, model + head)")
    p.add_argument("--lm-coef", type=float, default=None,
                   help="weight of the auxiliary LM loss (default 0.5, as GPT-1; 0 disables it)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    add_train_flags(p, {"max_steps": "optimizer steps (default: 3 epochs)", "batch_size": "rows per micro batch (16)",
                        "block_size": "max tokens per sequence (default: the model's context)",
                        "lr": "peak learning rate (2.5e-4)",
                        "warmup_steps": "linear warmup steps (default: 10%% of the steps), then cosine decay to 0",
                        "weight_decay": "AdamW weight decay (0.01)",
                        "dropout": "dropout of the model and classifier (default: the model's; classifier 0.1)"})
    p.set_defaults(func=cmd_finetune)


def cmd_predict(args: argparse.Namespace) -> None:
    from .stages.finetune import predict

    n = predict(args.model, args.input, args.out, batch_size=args.batch_size, device=args.device)
    print(f"wrote {n} predictions to {args.out}")


def add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="predictions of a fine-tuned run on a task file, as JSONL")
    p.add_argument("--model", required=True, help="run directory written by gptlab finetune")
    p.add_argument("--input", required=True, help="task file of the run's task type")
    p.add_argument("--out", required=True, help="JSONL file: each row plus prediction and probabilities/score")
    p.add_argument("--batch-size", type=int, default=32, help="rows per forward pass")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_predict)


# ------------------------------------------------------------------- tasks
def cmd_tasks_check(args: argparse.Namespace) -> None:
    from collections import Counter

    from .tasks import load_task

    task = load_task(args.file, args.type)
    line = f"{args.file}: {len(task.rows):,} {task.type} rows, OK"
    if task.graded:
        scores = [row["label"] for row in task.rows]
        line += f"; graded labels from {min(scores):g} to {max(scores):g}"
    elif task.type != "completion":
        counts = Counter(task.label_index(row) for row in task.rows)
        names = task.labels or [str(i) for i in range(max(counts) + 1)]
        line += "; labels: " + ", ".join(f"{names[i]} {counts[i]:,}" for i in sorted(counts))
    print(line)


def add_tasks_check(tsub: argparse._SubParsersAction) -> None:
    from .tasks import TASK_TYPES

    p = tsub.add_parser("check", help="validate a task file (JSONL) and count its rows and labels")
    p.add_argument("file", help="task file: .jsonl, optionally .gz")
    p.add_argument("--type", choices=TASK_TYPES, default=None, help="task type (default: from the first row's fields)")
    p.set_defaults(func=cmd_tasks_check)


def cmd_tasks_make(args: argparse.Namespace) -> None:
    from .tasks import DERIVED_TASKS, load_task, make_tasks

    for name, paths in make_tasks(args.corpus, args.out, seed=args.seed, n=args.size).items():
        counts = ", ".join(f"{split} {len(load_task(path).rows):,}" for split, path in paths.items())
        print(f"{paths['train'].parent}: {DERIVED_TASKS[name]}, {counts}")


def add_tasks_make(tsub: argparse._SubParsersAction) -> None:
    p = tsub.add_parser("make", help="derive cloze, same_source and lastword tasks from plain text (offline)")
    p.add_argument("--corpus", nargs="+", required=True, help="text files, directories or globs (.txt/.md, .gz)")
    p.add_argument("--out", required=True, help="directory for <task>/{train,val,test}.jsonl")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=1000, help="train rows per task; val gets 1/5, test 1/2 (default 1000)")
    p.set_defaults(func=cmd_tasks_make)


# `gptlab tasks <action>`: each action contributes one add_tasks_* function here.
TASKS_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_tasks_check,
    add_tasks_make,
]


def add_tasks(sub: argparse._SubParsersAction) -> None:
    add_group(sub, "tasks", "task files for fine-tuning and in-context evaluation (check, make)", TASKS_SUBCOMMANDS)


# ------------------------------------------------------------------ parser
# Each sub-command contributes one add_* function; keep them in this list.
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_presets,
    add_generate,
    add_convert,
    add_tokenizer,
    add_prepare,
    add_train,
    add_eval,
    add_demo,
    add_finetune,
    add_predict,
    add_tasks,
]


def build_parser() -> argparse.ArgumentParser:
    from .cli_align import ALIGN_SUBCOMMANDS

    parser = argparse.ArgumentParser(prog="gptlab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in [*SUBCOMMANDS, *ALIGN_SUBCOMMANDS]:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"gptlab {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"gptlab {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
