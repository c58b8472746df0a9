"""Heads that read a GPT's hidden states, and the head file that travels with a run directory.

``ScalarModel`` is InstructGPT's reward model and PPO's value function: the
backbone with its LM head set aside and a linear layer to one number per
position. The reward model reads it at the last real token of a right-padded
sequence; the value function reads it at every response position.

A head is stored next to the backbone's ``model.safetensors`` as its own
safetensors file whose name, sha256 and size go into ``config.json``
(``save_head`` / ``load_head``), so a copied or half-copied run directory is
caught on load.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .config import GPTConfig
from .errors import CheckpointError
from .model import GPT

__all__ = ["ScalarModel", "save_head", "load_head"]


class ScalarModel(nn.Module):
    """A GPT (``self.gpt``) plus ``head``: hidden state (…, C) -> one scalar per position."""

    def __init__(self, config: GPTConfig, gpt: GPT | None = None) -> None:
        super().__init__()
        self.config = config
        self.gpt = gpt if gpt is not None else GPT(config)
        self.head = nn.Linear(config.n_embd, 1)
        nn.init.normal_(self.head.weight, std=1.0 / (config.n_embd + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        return self.gpt.flops_per_token(seq_len)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Values (B, T) of every position of ``idx`` (B, T)."""
        return self.head(self.gpt.hidden_states(idx)).squeeze(-1).float()

    def score(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Rewards (B,) read at each right-padded row's last real token (``lengths - 1``)."""
        values = self(idx)
        return values[torch.arange(idx.shape[0], device=idx.device), lengths - 1]


def save_head(run_dir: str | os.PathLike[str], head: nn.Module, name: str) -> dict[str, Any]:
    """Write ``head``'s state as ``RUN_DIR/name``; returns the record for config.json."""
    from .checkpoint import atomic_save_safetensors

    path = Path(run_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = atomic_save_safetensors(dict(head.state_dict()), path)
    return {"file": name, "sha256": digest, "bytes": path.stat().st_size}


def load_head(run_dir: str | os.PathLike[str], record: Any, head: nn.Module, what: str) -> nn.Module:
    """Load the head file ``record`` (from ``save_head``) into ``head``, checking its sha256."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .atomic import sha256_file

    if not isinstance(record, dict) or not isinstance(record.get("file"), str):
        raise CheckpointError(f"{run_dir}: config.json does not name the {what} head file; "
                              f"train it again or copy the whole run directory")
    path = Path(run_dir) / record["file"]
    if not path.is_file() or sha256_file(path) != record.get("sha256"):
        raise CheckpointError(f"{path}: missing or does not match config.json (sha256); copy the whole run "
                              f"directory or train the {what} again")
    try:
        head.load_state_dict(load_file(str(path)))
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: unreadable or the wrong shape ({exc})") from None
    return head
