"""What a trained Image GPT does: complete images from their top rows, and linear probes of its features.

    gptlab images complete --model runs/igpt --from-val 6 --keep-rows 4 --samples 8 --out grid.png
    gptlab images probe --model runs/igpt --data data/digits --out runs/igpt/probe

``complete`` is iGPT's figure: the top rows given, the rest sampled pixel by pixel (only palette
colours), the original beside them. ``probe`` is iGPT's linear probe: each layer's hidden states,
average-pooled over an image's pixels, fit by a logistic regression on the train split and scored on
the held-out split, layer by layer (iGPT found the best features in the middle of the network), beside
two baselines: a logistic regression on the raw (palette) pixels and a small CNN trained from scratch
for as long as the GPT was trained.
"""

from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from .errors import UserError
from .model import GPT, KVCache
from .tokenizer import PaletteTokenizer, Tokenizer

__all__ = ["palette_of", "complete_images", "completion_rows", "pixel_states", "layer_features", "logistic_probe", "train_cnn",
           "ProbeResult", "probe", "plot_probe", "write_probe"]


def palette_of(tokenizer: Tokenizer | None, where: str) -> PaletteTokenizer:
    """The run's tokenizer when it is a palette (an Image GPT), else a one-line error."""
    if not isinstance(tokenizer, PaletteTokenizer):
        raise UserError(f"{where}: not an Image GPT (its tokenizer is not a palette); train one on the output of "
                        f"`gptlab images prepare`")
    return tokenizer


def _check_fits(model: GPT, tok: PaletteTokenizer) -> int:
    h, w = tok.image_size
    if model.config.block_size < h * w + 1:
        raise UserError(f"the model's context ({model.config.block_size}) is shorter than an image and its "
                        f"separator ({h * w + 1} tokens); train with --block-size {h * w + 1} or more")
    return h * w


@torch.inference_mode()
def complete_images(model: GPT, tok: PaletteTokenizer, prompts: torch.Tensor, samples: int, *,
                    temperature: float = 1.0, seed: int = 0) -> torch.Tensor:
    """Sampled completions (N, samples, H*W) of the images whose first pixels are ``prompts`` (N, R*W).

    Each image starts after ``<|endoftext|>`` as in training; every drawn token is a palette colour (the
    special tokens' logits are masked). All N * samples rows decode together through one KV cache.
    """
    pixels = _check_fits(model, tok)
    model.eval()
    n, given = prompts.shape
    device = model.wte.weight.device
    rows = prompts.repeat_interleave(samples, 0).to(device)
    idx = torch.cat([torch.full((len(rows), 1), tok.eos_id, device=device), rows], 1)
    cache = KVCache(model.config, len(rows), max_len=pixels + 1, device=device, dtype=model.wte.weight.dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    logits = model(idx, cache=cache)[:, -1]
    out = [rows]
    for _ in range(pixels - given):
        logits = logits[:, :tok.palette_size].float()
        if temperature == 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            nxt = torch.multinomial(F.softmax(logits / temperature, -1), 1, generator=gen)
        out.append(nxt)
        if cache.length < pixels:
            logits = model(nxt, cache=cache)[:, -1]
    return torch.cat(out, 1).view(n, samples, pixels).cpu()


def completion_rows(tok: PaletteTokenizer, originals: np.ndarray, done: torch.Tensor,
                    rows: int) -> list[list[np.ndarray]]:
    """The grid's rows: the given top ``rows`` (the rest light blue), each completion, the original."""
    out = []
    for orig, samples in zip(originals, done):
        shown = tok.image(orig.tolist()).copy()
        shown[rows:] = (190, 210, 240)
        out.append([shown, *(tok.image(s) for s in samples.tolist()), tok.image(orig.tolist())])
    return out


def pixel_states(model: GPT, tok: PaletteTokenizer, ids: torch.Tensor) -> list[torch.Tensor]:
    """Per layer (0 = the embeddings, i = after block i), the hidden states (N, H*W, n_embd) at each pixel of
    the images ``ids`` (N, H*W), each read after ``<|endoftext|>`` as in training."""
    _check_fits(model, tok)
    x = torch.cat([torch.full((len(ids), 1), tok.eos_id, device=ids.device), ids], 1)
    caught: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _a, out: caught.append(out[:, 1:]))
             for m in [model.drop, *model.h]]
    try:
        model.hidden_states(x)
    finally:
        for h in hooks:
            h.remove()
    return caught


