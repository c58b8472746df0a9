"""InstructGPT step 1: supervised fine-tuning on demonstrations, through the chat format.

    gptlab sft --model runs/base --data demos.jsonl --out runs/sft [--val val.jsonl | --val-fraction 0.05]
        [--pack --max-steps N --batch-size 16 --lr 1e-4]

Every row (``{"prompt", "response"}`` or ``{"messages": [...]}``, see
``align_data.load_sft``) is rendered by ``chat.render``; the loss is the
next-token cross-entropy on the assistant's tokens only, each assistant turn
closed by ``<|end|>`` (its end-of-sequence token) so that the model learns to
stop. Padding uses ``<|pad|>``, never ``<|end|>`` or ``<|endoftext|>``, so
stopping is not learned from padding. ``--pack`` fills each row of
``block_size`` tokens with whole examples (fewer padded tokens per step;
examples in a row can attend to earlier ones, as in most packed SFT).

The chat tokens are added to the tokenizer when missing (new embedding rows,
``model.with_tokens``); the output is an ordinary run directory whose
config.json records ``chat_format``, which the chat server looks for.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..align_data import load_sft
from ..chat import CHAT_TOKENS, render, render_prompt
from ..errors import DataError, UserError
from ..model import GPT, with_tokens
from ..tokenizer import PAD
from ..trainer import DistEnv, TrainConfig, Trainer, TrainResult
from .sequences import align_run_config, data_record, sample_replies, split_held_out, stage_run

__all__ = ["SFT_DEFAULTS", "SFT_EPOCHS", "SFTStage", "encode_sft", "load_chat_model", "run_sft", "sft_sample"]

SFT_EPOCHS = 3
SFT_DEFAULTS: dict[str, Any] = {"batch_size": 16, "lr": 1e-4, "min_lr": 0.0, "weight_decay": 0.0}
IGNORE = -100


def load_chat_model(spec: str | os.PathLike[str], dropout: float | None = None) -> tuple[GPT, Any, dict[str, Any]]:
    """A run (or ``hf:DIR``) with the chat tokens and ``<|pad|>`` in its tokenizer and embeddings."""
    from ..checkpoint import load_run

    gpt, tokenizer, config = load_run(spec)
    if tokenizer is None:
        raise UserError(f"{spec}: has no tokenizer gptlab can use; alignment stages need one")
    return with_tokens(gpt, tokenizer, [*CHAT_TOKENS, PAD], dropout), tokenizer, config


def encode_sft(path: str | os.PathLike[str], tokenizer: Any, max_len: int) -> list[tuple[list[int], list[bool], str, int]]:
    """(ids, train mask, the first user turn, line) per row, cut to ``max_len`` tokens.

    A row whose assistant tokens all fall beyond ``max_len`` is an error naming its line.
    """
    out = []
    for ex in load_sft(path):
        ids, mask = render(ex.messages, tokenizer)
        ids, mask = ids[:max_len], mask[:max_len]
        if not any(mask[1:]):
            raise DataError(f"{path}:{ex.line}: no response token fits in {max_len} tokens; shorten the "
                            f"prompt or raise --block-size (the model's context is the limit)")
        first_user = next((m.content for m in ex.messages if m.role == "user"), "")
        out.append((ids, mask, first_user, ex.line))
    return out


def _rows(examples: Sequence[tuple[list[int], list[bool]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Inputs and targets (IGNORE where the mask is off or padded) for whole sequences."""
    width = max(len(ids) for ids, _ in examples) - 1
    x = np.full((len(examples), width), pad_id, dtype=np.int64)
    y = np.full((len(examples), width), IGNORE, dtype=np.int64)
    for r, (ids, mask) in enumerate(examples):
        n = len(ids) - 1
        x[r, :n] = ids[:-1]
        y[r, :n] = np.where(mask[1:], ids[1:], IGNORE)
    return {"x": torch.from_numpy(x), "y": torch.from_numpy(y)}


def _pack(examples: Sequence[tuple[list[int], list[bool]]], rows: int, width: int) -> list[tuple[list[int], list[bool]]]:
    """Concatenate whole examples into at most ``rows`` rows of up to ``width`` + 1 tokens."""
    packed: list[tuple[list[int], list[bool]]] = []
    for ids, mask in examples:
        if packed and len(packed[-1][0]) + len(ids) <= width + 1:
            packed[-1][0].extend(ids)
            packed[-1][1].extend(mask)
        elif len(packed) < rows:
            packed.append((list(ids), list(mask)))
        else:
            break
    return packed


