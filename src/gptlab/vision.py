"""GPT-4-style image input: a small vision encoder whose outputs stand where ``<|image|>`` tokens are.

An image in a conversation is rendered as ``patches`` copies of the ``<|image|>`` token right after the
user's role token; the GPT's token embeddings at those positions are replaced, in order, by the
encoder's outputs. The encoder is one of two (``VisionConfig.encoder``, chosen by measurement:
docs/BENCHMARKS.md): ``patches``, ViT's patch embedding trained with the model (a strided convolution,
learned patch positions, one bidirectional transformer layer, a projection into the GPT's width), or
``igpt``, a trained Image GPT read as a frozen feature extractor (its hidden states at one block,
averaged over each patch's pixels, then a trained projection). The GPT itself only gains an optional
``token_embeds`` input (``GPT.forward``); text-only models are untouched.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .chat import Message, render
from .config import Config
from .errors import CheckpointError, DataError, UserError
from .heads import GPTWrapper
from .igpt import palette_of, pixel_states
from .images import read_rgb
from .model import GPT
from .runs import load_head, load_run
from .tokenizer import Tokenizer

__all__ = ["IMAGE", "VisionConfig", "VisionEncoder", "VisionGPT", "image_tensor", "read_image", "token_embeds",
           "image_token_id", "render_images", "load_vision", "load_vision_run", "read_image_ref"]

IMAGE = "<|image|>"


@dataclass
class VisionConfig(Config):
    """The vision encoder of an image-input chat model (saved in its run's config.json)."""

    section: ClassVar[str] = "vision"

    image_size: int = 8
    """side of the square images the encoder reads"""
    channels: int = 1
    """1 for greyscale, 3 for RGB"""
    patch: int = 2
    """side of a patch: (image_size / patch)^2 image tokens per image"""
    width: int = 64
    """the encoder's own width (encoder patches)"""
    encoder: str = "patches"
    """patches (a ViT patch embedding trained with the model) or igpt (a trained Image GPT, frozen)"""
    igpt: str = ""
    """the Image GPT run directory that encoder igpt reads (kept by path, not copied into the run)"""
    igpt_layer: int = 0
    """the Image GPT block whose outputs are the features (0: the last)"""

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch) ** 2


class VisionEncoder(nn.Module):
    """Images (N, C, S, S) in [0, 1] -> patch embeddings (N, patches, n_embd) in the GPT's embedding space."""

    def __init__(self, cfg: VisionConfig, n_embd: int) -> None:
        super().__init__()
        if cfg.image_size % cfg.patch:
            raise UserError(f"image_size {cfg.image_size} is not a multiple of patch {cfg.patch}")
        if cfg.encoder not in ("patches", "igpt"):
            raise UserError(f"vision encoder {cfg.encoder!r} is not patches or igpt")
        self.cfg = cfg
        if cfg.encoder == "igpt":
            gpt, tok, _ = load_run(cfg.igpt)
            self.palette = palette_of(tok, cfg.igpt)
            if self.palette.image_size != (cfg.image_size, cfg.image_size):
                raise UserError(f"{cfg.igpt}: the Image GPT reads {self.palette.image_size} images, not "
                                f"{cfg.image_size}x{cfg.image_size}")
            if not 0 <= cfg.igpt_layer <= gpt.config.n_layer:
                raise UserError(f"igpt_layer {cfg.igpt_layer} is not a block of {cfg.igpt} (1..{gpt.config.n_layer})")
            self.igpt = [gpt.eval().requires_grad_(False)]  # a list, not a submodule: neither trained nor saved
            self.proj = nn.Linear(gpt.config.n_embd, n_embd)
            return
        self.patchify = nn.Conv2d(cfg.channels, cfg.width, cfg.patch, stride=cfg.patch)
        self.pos = nn.Parameter(torch.randn(cfg.patches, cfg.width) * 0.02)
        self.mix = nn.TransformerEncoderLayer(cfg.width, nhead=4, dim_feedforward=4 * cfg.width, dropout=0.0,
                                              batch_first=True, norm_first=True)
        self.proj = nn.Linear(cfg.width, n_embd)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.cfg.encoder == "igpt":
            return self.proj(self.igpt_features(images))
        x = self.patchify(images).flatten(2).transpose(1, 2) + self.pos  # (N, patches, width)
        return self.proj(self.mix(x))

    @torch.no_grad()
    def igpt_features(self, images: torch.Tensor) -> torch.Tensor:
        """The Image GPT's hidden states at ``igpt_layer``, each patch's pixels averaged: (N, patches, its width)."""
        gpt, s, p = self.igpt[0].to(images.device), self.cfg.image_size, self.cfg.patch
        rgb = (images.clamp(0, 1) * 255).round().permute(0, 2, 3, 1).expand(-1, -1, -1, 3)  # (N, S, S, 3)
        ids = torch.from_numpy(self.palette.quantize(rgb.cpu().numpy())).view(len(images), -1).to(images.device)
        states = pixel_states(gpt, self.palette, ids)[self.cfg.igpt_layer or gpt.config.n_layer]  # (N, S*S, C)
        grid = states.transpose(1, 2).reshape(len(images), -1, s, s)
        return F.avg_pool2d(grid, p).flatten(2).transpose(1, 2)


