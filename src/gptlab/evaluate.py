"""Evaluation: perplexity and bits per byte on a token split (in-context evaluation is in icl.py).

    from gptlab.evaluate import evaluate_ppl
    evaluate_ppl(model, "data/shakespeare", split="val", batch_size=8)
    # {"loss": 1.47, "perplexity": 4.35, "bits_per_byte": 2.12, "tokens": 110592}

    gptlab eval ppl --model RUN_DIR --data DATA_DIR [--split val --batch-size 8 --max-batches N]

Loss is the mean next-token cross-entropy in nats over every target token of
the evaluated windows (sequential, non-overlapping, deterministic);
perplexity is ``exp(loss)`` and bits per byte ``loss / ln 2 / bytes_per_token``,
which compares models across tokenizers. ``lm_loss_sums`` is the shared core;
the trainer's pretraining evaluation calls it on every rank with that rank's
rows of the same fixed batches and all-reduces the sums.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Iterable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .data import TokenData, eval_batches
from .errors import DataError, UserError

__all__ = ["lm_loss_sums", "evaluate_ppl"]


@torch.no_grad()
def lm_loss_sums(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
                 world_size: int = 1, device: torch.device | str | None = None) -> tuple[float, int]:
    """(sum of next-token losses in nats, number of target tokens) over ``batches``.

    ``model(x)`` must return logits (B, T, V); targets equal to -100 are ignored.
    With ``world_size > 1`` each rank passes its own share of the batches (the
    same number of them on every rank, as FSDP needs) and the sums are
    all-reduced, so every rank returns the totals.
    """
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    nats = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        logits = model(x)
        nats += F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1),
                                ignore_index=-100, reduction="sum").double()
        count += (y != -100).sum().double()
    if world_size > 1:
        packed = torch.stack([nats, count])
        dist.all_reduce(packed)
        nats, count = packed[0], packed[1]
    return float(nats.item()), int(count.item())


def evaluate_ppl(model: nn.Module, data: TokenData | str | os.PathLike[str], split: str = "val", batch_size: int = 8,
                 block_size: int | None = None, max_batches: int | None = None,
                 device: torch.device | str | None = None) -> dict[str, float]:
    """Loss, perplexity, bits per byte and token count of ``model`` on a split of a data dir.

    ``data`` is a data directory or a ``gptlab.data.TokenData``. ``block_size``
    defaults to the model's context; ``max_batches`` None scores the whole split.
    """
    td = data if isinstance(data, TokenData) else TokenData(os.fspath(data))
    cfg = getattr(model, "config", None)
    ctx = getattr(cfg, "block_size", None)
    block = block_size or ctx
    if block is None:
        raise UserError("evaluate_ppl: pass block_size (the model has no config.block_size)")
    if ctx is not None and block > ctx:
        raise UserError(f"block_size {block} exceeds the model's context of {ctx}: use --block-size <= {ctx}")
    if batch_size < 1:
        raise UserError(f"batch_size={batch_size} must be >= 1")
    if max_batches is not None and max_batches < 1:
        raise UserError(f"max_batches={max_batches} must be >= 1 (or None: the whole split)")
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    tokens = td.split(split)
    was_training = model.training
    model.eval()
    amp = (torch.autocast("cuda", dtype=torch.bfloat16)
           if device.type == "cuda" and torch.cuda.is_bf16_supported() else contextlib.nullcontext())
    try:
        with amp:
            nats, n = lm_loss_sums(model, eval_batches(tokens, batch_size, block, max_batches), device=device)
    finally:
        model.train(was_training)
    if n == 0:
        raise DataError(f"split {split!r} has fewer than {block + 1} tokens: nothing to evaluate "
                        f"(lower --block-size or prepare more data)")
    loss = nats / n
    bpt = float(td.bytes_per_token(split))
    return {"loss": loss, "perplexity": math.exp(loss), "bits_per_byte": loss / math.log(2) / bpt,
            "tokens": n}
