"""Image GPT's commands: ``gptlab images prepare|complete|probe``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import TokenData
from ..errors import UserError
from ..igpt import complete_images, completion_rows, palette_of, probe, write_probe
from ..images import BUILTIN_SETS, image_split, prepare_images, read_rgb, save_grid
from ..images_demo import run_images_demo
from ..runs import load_run
from ..stages.vision_chat import run_vision_chat
from ..tokenizer import PaletteTokenizer, check_tokenizers_match
from ..train.dist import resolve_device
from ..train.metrics import read_metrics
from .args import add_group

__all__ = ["COMMANDS"]


def cmd_prepare(args: argparse.Namespace) -> None:
    meta = prepare_images(args.input, args.out, image_size=args.image_size, palette=args.palette,
                          val_fraction=args.val_fraction, seed=args.seed)
    info = meta["images"]
    h, w = info["image_size"]
    print(f"{args.out}: {info['count']['train']:,} train and {info['count']['val']:,} val images, {h}x{w}, "
          f"palette of {info['palette']} {'grey levels' if info['grey'] else 'colours'} "
          f"({h * w + 1} tokens per image with its separator)")


def add_prepare(isub: argparse._SubParsersAction) -> None:
    p = isub.add_parser("prepare", help="images -> pixel-token shards for `gptlab train` (the palette is the "
                                        "tokenizer)")
    p.add_argument("--input", required=True,
                   help=f"{' or '.join(BUILTIN_SETS)} (installed data sets), or a folder of PNG/JPEG images "
                        f"(sub-folders are labels)")
    p.add_argument("--image-size", type=int, default=None,
                   help="side of the square images (default: the set's own size; 32 for a folder)")
    p.add_argument("--palette", type=int, default=16, help="palette size: k-means clusters of the pixel colours "
                                                            "(16, 512, ...; default 16)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of images held out (the probe's test split)")
    p.add_argument("--seed", type=int, default=1337, help="seed of the split and the k-means")
    p.add_argument("--out", required=True, help="data directory to create")
    p.set_defaults(func=cmd_prepare)


def _image_run(args: argparse.Namespace) -> tuple[Any, PaletteTokenizer, dict[str, Any]]:
    model, tok, config = load_run(args.model, device=resolve_device(args.device))
    return model, palette_of(tok, args.model), config


def _image_data(args: argparse.Namespace, config: dict[str, Any], tok: PaletteTokenizer) -> TokenData:
    """``--data``, else the data directory the run was trained on, checked to hold the run's palette."""
    where = args.data or (config.get("data") or {}).get("dir")
    if not where:
        raise UserError(f"{args.model}: the run does not name its data directory; pass --data DIR")
    data = TokenData(where)
    check_tokenizers_match(tok, data.tokenizer(), model_vocab=tok.vocab_size, data_vocab=data.vocab_size,
                           model_name=os.fspath(args.model), data_name=os.fspath(where),
                           model_spec=tok.spec, data_spec=data.meta.get("tokenizer"))
    return data


def _read_image(path: str, tok: PaletteTokenizer) -> np.ndarray:
    """A user's image file as palette ids (H*W,): centred square crop, resized to the model's images."""
    return tok.quantize(read_rgb(Path(path), tok.image_size[0], path, "pass a PNG or JPEG file")).reshape(-1)


def cmd_complete(args: argparse.Namespace) -> None:
    model, tok, config = _image_run(args)
    h, w = tok.image_size
    if (args.input is None) == (args.from_val is None):
        raise UserError("give one of --input IMAGE (a file) or --from-val N (the first N held-out images)")
    if args.input is not None:
        originals = np.stack([_read_image(path, tok) for path in args.input])
    else:
        originals = image_split(_image_data(args, config, tok), "val")[0][:args.from_val]
        if len(originals) == 0:
            raise UserError("--from-val must be at least 1")
    rows = h // 2 if args.keep_rows is None else args.keep_rows
    if not 0 <= rows < h:
        raise UserError(f"--keep-rows {rows} must be between 0 and {h - 1} (the images have {h} rows)")
    if args.samples < 1:
        raise UserError("--samples must be at least 1")
    given = torch.as_tensor(originals[:, :rows * w], dtype=torch.long)
    done = complete_images(model, tok, given, args.samples, temperature=args.temperature, seed=args.seed)
    grid = completion_rows(tok, originals, done, rows)
    path = save_grid(grid, args.out, split_after=args.samples)
    print(f"{path}: {len(grid)} images x {args.samples} completions from the top {rows} of {h} rows "
          f"(columns: given, samples, original)")


