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


# ------------------------------------------------------------------ parser
# Each sub-command contributes one add_* function; keep them in this list.
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_presets,
    add_generate,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptlab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
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
