"""Chinese tokenizer modes side by side: bits per character on held-out text for char / word / BPE / WordPiece.

The corpus is all of Debian's fortunes-zh (the Tang 300, Song poems and 5,263 modern quotations, 2.2 MB;
the last 10% of each file held out). Each mode's tokenizer is trained on the train split with the same
vocabulary size (4096: below the train split's 5,838 characters, so char, word and WordPiece leave the rarest as
<|unk|>), and each model is the same GPT (equal parameters) trained for the same steps of the same batch, i.e. the same compute; the wall time of each is
printed too, in one process run. Bits per character = the mean loss per held-out token (nats) x held-out
tokens / held-out characters / ln 2, over the whole held-out split; the share of held-out characters a
mode could not spell (<|unk|> / [UNK], each costing one token's loss) is printed beside it.

    python benchmarks/bench_chinese.py [--vocab-size 4096] [--steps 200] [--out DIR] [--modes char word bpe wordpiece]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", default=None, help="keep the runs here (default: a temporary directory)")
    ap.add_argument("--modes", nargs="+", default=["char", "word", "bpe", "wordpiece"])
    args = ap.parse_args()

    import torch

    from gptlab.config import GPTConfig
    from gptlab.data import TokenData, prepare
    from gptlab.evaluate import evaluate_ppl
    from gptlab.runs import load_run
    from gptlab.stages.pretrain import run_pretrain
    from gptlab.train.config import TrainConfig
    from gptlab.zh_poems import FORTUNES, fortunes_dir

    torch.set_num_threads(max(1, torch.get_num_threads()))
    files = [str(fortunes_dir() / name) for name in FORTUNES]
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-chinese-"))
    model = dict(n_layer=4, n_head=4, n_embd=128, block_size=128, dropout=0.0, vocab_size=args.vocab_size)
    train = TrainConfig(max_steps=args.steps, batch_size=16, lr=2e-3, min_lr=2e-4, warmup_steps=20,
                        eval_every=args.steps, eval_batches=4, checkpoint_every=0, keep_last=1, sample_tokens=0,
                        seed=1337, device="cpu")
    rows = []
    try:
        for mode in args.modes:
            t0 = time.perf_counter()
            prepare(files, mode, root / mode / "data", vocab_size=args.vocab_size, progress=False)
            data = TokenData(root / mode / "data")
            prep_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            run_pretrain(root / mode / "data", root / mode / "run", GPTConfig.from_dict(model), train, progress=False)
            train_s = time.perf_counter() - t0
            gpt = load_run(root / mode / "run")[0]
            val = data.meta["splits"]["val"]
            result = evaluate_ppl(gpt, data, "val", batch_size=16)
            bpc = result["loss"] * val["tokens"] / val["characters"] / math.log(2)
            rows.append({"mode": mode, "tokenizer": data.meta["tokenizer"], "vocab": data.vocab_size,
                         "params": sum(p.numel() for p in gpt.parameters()),
                         "val_chars_per_token": val["characters"] / val["tokens"],
                         "unk_share": val["unk_tokens"] / val["characters"], "bits_per_char": bpc,
                         "prepare_s": prep_s, "train_s": train_s})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        if not args.out:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\n{args.steps} steps x 16 x 128 tokens each; fortunes-zh, last 10% of each file held out\n")
    print("| mode | tokenizer | parameters | held-out chars/token | unknown chars | bits/char | train wall s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['tokenizer']} | {r['params'] / 1e6:.2f}M | {r['val_chars_per_token']:.2f} | "
              f"{r['unk_share']:.2%} | {r['bits_per_char']:.3f} | {r['train_s']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
