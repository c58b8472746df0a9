"""Faster learning on the baby recipe: the modern block family and Muon against the faithful GPT-2 recipe,
and a mixture of experts against a dense model, each pair side by side in one run.

    python benchmarks/bench_baby_fast.py --part recipe     # faithful 2,000 steps vs the fast config: val, wall
    python benchmarks/bench_baby_fast.py --part budget     # both recipes (and modern + AdamW) in 60 s each
    python benchmarks/bench_baby_fast.py --part ablation   # the fast recipe less one option at a time, 2 seeds
    python benchmarks/bench_baby_fast.py --part moe        # demo data: dense vs MoE (equal active params), 60 s
    python benchmarks/bench_baby_fast.py --part moe --moe-steps 150   # modern dense vs MoE at equal steps
    [--data-file ../shared/data/tinyshakespeare.txt] [--budget-s 60] [--seeds 1337 1338] [--ablation-steps 300]

Every training runs in a child process of its own (its peak RSS is its memory; none warms another's caches)
and the rows of one part run one after another, so their ratios share the machine's state. "Equal wall time"
sizes each run's steps from its own measured step time (``demo.seconds_per_step``), as ``gptlab demo`` does,
so every cosine schedule ends at the budget; the table shows the wall time each run really took.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FAITHFUL = ROOT / "configs" / "baby-shakespeare-char.yaml"
FAST = ROOT / "configs" / "baby-shakespeare-char-fast.yaml"
QUIET = {"checkpoint_every": 0, "sample_tokens": 0, "device": "cpu"}
# The fast recipe less one option (the model fields that undo it, or the AdamW optimizer).
ABLATIONS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "fast recipe": ({}, {}),
    "- Muon (AdamW)": ({}, {"optimizer": "adamw"}),
    "- rotary (learned positions)": ({"pos_embedding": "learned"}, {}),
    "- RMSNorm (LayerNorm)": ({"norm": "layernorm"}, {}),
    "- QK-norm": ({"qk_norm": False}, {}),
    "- ReLU² (GELU)": ({"activation": "gelu"}, {}),
    "- untied head (tied)": ({"tie_embeddings": True}, {}),
    "- logit softcap": ({"logit_softcap": 0.0}, {}),
    "- zero-init projections": ({"zero_init_proj": False}, {}),
}


def child(spec: dict[str, Any]) -> None:
    """One training run (in this child process): prints a JSON line with its figures."""
    from gptlab.config import GPTConfig
    from gptlab.data import TokenData
    from gptlab.demo import seconds_per_step
    from gptlab.stages.pretrain import build_model_config, run_pretrain
    from gptlab.train.config import TrainConfig, load_config_file
    from gptlab.model import GPT

    file = load_config_file(spec["config"], ("model", "train")) if spec.get("config") else {"model": {}, "train": {}}
    model = {**file["model"], **spec.get("model", {})}
    train = {**file["train"], **QUIET, **spec.get("train", {})}
    data = TokenData(spec["data"])
    if spec.get("budget_s"):  # size the run so its schedule ends at the budget
        cfg = TrainConfig.from_dict(train)
        mcfg = build_model_config(model, int(data.meta["vocab_size"]), cfg)
        steps = max(20, int(0.9 * spec["budget_s"] / seconds_per_step(mcfg, cfg)))
        train.update(max_steps=steps, lr_decay_steps=steps, eval_every=0,
                     warmup_steps=min(int(train.get("warmup_steps", 100)), steps // 10))
    t0 = time.perf_counter()
    result = run_pretrain(spec["data"], spec["out"], model, train, progress=False)
    wall = time.perf_counter() - t0
    mcfg = GPTConfig.from_dict(json.loads((Path(spec["out"]) / "config.json").read_text())["model"])
    print(json.dumps({"val": result.val_loss, "wall": wall, "steps": result.step, "ms_per_iter": result.ms_per_iter,
                      "tokens_per_s": 1000 * train["batch_size"] * (train.get("block_size") or mcfg.block_size)
                      / result.ms_per_iter if result.ms_per_iter else None,
                      "params": GPT.count_params(mcfg), "active": GPT.count_params(mcfg, active=True),
                      "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def step_ms(spec: dict[str, Any]) -> float:
    """One training step of ``spec``'s model and optimizer, in ms (``demo.seconds_per_step``, in this process)."""
    from gptlab.data import TokenData
    from gptlab.demo import seconds_per_step
    from gptlab.stages.pretrain import build_model_config
    from gptlab.train.config import TrainConfig

    cfg = TrainConfig.from_dict({**spec["train"], **QUIET})
    return 1000 * seconds_per_step(build_model_config(spec["model"], int(TokenData(spec["data"]).meta["vocab_size"]),
                                                      cfg), cfg)


