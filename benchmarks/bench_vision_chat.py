"""Image input in the conversation: held-out answer accuracy per question kind, with and without the image.

    python benchmarks/bench_vision_chat.py [--out runs/bench-vchat] [--steps 800] [--igpt IGPT_RUN] [--quick]

One process: `gptlab images prepare` on the digits, then `gptlab images chat-train` with the same model,
questions and steps: with the ViT patch encoder, with `--no-images` (the text-only baseline, which can
only learn each question's most frequent answer) and, given `--igpt` (an Image GPT trained on the same
digits, e.g. `gptlab images demo`'s), with that Image GPT as a frozen encoder. Accuracy: greedy decoding
gives exactly the answer, on held-out images never trained on.
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
    ap.add_argument("--igpt", default=None, help="an Image GPT run on the digits, to measure as the encoder")
    args = ap.parse_args()
    steps = str(100 if args.quick else args.steps)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    train = ["images", "chat-train", "--data", str(out / "digits"), "--max-steps", steps]
    runs = {"image": [], "text": ["--no-images"], **({"igpt": ["--encoder", "igpt", "--igpt", args.igpt]}
                                                      if args.igpt else {})}
    if gptlab(["images", "prepare", "--input", "digits", "--out", str(out / "digits")]):
        raise SystemExit("gptlab images prepare failed")
    seconds = {}
    for name, extra in runs.items():
        if gptlab([*train, "--out", str(out / name), *extra]):
            raise SystemExit(f"gptlab images chat-train {name} failed")
        seconds[name] = read_metrics(out / name / "metrics.jsonl")[-1]["time_s"]
    scores = {name: last_scores(out / name) for name in runs}
    print(f"\n{steps} steps each, {time.perf_counter() - t0:.0f} s in all; held-out digits; training seconds: "
          + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    heads = {"image": "ViT patches", "igpt": "Image GPT encoder (frozen)", "text": "text only"}
    print("| question | " + " | ".join(heads[n] for n in runs) + " |\n|---|" + "---:|" * len(runs))
    for kind in scores["image"]:
        print(f"| {kind} | " + " | ".join(f"{scores[n][kind]:.3f}" for n in runs) + " |")


if __name__ == "__main__":
    main()