class SFTStage:
    """Random demonstrations per micro batch (stateless in ``(seed, step, micro_step)``), response-only loss."""

    name = "sft"

    def __init__(self, train: Sequence[tuple[list[int], list[bool]]], val: Sequence[tuple[list[int], list[bool]]], *,
                 batch_size: int, seed: int, pad_id: int, pack: bool = False, max_len: int = 0, rank: int = 0,
                 world_size: int = 1, tokenizer: Any = None, sample_prompt: str | None = None,
                 save_extra: dict[str, Any] | None = None) -> None:
        if not train:
            raise DataError("no training rows (all held out for validation?); add rows or lower --val-fraction")
        self.train, self.val = list(train), list(val)
        self.batch_size, self.seed, self.pad_id, self.pack, self.max_len = batch_size, seed, pad_id, pack, max_len
        self.rank, self.world_size = rank, world_size
        self.tokenizer, self.sample_prompt, self.save_extra = tokenizer, sample_prompt, save_extra or {}

    def batch(self, step: int, micro_step: int) -> dict[str, torch.Tensor]:
        if self.pack:  # each rank packs its own draw: ~4 examples per row leaves slack for long ones
            rng = np.random.default_rng([self.seed, step, micro_step, self.rank])
            picks = rng.integers(0, len(self.train), size=self.batch_size * max(4, self.max_len // 16))
            return _rows(_pack([self.train[i] for i in picks], self.batch_size, self.max_len - 1), self.pad_id)
        # one global batch per (step, micro_step), each rank its slice: N processes see one process's batch
        rng = np.random.default_rng([self.seed, step, micro_step])
        picks = rng.integers(0, len(self.train), size=self.batch_size * self.world_size)
        mine = picks[self.rank * self.batch_size: (self.rank + 1) * self.batch_size]
        return _rows([self.train[i] for i in mine], self.pad_id)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        _, loss = model(batch["x"], batch["y"])
        return loss, {}

    def num_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["y"] != IGNORE).sum())

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Token-weighted response loss over the whole validation set."""
        if not self.val:
            return {}
        device = next(model.parameters()).device
        total, count = 0.0, 0
        for i in range(0, len(self.val), self.batch_size):
            b = _rows(self.val[i: i + self.batch_size], self.pad_id)
            y = b["y"].to(device)
            n = int((y != IGNORE).sum())
            _, loss = model(b["x"].to(device), y)
            total, count = total + float(loss) * n, count + n
        return {"val_loss": total / count}

    def sample(self, model: nn.Module) -> str:
        if self.sample_prompt is None or self.tokenizer is None:
            return ""
        return f"{self.sample_prompt}\n→ {sft_sample(model, self.tokenizer, self.sample_prompt)}"

    def save(self, run_dir: Path, model: nn.Module) -> None:
        from ..checkpoint import save_model

        save_model(run_dir, model, self.tokenizer, stage=self.name, extra=self.save_extra)


def sft_sample(model: GPT, tokenizer: Any, prompt: str, max_new_tokens: int = 48, temperature: float = 0.0) -> str:
    """The assistant's reply to ``prompt`` (greedy by default), cut at the end of its turn."""
    ids = render_prompt(prompt, tokenizer)[-(model.config.block_size - 1):]
    reply = sample_replies(model, tokenizer, [ids], max_new_tokens=max_new_tokens, seed=0, temperature=temperature)[0]
    return reply.text or ""


def run_sft(model_spec: str, data_file: str | os.PathLike[str], out_dir: str | os.PathLike[str],
            train_config: TrainConfig, *, val_file: str | os.PathLike[str] | None = None, val_fraction: float = 0.05,
            pack: bool = False, resume: bool = False, progress: bool = True, env: DistEnv | None = None) -> TrainResult:
    """Supervised fine-tuning of ``model_spec`` on the demonstrations in ``data_file``.

    Validation: ``val_file``, or the rows whose first user turn hashes into
    ``val_fraction`` (identical prompts stay on one side).
    """
    with stage_run(out_dir, resume, train_config, env, val_fraction) as (env, started):
        gpt, tokenizer, base = load_chat_model(model_spec, train_config.dropout)
        max_len = min(train_config.block_size or gpt.config.block_size, gpt.config.block_size) + 1
        rows = encode_sft(data_file, tokenizer, max_len)  # errors before anything is written
        pairs = [(ids, mask) for ids, mask, _, _ in rows]
        if val_file is not None:
            train, val = pairs, [(ids, mask) for ids, mask, _, _ in encode_sft(val_file, tokenizer, max_len)]
        else:
            train, val = split_held_out([user for _, _, user, _ in rows], pairs, val_fraction, train_config.seed)
        sample_prompt = next((user for _, _, user, _ in rows), None)
        extra, run_config = align_run_config(
            SFTStage.name, gpt.config, train_config,
            {"pack": pack, "val_fraction": None if val_file else val_fraction, "train_rows": len(train),
             "val_rows": len(val)}, data_record(model_spec, data_file, val_file))
        if env.is_main and not started:
            tokenizer.save(Path(out_dir) / "tokenizer")
        stage = SFTStage(train, val, batch_size=train_config.batch_size, seed=train_config.seed,
                         pad_id=tokenizer.pad_id, pack=pack, max_len=max_len, rank=env.rank,
                         world_size=env.world_size, tokenizer=tokenizer, sample_prompt=sample_prompt,
                         save_extra=extra)
        return Trainer(gpt, stage, train_config, out_dir, env=env, resume=resume, run_config=run_config,
                       progress=progress).fit()