def add_complete(isub: argparse._SubParsersAction) -> None:
    p = isub.add_parser("complete", help="iGPT's figure: complete images from their top rows (a PNG grid)")
    p.add_argument("--model", required=True, help="an Image GPT run directory")
    p.add_argument("--input", nargs="+", default=None, help="image files to complete")
    p.add_argument("--from-val", type=int, default=None, help="complete the first N held-out images of the data")
    p.add_argument("--data", default=None, help="the image data directory (default: the run's)")
    p.add_argument("--keep-rows", type=int, default=None, help="rows given from the top (default: half)")
    p.add_argument("--samples", type=int, default=8, help="completions per image (default 8)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.set_defaults(func=cmd_complete)


def _train_seconds(run: str) -> float:
    """How long the run trained (its metrics' last time_s): the small CNN's budget."""
    path = Path(run) / "metrics.jsonl"
    times = [r["time_s"] for r in read_metrics(path) if isinstance(r.get("time_s"), (int, float))] \
        if path.is_file() else []
    if not times:
        raise UserError(f"{path}: no training time recorded; pass --cnn-seconds S")
    return float(times[-1])


def cmd_probe(args: argparse.Namespace) -> None:
    model, tok, config = _image_run(args)
    data = _image_data(args, config, tok)
    train, test = image_split(data, "train"), image_split(data, "val")
    if train[1] is None or test[1] is None:
        raise UserError(f"{data.path}: the images have no labels (a folder without class sub-folders); "
                        f"the probe needs labelled images")
    seconds = args.cnn_seconds if args.cnn_seconds is not None else _train_seconds(args.model)
    result = probe(model, tok, (train[0], train[1]), (test[0], test[1]), cnn_seconds=seconds, layers=args.layer,
                   seed=args.seed)
    out = args.out or os.path.join(args.model, "probe")
    files = write_probe(result, out, title=f"linear probe of {Path(args.model).name}")
    print(result.table(), end="")
    print(f"best layer {result.best_layer} of {len(result.layers) - 1}; wrote {', '.join(map(str, files.values()))}")


def add_probe(isub: argparse._SubParsersAction) -> None:
    p = isub.add_parser("probe", help="linear probe of every layer vs raw-pixel logistic regression vs a small CNN")
    p.add_argument("--model", required=True, help="an Image GPT run directory")
    p.add_argument("--data", default=None, help="the labelled image data directory (default: the run's)")
    p.add_argument("--layer", type=int, nargs="+", default=None, help="probe only these layers (0 = embeddings)")
    p.add_argument("--cnn-seconds", type=float, default=None,
                   help="training time of the CNN baseline (default: the GPT's own training time)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="directory for probe.json/md/png (default: RUN/probe)")
    p.set_defaults(func=cmd_probe)


def cmd_chat_train(args: argparse.Namespace) -> None:
    train = {k: v for k, v in (("max_steps", args.max_steps), ("seed", args.seed)) if v is not None}
    settings = {"images": args.images, "encoder": args.encoder, "igpt": args.igpt or "", "igpt_layer": args.igpt_layer}
    result = run_vision_chat(args.data, args.out, train, settings, resume=args.resume)
    records = [r for r in read_metrics(Path(args.out) / "metrics.jsonl") if any(k.startswith("acc_") for k in r)]
    scores = ", ".join(f"{k[4:]} {v:.3f}" for k, v in records[-1].items() if k.startswith("acc_")) if records else ""
    print(f"saved {result.run_dir}; held-out answer accuracy: {scores}")


def add_chat_train(isub: argparse._SubParsersAction) -> None:
    p = isub.add_parser("chat-train", help="train an image-input chat model on labelled images (questions and answers)")
    p.add_argument("--data", required=True, help="a labelled image data directory (`gptlab images prepare`)")
    p.add_argument("--out", required=True, help="run directory to create")
    p.add_argument("--max-steps", type=int, default=None, help="training steps (default 600)")
    p.add_argument("--images", action=argparse.BooleanOptionalAction, default=True,
                   help="show the images (--no-images: the text-only baseline on the same questions)")
    p.add_argument("--encoder", choices=["patches", "igpt"], default="patches",
                   help="the vision encoder: a ViT patch embedding trained with the model (default), or a trained "
                        "Image GPT's features (frozen; with --igpt)")
    p.add_argument("--igpt", default=None, help="the Image GPT run directory for --encoder igpt")
    p.add_argument("--igpt-layer", type=int, default=0, help="its block whose outputs are read (default 0: the last)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--resume", action="store_true")
    p.set_defaults(func=cmd_chat_train)


def cmd_demo(args: argparse.Namespace) -> None:
    run_images_demo(args.out, minutes=args.minutes, seed=args.seed)


def add_demo(isub: argparse._SubParsersAction) -> None:
    p = isub.add_parser("demo", help="Image GPT and an image-input chat model on the digits, within a time budget")
    p.add_argument("--out", required=True, help="directory for digits/, igpt/ and chat/")
    p.add_argument("--minutes", type=float, default=15.0, help="time budget (default 15)")
    p.add_argument("--seed", type=int, default=1337)
    p.set_defaults(func=cmd_demo)


def add_images(sub: argparse._SubParsersAction) -> None:
    add_group(sub, "images", "Image GPT: pixels as tokens (prepare, complete, probe); image-input chat (chat-train); "
                             "demo", [add_prepare, add_complete, add_probe, add_chat_train, add_demo])


COMMANDS = [add_images]