def run(spec: dict[str, Any]) -> dict[str, Any]:
    shutil.rmtree(spec["out"], ignore_errors=True)
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"run {spec['out']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def prepare(tmp: Path, data_file: str) -> Path:
    from gptlab.cli import main as cli

    data = tmp / "char"
    if cli(["prepare", "--input", data_file, "--tokenizer", "char", "--out", str(data), "--val-fraction", "0.1"]):
        raise SystemExit(2)
    return data


def row(name: str, r: dict[str, Any], ref: dict[str, Any] | None = None) -> str:
    ratio = f"{r['wall'] / ref['wall']:.2f}" if ref else "1.00"
    return (f"| {name} | {r['steps']} | {r['val']:.4f} | {r['wall']:.1f} | {ratio} | {r['ms_per_iter']:.1f} | "
            f"{r['tokens_per_s']:,.0f} |")


HEADER = "| run | steps | val loss | wall s | × faithful wall | ms/step | tokens/s |\n|---|---:|---:|---:|---:|---:|---:|"


def part_recipe(tmp: Path, data: Path, args: argparse.Namespace) -> None:
    faithful = run({"data": str(data), "out": str(tmp / "faithful"), "config": str(FAITHFUL)})
    fast = run({"data": str(data), "out": str(tmp / "fast"), "config": str(FAST)})
    print(HEADER)
    print(row("faithful (baby-shakespeare-char.yaml)", faithful))
    print(row("fast (baby-shakespeare-char-fast.yaml)", fast, faithful))


def part_budget(tmp: Path, data: Path, args: argparse.Namespace) -> None:
    runs = {"faithful, AdamW": ({"config": str(FAITHFUL)}),
            "modern blocks, AdamW": ({"config": str(FAST), "train": {"optimizer": "adamw"}}),
            "fast (modern + Muon)": ({"config": str(FAST)})}
    results = {name: run({"data": str(data), "out": str(tmp / f"budget{i}"), "budget_s": args.budget_s, **spec})
               for i, (name, spec) in enumerate(runs.items())}
    print(f"equal budget: {args.budget_s:.0f} s of training each\n{HEADER}")
    ref = results["faithful, AdamW"]
    for name, r in results.items():
        print(row(name, r, ref))


