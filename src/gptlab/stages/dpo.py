"""Direct preference optimisation: the policy learns from the rankings without a reward model or RL.

    gptlab dpo --model runs/sft --data rankings.jsonl --out runs/dpo [--beta 0.1 --val-fraction 0.1]

Every ranking of K responses gives its C(K,2) (better, worse) pairs. With
π the policy, π_ref the frozen SFT model and sequence log-probs summed over
the response tokens (``<|end|>`` included)::

    loss = -log σ(β · ((log π(y_w) - log π_ref(y_w)) - (log π(y_l) - log π_ref(y_l))))

The reference log-probs are computed once, before training, so π_ref never
sits in memory next to the policy. Logged: ``reward_accuracy`` (how often the
implicit reward β·log π/π_ref ranks the pair right) and ``reward_margin``;
``val_accuracy`` is the same over the held-out pairs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
import torch.nn as nn

from ..align_data import load_rankings
from ..chat import CHAT_FORMAT, render_pair
from ..config import Config
from ..data import rank_draw
from ..errors import DataError, naming
from ..heads import PolicyModel
from ..lora import add_lora
from ..rl import dpo_loss
from ..runs import save_model
from ..tokenizer import Tokenizer
from ..train.config import Given
from ..train.dist import DistEnv
from ..train.loop import Stage, TrainResult
from .common import (StageRun, TrainDefaults, chat_pad_id, count_unknown, data_record, load_chat_model, pad_right, responses_of,
                     split_held_out)

__all__ = ["DPO_TRAIN", "DPOConfig", "DPOStage", "encode_pairs", "run_dpo"]

DPO_TRAIN = TrainDefaults({"batch_size": 16, "lr": 5e-5, "min_lr": 0.0, "weight_decay": 0.0}, epochs=2)
Pair = tuple[list[int], int, list[int], int]  # chosen ids, response start, rejected ids, response start


@dataclass
class DPOConfig(Config):
    """DPO's own settings (config.json's ``dpo`` section)."""

    section: ClassVar[str] = "dpo"

    beta: float = 0.1
    """β: strength of the implicit KL constraint to the reference (the SFT model)"""
    val_fraction: float = 0.1
    """share of prompts held out for validation when no --val file is given"""

    def validate(self) -> None:
        self.need(self.beta > 0, f"beta={self.beta} must be > 0")
        self.need(0 <= self.val_fraction < 1, f"val_fraction={self.val_fraction} must be in [0, 1)")


def _fit(ids: list[int], start: int, max_len: int, where: str) -> tuple[list[int], int]:
    """Cut the prompt's beginning so the sequence fits; the response must keep at least its first token."""
    cut = max(0, len(ids) - max_len)
    if start - cut < 1:
        raise DataError(f"{where}: the prompt leaves no room for the response in {max_len} tokens; "
                        f"shorten it or use a model with a longer context")
    return ids[cut:], start - cut


def encode_pairs(path: str | os.PathLike[str], tokenizer: Tokenizer, max_len: int) -> list[tuple[str, Pair]]:
    """(prompt, pair) for every (better, worse) pair of every ranking in ``path``."""
    out: list[tuple[str, Pair]] = []
    for r in load_rankings(path):
        where = f"{path}:{r.line}"
        with naming(where):
            seqs = [_fit(*render_pair(r.prompt, resp, tokenizer), max_len, where) for resp in r.responses]
        out.extend((r.prompt, (*seqs[i], *seqs[j])) for i in range(len(seqs)) for j in range(i + 1, len(seqs)))
    return out


