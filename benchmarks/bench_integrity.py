"""What each integrity check costs, against coreutils `sha256sum` reading the same bytes.

Why: gptlab checks what it reads before it trusts it (issue #13): a data directory's shards (sha256 and every
id below the vocabulary, once per change of size or mtime), a run's weights and tokenizer files (sha256
against config.json on every load), a checkpoint's files (sha256 against its manifest on resume). This
measures each on files of realistic size, warm in the page cache, next to `sha256sum` on the same files
(the least any sha256 check can cost), and the cached shard check that a second command pays.

    python benchmarks/bench_integrity.py [--data-gb 1.0] [--preset gpt2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from gptlab import GPT, GPTConfig
from gptlab.data import FORMAT, META_FILE, TokenData
from gptlab.atomic import sha256_file
from gptlab.runs import load_run, save_model
from gptlab.tokenizer import load_tokenizer, tokenizer_digest
from gptlab.train.checkpoints import verify_checkpoint, write_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SHARD = 1 << 27  # tokens per shard (256 MB of uint16), as prepare writes at scale


def timed(fn: Callable[[], object], repeat: int = 3) -> float:
    """Best wall time of ``repeat`` calls (the files are warm in the page cache after the first)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def sha256sum(paths: list[Path]) -> float:
    """The peer: coreutils `sha256sum` over the same files (a separate process, as a user would check them)."""
    return timed(lambda: subprocess.run(["sha256sum", *map(str, paths)], check=True, capture_output=True))


def hashlib_only(paths: list[Path]) -> float:
    """The floor of any sha256 check in Python: hashlib (OpenSSL) over the files, nothing else."""
    def run() -> None:
        for p in paths:
            with open(p, "rb") as fh:
                hashlib.file_digest(fh, "sha256")
    return timed(run)


def data_dir(root: Path, gigabytes: float, vocab: int) -> list[Path]:
    """A data directory of random ids below ``vocab`` (the checks do not care what the text was)."""
    rng = np.random.default_rng(0)
    tokens, shards, paths = int(gigabytes * 1e9) // 2, [], []
    for i, start in enumerate(range(0, tokens, SHARD)):
        ids = rng.integers(0, vocab, size=min(SHARD, tokens - start), dtype=np.uint16)
        path = root / f"train-{i:05d}.bin"
        ids.tofile(path)
        shards.append({"file": path.name, "tokens": len(ids), "sha256": hashlib.sha256(ids.data).hexdigest()})
        paths.append(path)
    meta = {"format": FORMAT, "tokenizer_dir": "tokenizer", "vocab_size": vocab, "eos_id": vocab - 1,
            "dtype": "uint16", "splits": {"train": {"tokens": tokens, "bytes": 0, "documents": 1, "shards": shards},
                                          "val": {"tokens": 0, "bytes": 0, "documents": 0, "shards": []}}}
    (root / META_FILE).write_text(json.dumps(meta))
    return paths


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-gb", type=float, default=1.0, help="size of the token shards to verify")
    ap.add_argument("--preset", default="gpt2", help="model whose weights and checkpoint are checked")
    ap.add_argument("--ranks", default=str(ROOT / ".cache/testdata/gpt2.tiktoken"), help="GPT-2 ranks file")
    args = ap.parse_args()
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, python {platform.python_version()}")
    rows: list[tuple[str, list[Path], float]] = []  # (check, files it reads, seconds)
    notes: list[str] = []
    with tempfile.TemporaryDirectory(dir=ROOT / ".cache") as tmp:
        root = Path(tmp)
        data = root / "data"
        data.mkdir()
        shards = data_dir(data, args.data_gb, 50257)

        def verify_fresh() -> None:
            (data / ".verified.json").unlink(missing_ok=True)
            TokenData(data).verify()

        rows.append(("data shards: sha256 + every id < vocab_size (train/eval ppl, first time)", shards,
                     timed(verify_fresh)))
        TokenData(data).verify()
        cached = timed(lambda: TokenData(data).verify())
        notes.append(f"a later command on the same data directory (size + mtime unchanged): {cached * 1e3:.2f} ms")

        torch.manual_seed(0)
        tok = load_tokenizer(args.ranks) if Path(args.ranks).is_file() else None
        model = GPT(GPTConfig.from_preset(args.preset, **({"vocab_size": tok.vocab_size} if tok else {})))
        run = root / "run"
        save_model(run, model, tok)
        weights = run / "model.safetensors"
        rows.append((f"weights: sha256 against config.json (every load; {args.preset})", [weights],
                     timed(lambda: sha256_file(weights))))
        notes.append(f"the whole load_run of {args.preset} that check is part of: {timed(lambda: load_run(run)):.3f} s")
        if tok is not None:
            tok_dir = run / "tokenizer"
            files = sorted(p for p in tok_dir.iterdir() if p.is_file())
            rows.append(("tokenizer files: sha256 against config.json / meta.json (every load)", files,
                         timed(lambda: tokenizer_digest(tok_dir))))
            notes.append(f"loading that tokenizer: {timed(lambda: load_tokenizer(tok_dir)):.3f} s")

        params = dict(model.named_parameters())
        optimizer = {"state": {n: {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(p),
                                   "exp_avg_sq": torch.zeros_like(p)} for n, p in params.items()},
                     "param_groups": [{"params": list(params), "lr": 1e-4}]}
        ckpt = write_checkpoint(root / "ckpt-run", 1, {n: p.detach() for n, p in params.items()}, optimizer,
                                [{}], None, {"step": 1}, keep_last=1)
        rows.append(("checkpoint: every file against manifest.json (resume)",
                     sorted(p for p in ckpt.iterdir() if p.is_file()), timed(lambda: verify_checkpoint(ckpt))))

        print("\n| check | size | gptlab s | GB/s | hashlib sha256 alone s | coreutils sha256sum s | gptlab/sha256sum |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for what, paths, ours in rows:
            size = sum(p.stat().st_size for p in paths)
            peer = sha256sum(paths)
            print(f"| {what} | {size / 1e6:,.1f} MB | {ours:.3f} | {size / 1e9 / ours:.2f} | "
                  f"{hashlib_only(paths):.3f} | {peer:.3f} | {ours / peer:.2f}× |")
        for note in notes:
            print(f"- {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
