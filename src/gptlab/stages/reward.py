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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
import torch.nn as nn

from ..align_data import load_rankings
from ..chat import CHAT_FORMAT, render_pair, render_prompt
from ..config import Config
from ..data import rank_draw
from ..errors import DataError, naming
from ..heads import ScalarModel
from ..hf import HFHead
from ..lora import add_lora
from ..model import GPT
from ..rl import ranking_loss
from ..runs import load_with_head, save_model
from ..tokenizer import Tokenizer
from ..train.config import Given
from ..train.dist import DistEnv
from ..train.loop import Stage, TrainResult
from .common import (StageRun, TrainDefaults, chat_pad_id, count_unknown, data_record, load_chat_model, pad_right, sample_replies,
                     split_held_out)

__all__ = ["RM_TRAIN", "RMConfig", "RewardStage", "encode_rankings", "sample_responses", "run_rm",
           "save_reward_model", "load_reward_model"]

# InstructGPT: one epoch (the reward model overfits after that).
RM_TRAIN = TrainDefaults({"batch_size": 8, "lr": 1e-4, "min_lr": 0.0, "weight_decay": 0.0}, epochs=1)
HEAD_FILE = "reward_head.safetensors"
NORM_PROMPTS = 256


@dataclass
class RMConfig(Config):
    """The reward model's own settings (config.json's ``reward`` section)."""

    section: ClassVar[str] = "reward"

    val_fraction: float = 0.1
    """share of prompts held out for validation when no --val file is given"""
    norm_tokens: int = 64
    """longest SFT response sampled for the reward normalisation (mean 0 on the SFT model's own samples)"""

    def validate(self) -> None:
        self.need(0 <= self.val_fraction < 1, f"val_fraction={self.val_fraction} must be in [0, 1)")
        self.need(self.norm_tokens >= 1, f"norm_tokens={self.norm_tokens} must be >= 1")


def encode_rankings(path: str | os.PathLike[str], tokenizer: Tokenizer, max_len: int) -> list[tuple[str, list[list[int]]]]:
    """(prompt, token ids of each response best -> worst) per ranking; over-long ones keep their end."""
    out = []
    for r in load_rankings(path):
        with naming(f"{path}:{r.line}"):
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


class RewardStage(Stage[ScalarModel]):
    """Random ranking groups per micro batch (stateless in ``(seed, step, micro_step)``), the K-way loss."""

    name = "rm"

    def __init__(self, train: Sequence[Sequence[list[int]]], val: Sequence[Sequence[list[int]]], *, batch_size: int,
                 seed: int, pad_id: int, rank: int = 0, world_size: int = 1, tokenizer: Tokenizer | None = None,
                 norm_seqs: Sequence[list[int]] = (), save_extra: dict[str, Any] | None = None) -> None:
        if not train:
            raise DataError("no training rankings (all held out for validation?); add rows or lower --val-fraction")
        self.train, self.val = list(train), list(val)
        self.batch_size, self.seed, self.pad_id = batch_size, seed, pad_id
        self.rank, self.world_size = rank, world_size
        self.tokenizer, self.norm_seqs, self.save_extra = tokenizer, list(norm_seqs), save_extra or {}

    def batch(self, step: int, micro_step: int) -> dict[str, torch.Tensor]:
        mine = rank_draw((self.seed, step, micro_step), len(self.train), self.batch_size, self.rank, self.world_size)
        return _collate([self.train[i] for i in mine], self.pad_id)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        scores, valid = _group_scores(model, batch)
        loss, correct, total = ranking_loss(scores, valid)
        return loss, {"accuracy": correct / total}

    def num_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["lengths"].sum())

    def evaluate(self, model: ScalarModel) -> dict[str, float]:
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
    def save(self, run_dir: Path, model: ScalarModel) -> None:
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
            model.head.bias.sub_(shift)
            model.train(was_training)
        reward = {**self.save_extra.get("reward", {}), "bias_shift": shift, "normalized_on": len(self.norm_seqs)}
        save_reward_model(run_dir, model, self.tokenizer, {**self.save_extra, "reward": reward})