def part_ablation(tmp: Path, data: Path, args: argparse.Namespace) -> None:
    steps = args.ablation_steps
    print(f"ablation: the fast recipe less one option, {steps} steps each, seeds {' '.join(map(str, args.seeds))}")
    print("| run | val loss (mean) | spread (max - min) | Δ vs fast recipe | ms/step |\n|---|---:|---:|---:|---:|")
    base = None
    for name, (model, train) in ABLATIONS.items():
        vals, ms = [], []
        for seed in args.seeds:
            r = run({"data": str(data), "out": str(tmp / "ablation"), "config": str(FAST), "model": model,
                     "train": {**train, "seed": seed, "max_steps": steps, "lr_decay_steps": steps, "eval_every": 0,
                               "warmup_steps": steps // 10}})
            vals.append(r["val"])
            ms.append(r["ms_per_iter"])
        mean = statistics.mean(vals)
        base = mean if base is None else base
        print(f"| {name} | {mean:.4f} | {max(vals) - min(vals):.4f} | {mean - base:+.4f} | {statistics.mean(ms):.1f} |",
              flush=True)


def part_moe(tmp: Path, data_file: str, args: argparse.Namespace) -> None:
    """The demo's data (Shakespeare's plays, 4,096-token BPE) and model; dense vs MoE at equal active
    parameters (4 experts, top-1: each token runs one MLP as wide as the dense one) and equal wall time."""
    from gptlab.data import prepare as prepare_tokens
    from gptlab.demo import shakespeare_files

    demo_model = {"n_layer": 4, "n_embd": 192, "n_head": 4, "block_size": 128, "dropout": 0.0}  # the demo's shape
    data = tmp / "demo-data"
    prepare_tokens(shakespeare_files(), "bpe", data, vocab_size=4096, seed=1337)
    demo_train = {"batch_size": 16, "lr": 2e-3, "min_lr": 2e-4, "warmup_steps": 50, "beta2": 0.99,
                  "eval_batches": 8, "seed": 1337}
    modern = {"pos_embedding": "rotary", "norm": "rmsnorm", "qk_norm": True, "activation": "relu2",
              "tie_embeddings": False, "bias": False, "logit_softcap": 15.0, "zero_init_proj": True,
              "scale_residual_init": False}
    muon = {"optimizer": "muon", "muon_lr": 0.03, "lr": 3e-3, "min_lr": 3e-4}
    moe = {"ffn": "moe", "n_experts": 4, "top_k": 1}
    runs = {"dense, faithful, AdamW (the demo before #15)": ({}, {}),
            "dense, modern + Muon": (modern, muon),
            "MoE 4 experts top-1, faithful, AdamW": (moe, {}),
            "MoE 4 experts top-1, modern + Muon": ({**modern, **moe}, muon)}
    if args.moe_steps:  # equal steps (equal active FLOPs); the step costs timed here, minutes apart at most
        runs = {k: v for k, v in runs.items() if "modern" in k}
        print(f"demo data, {args.moe_steps} steps each; ms/step timed 3 times each (median), one after the other:")
        for name, (model, train) in runs.items():
            spec = {"data": str(data), "model": {**demo_model, **model}, "train": {**demo_train, **train}}
            print(f"  {name}: {statistics.median(step_ms(spec) for _ in range(3)):.0f} ms/step", flush=True)
    else:
        print(f"demo data, equal budget: {args.budget_s:.0f} s of training each")
    print("| run | params (active) | steps | val loss | wall s | ms/step | tokens/s | peak RSS MB |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|")
    for i, (name, (model, train)) in enumerate(runs.items()):
        size = ({"train": {**demo_train, **train, "max_steps": args.moe_steps, "lr_decay_steps": args.moe_steps,
                           "warmup_steps": args.moe_steps // 10, "eval_every": 0}} if args.moe_steps
                else {"budget_s": args.budget_s, "train": {**demo_train, **train}})
        r = run({"data": str(data), "out": str(tmp / f"moe{i}"), "model": {**demo_model, **model}, **size})
        print(f"| {name} | {r['params'] / 1e6:.2f}M ({r['active'] / 1e6:.2f}M) | {r['steps']} | {r['val']:.4f} | "
              f"{r['wall']:.1f} | {r['ms_per_iter']:.1f} | {r['tokens_per_s']:,.0f} | {r['maxrss_mb']:.0f} |",
              flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["recipe", "budget", "ablation", "moe", "all"], default="all")
    ap.add_argument("--data-file", default=str(ROOT / ".." / "shared" / "data" / "tinyshakespeare.txt"))
    ap.add_argument("--budget-s", type=float, default=60.0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338])
    ap.add_argument("--ablation-steps", type=int, default=300)
    ap.add_argument("--moe-steps", type=int, default=0, help="moe part: equal steps instead of equal time")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(json.loads(args.child))
        return 0
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {' '.join(sys.argv)}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-fast-"))
    try:
        parts = ["recipe", "budget", "ablation", "moe"] if args.part == "all" else [args.part]
        data = prepare(tmp, str(Path(args.data_file).resolve())) if set(parts) - {"moe"} else tmp
        for part in parts:
            print(f"\n## {part}", flush=True)
            if part == "moe":
                part_moe(tmp, args.data_file, args)
            else:
                {"recipe": part_recipe, "budget": part_budget, "ablation": part_ablation}[part](tmp, data, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
