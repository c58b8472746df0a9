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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..align_data import load_sft
from ..chat import CHAT_FORMAT, render, render_prompt
from ..config import Config
from ..data import rank_draw
from ..errors import DataError, naming
from ..lora import add_lora
from ..model import GPT
from ..runs import save_model
from ..tokenizer import Tokenizer
from ..train.config import Given, resolve
from ..train.dist import DistEnv
from ..train.loop import Stage, TrainResult
from .vision_chat import run_image_sft, takes_images
from .common import (StageRun, TrainDefaults, chat_pad_id, count_unknown, data_record, draw_weighted, load_chat_model, sample_replies,
                     split_held_out)

__all__ = ["SFT_TRAIN", "SFTConfig", "SFTStage", "encode_sft", "run_sft", "sft_sample"]

SFT_TRAIN = TrainDefaults({"batch_size": 16, "lr": 1e-4, "min_lr": 0.0, "weight_decay": 0.0}, epochs=3)
IGNORE = -100


@dataclass
class SFTConfig(Config):
    """Supervised fine-tuning's own settings (config.json's ``sft`` section)."""

    section: ClassVar[str] = "sft"

    pack: bool = False
    """pack whole examples into full rows (fewer pad tokens)"""
    val_fraction: float = 0.05
    """share of prompts held out for validation when no --val file is given"""

    def validate(self) -> None:
        self.need(0 <= self.val_fraction < 1, f"val_fraction={self.val_fraction} must be in [0, 1)")


def encode_sft(path: str | os.PathLike[str], tokenizer: Tokenizer, max_len: int) -> list[tuple[list[int], list[bool], str, int]]:
    """(ids, train mask, the first user turn, line) per row, cut to ``max_len`` tokens.

    A row whose assistant tokens all fall beyond ``max_len`` is an error naming its line.
    """
    out = []
    for ex in load_sft(path):
        with naming(f"{path}:{ex.line}"):
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


class SFTStage(Stage[GPT]):
    """Random demonstrations per micro batch (stateless in ``(seed, step, micro_step)``), response-only loss."""

    name = "sft"

    def __init__(self, train: Sequence[tuple[list[int], list[bool]]], val: Sequence[tuple[list[int], list[bool]]], *,
                 batch_size: int, seed: int, pad_id: int, pack: bool = False, max_len: int = 0, rank: int = 0,
                 world_size: int = 1, tokenizer: Tokenizer | None = None, sample_prompt: str | None = None,
                 save_extra: dict[str, Any] | None = None) -> None:
        if not train:
            raise DataError("no training rows (all held out for validation?); add rows or lower --val-fraction")
        self.train, self.val = list(train), list(val)
        self.targets = [sum(mask[1:]) for _, mask in self.train]  # response tokens per example
        self.batch_size, self.seed, self.pad_id, self.pack, self.max_len = batch_size, seed, pad_id, pack, max_len
        self.rank, self.world_size = rank, world_size
        self.tokenizer, self.sample_prompt, self.save_extra = tokenizer, sample_prompt, save_extra or {}

    def batch(self, step: int, micro_step: int) -> dict[str, torch.Tensor]:
        if self.pack:  # each rank packs its own draw (~4 examples per row leaves slack for long ones): per-rank means
            picks = rank_draw((self.seed, step, micro_step, self.rank), len(self.train),
                              self.batch_size * max(4, self.max_len // 16))
            rows = _rows(_pack([self.train[i] for i in picks], self.batch_size, self.max_len - 1), self.pad_id)
            return {**rows, "weight": torch.tensor(1.0)}
        mine, weight = draw_weighted((self.seed, step, micro_step), self.targets, self.batch_size, self.rank,
                                     self.world_size)
        return {**_rows([self.train[i] for i in mine], self.pad_id), "weight": torch.tensor(weight)}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        _, loss = model(batch["x"], batch["y"])
        return loss * batch["weight"], {}

    def num_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["y"] != IGNORE).sum())

    def evaluate(self, model: GPT) -> dict[str, float]:
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

    def sample(self, model: GPT) -> str | None:
        if self.sample_prompt is None or self.tokenizer is None:
            return None
        return f"{self.sample_prompt}\n→ {sft_sample(model, self.tokenizer, self.sample_prompt)}"

    def save(self, run_dir: Path, model: GPT) -> None:
        save_model(run_dir, model, self.tokenizer, stage=self.name, extra=self.save_extra)


