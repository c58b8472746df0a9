"""Pretraining: next-token prediction over a prepared token data directory.

    gptlab prepare --input input.txt --tokenizer char --out data/shakespeare
    gptlab train --data data/shakespeare --out runs/baby --config configs/baby-shakespeare-char.yaml
    torchrun --nproc_per_node 8 -m gptlab.cli train --data ... --out ... --preset gpt2 [--fsdp]

or from Python::

    model_cfg, train_cfg = pretrain_configs("data/shakespeare", "runs/baby",
                                            config_file="configs/baby-shakespeare-char.yaml")
    result = run_pretrain("data/shakespeare", "runs/baby", model_cfg, train_cfg)

The stage is small: batches are random windows of the train split, drawn
statelessly from ``(seed, step, micro_step)`` by ``data.PretrainBatches`` (each
rank takes its slice of the same global batch); the loss is the model's
cross-entropy; evaluation scores a fixed set of sequential val windows (loss
and bits per byte) and prints a short sample. Everything else is the trainer's.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..config import GPTConfig
from ..errors import ConfigError, TokenizerError, UserError
from ..trainer import (CONFIG_FILE, DistEnv, Trainer, TrainConfig, TrainResult, build_model_config,
                       check_run_dir, load_config_file, distributed)

__all__ = ["PretrainStage", "pretrain_configs", "run_pretrain"]


class PretrainStage:
    """Next-token loss over random train windows; val loss / bits per byte over fixed val windows."""

    name = "pretrain"

    def __init__(self, data: Any, batch_size: int, block_size: int, seed: int, *, rank: int = 0,
                 world_size: int = 1, eval_batches: int = 20, tokenizer: Any = None,
                 sample_tokens: int = 64, sample_prompt: str = "\n", sample_temperature: float = 0.8,
                 save_extra: dict[str, Any] | None = None) -> None:
        from ..data import PretrainBatches, eval_batches as sequential_batches

        self.data = data
        self.rank, self.world_size = rank, world_size
        self.batches = PretrainBatches(data.split("train"), batch_size, block_size, seed,
                                       rank=rank, world_size=world_size)
        # A fixed, deterministic validation set: the same windows at every evaluation and for any
        # number of processes (global batches of batch_size * world_size; each rank scores its rows).
        rows = slice(rank * batch_size, (rank + 1) * batch_size)
        self.val = [(x[rows], y[rows]) for x, y in sequential_batches(
            data.split("val"), batch_size * world_size, block_size, eval_batches)] if eval_batches > 0 else []
        self.val_bytes_per_token = float(data.bytes_per_token("val")) if self.val else 1.0
        self.tokenizer = tokenizer
        self.sample_tokens, self.sample_prompt = sample_tokens, sample_prompt
        self.sample_temperature, self.seed = sample_temperature, seed
        self.save_extra = save_extra or {}

    def batch(self, step: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batches.get(step, micro_step)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        x, y = batch
        _, loss = model(x, y)
        return loss, {}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        from ..evaluate import lm_loss_sums

        if not self.val:
            return {}
        nats, n = lm_loss_sums(model, self.val, world_size=self.world_size)
        loss = nats / n
        return {"val_loss": loss, "val_bpb": loss / math.log(2) / self.val_bytes_per_token}

    def sample(self, model: nn.Module) -> str:
        from ..engine import Engine, SamplingParams

        if self.tokenizer is None or self.sample_tokens == 0:
            return ""
        try:
            ids = self.tokenizer.encode(self.sample_prompt) or [self.tokenizer.eos_id]
        except TokenizerError:  # the prompt has characters outside a char vocabulary
            ids = [self.tokenizer.eos_id]
        params = SamplingParams(max_new_tokens=self.sample_tokens, temperature=self.sample_temperature,
                                top_k=200 if self.sample_temperature > 0 else None, seed=self.seed)
        completion = Engine(model, self.tokenizer).generate_ids([ids], params)[0]
        return self.tokenizer.decode(ids) + (completion.text or "")

    def save(self, run_dir: Path, model: nn.Module) -> None:
        from ..checkpoint import save_model

        save_model(run_dir, model, self.tokenizer, stage=self.name, extra=self.save_extra)


def _data_vocab(meta: dict[str, Any], data_dir: str) -> int:
    vocab = meta.get("vocab_size")
    if not isinstance(vocab, int) or vocab < 1:
        raise UserError(f"{data_dir}: meta.json has no valid vocab_size; re-run gptlab prepare")
    return vocab


def pretrain_configs(data_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                     config_file: str | os.PathLike[str] | None = None, preset: str | None = None,
                     train_overrides: dict[str, Any] | None = None,
                     resume: bool = False) -> tuple[GPTConfig, TrainConfig]:
    """Resolve the model and train configs of a pretraining run.

    Fresh run: preset (``--preset`` or the file's ``model.preset``) < the file's
    model fields < ``train.block_size``/``train.dropout``; train fields: defaults <
    file < ``train_overrides`` (the flags given on the command line). The
    vocabulary always comes from the data. Resumed run: the run's own
    ``config.json`` with ``train_overrides`` on top (e.g. a larger max_steps);
    a ``--config``/``--preset`` whose model differs from the run's is an error.
    """
    from ..data import TokenData

    overrides = {k: v for k, v in (train_overrides or {}).items() if v is not None}
    sections: dict[str, dict[str, Any]] = {"model": {}, "train": {}}
    if config_file is not None:
        sections = load_config_file(config_file)  # first: a bad file fails before anything is read
    data = TokenData(os.fspath(data_dir))
    vocab = _data_vocab(data.meta, os.fspath(data_dir))
    run_cfg_path = Path(out_dir) / CONFIG_FILE
    saved = None
    if resume and run_cfg_path.is_file():
        from ..checkpoint import read_run_config

        saved = read_run_config(out_dir)

    if preset is not None:
        sections["model"]["preset"] = preset
    source = os.fspath(config_file) if config_file is not None else "--preset"

    if saved is not None:
        base = dict(saved.get("train") or {})
        train = TrainConfig.from_dict({**base, **overrides}, source=f"{run_cfg_path}: train")
        model = GPTConfig.from_dict(saved["model"], source=str(run_cfg_path))
        if model.vocab_size != vocab:
            raise ConfigError(f"--resume: the run {out_dir} has vocab_size {model.vocab_size} but the data "
                              f"{data_dir} has {vocab}; resume with the run's own data")
        if config_file is not None or preset is not None:
            wanted = build_model_config(sections["model"], vocab, train, source=f"{source}: model")
            if wanted.to_dict() | {"name": ""} != model.to_dict() | {"name": ""}:
                raise ConfigError(f"--resume: the model from {source} differs from the run's ({run_cfg_path}); "
                                  f"drop --config/--preset when resuming, or use a new --out")
        return model, train

    if not sections["model"]:
        raise ConfigError("no model given: pass --preset NAME or --config FILE (with a model: section)")
    train = TrainConfig.from_dict({**sections["train"], **overrides},
                                  source=f"{source}: train" if config_file is not None else "train flags")
    model = build_model_config(sections["model"], vocab, train, source=f"{source}: model")
    if train.block_size is not None and train.block_size > model.block_size:
        raise ConfigError(f"block_size {train.block_size} exceeds the model's context {model.block_size}")
    return model, train


def run_pretrain(data_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], model_config: GPTConfig,
                 train_config: TrainConfig, resume: bool = False, *, progress: bool = True,
                 env: DistEnv | None = None) -> TrainResult:
    """Pretrain a fresh ``GPT(model_config)`` (or resume ``out_dir``) on ``data_dir``.

    Under torchrun this joins the process group (DDP, or FSDP2 with
    ``train_config.fsdp``); only rank 0 writes files and prints.
    """
    from ..data import TokenData
    from ..model import GPT

    with distributed(env, train_config.device) as env:
        data = TokenData(os.fspath(data_dir))
        vocab = _data_vocab(data.meta, os.fspath(data_dir))
        if model_config.vocab_size != vocab:
            raise ConfigError(f"model vocab_size {model_config.vocab_size} differs from the data's "
                              f"tokenizer ({vocab}); the vocabulary comes from the data")
        block = train_config.block_size or model_config.block_size
        if block > model_config.block_size:
            raise ConfigError(f"block_size {block} exceeds the model's context {model_config.block_size}")
        if train_config.dropout is not None and train_config.dropout != model_config.dropout:
            model_config = GPTConfig.from_dict({**model_config.to_dict(), "dropout": train_config.dropout})
        started = check_run_dir(out_dir, resume)
        if env.is_distributed:
            torch.distributed.barrier()  # every rank has looked before rank 0 writes
        tokenizer = data.tokenizer()
        spec = data.meta.get("tokenizer")
        extra = {"train": train_config.to_dict(),
                 "data": {"dir": os.path.abspath(os.fspath(data_dir)),
                          "tokenizer": spec if isinstance(spec, (str, dict)) else None}}
        run_config = {"format_version": 1, "model": model_config.to_dict(),
                      "tokenizer": "tokenizer" if tokenizer is not None else None,
                      "stage": PretrainStage.name, **extra}
        if env.is_main and tokenizer is not None and not started:
            tokenizer.save(Path(out_dir) / "tokenizer")

        torch.manual_seed(train_config.seed)  # the same initial weights on every rank
        model = GPT(model_config)
        stage = PretrainStage(data, train_config.batch_size, block, train_config.seed,
                              rank=env.rank, world_size=env.world_size,
                              eval_batches=train_config.eval_batches, tokenizer=tokenizer,
                              sample_tokens=train_config.sample_tokens, sample_prompt=train_config.sample_prompt,
                              sample_temperature=train_config.sample_temperature, save_extra=extra)
        trainer = Trainer(model, stage, train_config, out_dir, env=env, resume=resume,
                          run_config=run_config, progress=progress)
        return trainer.fit()
