"""Image GPT on real digits: completions, the linear probe by layer vs raw pixels vs a small CNN, fine-tuning.

    python benchmarks/bench_igpt.py [--out runs/bench-igpt] [--steps 400] [--quick]
    python benchmarks/bench_igpt.py --input mnist5k --image-size 14 --n-layer 4 --batch-size 16 --cnn-seconds 150

One process: `gptlab images prepare` (default: scikit-learn's 8x8 digits, 16 grey levels), `gptlab train`
of a GPT on the pixel tokens, `gptlab images complete` (the grid PNG), `gptlab images probe` (every layer;
the CNN gets the GPT's own training time unless --cnn-seconds) and `gptlab finetune --task
classification` on the image rows. Prints the table recorded in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from gptlab.cli import main as gptlab
from gptlab.train.metrics import read_metrics


def run(*argv: str) -> None:
    code = gptlab(list(argv))
    if code:
        raise SystemExit(f"gptlab {' '.join(argv)} exited {code}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench-igpt")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--quick", action="store_true", help="100 steps, for a smoke run")
    ap.add_argument("--input", default="digits", help="digits, mnist5k or a folder (images prepare --input)")
    ap.add_argument("--image-size", default=None)
    ap.add_argument("--n-layer", default="6")
    ap.add_argument("--batch-size", default="32")
    ap.add_argument("--cnn-seconds", default=None)
    args = ap.parse_args()
    steps = 100 if args.quick else args.steps
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    data, model = out / "images", out / "igpt"
    t0 = time.perf_counter()
    run("images", "prepare", "--input", args.input, "--palette", "16", "--out", str(data),
        *(["--image-size", args.image_size] if args.image_size else []))
    side = json.loads((data / "meta.json").read_text())["images"]["image_size"][0]
    run("train", "--data", str(data), "--out", str(model), "--preset", "tiny", "--n-layer", args.n_layer, "--n-head",
        "4", "--n-embd", "64", "--block-size", str(2 * (side * side + 1)), "--max-steps", str(steps), "--batch-size",
        args.batch_size, "--lr", "3e-3",
        "--warmup-steps", "50", "--eval-every", str(max(steps // 4, 1)), "--sample-every", "0",
        "--sample-prompt", "")
    run("images", "complete", "--model", str(model), "--from-val", "8", "--keep-rows", str(side // 2), "--samples",
        "8", "--out", str(model / "completions.png"))
    run("images", "probe", "--model", str(model), *(["--cnn-seconds", args.cnn_seconds] if args.cnn_seconds else []))
    run("finetune", "--task", "classification", "--model", str(model), "--train", str(data / "classify/train.jsonl"),
        "--val", str(data / "classify/val.jsonl"), "--out", str(out / "finetune"), "--max-steps", str(steps // 2),
        "--batch-size", args.batch_size, "--lr", "1e-3", "--eval-every", str(max(steps // 2, 1)))
    probe = json.loads((model / "probe" / "probe.json").read_text())
    val = [r["val_loss"] for r in read_metrics(model / "metrics.jsonl") if "val_loss" in r]
    ft = [r["val_accuracy"] for r in read_metrics(out / "finetune" / "metrics.jsonl") if "val_accuracy" in r]
    train_s = read_metrics(model / "metrics.jsonl")[-1]["time_s"]
    print(f"\nImage GPT on {args.input} ({side}x{side}), {args.n_layer} layers x 64, {steps} steps in {train_s:.0f} s; "
          f"val loss {val[-1]:.3f} "
          f"nats/pixel; {probe['n_train']} train / {probe['n_test']} test images")
    print("| method | test accuracy |\n|---|---:|")
    for i, acc in enumerate(probe["layers"]):
        print(f"| linear probe, {'embeddings' if i == 0 else f'block {i}'} | {acc:.3f} |")
    print(f"| logistic regression on raw pixels | {probe['pixels']:.3f} |")
    print(f"| small CNN, {probe['cnn_seconds']:.0f} s ({probe['cnn_steps']} steps) | {probe['cnn']:.3f} |")
    print(f"| GPT-1 fine-tuning of the Image GPT, {steps // 2} steps | {ft[-1]:.3f} |")
    print(f"| chance | {probe['chance']:.3f} |")
    print(f"best probe layer: {probe['best_layer']} of {len(probe['layers']) - 1}; total {time.perf_counter() - t0:.0f} s; "
          f"grid: {model / 'completions.png'}")


if __name__ == "__main__":
    main()
