"""Batches of prompt + response sequences, shared by the alignment stages (sft, rm, dpo, ppo).

Sequences are right-padded: every real token keeps its position and causal
attention never looks right, so padding needs no attention mask. A response's
log-probs are read from the hidden states at the positions that predict it
(``starts - 1 + t``), so the vocabulary-sized logits exist only for response
tokens, never for the whole (B, T, V) sequence.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch
import torch.nn as nn

from ..model import GPT
from ..rl import entropy_from_logits, token_logprobs

__all__ = ["pad_right", "response_positions", "responses_of", "held_out", "PolicyModel"]


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx (N, L) right-padded with ``pad_id``, lengths (N,))."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    idx = torch.full((len(seqs), int(lengths.max())), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        idx[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    return idx, lengths


def response_positions(starts: torch.Tensor, width: int, seq_len: int) -> torch.Tensor:
    """Positions (N, width) whose next-token distribution predicts response token t (clamped in range)."""
    t = torch.arange(width, device=starts.device)
    return (starts[:, None] - 1 + t[None]).clamp(0, seq_len - 1)


def responses_of(idx: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor,
                 width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Response tokens (N, W) aligned at their start, and their mask (N, W), from right-padded ``idx``."""
    n_resp = lengths - starts
    width = int(n_resp.max()) if width is None else width
    t = torch.arange(width, device=idx.device)
    pos = (starts[:, None] + t[None]).clamp(max=idx.shape[1] - 1)
    mask = t[None] < n_resp[:, None]
    return idx.gather(1, pos) * mask, mask


def held_out(key: str, fraction: float, seed: int) -> bool:
    """Whether ``key`` (a prompt) is in the validation share: a seeded hash, so identical prompts stay together."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


class PolicyModel(nn.Module):
    """A GPT seen as a policy over responses: per-token log-probs (and entropy) of given response tokens.

    One module call computes everything a loss needs, so DDP wraps it like any model.
    """

    def __init__(self, gpt: GPT) -> None:
        super().__init__()
        self.gpt = gpt
        self.config = gpt.config

    def flops_per_token(self, seq_len: int | None = None) -> float:
        return self.gpt.flops_per_token(seq_len)

    def forward(self, idx: torch.Tensor, starts: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(log-probs (N, W) of ``targets`` at ``temperature``, entropy (N, W) or None)."""
        h = self.gpt.hidden_states(idx)
        pos = response_positions(starts, targets.shape[1], idx.shape[1])
        logits = self.gpt.lm_head(h.gather(1, pos[..., None].expand(-1, -1, h.shape[-1])))
        logp = token_logprobs(logits, targets, temperature)
        return logp, entropy_from_logits(logits, temperature) if with_entropy else None