@torch.inference_mode()
def layer_features(model: GPT, tok: PaletteTokenizer, ids: np.ndarray, batch_size: int = 64) -> list[torch.Tensor]:
    """Per layer (0 = the embeddings, i = after block i), each image's hidden states averaged over its pixel
    positions: a list of n_layer + 1 tensors (N, n_embd)."""
    model.eval()
    device = model.wte.weight.device
    feats: list[list[torch.Tensor]] = [[] for _ in range(model.config.n_layer + 1)]
    for start in range(0, len(ids), batch_size):
        x = torch.as_tensor(ids[start:start + batch_size], dtype=torch.long, device=device)
        for layer, states in enumerate(pixel_states(model, tok, x)):
            feats[layer].append(states.mean(1).float().cpu())
    return [torch.cat(f) for f in feats]


def logistic_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                   *, l2: float = 1e-3, steps: int = 200) -> float:
    """Test accuracy of a multinomial logistic regression (features standardised on the train split, L2
    penalty ``l2``, full-batch L-BFGS) fit on the train split."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    xtr, xte = (train_x - mean) / std, (test_x - mean) / std
    classes = int(max(train_y.max(), test_y.max())) + 1
    torch.manual_seed(0)
    lin = nn.Linear(xtr.shape[1], classes)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1, max_iter=steps, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(lin(xtr), train_y) + l2 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float((lin(xte).argmax(-1) == test_y).float().mean())


class SmallCNN(nn.Module):
    """Two 3x3 convolutions, a 2x2 max-pool and a linear classifier: the from-scratch baseline."""

    def __init__(self, channels: int, size: tuple[int, int], classes: int, width: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc = nn.Linear(2 * width * (size[0] // 2) * (size[1] // 2), classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        return self.fc(x.flatten(1))


def train_cnn(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
              seconds: float, *, seed: int = 0, batch_size: int = 64) -> tuple[float, int]:
    """(test accuracy, steps) of ``SmallCNN`` on images (N, C, H, W) in [0, 1] trained with AdamW for
    ``seconds`` of wall time (at least one epoch)."""
    torch.manual_seed(seed)
    classes = int(max(train_y.max(), test_y.max())) + 1
    cnn = SmallCNN(train_x.shape[1], (train_x.shape[2], train_x.shape[3]), classes)
    opt = torch.optim.AdamW(cnn.parameters(), lr=2e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    start, steps = time.perf_counter(), 0
    epoch_steps = math.ceil(len(train_x) / batch_size)
    while steps < epoch_steps or time.perf_counter() - start < seconds:
        pick = torch.randint(0, len(train_x), (batch_size,), generator=gen)
        loss = F.cross_entropy(cnn(train_x[pick]), train_y[pick])
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    with torch.no_grad():
        return float((cnn(test_x).argmax(-1) == test_y).float().mean()), steps


@dataclass
class ProbeResult:
    layers: list[float]  # test accuracy of the probe at each layer (0 = embeddings)
    pixels: float  # logistic regression on the raw palette pixels
    cnn: float  # the small CNN trained for cnn_seconds
    cnn_seconds: float
    cnn_steps: int
    chance: float
    n_train: int
    n_test: int

    @property
    def best_layer(self) -> int:
        return int(np.nanargmax(self.layers))

    def table(self) -> str:
        lines = ["| features | test accuracy |", "|---|---:|"]
        for i, acc in enumerate(self.layers):
            name = "embeddings" if i == 0 else f"block {i}"
            lines.append(f"| linear probe, {name}{' (best)' if i == self.best_layer else ''} | {acc:.3f} |")
        lines.append(f"| logistic regression on raw pixels | {self.pixels:.3f} |")
        lines.append(f"| small CNN from scratch ({self.cnn_seconds:.0f} s, {self.cnn_steps} steps) | {self.cnn:.3f} |")
        lines.append(f"| chance (most frequent class) | {self.chance:.3f} |")
        return "\n".join(lines) + f"\n\n{self.n_train} train images, {self.n_test} test images.\n"


def _pixels(tok: PaletteTokenizer, ids: np.ndarray) -> torch.Tensor:
    """Palette ids (N, H*W) as images (N, C, H, W) in [0, 1]: one channel for greyscale palettes."""
    h, w = tok.image_size
    px = torch.from_numpy(tok.colours[ids].reshape(len(ids), h, w, 3)).permute(0, 3, 1, 2).float() / 255
    return px[:, :1] if tok.grey else px


def probe(model: GPT, tok: PaletteTokenizer, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
          *, cnn_seconds: float, layers: list[int] | None = None, seed: int = 0) -> ProbeResult:
    """The linear probe at every layer (or only ``layers``; the others are NaN) and both baselines."""
    ytr, yte = torch.as_tensor(train[1]), torch.as_tensor(test[1])
    feats_tr, feats_te = layer_features(model, tok, train[0]), layer_features(model, tok, test[0])
    wanted = range(len(feats_tr)) if layers is None else layers
    for layer in wanted:
        if not 0 <= layer < len(feats_tr):
            raise UserError(f"--layer {layer} is not a layer of this model (0 = embeddings .. {len(feats_tr) - 1})")
    accs = [logistic_probe(feats_tr[i], ytr, feats_te[i], yte) if i in wanted else math.nan
            for i in range(len(feats_tr))]
    ptr, pte = _pixels(tok, train[0]), _pixels(tok, test[0])
    raw = logistic_probe(ptr.flatten(1), ytr, pte.flatten(1), yte)
    cnn, steps = train_cnn(ptr, ytr, pte, yte, cnn_seconds, seed=seed)
    chance = float(torch.bincount(yte).max()) / len(yte)
    return ProbeResult(accs, raw, cnn, cnn_seconds, steps, chance, len(ytr), len(yte))


def plot_probe(result: ProbeResult, title: str = "") -> bytes:
    """PNG of probe accuracy vs layer with the baselines as horizontal lines."""
    fig = Figure(figsize=(6.5, 4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    points = [(i, a) for i, a in enumerate(result.layers) if not math.isnan(a)]
    ax.plot(*zip(*points), "o-", label="linear probe on the GPT's features")
    ax.axhline(result.pixels, color="C1", linestyle="--", label="logistic regression on raw pixels")
    ax.axhline(result.cnn, color="C2", linestyle="-.", label=f"small CNN ({result.cnn_seconds:.0f} s)")
    ax.axhline(result.chance, color="0.5", linestyle=":", label="chance")
    ax.set_xticks(range(len(result.layers)), ["emb"] + [str(i) for i in range(1, len(result.layers))])
    ax.set_xlabel("layer (block whose output is probed)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_probe(result: ProbeResult, out: str | Path, title: str = "") -> dict[str, Path]:
    """probe.json, probe.md (the table) and probe.png (accuracy vs layer) in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {"layers": [None if math.isnan(a) else a for a in result.layers],
                            "best_layer": result.best_layer, "pixels": result.pixels, "cnn": result.cnn,
                            "cnn_seconds": result.cnn_seconds, "cnn_steps": result.cnn_steps,
                            "chance": result.chance, "n_train": result.n_train, "n_test": result.n_test}
    return {"json": atomic_write_json(out / "probe.json", data),
            "md": atomic_write_text(out / "probe.md", result.table()),
            "png": atomic_write_bytes(out / "probe.png", plot_probe(result, title))}
