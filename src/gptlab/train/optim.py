"""The optimizers and their schedule: AdamW with decay only on matrices, or Muon for the blocks' matrices
and AdamW for the rest; linear warmup then cosine decay, the same shape for every learning rate.

Muon (``torch.optim.Muon``: momentum, then the update orthogonalised by Newton-Schulz iterations) takes
only 2-D matrices, and only those inside the transformer blocks (``model.hidden_matrices``): embeddings
and the LM head are lookups and a classifier rather than maps between hidden states, and norms, biases
and MoE routers are not matrices worth orthogonalising, so they stay with AdamW at its own ``lr``.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from ..model import hidden_matrices
from .config import TrainConfig

__all__ = ["lr_at", "param_groups", "make_optimizers", "set_lr"]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (1-based): linear warmup, cosine decay, floor.

    ``lr * step / warmup_steps`` up to ``warmup_steps`` (so the peak is reached
    exactly at the end of warmup), then a half cosine from ``lr`` down to
    ``min_lr`` at ``decay_steps``, and ``min_lr`` after that.
    """
    lr, floor, warmup, decay = cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.decay_steps
    if step <= warmup:
        return lr * step / warmup
    if step >= decay:
        return floor
    progress = (step - warmup) / (decay - warmup)
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - floor)


def param_groups(params: Iterable[nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on matrices and embeddings (dim >= 2), none on biases and norms."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in params:
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def make_optimizers(model: nn.Module, cfg: TrainConfig, device: torch.device) -> list[torch.optim.Optimizer]:
    """[AdamW] or, with ``cfg.optimizer == "muon"``, [AdamW for the rest, Muon for the hidden matrices].

    AdamW is fused (one kernel for all parameters: 5x faster than foreach on CPU) unless the parameters
    are FSDP-sharded DTensors on the CPU, which the fused kernel does not take.
    """
    sharded = any(isinstance(p, DTensor) for p in model.parameters())
    matrices = hidden_matrices(model) if cfg.optimizer == "muon" else []
    taken = {id(p) for p in matrices}
    rest = [p for _, p in model.named_parameters() if id(p) not in taken]  # a tied weight appears once
    adamw = torch.optim.AdamW(param_groups(rest, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                              eps=1e-8, fused=True if device.type == "cuda" or not sharded else None)
    if not matrices:
        return [adamw]
    muon = torch.optim.Muon([p for p in matrices if p.requires_grad], lr=cfg.muon_lr,
                            momentum=cfg.muon_momentum, weight_decay=cfg.muon_weight_decay)
    return [adamw, muon]


def set_lr(optimizers: list[torch.optim.Optimizer], step: int, cfg: TrainConfig) -> float:
    """Set every group's learning rate for step ``step``: ``lr_at``, scaled to ``muon_lr`` for Muon; returns
    AdamW's."""
    lr = lr_at(step, cfg)
    for opt in optimizers:
        group_lr = lr * cfg.muon_lr / cfg.lr if isinstance(opt, torch.optim.Muon) else lr
        for group in opt.param_groups:
            group["lr"] = group_lr
    return lr
