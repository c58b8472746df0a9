"""Every wrapper of a GPT that a stage trains: the task head (GPT-1), the scalar head (reward / value), the policy.

A wrapper holds its backbone as ``self.gpt`` and adds what its objective reads
from the hidden states. ``GPTWrapper`` gives each one what the trainer asks of a
model (``flops_per_token``, the blocks FSDP shards, an empty unsharded copy),
so the trainer never looks inside a wrapper. A run directory always stores the
plain backbone; heads are saved beside it (``runs.save_model``'s ``head``).

- ``TaskModel``: GPT-1 fine-tuning: a linear head on the hidden state at each
  sequence's ``[extract]`` token (classification, entailment, similarity,
  multiple choice).
- ``ScalarModel``: InstructGPT's reward model and PPO's value function: one
  scalar per position, read at the last real token (reward) or at every
  response position (value).
- ``PolicyModel``: a GPT seen as a policy over responses: per-token log-probs
  (and entropy) of given response tokens, without (B, T, V) logits for the
  whole sequence.
- ``ActorCritic``: PPO's trained pair, policy and value function, in one forward call.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import GPTConfig
from .model import GPT
from .rl import entropy_from_logits, token_logprobs

__all__ = ["GPTWrapper", "TaskModelConfig", "TaskModel", "ScalarModel", "PolicyModel", "ActorCritic",
           "response_positions", "CLF_DROPOUT"]

CLF_DROPOUT = 0.1  # GPT-1's classifier dropout
W = TypeVar("W", bound="GPTWrapper")


class GPTWrapper(nn.Module, abc.ABC):
    """A module around one backbone ``self.gpt``: what the trainer needs of it, answered once."""

    def __init__(self, gpt: GPT) -> None:
        super().__init__()
        self.gpt = gpt

    def flops_per_token(self, seq_len: int | None = None) -> float:
        return self.gpt.flops_per_token(seq_len)  # a linear head adds a negligible amount

    def shard_units(self) -> list[nn.Module]:
        return self.gpt.shard_units()

    @abc.abstractmethod
    def empty_copy(self: W) -> W:
        """The same wrapper around ``self.gpt.empty_copy()``: unsharded, on the CPU, for a full state dict."""


def response_positions(starts: torch.Tensor, width: int, seq_len: int) -> torch.Tensor:
    """Positions (N, width) whose next-token distribution predicts response token t (clamped in range)."""
    t = torch.arange(width, device=starts.device)
    return (starts[:, None] - 1 + t[None]).clamp(0, seq_len - 1)


# ================================================================ GPT-1 task head
@dataclass
class TaskModelConfig:
    """Enough to rebuild a ``TaskModel``."""

    gpt: GPTConfig
    task_type: str
    n_classes: int  # head outputs: the labels, or 1 (graded similarity, multiple choice)
    clf_dropout: float = CLF_DROPOUT

    @property
    def regression(self) -> bool:
        return self.task_type == "similarity" and self.n_classes == 1


class TaskModel(GPTWrapper):
    """A GPT plus a linear head on the final hidden state at each sequence's ``[extract]``.

    Batches are right-padded (causal attention never lets a real token see the
    padding after it), so ``[extract]`` sits at ``lengths - 1``. ``slot`` (B, K)
    lists each row's sequences (-1 where a row has fewer choices).
    """

    def __init__(self, config: TaskModelConfig, gpt: GPT | None = None) -> None:
        super().__init__(gpt if gpt is not None else GPT(config.gpt))
        self.config = config
        self.drop = nn.Dropout(config.clf_dropout)
        self.head = nn.Linear(config.gpt.n_embd, config.n_classes)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def empty_copy(self) -> "TaskModel":
        return TaskModel(self.config, self.gpt.empty_copy())

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor, slot: torch.Tensor,
                lm: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(head outputs, mean next-token loss over the real tokens or None without ``lm``).

        Outputs: logits (B, n_classes); scores (B,) for graded similarity; choice
        logits (B, K) with -inf at missing choices for multiple choice.
        """
        h = self.gpt.hidden_states(idx)
        feats = self.drop(h[torch.arange(idx.shape[0], device=idx.device), lengths - 1])
        lm_loss = None
        if lm:
            keep = torch.arange(idx.shape[1] - 1, device=idx.device)[None] < (lengths - 1)[:, None]
            logits = self.gpt.logits(h[:, :-1][keep])
            lm_loss = F.cross_entropy(logits.float(), idx[:, 1:][keep])
        if self.config.task_type == "multiple_choice":
            scores = self.head(feats).squeeze(-1)
            return scores[slot.clamp(min=0)].masked_fill(slot < 0, float("-inf")), lm_loss
        out = self.head(feats[slot].sum(1))  # similarity: both orders added; else one sequence per row
        return (out.squeeze(-1) if self.config.regression else out), lm_loss


