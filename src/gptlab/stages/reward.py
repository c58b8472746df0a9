"""InstructGPT step 2: a reward model trained on rankings of K responses per prompt.

    gptlab rm --model runs/sft --data rankings.jsonl --out runs/rm [--val-fraction 0.1 --max-steps N]

The reward model is the SFT model with its LM head set aside and a scalar head
(``heads.ScalarModel``) read at the last real token of ``prompt + response +
<|end|>`` (rendered by ``chat.render_pair``). Its loss is InstructGPT's::

    loss(θ) = -1/C(K,2) · Σ_{(y_w, y_l)} log σ(r_θ(x, y_w) - r_θ(x, y_l))

with all C(K,2) pairs of a prompt in one batch element: the K responses go
through the model once and every pair is formed from those K scores (K forward
passes instead of K(K-1)), and one prompt's correlated pairs cannot overfit
across many steps. ``val_accuracy`` is the held-out pairwise accuracy, pairs
counted individually.

After training, the head's bias is shifted so that the SFT model's own
responses (sampled at T = 1 for up to 256 training prompts before training
starts) score mean 0, the paper's normalisation, so that PPO starts near zero reward.
A reward-model run directory holds the backbone (``model.safetensors``),
``reward_head.safetensors`` and a ``reward`` section in config.json.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..align_data import load_rankings
from ..chat import render_pair, render_prompt
from ..errors import CheckpointError, DataError
from ..heads import ScalarModel, load_head, save_head
from ..rl import ranking_loss
from ..trainer import DistEnv, TrainConfig, Trainer, TrainResult
from .sequences import align_run_config, data_record, pad_right, sample_replies, split_held_out, stage_run
from .sft import load_chat_model

__all__ = ["RM_DEFAULTS", "RM_EPOCHS", "RewardStage", "encode_rankings", "sample_responses", "run_rm",
           "save_reward_model", "load_reward_model"]

RM_EPOCHS = 1  # InstructGPT: one epoch (the reward model overfits after that)
RM_DEFAULTS: dict[str, Any] = {"batch_size": 8, "lr": 1e-4, "min_lr": 0.0, "weight_decay": 0.0}
HEAD_FILE = "reward_head.safetensors"
NORM_PROMPTS = 256


def encode_rankings(path: str | os.PathLike[str], tokenizer: Any, max_len: int) -> list[tuple[str, list[list[int]]]]:
    """(prompt, token ids of each response best -> worst) per ranking; over-long ones keep their end."""
    out = []
    for r in load_rankings(path):
        seqs = [render_pair(r.prompt, resp, tokenizer)[0][-max_len:] for resp in r.responses]
        out.append((r.prompt, seqs))
    return out


def _collate(groups: Sequence[Sequence[list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    seqs = [s for g in groups for s in g]
    idx, lengths = pad_right(seqs, pad_id)
    slot = torch.full((len(groups), max(map(len, groups))), -1, dtype=torch.long)
    n = 0
    for i, g in enumerate(groups):
        slot[i, : len(g)] = torch.arange(n, n + len(g))
        n += len(g)
    return {"idx": idx, "lengths": lengths, "slot": slot}


def _group_scores(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    values = model(batch["idx"])  # (N, T): one call, so DDP sees the whole forward
    lengths, slot = batch["lengths"], batch["slot"]
    scores = values[torch.arange(values.shape[0], device=values.device), lengths - 1]
    return scores[slot.clamp(min=0)], slot >= 0


class RewardStage:
    """Random ranking groups per micro batch (stateless in ``(seed, step, micro_step)``), the K-way loss."""

    name = "rm"

    def __init__(self, train: Sequence[Sequence[list[int]]], val: Sequence[Sequence[list[int]]], *, batch_size: int,
                 seed: int, pad_id: int, rank: int = 0, world_size: int = 1, tokenizer: Any = None,
                 norm_seqs: Sequence[list[int]] = (), save_extra: dict[str, Any] | None = None) -> None:
        if not train:
            raise DataError("no training rankings (all held out for validation?); add rows or lower --val-fraction")
        self.train, self.val = list(train), list(val)
        self.batch_size, self.seed, self.pad_id = batch_size, seed, pad_id
        self.rank, self.world_size = rank, world_size
        self.tokenizer, self.norm_seqs, self.save_extra = tokenizer, list(norm_seqs), save_extra or {}

    def batch(self, step: int, micro_step: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, step, micro_step])
        picks = rng.integers(0, len(self.train), size=self.batch_size * self.world_size)
        mine = picks[self.rank * self.batch_size: (self.rank + 1) * self.batch_size]
        return _collate([self.train[i] for i in mine], self.pad_id)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        scores, valid = _group_scores(model, batch)
        loss, correct, total = ranking_loss(scores, valid)
        return loss, {"accuracy": correct / total}

    def num_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["lengths"].sum())

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Loss and pairwise accuracy over every held-out ranking."""
        if not self.val:
            return {}
        device = next(model.parameters()).device
        loss_sum, correct, total = 0.0, 0.0, 0.0
        for i in range(0, len(self.val), self.batch_size):
            chunk = self.val[i: i + self.batch_size]
            b = {k: v.to(device) for k, v in _collate(chunk, self.pad_id).items()}
            loss, c, t = ranking_loss(*_group_scores(model, b))
            loss_sum, correct, total = loss_sum + float(loss) * len(chunk), correct + float(c), total + float(t)
        return {"val_loss": loss_sum / len(self.val), "val_accuracy": correct / total}

    @torch.no_grad()
    def save(self, run_dir: Path, model: nn.Module) -> None:
        """Shift the bias so the SFT model's own responses score mean 0, then write the run."""
        shift = 0.0
        if self.norm_seqs:
            was_training = model.training
            model.eval()
            device = next(model.parameters()).device
            scores = []
            for i in range(0, len(self.norm_seqs), 32):
                idx, lengths = pad_right(self.norm_seqs[i: i + 32], self.pad_id)
                scores.append(model.score(idx.to(device), lengths.to(device)))
            shift = float(torch.cat(scores).mean())
            model.head.bias -= shift
            model.train(was_training)
        reward = {**self.save_extra.get("reward", {}), "bias_shift": shift, "normalized_on": len(self.norm_seqs)}
        save_reward_model(run_dir, model, self.tokenizer, {**self.save_extra, "reward": reward})


