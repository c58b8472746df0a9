"""Commands that make data: ``gptlab tokenizer train``, ``gptlab prepare``, ``gptlab tasks check|make``,
``gptlab conversations``."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from ..atomic import atomic_write_jsonl
from ..conversations import held_out_conversation, read_chatterbot, read_chitchat, sft_rows
from ..data import prepare
from ..errors import UserError
from ..tasks import DERIVED_TASKS, TASK_TYPES, load_task, make_tasks
from ..tokenizer import TOKENIZER_MODES, UNK, train_tokenizer_files
from .args import add_group

__all__ = ["COMMANDS"]


MODE_HELP = ("char: one token per character (the most frequent ones with --vocab-size, the rest <|unk|>); "
             "word: jieba's Chinese words, spelled by characters when not in the vocabulary; "
             "bpe: byte-level BPE; wordpiece: BERT's WordPiece (a vocab.txt, as GPT2-Chinese)")


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    tok = train_tokenizer_files(args.input, args.vocab_size, args.out, mode=args.mode, show_progress=True)
    print(f"trained {args.mode} tokenizer {tok.spec}: {tok.vocab_size} tokens ({len(tok.special_tokens)} special) "
          f"-> {args.out}")


def add_tokenizer_train(tsub: argparse._SubParsersAction) -> None:
    t = tsub.add_parser("train", help="train a tokenizer (char, word, bpe or wordpiece) on text files")
    t.add_argument("--mode", choices=TOKENIZER_MODES, default="bpe", help=MODE_HELP + " (default bpe)")
    t.add_argument("--input", nargs="+", required=True, help="text files")
    t.add_argument("--vocab-size", type=int, default=None,
                   help="vocabulary size (needed by bpe and wordpiece; char and word default to all they see)")
    t.add_argument("--out", required=True, help="output tokenizer directory")
    t.set_defaults(func=cmd_tokenizer_train)


def add_tokenizer(sub: argparse._SubParsersAction) -> None:
    add_group(sub, "tokenizer", "tokenizer tools", [add_tokenizer_train])


def cmd_prepare(args: argparse.Namespace) -> None:
    if args.train_tokenizer and args.vocab_size is None:
        raise UserError("--train-tokenizer needs --vocab-size N (for example 4096)")
    spec = "bpe" if args.train_tokenizer else args.tokenizer
    if args.vocab_size is not None and spec not in TOKENIZER_MODES:
        raise UserError(f"--vocab-size only applies to a tokenizer trained here (--tokenizer "
                        f"{'|'.join(TOKENIZER_MODES)}), not to {spec}")
    meta = prepare(args.input, spec, args.out, val_fraction=args.val_fraction, seed=args.seed,
                   text_field=args.text_field, vocab_size=args.vocab_size, dtype=args.dtype, workers=args.workers)
    s = meta["splits"]
    print(f"{args.out}: train {s['train']['tokens']:,} tokens, val {s['val']['tokens']:,} tokens "
          f"({meta['dtype']}, tokenizer {meta['tokenizer']}, vocab {meta['vocab_size']:,})")
    unk = {name: split["unk_tokens"] for name, split in s.items()}
    if any(unk.values()):
        print(f"characters the vocabulary lacks, encoded as {UNK}: "
              + ", ".join(f"{name} {n:,} of {s[name]['characters']:,} characters" for name, n in unk.items()))


def add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="tokenize text into train/val token shards for `gptlab train`")
    p.add_argument("--input", nargs="+", required=True,
                   help="files, directories, globs (.txt/.md/.jsonl, optionally .gz) or hf:NAME[:SPLIT]")
    p.add_argument("--tokenizer", default="gpt2",
                   help="gpt2, a tokenizer directory, a .tiktoken file, a BERT vocab.txt, or a mode to train on the "
                        f"train split first: {MODE_HELP} (default gpt2)")
    p.add_argument("--train-tokenizer", action="store_true", help="the same as --tokenizer bpe")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="vocabulary size of a tokenizer trained here (needed by bpe and wordpiece)")
    p.add_argument("--out", required=True, help="data directory to create")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of each text file / of records for val")
    p.add_argument("--seed", type=int, default=1337, help="seed of the record-level validation split")
    p.add_argument("--text-field", default="text", help="JSONL / dataset field holding the text")
    p.add_argument("--dtype", choices=["auto", "uint16", "uint32"], default="auto")
    p.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all cores)")
    p.set_defaults(func=cmd_prepare)


def cmd_tasks_check(args: argparse.Namespace) -> None:
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
    p = tsub.add_parser("check", help="validate a task file (JSONL) and count its rows and labels")
    p.add_argument("file", help="task file: .jsonl, optionally .gz")
    p.add_argument("--type", choices=TASK_TYPES, default=None, help="task type (default: from the first row's fields)")
    p.set_defaults(func=cmd_tasks_check)


def cmd_tasks_make(args: argparse.Namespace) -> None:
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


def add_tasks(sub: argparse._SubParsersAction) -> None:
    add_group(sub, "tasks", "task files for fine-tuning and in-context evaluation (check, make)",
              [add_tasks_check, add_tasks_make])


def cmd_conversations(args: argparse.Namespace) -> None:
    source, _, language = args.source.partition(":")
    if source not in ("chitchat", "chatterbot"):
        raise UserError(f"--source {args.source!r}: choose chitchat or chatterbot[:LANGUAGE] (e.g. chatterbot:chinese)")
    if not 0 <= args.val_fraction < 1:
        raise UserError(f"--val-fraction {args.val_fraction} must be in [0, 1)")
    convs = read_chitchat() if source == "chitchat" else read_chatterbot(language or "english")
    out = Path(args.out)
    for split in ("train", "val"):
        keep = [c for c in convs if held_out_conversation(c, args.val_fraction, args.seed) == (split == "val")]
        rows = sft_rows(keep, args.max_chars)
        atomic_write_jsonl(out / f"{split}.jsonl", rows)
        print(f"{out / (split + '.jsonl')}: {len(rows):,} rows from {len(keep):,} conversations")


def add_conversations(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("conversations", help="real conversations (chitchat-dataset, chatterbot-corpus) as SFT rows, "
                                             "held-out conversations in val.jsonl")
    p.add_argument("--source", default="chitchat", help="chitchat, or chatterbot[:LANGUAGE] (default chitchat)")
    p.add_argument("--out", required=True, help="directory for train.jsonl and val.jsonl")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of conversations held out (default 0.05)")
    p.add_argument("--max-chars", type=int, default=None,
                   help="cut conversations into pieces of whole exchanges of at most this many characters")
    p.add_argument("--seed", type=int, default=1337, help="seed of the held-out split")
    p.set_defaults(func=cmd_conversations)


COMMANDS = [add_tokenizer, add_prepare, add_tasks, add_conversations]
