"""Learning quality: nanoGPT's baby GPT on character-level Shakespeare, end to end.

Prepares tinyshakespeare with the char tokenizer (last 10% = validation, as
nanoGPT's prepare.py splits it), trains ``configs/baby-shakespeare-char.yaml``
(4 layers x 4 heads x 128, context 64, batch 12, 2000 iterations) and prints
our final validation loss next to nanoGPT's reported 1.88, plus the wall time
per training iteration.

    python benchmarks/bench_baby_shakespeare.py [--data-file ../shared/data/tinyshakespeare.txt]
        [--out runs/bench-baby] [--max-steps 2000] [--device auto]

nanoGPT's CPU recipe estimates val loss from 20 random batches of 12 x 64; the
training-time figure here averages 20 fixed sequential batches, and the
benchmark also scores the whole val split once at the end.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NANOGPT_VAL_LOSS = 1.88


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-file", default=str(ROOT / ".." / "shared" / "data" / "tinyshakespeare.txt"))
    ap.add_argument("--out", default=None, help="run directory (default: a temporary one, deleted afterwards)")
    ap.add_argument("--config", default=str(ROOT / "configs" / "baby-shakespeare-char.yaml"))
    ap.add_argument("--max-steps", type=int, default=None, help="override the recipe's 2000 (quick checks)")
    ap.add_argument("--device", default=None)
    args = ap.parse_args()

    from gptlab.cli import main as cli
    from gptlab.runs import read_run_config
    from gptlab.stages.pretrain import run_pretrain

    data_file = Path(args.data_file).resolve()
    if not data_file.is_file():
        print(f"data file {data_file} not found: pass --data-file", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="bench-baby-"))
    try:
        data_dir = tmp / "data"
        t0 = time.perf_counter()
        if cli(["prepare", "--input", str(data_file), "--tokenizer", "char", "--out", str(data_dir),
                "--val-fraction", "0.1"]) != 0:
            return 2
        prep_s = time.perf_counter() - t0
        out = Path(args.out) if args.out else tmp / "run"
        if out.exists():
            shutil.rmtree(out)
        overrides = {"max_steps": args.max_steps, "device": args.device}
        if args.max_steps is not None:
            overrides["lr_decay_steps"] = args.max_steps
        t0 = time.perf_counter()
        result = run_pretrain(data_dir, out, train=overrides, config_file=args.config)
        wall = time.perf_counter() - t0
        import torch

        from gptlab.runs import load_run
        from gptlab.evaluate import evaluate_ppl

        from gptlab.config import GPTConfig
        from gptlab.train.config import TrainConfig

        model = load_run(out)[0]
        saved = read_run_config(out)
        model_cfg, train_cfg = GPTConfig.from_dict(saved["model"]), TrainConfig.from_dict(saved["train"])
        full = evaluate_ppl(model, data_dir, block_size=train_cfg.block_size or model_cfg.block_size, batch_size=64)

        print()
        print(f"baby GPT, char-level tinyshakespeare ({model_cfg.n_layer} layers, {model_cfg.n_head} heads, "
              f"{model_cfg.n_embd} wide, context {train_cfg.block_size or model_cfg.block_size}, "
              f"batch {train_cfg.batch_size}, {result.step} steps; torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads)")
        print(f"  val loss      gptlab {result.val_loss:.4f}   nanoGPT (reported) {NANOGPT_VAL_LOSS:.2f}   "
              f"ratio {result.val_loss / NANOGPT_VAL_LOSS:.3f}")
        print(f"  val loss, whole val split ({full['tokens']:,} tokens in non-overlapping windows): "
              f"{full['loss']:.4f}")
        print(f"  val bpb       {result.val_bpb:.4f}")
        print(f"  train loss    {result.loss:.4f}")
        print(f"  ms/iter       {result.ms_per_iter:.1f} (training steps only)")
        print(f"  wall          {wall:.1f} s training incl. eval/checkpoints, {prep_s:.1f} s prepare")
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