def _collate(pairs: Sequence[Pair], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen sequences first, then rejected ones, right-padded together."""
    seqs = [p[0] for p in pairs] + [p[2] for p in pairs]
    idx, lengths = pad_right(seqs, pad_id)
    starts = torch.tensor([p[1] for p in pairs] + [p[3] for p in pairs])
    targets, mask = responses_of(idx, starts, lengths)
    return {"idx": idx, "starts": starts, "targets": targets, "mask": mask}


def _sequence_logprobs(model: nn.Module, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs of the chosen (N,) and rejected (N,) halves of a batch."""
    logp, _ = model(b["idx"], b["starts"], b["targets"])
    sums = (logp * b["mask"]).sum(1)
    return sums.chunk(2)


class DPOStage(Stage[PolicyModel]):
    """Random pairs per micro batch (stateless in ``(seed, step, micro_step)``), the DPO loss."""

    name = "dpo"

    def __init__(self, train: Sequence[Pair], val: Sequence[Pair], reference: nn.Module, *, batch_size: int, seed: int,
                 pad_id: int, beta: float = 0.1, rank: int = 0, world_size: int = 1, tokenizer: Tokenizer | None = None,
                 save_extra: dict[str, Any] | None = None) -> None:
        if not train:
            raise DataError("no training pairs (all held out for validation?); add rows or lower --val-fraction")
        DPOConfig(beta=beta)  # the one rule for β
        self.train, self.val = list(train), list(val)
        self.batch_size, self.seed, self.pad_id, self.beta = batch_size, seed, pad_id, beta
        self.rank, self.world_size = rank, world_size
        self.tokenizer, self.save_extra = tokenizer, save_extra or {}
        self.ref_train = self._reference(reference, self.train)
        self.ref_val = self._reference(reference, self.val)

    @torch.no_grad()
    def _reference(self, reference: nn.Module, pairs: Sequence[Pair]) -> torch.Tensor:
        """(N, 2) reference log-probs of each pair's chosen and rejected response."""
        out = [torch.zeros(0, 2)]
        device = next(reference.parameters()).device
        for i in range(0, len(pairs), self.batch_size):
            b = {k: v.to(device) for k, v in _collate(pairs[i: i + self.batch_size], self.pad_id).items()}
            out.append(torch.stack(_sequence_logprobs(reference, b), 1).cpu())
        return torch.cat(out)

    def batch(self, step: int, micro_step: int) -> dict[str, torch.Tensor]:
        mine = rank_draw((self.seed, step, micro_step), len(self.train), self.batch_size, self.rank, self.world_size)
        return {**_collate([self.train[i] for i in mine], self.pad_id), "ref": self.ref_train[torch.from_numpy(mine)]}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        chosen, rejected = _sequence_logprobs(model, batch)
        loss, stats = dpo_loss(chosen, rejected, batch["ref"][:, 0], batch["ref"][:, 1], self.beta)
        return loss, stats

    def num_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["mask"].sum())

    def evaluate(self, model: PolicyModel) -> dict[str, float]:
        if not self.val:
            return {}
        device = next(model.parameters()).device
        loss_sum, correct = 0.0, 0.0
        for i in range(0, len(self.val), self.batch_size):
            chunk = self.val[i: i + self.batch_size]
            b = {k: v.to(device) for k, v in _collate(chunk, self.pad_id).items()}
            ref = self.ref_val[i: i + len(chunk)].to(device)
            loss, stats = dpo_loss(*_sequence_logprobs(model, b), ref[:, 0], ref[:, 1], self.beta)
            loss_sum += float(loss) * len(chunk)
            correct += float(stats["reward_accuracy"]) * len(chunk)
        return {"val_loss": loss_sum / len(self.val), "val_accuracy": correct / len(self.val)}

    def save(self, run_dir: Path, model: PolicyModel) -> None:
        save_model(run_dir, model.gpt, self.tokenizer, stage=self.name, extra=self.save_extra)


def run_dpo(model_spec: str, data_file: str | os.PathLike[str], out_dir: str | os.PathLike[str],
            train: Given = None, dpo: Given = None, *, lora: Given = None, val_file: str | os.PathLike[str] | None = None,
            config_file: str | os.PathLike[str] | None = None, resume: bool = False, progress: bool = True,
            env: DistEnv | None = None) -> TrainResult:
    """DPO of the SFT run ``model_spec`` on the rankings in ``data_file`` (it is also the reference)."""
    run = StageRun(DPOStage.name, out_dir, resume=resume, config_file=config_file, sections=(DPOConfig.section,))
    settings = run.settings(DPOConfig, dpo)
    n_pairs = sum(len(r.responses) * (len(r.responses) - 1) // 2 for r in load_rankings(data_file))
    train_cfg = run.train(train, DPO_TRAIN.values, DPO_TRAIN.derive(n_pairs))
    lora_cfg = run.lora(lora, train_cfg)
    with run.joined(env, train_cfg) as env:
        gpt, tokenizer, _ = load_chat_model(model_spec, train_cfg.dropout)
        max_len = min(train_cfg.block_size or gpt.config.block_size, gpt.config.block_size)
        rows = encode_pairs(data_file, tokenizer, max_len)
        pairs = [p for _, p in rows]
        if val_file is not None:
            train_pairs, val = pairs, [p for _, p in encode_pairs(val_file, tokenizer, max_len)]
        else:
            train_pairs, val = split_held_out([prompt for prompt, _ in rows], pairs, settings.val_fraction,
                                              train_cfg.seed)
        # each sequence once: a response ranked among k stands in k - 1 pairs
        sequences = {tuple(seq) for p in [*train_pairs, *val] for seq in (p[0], p[2])}
        unk = count_unknown(tokenizer, sequences, data_file, env.is_main and progress)
        # the reference's log-probs are computed once, in DPOStage, before training (and before any adapters)
        reference = PolicyModel(gpt).eval().to(env.device)
        extra = {"chat_format": CHAT_FORMAT, "train": train_cfg.to_dict(),
                 "dpo": {**settings.to_dict(), "train_pairs": len(train_pairs), "val_pairs": len(val)},
                 "data": data_record(model_spec, data_file, val_file, unk), **lora_cfg.record()}
        run.begin(env, gpt.config, tokenizer, extra)
        stage = DPOStage(train_pairs, val, reference, batch_size=train_cfg.batch_size, seed=train_cfg.seed,
                         pad_id=chat_pad_id(tokenizer), beta=settings.beta, rank=env.rank, world_size=env.world_size,
                         tokenizer=tokenizer, save_extra=extra)
        del reference
        return run.trainer(PolicyModel(add_lora(gpt, lora_cfg)), stage, train_cfg, env, progress).fit()
