"""Image-input chat (GPT-4's image in the conversation), trained from labelled images on the shared trainer.

    gptlab images prepare --input digits --out data/digits
    gptlab images chat-train --data data/digits --out runs/vchat [--no-images]

Each labelled training image gives one conversation per question kind ("What digit is this?" ->
"seven", "Is it even?" -> "no", ...): the user turn holds the image and the question, the loss is
on the assistant's reply (chat.py's format). The model is a new GPT with a character vocabulary of
the questions and answers, and a ``VisionEncoder`` (vision.py) trained with it. Evaluation scores the
held-out images (never trained on) per question kind: a reply counts when greedy decoding gives exactly
the answer. ``--no-images`` trains the same model on the same questions without the images: the
chance level the image model must beat.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..chat import CHAT_FORMAT, Message
from ..config import Config, GPTConfig
from ..data import TokenData, rank_draw
from ..align_data import load_sft
from ..errors import DataError, UserError, naming
from ..images import image_split, questions_for
from ..igpt import palette_of
from ..model import GPT
from ..runs import CONFIG_FILE, read_run_config, save_model
from ..tokenizer import CharTokenizer, Tokenizer
from ..train.config import Given
from ..train.dist import DistEnv
from ..train.loop import Stage, TrainResult
from ..vision import (IMAGE, VisionConfig, VisionEncoder, VisionGPT, image_tensor, image_token_id, load_vision_run,
                      read_image_ref, render_images, token_embeds)
from .common import StageRun, TrainDefaults, data_record, pad_right, split_held_out

__all__ = ["VisionChatConfig", "VisionChatStage", "run_vision_chat", "run_image_sft", "takes_images",
           "answer_accuracy"]

@dataclass
class VisionChatConfig(Config):
    """The image-input chat model's own settings (config.json's ``vision_chat`` section)."""

    section: ClassVar[str] = "vision_chat"

    images: bool = True
    """show the model the images (off: the text-only baseline on the same questions)"""
    patch: int = 2
    """side of the encoder's square patches"""
    vision_width: int = 64
    """the vision encoder's width (encoder patches)"""
    encoder: str = "patches"
    """patches (a ViT patch embedding trained with the model) or igpt (a trained Image GPT's features, frozen)"""
    igpt: str = ""
    """the Image GPT run directory for encoder igpt"""
    igpt_layer: int = 0
    """the Image GPT block whose outputs are the features (0: the last)"""


VISION_TRAIN = TrainDefaults({"max_steps": 600, "batch_size": 32, "lr": 2e-3, "warmup_steps": 30, "eval_every": 200,
                              "sample_tokens": 0, "checkpoint_every": 0})
VISION_MODEL = {"n_layer": 2, "n_head": 4, "n_embd": 64, "block_size": 64}


Example = tuple[list[int], list[bool], torch.Tensor | None]  # ids, train mask, its images (n, C, S, S) or None