def sft_sample(model: GPT, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 48, temperature: float = 0.0) -> str:
    """The assistant's reply to ``prompt`` (greedy by default), cut at the end of its turn."""
    ids = render_prompt(prompt, tokenizer)[-(model.config.block_size - 1):]
    reply = sample_replies(model, tokenizer, [ids], max_new_tokens=max_new_tokens, seed=0, temperature=temperature)[0]
    return reply.text or ""


def run_sft(model_spec: str, data_file: str | os.PathLike[str], out_dir: str | os.PathLike[str],
            train: Given = None, sft: Given = None, *, lora: Given = None, val_file: str | os.PathLike[str] | None = None,
            config_file: str | os.PathLike[str] | None = None, resume: bool = False, progress: bool = True,
            env: DistEnv | None = None) -> TrainResult:
    """Supervised fine-tuning of ``model_spec`` on the demonstrations in ``data_file``.

    Validation: ``val_file``, or the rows whose first user turn hashes into
    ``sft.val_fraction`` (identical prompts stay on one side). An image-input model, or rows whose user
    messages hold images, go to ``vision_chat.run_image_sft`` (the encoder is trained too).
    """
    examples = None if takes_images(model_spec) else load_sft(data_file)
    if examples is None or any(ex.images for ex in examples):
        return run_image_sft(model_spec, data_file, out_dir, train, resolve(SFTConfig, sft).val_fraction,
                             val_file=val_file, resume=resume, progress=progress, env=env)
    run = StageRun(SFTStage.name, out_dir, resume=resume, config_file=config_file, sections=(SFTConfig.section,))
    settings = run.settings(SFTConfig, sft)
    n_rows = len(examples)
    train_cfg = run.train(train, SFT_TRAIN.values, SFT_TRAIN.derive(n_rows))
    lora_cfg = run.lora(lora, train_cfg)
    with run.joined(env, train_cfg) as env:
        gpt, tokenizer, _ = load_chat_model(model_spec, train_cfg.dropout)
        max_len = min(train_cfg.block_size or gpt.config.block_size, gpt.config.block_size) + 1
        rows = encode_sft(data_file, tokenizer, max_len)  # errors before anything is written
        pairs = [(ids, mask) for ids, mask, _, _ in rows]
        if val_file is not None:
            train_rows, val = pairs, [(ids, mask) for ids, mask, _, _ in encode_sft(val_file, tokenizer, max_len)]
        else:
            train_rows, val = split_held_out([user for _, _, user, _ in rows], pairs, settings.val_fraction,
                                             train_cfg.seed)
        sample_prompt = next((user for _, _, user, _ in rows), None)
        unk = count_unknown(tokenizer, (ids for ids, _ in [*train_rows, *val]), data_file, env.is_main and progress)
        extra = {"chat_format": CHAT_FORMAT, "train": train_cfg.to_dict(),
                 "sft": {**settings.to_dict(), "train_rows": len(train_rows), "val_rows": len(val)},
                 "data": data_record(model_spec, data_file, val_file, unk), **lora_cfg.record()}
        run.begin(env, gpt.config, tokenizer, extra)
        stage = SFTStage(train_rows, val, batch_size=train_cfg.batch_size, seed=train_cfg.seed,
                         pad_id=chat_pad_id(tokenizer), pack=settings.pack, max_len=max_len, rank=env.rank,
                         world_size=env.world_size, tokenizer=tokenizer, sample_prompt=sample_prompt,
                         save_extra=extra)
        return run.trainer(add_lora(gpt, lora_cfg), stage, train_cfg, env, progress).fit()
