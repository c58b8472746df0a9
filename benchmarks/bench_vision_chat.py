"""Image input in the conversation: held-out answer accuracy per question kind, with and without the image.

    python benchmarks/bench_vision_chat.py [--out runs/bench-vchat] [--steps 800] [--quick]

One process: `gptlab images prepare` on the digits, then `gptlab images chat-train` twice with the same
model, questions and steps: once with the images, once with `--no-images` (the text-only baseline, which
can only learn each question's most frequent answer). Accuracy: greedy decoding gives exactly the answer,
on held-out images never trained on.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from gptlab.cli import main as gptlab
from gptlab.train.metrics import read_metrics


def last_scores(run: Path) -> dict[str, float]:
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "acc_digit" in r]
    return {k[4:]: v for k, v in rows[-1].items() if k.startswith("acc_")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench-vchat")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--quick", action="store_true", help="100 steps, for a smoke run")
    args = ap.parse_args()
    steps = str(100 if args.quick else args.steps)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    for argv in (["images", "prepare", "--input", "digits", "--out", str(out / "digits")],
                 ["images", "chat-train", "--data", str(out / "digits"), "--out", str(out / "image"), "--max-steps", steps],
                 ["images", "chat-train", "--data", str(out / "digits"), "--out", str(out / "text"), "--max-steps", steps,
                  "--no-images"]):
        if gptlab(argv):
            raise SystemExit(f"gptlab {' '.join(argv)} failed")
    image, text = last_scores(out / "image"), last_scores(out / "text")
    print(f"\n{steps} steps each, {time.perf_counter() - t0:.0f} s in all; held-out digits")
    print("| question | with the image | text only (same questions) |\n|---|---:|---:|")
    for kind in image:
        print(f"| {kind} | {image[kind]:.3f} | {text[kind]:.3f} |")


if __name__ == "__main__":
    main()
