"""`gptlab <command>`: the command-line interface, one module per topic.

    models.py      presets, generate, convert
    data.py        tokenizer train, prepare, tasks check|make
    training.py    train, finetune, sft, rm, dpo, ppo (flags generated from the config dataclasses)
    evaluation.py  eval ppl|icl, predict
    serving.py     chat, serve
    demos.py       demo, rlhf-demo
    images.py      images prepare|complete|probe (Image GPT)
    args.py        flags from dataclass fields, command groups

A ``UserError``, a usage error or a path the system refuses is printed as one line (no traceback) and exits with code 2.
``python -m gptlab.cli`` is the same program (what torchrun launches).
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from ..errors import UserError
from . import data, demos, evaluation, images, models, serving, training

__all__ = ["main", "build_parser"]


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors in one line, like every other error (``--help`` shows the usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gptlab", description="The GPT lineage as one hackable tool: "
                                     "GPT-1, GPT-2, GPT-3, InstructGPT, ChatGPT")
    sub = parser.add_subparsers(dest="command", required=True)
    for topic in (models, data, training, evaluation, serving, demos, images):
        for add in topic.COMMANDS:
            add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"gptlab {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # the system refused a path: a directory where a file goes, permissions, a full disk
        where = exc.filename2 if exc.filename2 is not None else exc.filename
        print(f"gptlab {args.command}: error: {where}: {exc.strerror or exc}; check the path, its permissions and "
              f"the free space", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gptlab {args.command}: interrupted", file=sys.stderr)
        return 130
