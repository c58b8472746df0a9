"""`make bench`: every benchmark, one after another, each in its own process so none warms another's caches.

    python benchmarks/run_all.py [--quick]

``--quick`` shrinks the inputs (prepare 64 MB, baby GPT 300 steps, a 10 s serving soak) for a smoke run;
the figures in docs/BENCHMARKS.md come from the full run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small inputs, for a smoke run")
    args = ap.parse_args()
    runs = [
        ["bench_tokenizer.py"],
        ["bench_model.py"],
        ["bench_prepare.py", "--size-mb", "64" if args.quick else "1024"],
        ["bench_integrity.py", *(["--data-gb", "0.1", "--preset", "tiny"] if args.quick else [])],
        ["bench_baby_shakespeare.py", *(["--max-steps", "300"] if args.quick else [])],
        ["bench_baby_fast.py", *(["--part", "ablation", "--ablation-steps", "30", "--seeds", "1"] if args.quick else [])],
        ["bench_semisupervised.py", *(["--quick"] if args.quick else [])],
        ["bench_ppo_trl.py", *(["--quick"] if args.quick else [])],
        ["bench_lora.py", *(["--quick"] if args.quick else [])],
        ["bench_rlhf.py", "--out", "runs/bench-rlhf-quick" if args.quick else "runs/bench-rlhf",
         *(["--quick"] if args.quick else [])],
        ["bench_serve.py", *(["--quick"] if args.quick else [])],
        ["bench_visualize.py", *(["--repeat", "1"] if args.quick else [])],
        ["bench_chinese.py", "--steps", "20" if args.quick else "300"],
        ["bench_igpt.py", *(["--quick"] if args.quick else [])],
        ["fuzz_serve.py", *(["--max-examples", "20"] if args.quick else [])],
    ]
    failed = []
    for cmd in runs:
        print(f"\n=== {' '.join(cmd)} ===", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, str(HERE / cmd[0]), *cmd[1:]])
        print(f"=== {cmd[0]}: exit {rc}, {time.perf_counter() - t0:.0f} s ===", flush=True)
        if rc:
            failed.append(cmd[0])
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