class VisionChatStage(Stage[VisionGPT]):
    """Assistant-only next-token loss over (image, question, answer) conversations."""

    name = "vision-chat"

    def __init__(self, train: list[Example], val: dict[str, list[Example]], *, batch_size: int, seed: int,
                 pad_id: int, tokenizer: Tokenizer, rank: int = 0, world_size: int = 1,
                 save_extra: dict[str, Any] | None = None) -> None:
        self.train, self.val, self.batch_size, self.seed, self.pad_id = train, val, batch_size, seed, pad_id
        self.tokenizer, self.rank, self.world_size = tokenizer, rank, world_size
        self.save_extra = save_extra or {}

    def batch(self, step: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = rank_draw((self.seed, step, micro_step), len(self.train), self.batch_size, self.rank, self.world_size)
        return collate([self.train[int(i)] for i in rows], self.pad_id)

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        idx, targets, images = batch
        return model(idx, targets, images), {}

    def evaluate(self, model: VisionGPT) -> dict[str, float]:
        return {f"acc_{kind}": acc for kind, acc in answer_accuracy(model, self.val, self.pad_id).items()}

    def save(self, run_dir: Path, model: VisionGPT) -> None:
        save_model(run_dir, model.gpt, self.tokenizer, stage=self.name, extra=self.save_extra,
                   head=(VisionConfig.section, "vision.safetensors", model.vision))


def collate(examples: Sequence[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(idx, targets with -100 off the assistant's tokens, images (N, C, S, S)) of right-padded examples."""
    idx, _ = pad_right([ids for ids, _, _ in examples], pad_id)
    targets = torch.full_like(idx, -100)
    for row, (ids, mask, _) in enumerate(examples):
        keep = torch.tensor(mask[1:], dtype=torch.bool)
        targets[row, :len(ids) - 1][keep] = torch.tensor(ids[1:])[keep]
    pics = [img for _, _, img in examples if img is not None]
    images = torch.cat(pics) if pics else torch.zeros(0, 1, 1, 1)
    return idx[:, :-1], targets[:, :-1], images


@torch.no_grad()
def answer_accuracy(model: VisionGPT, examples: dict[str, list[Example]], pad_id: int,
                    batch_size: int = 128) -> dict[str, float]:
    """Per question kind, the share of conversations whose every answer token is the model's argmax given
    what precedes it: exactly what greedy decoding would reply."""
    was = model.training
    model.eval()
    out = {}
    for kind, rows in examples.items():
        right = 0
        for start in range(0, len(rows), batch_size):
            idx, targets, images = collate(rows[start:start + batch_size], pad_id)
            embeds = token_embeds(model.gpt, model.vision, idx, model.image_id, images) if len(images) else None
            logits = model.gpt(idx, token_embeds=embeds)
            assert isinstance(logits, torch.Tensor)
            ok = (logits.argmax(-1) == targets) | (targets == -100)
            right += int(ok.all(1).sum())
        out[kind] = right / max(len(rows), 1)
    model.train(was)
    return out


def _examples(ids: np.ndarray, labels: np.ndarray, classes: list[str], pixels: Callable[[Any], np.ndarray],
              tok: Tokenizer, vcfg: VisionConfig, images: bool) -> dict[str, list[Example]]:
    out: dict[str, list[Example]] = {}
    for kind, question, answer in questions_for(classes):
        rows = out.setdefault(kind, [])
        for img_ids, label in zip(ids, labels):
            msgs = [Message("user", question), Message("assistant", answer(classes[int(label)]))]
            seq, mask = render_images(msgs, [1 if images else 0, 0], tok, vcfg.patches)
            rows.append((seq, mask, image_tensor(pixels(img_ids), vcfg)[None] if images else None))
    return out


def chat_tokenizer(classes: Sequence[str]) -> CharTokenizer:
    """A character vocabulary of every question and answer, with the chat tokens and ``<|image|>``."""
    qs = questions_for(classes)
    text = "".join(q + "".join(a(c) for c in classes) for _, q, a in qs)
    tok = CharTokenizer.from_text(text)
    tok.add_special_tokens([IMAGE])
    return tok


def run_vision_chat(data_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], train: Given = None,
                    settings: Given = None, *, model: dict[str, Any] | None = None, resume: bool = False,
                    progress: bool = True, env: DistEnv | None = None) -> TrainResult:
    """Train an image-input chat model on the labelled images of ``data_dir`` (``gptlab images prepare``)."""
    run = StageRun(VisionChatStage.name, out_dir, resume=resume, sections=(VisionChatConfig.section, "model"))
    cfg = run.settings(VisionChatConfig, settings)
    data = TokenData(data_dir)
    palette = palette_of(data.tokenizer(), os.fspath(data_dir))
    (tr_ids, tr_labels), (va_ids, va_labels) = image_split(data, "train"), image_split(data, "val")
    if tr_labels is None or va_labels is None:
        raise UserError(f"{data_dir}: the images have no labels; the questions need labelled images")
    classes = data.meta["images"]["classes"]
    h, w = palette.image_size
    if h != w:
        raise UserError(f"{data_dir}: images are {h}x{w}; the vision encoder reads square images")
    if cfg.encoder == "igpt" and not cfg.igpt:
        raise UserError("--encoder igpt needs --igpt RUN: an Image GPT trained on the same images")
    vcfg = VisionConfig(image_size=h, channels=1 if palette.grey else 3, patch=cfg.patch, width=cfg.vision_width,
                        encoder=cfg.encoder, igpt=os.path.abspath(cfg.igpt) if cfg.igpt else "",
                        igpt_layer=cfg.igpt_layer)
    train_cfg = run.train(train, VISION_TRAIN.values)
    tok = chat_tokenizer(classes)
    with run.joined(env, train_cfg) as env:
        saved = (run.saved or {}).get("model")
        gcfg = GPTConfig.from_dict(saved, source="config.json") if saved else GPTConfig.from_dict(
            {**VISION_MODEL, **(model or {}), "vocab_size": tok.vocab_size}, source="vision chat model")
        train_ex = [e for rows in _examples(tr_ids, tr_labels, classes, palette.image, tok, vcfg, cfg.images).values()
                    for e in rows]
        val = _examples(va_ids, va_labels, classes, palette.image, tok, vcfg, cfg.images)
        longest = max(len(ids) for ids, _, _ in train_ex)
        if longest > gcfg.block_size:
            raise UserError(f"conversations of {longest} tokens exceed the model's context {gcfg.block_size}")
        extra = {"chat_format": CHAT_FORMAT, "train": train_cfg.to_dict(),
                 VisionChatConfig.section: cfg.to_dict(), VisionConfig.section: vcfg.to_dict(),
                 "data": {"dir": os.path.abspath(os.fspath(data_dir)), "classes": classes}}
        run.begin(env, gcfg, tok, extra)
        stage = VisionChatStage(train_ex, val, batch_size=train_cfg.batch_size, seed=train_cfg.seed,
                                pad_id=tok.special_tokens["<|pad|>"], tokenizer=tok, rank=env.rank,
                                world_size=env.world_size, save_extra=extra)
        vgpt = VisionGPT(GPT(gcfg), VisionEncoder(vcfg, gcfg.n_embd), tok.special_tokens[IMAGE])
        return run.trainer(vgpt, stage, train_cfg, env, progress).fit()


def _sft_examples(path: str | os.PathLike[str], tok: Tokenizer, vision: VisionEncoder, max_len: int
                  ) -> tuple[list[Example], list[str]]:
    """The rows of an SFT file (``align_data.load_sft``: text or image parts) as examples, and each row's first
    user text with its images (the held-out split's key: the same question about another image is another row)."""
    base = Path(path).expanduser().parent
    out, keys = [], []
    for ex in load_sft(path):
        where = f"{path}:{ex.line}"
        refs = ex.images or [[] for _ in ex.messages]
        with naming(where):
            ids, mask = render_images(ex.messages, [len(r) for r in refs], tok, vision.cfg.patches)
            pics = [read_image_ref(ref, vision.cfg, base) for r in refs for ref in r]
        if len(ids) > max_len:
            raise DataError(f"{where}: {len(ids)} tokens do not fit the model's context of {max_len}; shorten it")
        out.append((ids, mask, torch.stack(pics) if pics else None))
        keys.append(next((m.content for m in ex.messages if m.role == "user"), "") + "".join(sum(refs, [])))
    return out, keys


def takes_images(model_spec: str) -> bool:
    """Whether ``model_spec`` is a run directory of an image-input model (its config.json has a vision section)."""
    path = Path(model_spec).expanduser() / CONFIG_FILE
    return path.is_file() and isinstance(read_run_config(path.parent).get(VisionConfig.section), dict)


def run_image_sft(model_spec: str, data_file: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                  train: Given = None, val_fraction: float = 0.05, *, val_file: str | os.PathLike[str] | None = None,
                  resume: bool = False, progress: bool = True, env: DistEnv | None = None) -> TrainResult:
    """``gptlab sft`` of an image-input model (``gptlab images chat-train``'s) on rows whose user messages hold
    image parts: the GPT and its vision encoder are fine-tuned together; the score is the held-out rows'
    exact-answer accuracy (``acc_val``)."""
    run = StageRun(VisionChatStage.name, out_dir, resume=resume)
    train_cfg = run.train(train, VISION_TRAIN.values)
    with run.joined(env, train_cfg) as env:
        gpt, tok, config, vision = load_vision_run(model_spec)
        if tok is None or vision is None:
            raise UserError(f"{model_spec}: not an image-input model (no vision encoder), so it cannot read the "
                            f"images in {data_file}; start from a run of gptlab images chat-train")
        rows, keys = _sft_examples(data_file, tok, vision, gpt.config.block_size)
        if val_file is not None:
            train_rows, val = rows, _sft_examples(val_file, tok, vision, gpt.config.block_size)[0]
        else:
            train_rows, val = split_held_out(keys, rows, val_fraction, train_cfg.seed)
        extra = {"chat_format": CHAT_FORMAT, "train": train_cfg.to_dict(), VisionConfig.section: vision.cfg.to_dict(),
                 "data": data_record(model_spec, data_file, val_file)}
        run.begin(env, gpt.config, tok, extra)
        stage = VisionChatStage(train_rows, {"val": val} if val else {}, batch_size=train_cfg.batch_size,
                                seed=train_cfg.seed, pad_id=tok.special_tokens["<|pad|>"], tokenizer=tok,
                                rank=env.rank, world_size=env.world_size, save_extra=extra)
        model = VisionGPT(gpt.train(), vision.train(), image_token_id(tok))
        return run.trainer(model, stage, train_cfg, env, progress).fit()
