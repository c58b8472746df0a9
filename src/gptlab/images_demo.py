"""``gptlab images demo``: Image GPT and an image-input chat model on the digits, within a time budget.

    gptlab images demo --out runs/images [--minutes 15]

Offline, on scikit-learn's 8x8 digits: ``DIR/digits`` (``images prepare``), ``DIR/igpt`` (an Image GPT
trained on the pixel tokens, with ``completions.png`` and ``probe/``: the linear probe of every layer
beside raw pixels and a small CNN), and ``DIR/chat`` (an image-input chat model: ``gptlab serve --model
DIR/chat`` answers "What digit is this?" about an image sent through the API), whose vision encoder is
the Image GPT just trained, frozen: at equal steps it answers better than ViT patches trained with the
model (docs/BENCHMARKS.md). The budget is shared out by timing a training step of each model on this
machine first; the demo ends by asking the chat model about a few held-out digits, as the server does.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from .chat import Message, stop_ids
from .config import GPTConfig
from .data import TokenData, check_new_dir
from .demo import seconds_per_step
from .engine import Engine, SamplingParams
from .errors import DataError
from .igpt import complete_images, completion_rows, palette_of, probe, write_probe
from .images import DIGIT_NAMES, image_split, prepare_images, save_grid
from .runs import load_run
from .stages.pretrain import run_pretrain
from .stages.vision_chat import run_vision_chat
from .train.config import TrainConfig
from .train.metrics import read_metrics
from .vision import image_tensor, load_vision_run, render_images

__all__ = ["IGPT_MODEL", "run_images_demo"]

IGPT_MODEL = {"n_layer": 6, "n_head": 4, "n_embd": 64, "block_size": 130}
SHARES = {"igpt": 0.45, "cnn": 0.15}  # of the budget; the chat model gets what is left after the probes


def _steps(model: dict[str, int], vocab: int, batch: int, seconds: float, least: int) -> tuple[int, float]:
    """(steps that fit ``seconds``, at least ``least``; measured seconds per step)."""
    cfg = GPTConfig.from_dict({**model, "vocab_size": vocab})
    step_s = seconds_per_step(cfg, TrainConfig(batch_size=batch, device="cpu"))
    return max(least, int(seconds / step_s)), step_s


def run_images_demo(out: str | os.PathLike[str], *, minutes: float = 15.0, seed: int = 1337,
                    min_steps: int = 30) -> Path:
    """Run the demo into ``out`` (see the module docstring); returns ``out``. Each model trains at least
    ``min_steps`` steps whatever the budget."""
    if minutes <= 0:
        raise DataError(f"--minutes {minutes} must be > 0")
    start, budget = time.perf_counter(), minutes * 60.0
    out = check_new_dir(out)
    print("[1/5] the digits as pixel tokens")
    prepare_images("digits", out / "digits", palette=16, seed=seed)
    data = TokenData(out / "digits")
    tok = palette_of(data.tokenizer(), str(out / "digits"))
    train_ids, train_labels = image_split(data, "train")
    val_ids, val_labels = image_split(data, "val")
    assert train_labels is not None and val_labels is not None  # the digits are labelled

    steps, step_s = _steps(IGPT_MODEL, tok.vocab_size, 32, SHARES["igpt"] * budget, min_steps)
    print(f"[2/5] Image GPT: {steps} steps ({step_s * 1000:.0f} ms/step measured)")
    run_pretrain(out / "digits", out / "igpt", IGPT_MODEL,
                 {"max_steps": steps, "batch_size": 32, "lr": 3e-3, "warmup_steps": min(50, steps // 10),
                  "eval_every": max(steps // 4, 25), "eval_batches": 8, "checkpoint_every": max(steps // 2, 25),
                  "sample_tokens": 0,
                  "seed": seed, "device": "cpu"})
    model, _, _ = load_run(out / "igpt")
    done = complete_images(model, tok, torch.as_tensor(val_ids[:8, :32]), 8, seed=seed)
    save_grid(completion_rows(tok, val_ids[:8], done, 4), out / "igpt" / "completions.png", split_after=8)

    print("[3/5] the linear probe of every layer, raw pixels and a small CNN")
    result = probe(model, tok, (train_ids, train_labels), (val_ids, val_labels), cnn_seconds=SHARES["cnn"] * budget,
                   seed=seed)
    write_probe(result, out / "igpt" / "probe", title="Image GPT on the digits: linear probe by layer")
    print(result.table(), end="")

    # The chat model's steps are timed by taking them: its first min_steps, then a resume to what fits.
    chat = {"encoder": "igpt", "igpt": str(out / "igpt")}  # the better encoder (docs/BENCHMARKS.md)
    run_vision_chat(out / "digits", out / "chat", {"max_steps": min_steps, "eval_every": 0, "seed": seed,
                                                   "device": "cpu"}, chat, progress=False)
    times = [r["time_s"] for r in read_metrics(out / "chat" / "metrics.jsonl") if "time_s" in r]
    step_s = (times[-1] - times[0]) / max(len(times) - 1, 1)
    left = budget - (time.perf_counter() - start)
    steps = max(min_steps, int((left - 30) / step_s))
    print(f"[4/5] the image-input chat model, reading images through the Image GPT: {steps} steps "
          f"({step_s * 1000:.0f} ms/step measured)")
    run_vision_chat(out / "digits", out / "chat", {"max_steps": steps, "eval_every": steps}, chat, resume=True)

    print("[5/5] asking it about held-out digits, as the server would")
    gpt, chat_tok, _, vision = load_vision_run(out / "chat")
    assert chat_tok is not None and vision is not None
    engine = Engine(gpt, chat_tok, vision=vision)
    prompt, _ = render_images([Message("user", "What digit is this?")], [1], chat_tok, vision.cfg.patches,
                              add_generation_prompt=True)
    params = SamplingParams(max_new_tokens=16, temperature=0, stop_token_ids=stop_ids(chat_tok))
    for ids, label in zip(val_ids[:5], val_labels):
        image = image_tensor(tok.image(ids.tolist()), vision.cfg)[None]
        reply = engine.generate_ids([prompt], params, images=[image])[0].text
        print(f"      a held-out {DIGIT_NAMES[int(label)]}: What digit is this? -> {reply}")

    print(f"\nImage GPT       {out / 'igpt'} (completions.png, probe/probe.md, probe/probe.png, loss.png)")
    print(f"image chat      {out / 'chat'}")
    print(f"wall time       {(time.perf_counter() - start) / 60:.1f} min\n")
    print("next:")
    print(f"  gptlab serve --model {out / 'chat'}     # then send an image: README, 'Images'")
    print(f"  gptlab chat --model {out / 'chat'}      # /image PATH, then ask")
    print(f"  gptlab images complete --model {out / 'igpt'} --from-val 8 --out grid.png")
    return out