# ============================================================ reward / value head
class ScalarModel(GPTWrapper):
    """A GPT plus ``head``: hidden state (…, C) -> one scalar per position."""

    def __init__(self, gpt: GPT) -> None:
        super().__init__(gpt)
        self.config = gpt.config
        self.head = nn.Linear(gpt.config.n_embd, 1)
        nn.init.normal_(self.head.weight, std=1.0 / (gpt.config.n_embd + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)

    def empty_copy(self) -> "ScalarModel":
        return ScalarModel(self.gpt.empty_copy())

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Values (B, T) of every position of ``idx`` (B, T)."""
        return self.head(self.gpt.hidden_states(idx)).squeeze(-1).float()

    def score(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Rewards (B,) read at each right-padded row's last real token (``lengths - 1``)."""
        values = self(idx)
        return values[torch.arange(idx.shape[0], device=idx.device), lengths - 1]


# ======================================================================= policy
class PolicyModel(GPTWrapper):
    """Per-token log-probs (and entropy) of given response tokens; one call computes what a loss needs."""

    def __init__(self, gpt: GPT) -> None:
        super().__init__(gpt)
        self.config = gpt.config

    def empty_copy(self) -> "PolicyModel":
        return PolicyModel(self.gpt.empty_copy())

    def forward(self, idx: torch.Tensor, starts: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(log-probs (N, W) of ``targets`` at ``temperature``, entropy (N, W) or None)."""
        h = self.gpt.hidden_states(idx)
        pos = response_positions(starts, targets.shape[1], idx.shape[1])
        logits = self.gpt.logits(h.gather(1, pos[..., None].expand(-1, -1, h.shape[-1])))
        logp = token_logprobs(logits, targets, temperature)
        return logp, entropy_from_logits(logits, temperature) if with_entropy else None


class ActorCritic(nn.Module):
    """PPO's trained pair: policy and value function (two backbones), one forward call for DDP."""

    def __init__(self, policy: PolicyModel, value: ScalarModel) -> None:
        super().__init__()
        self.policy, self.value = policy, value
        self.config = policy.config

    def flops_per_token(self, seq_len: int | None = None) -> float:
        return self.policy.flops_per_token(seq_len) + self.value.flops_per_token(seq_len)

    def shard_units(self) -> list[nn.Module]:
        return self.policy.shard_units() + self.value.shard_units()

    def empty_copy(self) -> "ActorCritic":
        return ActorCritic(self.policy.empty_copy(), self.value.empty_copy())

    def forward(self, idx: torch.Tensor, starts: torch.Tensor, targets: torch.Tensor, temperature: float,
                ptx_x: torch.Tensor | None = None, ptx_y: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """(log-probs (N, W), entropy (N, W), values (N, W), pretraining LM loss or None)."""
        logp, entropy = self.policy(idx, starts, targets, temperature, with_entropy=True)
        values = self.value(idx).gather(1, response_positions(starts, targets.shape[1], idx.shape[1]))
        ptx = self.policy.gpt(ptx_x, ptx_y)[1] if ptx_x is not None else None
        return logp, entropy, values, ptx
