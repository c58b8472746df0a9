"""The InstructGPT, chat and serving commands of the CLI: ``gptlab sft | rm | ppo | dpo | rlhf-demo | chat | serve``.

Each maps its flags onto a stage's ``run_*`` function (``gptlab.stages``); the
trainer flags are shared with ``gptlab finetune`` (``cli.add_train_flags``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import threading
from pathlib import Path
from typing import Any, Callable

from .cli import add_train_flags, train_overrides

__all__ = ["ALIGN_SUBCOMMANDS"]


def _exit(result: Any) -> int:
    return 128 + result.signal if result.signal else 0


def _common(p: argparse.ArgumentParser, val_fraction: float, helps: dict[str, str]) -> None:
    p.add_argument("--val", default=None, help="validation file (default: hold out --val-fraction of --data by prompt)")
    p.add_argument("--val-fraction", type=float, default=val_fraction,
                   help=f"share of prompts held out for validation when --val is not given (default {val_fraction})")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    add_train_flags(p, helps)


# --------------------------------------------------------------------- sft
def cmd_sft(args: argparse.Namespace) -> int:
    from .align_data import load_sft
    from .stages.sft import SFT_DEFAULTS, SFT_EPOCHS, run_sft
    from .trainer import epoch_config

    n = len(load_sft(args.data))
    cfg, _ = epoch_config(args.out, n, train_overrides(args), SFT_DEFAULTS, SFT_EPOCHS, resume=args.resume,
                          source="sft flags")
    return _exit(run_sft(args.model, args.data, args.out, cfg, val_file=args.val, val_fraction=args.val_fraction,
                         pack=args.pack, resume=args.resume))


def add_sft(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sft", help="InstructGPT step 1: supervised fine-tuning on demonstrations (chat format)")
    p.add_argument("--model", required=True, help="run directory or hf:DIR to start from")
    p.add_argument("--data", required=True, help='JSONL of {"prompt", "response"} or {"messages": [...]} rows')
    p.add_argument("--out", required=True, help="run directory for the SFT model")
    p.add_argument("--pack", action="store_true", help="pack whole examples into full rows (fewer pad tokens)")
    _common(p, 0.05, {"max_steps": "optimizer steps (default: 3 epochs)", "batch_size": "rows per micro batch (16)",
                      "lr": "peak learning rate (1e-4), cosine decay to 0", "weight_decay": "AdamW weight decay (0)"})
    p.set_defaults(func=cmd_sft)


# ---------------------------------------------------------------------- rm
def cmd_rm(args: argparse.Namespace) -> int:
    from .align_data import load_rankings
    from .stages.reward import RM_DEFAULTS, RM_EPOCHS, run_rm
    from .trainer import epoch_config

    n = len(load_rankings(args.data))
    cfg, _ = epoch_config(args.out, n, train_overrides(args), RM_DEFAULTS, RM_EPOCHS, resume=args.resume,
                          source="rm flags")
    return _exit(run_rm(args.model, args.data, args.out, cfg, val_file=args.val, val_fraction=args.val_fraction,
                        resume=args.resume))


def add_rm(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rm", help="InstructGPT step 2: reward model from rankings of K responses per prompt")
    p.add_argument("--model", required=True, help="the SFT run directory (the reward model starts from it)")
    p.add_argument("--data", required=True,
                   help='JSONL of {"prompt", "responses", "ranking"} and/or {"prompt", "chosen", "rejected"} rows')
    p.add_argument("--out", required=True, help="run directory for the reward model")
    _common(p, 0.1, {"max_steps": "optimizer steps (default: 1 epoch, as InstructGPT)",
                     "batch_size": "rankings (prompts) per micro batch (8)", "lr": "peak learning rate (1e-4)"})
    p.set_defaults(func=cmd_rm)


# --------------------------------------------------------------------- dpo
def cmd_dpo(args: argparse.Namespace) -> int:
    from .align_data import load_rankings
    from .stages.dpo import DPO_DEFAULTS, DPO_EPOCHS, run_dpo
    from .trainer import epoch_config

    n = sum(len(r.responses) * (len(r.responses) - 1) // 2 for r in load_rankings(args.data))
    cfg, saved = epoch_config(args.out, n, train_overrides(args), DPO_DEFAULTS, DPO_EPOCHS, resume=args.resume,
                              source="dpo flags")
    beta = args.beta if args.beta is not None else float((saved.get("dpo") or {}).get("beta", 0.1))
    return _exit(run_dpo(args.model, args.data, args.out, cfg, beta=beta, val_file=args.val,
                         val_fraction=args.val_fraction, resume=args.resume))


def add_dpo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dpo", help="direct preference optimisation of an SFT run on the same ranking files")
    p.add_argument("--model", required=True, help="the SFT run directory (policy and frozen reference)")
    p.add_argument("--data", required=True, help="rankings JSONL (every ranked pair is used)")
    p.add_argument("--out", required=True, help="run directory for the DPO policy")
    p.add_argument("--beta", type=float, default=None, help="β: strength of the KL constraint (default 0.1)")
    _common(p, 0.1, {"max_steps": "optimizer steps (default: 2 epochs over the pairs)",
                     "batch_size": "pairs per micro batch (16)", "lr": "peak learning rate (5e-5)"})
    p.set_defaults(func=cmd_dpo)


# --------------------------------------------------------------------- ppo
PPO_FLAGS = ("rollout_batch", "minibatches", "ppo_epochs", "max_new_tokens", "temperature", "kl_coef", "kl_target",
             "ptx_coef", "ptx_batch", "vf_coef", "missing_eos_penalty", "max_kl", "gamma", "lam", "clip_range")


def cmd_ppo(args: argparse.Namespace) -> int:
    from .checkpoint import read_run_config
    from .stages.ppo import PPOConfig, ppo_train_config, run_ppo

    given = {k: getattr(args, k) for k in PPO_FLAGS if getattr(args, k) is not None}
    saved = read_run_config(args.out) if args.resume and (Path(args.out) / "config.json").is_file() else {}
    cfg = PPOConfig.from_dict({**(saved.get("ppo") or {}), **given})
    overrides = train_overrides(args)
    if saved:
        from .trainer import TrainConfig

        train = TrainConfig.from_dict({**saved["train"], **{k: v for k, v in overrides.items() if v is not None}})
    else:
        train = ppo_train_config(cfg, args.iterations, overrides)
    return _exit(run_ppo(args.policy, args.reward, args.prompts, args.out, train, cfg, ptx_data=args.ptx_data,
                         val_fraction=args.val_fraction, resume=args.resume))


def add_ppo(sub: argparse._SubParsersAction) -> None:
    from .stages.ppo import PPOConfig

    d = PPOConfig()
    p = sub.add_parser("ppo", help="InstructGPT step 3: PPO against a reward model, per-token KL, optional PPO-ptx")
    p.add_argument("--policy", required=True, help="the SFT run directory (policy init and frozen reference)")
    p.add_argument("--reward", required=True, help="the reward-model run directory (also the value function's init)")
    p.add_argument("--prompts", required=True, help='JSONL with a "prompt" field per row')
    p.add_argument("--out", required=True, help="run directory for the PPO policy")
    p.add_argument("--ptx-data", default=None, help="data directory from gptlab prepare for the pretraining mix")
    p.add_argument("--iterations", type=int, default=100,
                   help="PPO iterations (rollout + ppo_epochs x minibatches updates; default 100)")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="share of prompts held out for val_reward / val_kl (at most 64)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    for f in dataclasses.fields(PPOConfig):
        if f.name not in PPO_FLAGS:
            continue
        typ = int if f.name in ("rollout_batch", "minibatches", "ppo_epochs", "max_new_tokens", "ptx_batch") else float
        p.add_argument(f"--{f.name.replace('_', '-')}", type=typ, default=None,
                       help=f"default {getattr(d, f.name)}")
    add_train_flags(p, {"max_steps": "optimizer steps (default: iterations x ppo_epochs x minibatches)",
                        "lr": "learning rate (1e-5, constant)", "batch_size": "pretraining (ptx) rows per step"})
    p.set_defaults(func=cmd_ppo)


# --------------------------------------------------------------- rlhf-demo
def cmd_rlhf_demo(args: argparse.Namespace) -> int:
    from .rlhf_demo import run_rlhf_demo

    run_rlhf_demo(args.out, minutes=args.minutes, quick=args.quick, seed=args.seed)
    return 0


def add_rlhf_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rlhf-demo", help="the whole InstructGPT chain offline on tweets: pretrain, labeler, SFT, "
                                         "rankings, RM, PPO, DPO, measured")
    p.add_argument("--out", default="runs/rlhf-demo", help="directory for every run, data file and the report")
    p.add_argument("--minutes", type=float, default=None, help="time budget (scales every stage's steps)")
    p.add_argument("--quick", action="store_true", help="a smoke run of a few minutes (numbers meaningless)")
    p.add_argument("--seed", type=int, default=1337)
    p.set_defaults(func=cmd_rlhf_demo)


# ------------------------------------------------------------------- chat
def cmd_chat(args: argparse.Namespace) -> int:
    from .checkpoint import load_run
    from .chat_repl import run_chat
    from .engine import Engine, SamplingParams
    from .errors import UserError

    model, tokenizer, config = load_run(args.model)
    if not config.get("chat_format"):
        raise UserError(f"{args.model} has no chat format (it was not trained with gptlab sft, ppo or dpo): "
                        f"fine-tune it with gptlab sft first, or use gptlab generate for plain completion")
    engine = Engine(model, tokenizer, precision=args.precision)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed)
    run_chat(engine, params, system=args.system)
    return 0


def add_chat(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="talk to a chat model (gptlab sft/ppo/dpo run) in the terminal, streaming")
    p.add_argument("--model", required=True, help="run directory with a chat format, or hf:DIR")
    p.add_argument("--system", default=None, help="system prompt (change it in the chat with /system TEXT)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="longest reply in tokens (default 128)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--precision", choices=["fp32", "int8"], default="fp32")
    p.set_defaults(func=cmd_chat)


# ------------------------------------------------------------------ serve
def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .checkpoint import load_run
    from .errors import UserError
    from .serve import create_app

    for flag in ("max_body_bytes", "max_queue", "max_batch"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')}={getattr(args, flag)} must be >= 1")
    directory = Path(str(args.model).removeprefix("hf:")).expanduser()
    name = args.model_name or directory.resolve().name
    app = create_app(load=lambda: load_run(args.model), model_name=name, api_key=args.api_key,
                     max_body_bytes=args.max_body_bytes, max_queue=args.max_queue, max_batch=args.max_batch,
                     data_dir=args.data_dir or directory)
    model_server = app.state.server
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning"))
    original_startup = server.startup

    def announce() -> None:  # /health answers 503 while the model loads; the URL is printed once it is ready
        model_server.ready.wait()
        if model_server.load_error:
            print(f"gptlab serve: error: {model_server.load_error}", file=sys.stderr, flush=True)
            server.should_exit = True
            return
        host = f"[{args.host}]" if ":" in args.host else args.host
        port = server.servers[0].sockets[0].getsockname()[1] if server.servers else args.port
        print(f"gptlab serve: model '{name}' at http://{host}:{port}/v1 (web chat: http://{host}:{port}/; "
              "Ctrl-C stops)", flush=True)

    async def startup(sockets: Any = None) -> None:
        await original_startup(sockets=sockets)
        if server.started:
            threading.Thread(target=announce, daemon=True).start()

    server.startup = startup  # type: ignore[method-assign]
    server.run()
    return 2 if model_server.load_error else 0


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
                   help="where the web pages append feedback.jsonl and rankings.jsonl (default: the model's directory)")
    p.set_defaults(func=cmd_serve)


ALIGN_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_sft, add_rm, add_ppo, add_dpo,
                                                                          add_rlhf_demo, add_chat, add_serve]
