"""The training commands, one per stage: ``gptlab train`` (pretraining), ``finetune``, ``sft``, ``rm``, ``dpo``, ``ppo``.

Each maps its inputs and its generated flags (the fields of ``TrainConfig``, of
the stage's own config and, for ``train``, of ``GPTConfig``) onto the stage's
``run_*``; the stage resolves them against a config file and a resumed run.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable, Mapping

from ..config import Config, GPTConfig
from ..lora import LoRAConfig
from ..stages.dpo import DPO_TRAIN, DPOConfig, run_dpo
from ..stages.finetune import FINETUNE_TRAIN, FinetuneConfig, run_finetune
from ..stages.ppo import PPO_ITERATIONS, PPO_TRAIN, PPOConfig, run_ppo
from ..stages.pretrain import run_pretrain
from ..stages.reward import RM_TRAIN, RMConfig, run_rm
from ..stages.sft import SFT_TRAIN, SFTConfig, run_sft
from ..stages.common import TrainDefaults
from ..train.config import TrainConfig
from ..train.loop import TrainResult
from .args import Adder, add_fields, exit_code, given

__all__ = ["COMMANDS"]

NO_VERIFY: dict[str, Any] = {"action": "store_true", "help": "skip checking the data's shards against meta.json "
                             "(sha256, ids below the vocabulary; done once per change) for corpora too large to read twice"}
RESUME_HELP = "continue the run in --out from its latest checkpoint (its saved configs; flags may extend training)"


# An input's flag names (the first is its name, the others aliases) and argparse options.
Inputs = list[tuple[str | tuple[str, ...], dict[str, Any]]]


def _stage_parser(sub: argparse._SubParsersAction, name: str, help: str, inputs: Inputs,
                  settings: type[Config], train_defaults: Mapping[str, str],
                  rename: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """A stage command's parser: its inputs, --out, --config and --resume, then the flags of its settings
    (``settings``: the model's for pretraining) and of the trainer."""
    p = sub.add_parser(name, help=help)
    for flags, options in inputs:
        p.add_argument(*((flags,) if isinstance(flags, str) else flags), **options)
    p.add_argument("--out", required=True, help="run directory (checkpoints, metrics.jsonl, loss.png, final model)")
    p.add_argument("--config", default=None, help=f"YAML/JSON file with {settings.section}: and train: sections "
                                                   f"(flags override it; a resumed run keeps its saved configs)")
    p.add_argument("--resume", action="store_true", help=RESUME_HELP)
    if settings is GPTConfig:
        add_fields(p, GPTConfig, title="model (GPTConfig): a preset's or the config file's values, changed by these "
                                       "(--block-size and --dropout below shape a new model too)",
                   skip=("vocab_size", "block_size", "dropout"))  # the vocabulary is the data's
    else:
        add_fields(p, settings, title=f"{name} settings ({settings.__name__}; kept by a resumed run)", rename=rename)
    add_fields(p, LoRAConfig, title="LoRA adapters (LoRAConfig; kept by a resumed run"
                                     + ("; with --init-from" if name == "train" else "") + ")")
    add_fields(p, TrainConfig, title="training (TrainConfig)", defaults=train_defaults)
    return p


# ------------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> int:
    model: dict[str, Any] = given(args, GPTConfig)
    if args.preset is not None:
        model["preset"] = args.preset
    return exit_code(run_pretrain(args.data, args.out, model, given(args, TrainConfig), init_from=args.init_from,
                                  lora=given(args, LoRAConfig), config_file=args.config, resume=args.resume, verify_data=not args.no_verify).signal)


def add_train(sub: argparse._SubParsersAction) -> None:
    p = _stage_parser(sub, "train", "pretrain a GPT on a prepared data directory (resumable; torchrun for DDP/FSDP)",
                      [("--data", {"required": True, "help": "data directory from `gptlab prepare`"}),
                       ("--no-verify", NO_VERIFY),
                       ("--preset", {"help": "model preset (see `gptlab presets`); the model flags change its fields"}),
                       ("--init-from", {"metavar": "RUN_DIR|hf:DIR",
                                        "help": "continue training this model (config and weights; a fresh optimizer): "
                                                "--block-size may crop its context, --dropout change; the data must "
                                                "use its tokenizer"})],
                      GPTConfig, {})
    p.set_defaults(func=cmd_train)


# ---------------------------------------------------------------- finetune
def cmd_finetune(args: argparse.Namespace) -> int:
    return exit_code(run_finetune(args.model, args.train, args.val, args.out, given(args, TrainConfig),
                                  given(args, FinetuneConfig), lora=given(args, LoRAConfig), config_file=args.config, resume=args.resume).signal)


def add_finetune(sub: argparse._SubParsersAction) -> None:
    p = _stage_parser(sub, "finetune", "GPT-1 supervised fine-tuning of a run on a task file (resumable)",
                      [("--model", {"required": True, "help": "run directory or hf:DIR to fine-tune"}),
                       ("--train", {"required": True, "help": "train task file (JSONL; its labels are the label set)"}),
                       ("--val", {"required": True, "help": "validation task file, scored whole at each evaluation"})],
                      FinetuneConfig, {**FINETUNE_TRAIN.help(), "dropout": "the model's; the classifier's 0.1"},
                      rename={"task_type": "task"})
    p.set_defaults(func=cmd_finetune)


# ------------------------------------------------------------ sft, rm, dpo
def _add_alignment(name: str, help: str, settings: type[Config], defaults: TrainDefaults, run: Callable[..., TrainResult],
                   model_help: str, data_help: str) -> Adder:
    """The commands that take a chat model, a data file and an optional validation file (sft, rm, dpo)."""
    def command(args: argparse.Namespace) -> int:
        return exit_code(run(args.model, args.data, args.out, given(args, TrainConfig), given(args, settings),
                             lora=given(args, LoRAConfig), val_file=args.val, config_file=args.config, resume=args.resume).signal)

    def add(sub: argparse._SubParsersAction) -> None:
        p = _stage_parser(sub, name, help, [
            ("--model", {"required": True, "help": model_help}), ("--data", {"required": True, "help": data_help}),
            ("--val", {"help": "validation file (default: hold out --val-fraction of --data by prompt)"})],
            settings, defaults.help())
        p.set_defaults(func=command)
    return add


add_sft = _add_alignment("sft", "InstructGPT step 1: supervised fine-tuning on demonstrations (chat format)",
                         SFTConfig, SFT_TRAIN, run_sft, "run directory or hf:DIR to start from",
                         'JSONL of {"prompt", "response"} or {"messages": [...]} rows')
add_rm = _add_alignment("rm", "InstructGPT step 2: reward model from rankings of K responses per prompt",
                        RMConfig, RM_TRAIN, run_rm, "the SFT run directory (the reward model starts from it)",
                        'JSONL of {"prompt", "responses", "ranking"} and/or {"prompt", "chosen", "rejected"} rows')
add_dpo = _add_alignment("dpo", "direct preference optimisation of an SFT run on the same ranking files",
                         DPOConfig, DPO_TRAIN, run_dpo, "the SFT run directory (policy and frozen reference)",
                         "rankings JSONL (every ranked pair is used)")


# --------------------------------------------------------------------- ppo
def cmd_ppo(args: argparse.Namespace) -> int:
    return exit_code(run_ppo(args.model, args.reward, args.prompts, args.out, given(args, TrainConfig),
                             given(args, PPOConfig), iterations=args.iterations, ptx_data=args.ptx_data,
                             lora=given(args, LoRAConfig),
                             config_file=args.config, resume=args.resume, verify_data=not args.no_verify).signal)


PPO_TRAIN_HELP = {**{k: repr(v) for k, v in PPO_TRAIN.items()},
                  "max_steps": "iterations x ppo_epochs x minibatches",
                  "batch_size": f"{PPO_TRAIN['batch_size']}: the pretraining (ptx) rows per update",
                  "min_lr": f"{PPO_TRAIN['min_lr']}: the learning rate stays constant",
                  "eval_every": "a tenth of the iterations", "checkpoint_every": "a tenth of the iterations"}


def add_ppo(sub: argparse._SubParsersAction) -> None:
    p = _stage_parser(sub, "ppo", "InstructGPT step 3: PPO against a reward model, per-token KL, optional PPO-ptx", [
        (("--model", "--policy"), {"required": True, "dest": "model",
                                   "help": "the SFT run directory (policy init and frozen reference; --policy "
                                           "is the same flag under its older name)"}),
        ("--reward", {"required": True, "help": "the reward-model run directory (also the value function's init)"}),
        ("--prompts", {"required": True, "help": 'JSONL with a "prompt" field per row'}),
        ("--ptx-data", {"help": "data directory from gptlab prepare for the pretraining mix"}),
        ("--no-verify", NO_VERIFY),
        ("--iterations", {"type": int, "help": f"PPO iterations: rollout + ppo_epochs x minibatches updates "
                                               f"(default {PPO_ITERATIONS}; on --resume: the new total)"})],
        PPOConfig, PPO_TRAIN_HELP)
    p.set_defaults(func=cmd_ppo)


COMMANDS = [add_train, add_finetune, add_sft, add_rm, add_dpo, add_ppo]