def sample_responses(gpt: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int, seed: int,
                     temperature: float = 1.0, batch_size: int = 32) -> list[list[int]]:
    """``prompt + response (+ the stop token when it ended)`` ids for each prompt, sampled from ``gpt``."""
    ids = [render_prompt(p, tokenizer)[-(gpt.config.block_size // 2):] for p in prompts]
    replies = sample_replies(gpt, tokenizer, ids, max_new_tokens=max_new_tokens, seed=seed, temperature=temperature,
                             batch_size=batch_size)
    return [p + c.token_ids + ([c.stop_token] if c.stop_token is not None else []) for p, c in zip(ids, replies)]


def save_reward_model(run_dir: str | os.PathLike[str], model: ScalarModel, tokenizer: Any,
                      extra: dict[str, Any]) -> Path:
    """The head file first, then the backbone run directory whose config.json records it."""
    from ..checkpoint import save_model

    reward = {**extra.get("reward", {}), "head": save_head(run_dir, model.head, HEAD_FILE)}
    return save_model(run_dir, model.gpt, tokenizer, stage=RewardStage.name, extra={**extra, "reward": reward})


def load_reward_model(spec: str | os.PathLike[str],
                      device: str | torch.device = "cpu") -> tuple[ScalarModel, Any, dict[str, Any]]:
    """(reward model in eval mode, tokenizer, config.json) of a ``gptlab rm`` run."""
    from ..checkpoint import load_run

    gpt, tokenizer, config = load_run(spec, device=device)
    reward = config.get("reward")
    if not isinstance(reward, dict):
        raise CheckpointError(f"{spec}: not a reward-model run (config.json has no reward section); "
                              f"train one with gptlab rm")
    if tokenizer is None:
        raise CheckpointError(f"{spec}: the run has no tokenizer directory; copy the whole run directory")
    model = ScalarModel(gpt.config, gpt)
    load_head(spec, reward.get("head"), model.head, "reward model")
    return model.to(device).eval(), tokenizer, config


def run_rm(model_spec: str, data_file: str | os.PathLike[str], out_dir: str | os.PathLike[str],
           train_config: TrainConfig, *, val_file: str | os.PathLike[str] | None = None, val_fraction: float = 0.1,
           norm_tokens: int = 64, resume: bool = False, progress: bool = True,
           env: DistEnv | None = None) -> TrainResult:
    """Train a reward model from the SFT run ``model_spec`` on the rankings in ``data_file``.

    Validation: ``val_file``, or the rankings whose prompt hashes into ``val_fraction``.
    ``norm_tokens`` bounds the SFT responses sampled for the reward normalisation.
    """
    with stage_run(out_dir, resume, train_config, env, val_fraction) as (env, started):
        gpt, tokenizer, _ = load_chat_model(model_spec, train_config.dropout)
        max_len = min(train_config.block_size or gpt.config.block_size, gpt.config.block_size)
        rows = encode_rankings(data_file, tokenizer, max_len)
        groups = [g for _, g in rows]
        if val_file is not None:
            train, val = groups, [g for _, g in encode_rankings(val_file, tokenizer, max_len)]
            train_prompts = [p for p, _ in rows]
        else:
            keys = [p for p, _ in rows]
            train, val = split_held_out(keys, groups, val_fraction, train_config.seed)
            train_prompts, _ = split_held_out(keys, keys, val_fraction, train_config.seed)
        prompts = list(dict.fromkeys(train_prompts))[:NORM_PROMPTS]
        norm_seqs = sample_responses(gpt, tokenizer, prompts, max_new_tokens=min(norm_tokens, max_len // 2),
                                     seed=train_config.seed)
        model = ScalarModel(gpt.config, gpt)
        extra, run_config = align_run_config(
            RewardStage.name, gpt.config, train_config,
            {"train_rankings": len(train), "val_rankings": len(val), "val_fraction": None if val_file else val_fraction},
            data_record(model_spec, data_file, val_file), key="reward")
        if env.is_main and not started:
            tokenizer.save(Path(out_dir) / "tokenizer")
        stage = RewardStage(train, val, batch_size=train_config.batch_size, seed=train_config.seed,
                            pad_id=tokenizer.pad_id, rank=env.rank, world_size=env.world_size, tokenizer=tokenizer,
                            norm_seqs=norm_seqs, save_extra=extra)
        return Trainer(model, stage, train_config, out_dir, env=env, resume=resume, run_config=run_config,
                       progress=progress).fit()