def sample_responses(gpt: GPT, tokenizer: Tokenizer, prompts: Sequence[str], *, max_new_tokens: int, seed: int,
                     temperature: float = 1.0, batch_size: int = 32) -> list[list[int]]:
    """``prompt + response (+ the stop token when it ended)`` ids for each prompt, sampled from ``gpt``."""
    ids = [render_prompt(p, tokenizer)[-(gpt.config.block_size // 2):] for p in prompts]
    replies = sample_replies(gpt, tokenizer, ids, max_new_tokens=max_new_tokens, seed=seed, temperature=temperature,
                             batch_size=batch_size)
    return [p + c.token_ids + ([c.stop_token] if c.stop_token is not None else []) for p, c in zip(ids, replies)]


def save_reward_model(run_dir: str | os.PathLike[str], model: ScalarModel, tokenizer: Tokenizer | None,
                      extra: dict[str, Any]) -> Path:
    """The head file, then the backbone run directory whose ``reward`` section records it."""
    return save_model(run_dir, model.gpt, tokenizer, RewardStage.name, extra, head=("reward", HEAD_FILE, model.head))


def hf_head(spec: str | os.PathLike[str]) -> tuple[GPT, Tokenizer, HFHead]:
    """A reward model as transformers' ``*ForSequenceClassification`` with one label (TRL's convention):
    scored at each row's last token that is not ``<|pad|>``, as ``ScalarModel.score`` on right-padded rows."""
    model, tokenizer, _ = load_reward_model(spec)
    return model.gpt, tokenizer, HFHead(model.head, "sequence", pad_id=chat_pad_id(tokenizer), labels=("reward",),
                                        regression=True)


def load_reward_model(spec: str | os.PathLike[str],
                      device: str | torch.device = "cpu") -> tuple[ScalarModel, Tokenizer, dict[str, Any]]:
    """(reward model in eval mode, tokenizer, config.json) of a ``gptlab rm`` run."""
    model, tokenizer, config = load_with_head(spec, "reward", lambda gpt, _: ScalarModel(gpt), "reward-model",
                                              "train one with gptlab rm", device)
    assert isinstance(model, ScalarModel)
    return model, tokenizer, config


def run_rm(model_spec: str, data_file: str | os.PathLike[str], out_dir: str | os.PathLike[str],
           train: Given = None, reward: Given = None, *, lora: Given = None, val_file: str | os.PathLike[str] | None = None,
           config_file: str | os.PathLike[str] | None = None, resume: bool = False, progress: bool = True,
           env: DistEnv | None = None) -> TrainResult:
    """Train a reward model from the SFT run ``model_spec`` on the rankings in ``data_file``.

    Validation: ``val_file``, or the rankings whose prompt hashes into ``reward.val_fraction``.
    """
    run = StageRun(RewardStage.name, out_dir, resume=resume, config_file=config_file, sections=(RMConfig.section,))
    settings = run.settings(RMConfig, reward)
    train_cfg = run.train(train, RM_TRAIN.values, RM_TRAIN.derive(len(load_rankings(data_file))))
    lora_cfg = run.lora(lora, train_cfg)
    with run.joined(env, train_cfg) as env:
        gpt, tokenizer, _ = load_chat_model(model_spec, train_cfg.dropout)
        max_len = min(train_cfg.block_size or gpt.config.block_size, gpt.config.block_size)
        rows = encode_rankings(data_file, tokenizer, max_len)
        groups = [g for _, g in rows]
        if val_file is not None:
            train_groups, val = groups, [g for _, g in encode_rankings(val_file, tokenizer, max_len)]
            train_prompts = [p for p, _ in rows]
        else:
            keys = [p for p, _ in rows]
            train_groups, val = split_held_out(keys, groups, settings.val_fraction, train_cfg.seed)
            train_prompts, _ = split_held_out(keys, keys, settings.val_fraction, train_cfg.seed)
        unk = count_unknown(tokenizer, (seq for g in [*train_groups, *val] for seq in g), data_file,
                            env.is_main and progress)
        prompts = list(dict.fromkeys(train_prompts))[:NORM_PROMPTS]
        norm_seqs = sample_responses(gpt, tokenizer, prompts, max_new_tokens=min(settings.norm_tokens, max_len // 2),
                                     seed=train_cfg.seed)
        extra = {"chat_format": CHAT_FORMAT, "train": train_cfg.to_dict(),
                 "reward": {**settings.to_dict(), "train_rankings": len(train_groups), "val_rankings": len(val)},
                 "data": data_record(model_spec, data_file, val_file, unk), **lora_cfg.record()}
        run.begin(env, gpt.config, tokenizer, extra)
        stage = RewardStage(train_groups, val, batch_size=train_cfg.batch_size, seed=train_cfg.seed,
                            pad_id=chat_pad_id(tokenizer), rank=env.rank, world_size=env.world_size,
                            tokenizer=tokenizer, norm_seqs=norm_seqs, save_extra=extra)
        return run.trainer(ScalarModel(add_lora(gpt, lora_cfg)), stage, train_cfg, env, progress).fit()