def image_tensor(pixels: np.ndarray, cfg: VisionConfig) -> torch.Tensor:
    """RGB pixels (S, S, 3) uint8 as the encoder's input (C, S, S) in [0, 1]."""
    if pixels.shape != (cfg.image_size, cfg.image_size, 3):
        raise UserError(f"an image of shape {pixels.shape} is not {cfg.image_size}x{cfg.image_size} RGB")
    t = torch.from_numpy(np.array(pixels, dtype=np.uint8)).permute(2, 0, 1).float() / 255  # a copy: writable
    return t[:1] if cfg.channels == 1 else t


def read_image(source: bytes | str | os.PathLike[str], cfg: VisionConfig) -> torch.Tensor:
    """A PNG/JPEG (its bytes or its path) as the encoder's input: the centred square crop at the encoder's size."""
    where = "the image" if isinstance(source, bytes) else os.fspath(source)
    file = source if isinstance(source, bytes) else Path(source).expanduser()
    return image_tensor(read_rgb(file, cfg.image_size, where, "give a PNG or JPEG"), cfg)


def read_image_ref(ref: str, cfg: VisionConfig, base: Path | None = None) -> torch.Tensor:
    """An image given as a base64 data URL or, with ``base`` (a data file's folder), a file path relative to it.
    Nothing is fetched: any other URL is refused."""
    if ref.startswith("data:"):
        head, comma, data = ref.partition(",")
        if not comma or not head.endswith(";base64"):
            raise DataError("a data URL must be base64: data:image/png;base64,...")
        try:
            raw = base64.b64decode(data, validate=True)
        except binascii.Error:
            raise DataError("the data URL's base64 is damaged; encode the image again") from None
        return read_image(raw, cfg)
    if base is None or ref.split(":", 1)[0].lower() in ("http", "https", "ftp", "file"):
        raise DataError("remote image URLs are not fetched; send the image inline as a data URL "
                        "(data:image/png;base64,...)")
    return read_image(base / ref, cfg)


def image_token_id(tokenizer: Tokenizer) -> int:
    image_id = tokenizer.special_tokens.get(IMAGE)
    if image_id is None:
        raise UserError("this model does not take images (its tokenizer has no <|image|> token)")
    return image_id


def token_embeds(gpt: GPT, encoder: VisionEncoder, idx: torch.Tensor, image_id: int,
                 images: torch.Tensor) -> torch.Tensor:
    """``wte(idx)`` (B, T, n_embd) with the ``<|image|>`` positions, row by row, taken by the encoded
    ``images`` (N, C, S, S) in order: row-major over the batch, ``patches`` positions per image."""
    x = gpt.wte(idx)
    where = idx == image_id
    n = int(where.sum())
    if n != len(images) * encoder.cfg.patches:
        raise UserError(f"{n} image tokens for {len(images)} images of {encoder.cfg.patches} patches each")
    if n:
        x = x.masked_scatter(where[..., None], encoder(images.to(x.device, x.dtype)).reshape(-1, x.shape[-1]))
    return x


class VisionGPT(GPTWrapper):
    """A GPT with a vision encoder: one module for the trainer, the loss over the assistant's tokens."""

    def __init__(self, gpt: GPT, vision: VisionEncoder, image_id: int) -> None:
        super().__init__(gpt)
        self.vision = vision
        self.image_id = image_id

    def empty_copy(self) -> "VisionGPT":
        return VisionGPT(self.gpt.empty_copy(), VisionEncoder(self.vision.cfg, self.gpt.config.n_embd), self.image_id)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        embeds = token_embeds(self.gpt, self.vision, idx, self.image_id, images)
        _, loss = self.gpt(idx, targets, token_embeds=embeds)
        return loss


def render_images(messages: Sequence[Message], image_counts: Sequence[int], tokenizer: Tokenizer, patches: int,
                  *, add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
    """``chat.render`` with ``image_counts[i]`` images of message i placed right after its role token, each as
    ``patches`` ``<|image|>`` tokens (never trained on)."""
    image_id = image_token_id(tokenizer) if any(image_counts) else -1
    ids: list[int] = []
    mask: list[bool] = []
    for m, count in zip(messages, image_counts):
        part, part_mask = render([m], tokenizer)
        ids += [part[0], *[image_id] * (count * patches), *part[1:]]
        mask += [part_mask[0], *[False] * (count * patches), *part_mask[1:]]
    if add_generation_prompt:
        tail, tail_mask = render([], tokenizer, add_generation_prompt=True)
        ids += tail
        mask += tail_mask
    return ids, mask


def load_vision(spec: Any, config: dict[str, Any], gpt: GPT) -> VisionEncoder | None:
    """The vision encoder of the run ``spec`` (its config.json is ``config``), None for a text-only run."""
    record = config.get(VisionConfig.section)
    if record is None:
        return None
    if not isinstance(record, dict):
        raise CheckpointError(f"{spec}: config.json's {VisionConfig.section} section is not an object")
    fields = {k: v for k, v in record.items() if k != "head"}
    encoder = VisionEncoder(VisionConfig.from_dict(fields, source=f"{spec}: config.json"), gpt.config.n_embd)
    load_head(spec, record.get("head"), encoder, "vision")
    return encoder.to(gpt.wte.weight.device).eval()


def load_vision_run(spec: Any) -> tuple[GPT, Tokenizer | None, dict[str, Any], VisionEncoder | None]:
    """``runs.load_run`` and the run's vision encoder (None for a text-only run): what ``gptlab serve`` loads."""
    gpt, tokenizer, config = load_run(spec)
    return gpt, tokenizer, config, load_vision(spec, config, gpt)
