"""Commands that talk to a model: ``gptlab chat`` (terminal) and ``gptlab serve`` (OpenAI-compatible API, web pages)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..chat_repl import run_chat
from ..engine import Engine, SamplingParams
from ..errors import UserError
from ..runs import load_run
from ..serve.run import run_server
from ..serve.web import WebData
from ..vision import load_vision, load_vision_run

__all__ = ["COMMANDS"]


def cmd_chat(args: argparse.Namespace) -> int:
    model, tokenizer, config = load_run(args.model)
    if not config.get("chat_format"):
        raise UserError(f"{args.model} has no chat format (it was not trained with gptlab sft, ppo or dpo): "
                        f"fine-tune it with gptlab sft first, or use gptlab generate for plain completion")
    engine = Engine(model, tokenizer, precision=args.precision, vision=load_vision(args.model, config, model))
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed)
    run_chat(engine, params, system=args.system)
    return 0


def add_chat(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="talk to a chat model (gptlab sft/ppo/dpo run) in the terminal, streaming")
    p.add_argument("--model", required=True, help="run directory with a chat format (an image-input one takes "
                                                  "/image PATH), or hf:DIR")
    p.add_argument("--system", default=None, help="system prompt (change it in the chat with /system TEXT)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="longest reply in tokens (default 128)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--precision", choices=["fp32", "int8"], default="fp32")
    p.set_defaults(func=cmd_chat)


def cmd_serve(args: argparse.Namespace) -> int:
    for flag in ("max_body_bytes", "max_queue", "max_batch", "max_record_bytes", "max_data_bytes"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')}={getattr(args, flag)} must be >= 1")
    if args.api_key is not None and not args.api_key.strip():
        raise UserError("--api-key is empty: give a secret (e.g. from `openssl rand -hex 16`) or leave the flag out")
    directory = Path(str(args.model).removeprefix("hf:")).expanduser()
    name = args.model_name or directory.resolve().name
    data = WebData(Path(args.data_dir).expanduser() if args.data_dir else None, args.max_record_bytes,
                   args.max_data_bytes)
    return run_server(lambda: load_vision_run(args.model), model_name=name, host=args.host, port=args.port,
                      api_key=args.api_key, max_body_bytes=args.max_body_bytes, max_queue=args.max_queue,
                      max_batch=args.max_batch, data=data, allow_hosts=args.allow_host or ())


def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, ...)")
    p.add_argument("--model", required=True, help="run directory or hf:DIR")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every route but /health")
    p.add_argument("--max-body-bytes", type=int, default=1_000_000, help="largest request body (default 1000000)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="generation requests running or waiting before new ones get 429 (default 64)")
    p.add_argument("--max-batch", type=int, default=16,
                   help="sequences decoded together; more requests wait to join between steps (default 16)")
    p.add_argument("--model-name", default=None, help="the model's name in the API (default: the directory name)")
    p.add_argument("--data-dir", default=None,
                   help="where the web pages append feedback.jsonl and rankings.jsonl and read prompts.jsonl "
                        "(default: nowhere: the pages' writes are refused)")
    p.add_argument("--max-record-bytes", type=int, default=WebData.max_record_bytes,
                   help=f"largest feedback or ranking record (default {WebData.max_record_bytes})")
    p.add_argument("--max-data-bytes", type=int, default=WebData.max_file_bytes,
                   help=f"largest feedback.jsonl / rankings.jsonl; past it appends get 429 "
                        f"(default {WebData.max_file_bytes})")
    p.add_argument("--allow-host", action="append", metavar="NAME",
                   help="another name the server answers to in the Host header (repeatable; bound to 127.0.0.1 "
                        "it answers only to localhost, 127.0.0.1 and ::1: the DNS-rebinding defence)")
    p.set_defaults(func=cmd_serve)


COMMANDS = [add_chat, add_serve]
