"""GPT-2-small on CPU, same weights in gptlab and Hugging Face transformers, one process.

Measures (1) training-step tokens/s (forward + backward + AdamW) and (2) greedy
KV-cache generation tokens/s at batch 1 with 128 new tokens, for gptlab in
fp32 and with the int8 decode path, and prints the ratios. With ``--run`` and
``--data`` (a trained run and its prepared data) it also measures what int8
costs in quality: validation perplexity and greedy-token agreement vs fp32.

    python benchmarks/bench_model.py [--batch 4 --seq 256 --new-tokens 128 --rounds 5 --run RUN --data DATA]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Callable

import torch

from gptlab import GPT
from gptlab.hf import import_hf
from gptlab.engine import Engine, SamplingParams


def interleaved(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median wall time of each function over ``rounds`` rounds that alternate between them
    (after one warm-up call each), so drift in machine load hits every side alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def same_weights(seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(GPT2Config()).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours, _ = import_hf(d)
    return hf, ours


def train_step_fn(model, batch, targets, is_hf: bool):
    # The same optimizer on both sides (the fused AdamW gptlab trains with), so the ratio is the models'.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    model.train()

    def step():
        if is_hf:
            loss = model(input_ids=batch, labels=batch).loss
        else:
            loss = model(batch[:, :-1], targets[:, 1:])[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def bench_training(hf, ours, batch: int, seq: int, rounds: int) -> dict:
    x = torch.randint(0, 50257, (batch, seq + 1))
    # Both compute the loss over the same seq tokens predicting the next one.
    t = interleaved({"hf": train_step_fn(hf, x[:, :seq], None, True),
                     "ours": train_step_fn(ours, x[:, : seq + 1], x[:, : seq + 1], False)}, rounds)
    tokens = batch * seq
    return {"train_tok_s_hf": tokens / t["hf"], "train_tok_s_gptlab": tokens / t["ours"],
            "train_ratio": t["hf"] / t["ours"]}


def greedy_agreement(hf_ids: list[int], ours, prompt: list[int]) -> tuple[int, float]:
    """Tokens before the first disagreement with transformers' greedy output, and at that point how far
    (in logits, under our model) transformers' token is from our argmax: ~1e-6 means a near-tie that
    float rounding decides, not a different model."""
    seq = torch.tensor([prompt + hf_ids])
    with torch.inference_mode():
        logits = ours(seq)[0, len(prompt) - 1:-1]
    ours_ids = logits.argmax(-1).tolist()
    k = next((i for i, (a, b) in enumerate(zip(hf_ids, ours_ids)) if a != b), len(hf_ids))
    gap = 0.0 if k == len(hf_ids) else float(logits[k, ours_ids[k]] - logits[k, hf_ids[k]])
    return k, gap


def bench_generation(hf, ours, new_tokens: int, rounds: int) -> dict:
    hf.eval(), ours.eval()
    prompt = torch.randint(0, 50257, (1, 16))
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, stop_at_eos=False)
    fp32, int8 = Engine(ours), Engine(ours, precision="int8")

    def run_hf():
        with torch.inference_mode():
            return hf.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(prompt))

    ids = prompt[0].tolist()
    hf_ids = run_hf()[0, 16:].tolist()
    same = hf_ids == fp32.generate_ids([ids], params)[0].token_ids
    agree, gap = greedy_agreement(hf_ids, ours, ids)
    t = interleaved({"hf": run_hf, "fp32": lambda: fp32.generate_ids([ids], params),
                     "int8": lambda: int8.generate_ids([ids], params)}, rounds)
    return {"gen_tok_s_hf": new_tokens / t["hf"], "gen_tok_s_gptlab_fp32": new_tokens / t["fp32"],
            "gen_tok_s_gptlab_int8": new_tokens / t["int8"], "gen_ratio_fp32": t["hf"] / t["fp32"],
            "gen_ratio_int8": t["hf"] / t["int8"], "greedy_identical_to_hf": same,
            "greedy_agree_tokens": agree, "greedy_gap_at_divergence": gap}


def int8_quality(run: str, data: str, prompts: int = 20, new_tokens: int = 64) -> dict:
    """Perplexity on the validation split and greedy agreement of the int8 path vs fp32 on a trained run."""
    from gptlab.runs import load_run
    from gptlab.data import TokenData, eval_batches

    model, tokenizer, _ = load_run(run)
    fp32, int8 = Engine(model, tokenizer), Engine(model, tokenizer, precision="int8")
    val = TokenData(data).split("val")
    T = min(256, model.config.block_size)
    nll = {"fp32": 0.0, "int8": 0.0}
    n = 0
    with torch.inference_mode():
        for x, y in eval_batches(val, 8, T, max_batches=20):
            for name, eng in (("fp32", fp32), ("int8", int8)):
                logits = eng.model(x)
                nll[name] += torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
            n += y.numel()
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, stop_at_eos=False)
    starts = [int(i) for i in torch.linspace(0, len(val) - 40, prompts)]
    agree = total = 0
    for s in starts:
        p = [int(t) for t in val[s : s + 32]]
        a = fp32.generate_ids([p], params)[0].token_ids
        b = int8.generate_ids([p], params)[0].token_ids
        prefix = next((i for i, (u, v) in enumerate(zip(a, b)) if u != v), len(a))
        agree += prefix
        total += len(a)
    ppl = {k: float(torch.tensor(v / n).exp()) for k, v in nll.items()}
    return {"ppl_fp32": ppl["fp32"], "ppl_int8": ppl["int8"], "ppl_ratio": ppl["int8"] / ppl["fp32"],
            "greedy_identical_prefix": agree / total}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (median)")
    ap.add_argument("--run", help="a trained run directory for the int8 quality check")
    ap.add_argument("--data", help="its prepared data directory")
    args = ap.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    hf, ours = same_weights(0)
    print(f"GPT-2 small: {GPT.num_params(ours):,} parameters, {torch.get_num_threads()} threads")
    res = bench_training(hf, ours, args.batch, args.seq, args.rounds)
    print(f"train step  B={args.batch} T={args.seq}: transformers {res['train_tok_s_hf']:.0f} tok/s, "
          f"gptlab {res['train_tok_s_gptlab']:.0f} tok/s, ratio {res['train_ratio']:.2f}x")
    hf, ours = same_weights(0)  # fresh: the training steps changed each model's weights differently
    gen = bench_generation(hf, ours, args.new_tokens, args.rounds)
    res.update(gen)
    print(f"generation  B=1 +{args.new_tokens}: transformers {gen['gen_tok_s_hf']:.1f} tok/s, "
          f"gptlab fp32 {gen['gen_tok_s_gptlab_fp32']:.1f} tok/s ({gen['gen_ratio_fp32']:.2f}x), "
          f"gptlab int8 {gen['gen_tok_s_gptlab_int8']:.1f} tok/s ({gen['gen_ratio_int8']:.2f}x); "
          f"greedy fp32 identical to transformers: {gen['greedy_identical_to_hf']}")
    if not gen["greedy_identical_to_hf"]:
        print(f"  (random weights: the first {gen['greedy_agree_tokens']} tokens agree; there transformers' "
              f"token is {gen['greedy_gap_at_divergence']:.2e} logits below our argmax, a near-tie)")
    if args.run and args.data:
        q = int8_quality(args.run, args.data)
        res.update(q)
        print(f"int8 quality on {args.run}: ppl fp32 {q['ppl_fp32']:.3f}, int8 {q['ppl_int8']:.3f} "
              f"(x{q['ppl_ratio']:.4f}); greedy tokens identical before first divergence: "
              f"{q['greedy_identical_prefix']:.1%}")
    return res


if __name__ == "__main__":
    main()
