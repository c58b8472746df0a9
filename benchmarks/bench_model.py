"""GPT-2-small on CPU, same weights in gptlab and Hugging Face transformers, one process.

Measures (1) training-step tokens/s (forward + backward + AdamW) and (2) greedy
KV-cache generation tokens/s at batch 1 with 128 new tokens, for gptlab in
fp32 and with the int8 decode path, and prints the ratios. With ``--run`` and
``--data`` (a trained run and its prepared data) it also measures what int8
costs in quality: validation perplexity and greedy-token agreement vs fp32.

    python benchmarks/bench_model.py [--steps 3 --batch 4 --seq 256 --new-tokens 128]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from gptlab import GPT
from gptlab.checkpoint import import_hf
from gptlab.engine import Engine, SamplingParams


def timed(fn, repeats: int) -> float:
    """Best wall time of ``repeats`` calls after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def same_weights(seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(GPT2Config()).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours, _ = import_hf(d)
    return hf, ours


def train_step_fn(model, batch, targets, is_hf: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
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


def bench_training(hf, ours, batch: int, seq: int, repeats: int) -> dict:
    x = torch.randint(0, 50257, (batch, seq + 1))
    # Both compute the loss over the same seq tokens predicting the next one.
    t_hf = timed(train_step_fn(hf, x[:, :seq], None, True), repeats)
    t_us = timed(train_step_fn(ours, x[:, : seq + 1], x[:, : seq + 1], False), repeats)
    tokens = batch * seq
    return {"train_tok_s_hf": tokens / t_hf, "train_tok_s_gptlab": tokens / t_us, "train_ratio": t_hf / t_us}


def bench_generation(hf, ours, new_tokens: int, repeats: int) -> dict:
    hf.eval(), ours.eval()
    prompt = torch.randint(0, 50257, (1, 16))
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, stop_at_eos=False)
    fp32, int8 = Engine(ours), Engine(ours, precision="int8")

    def run_hf():
        with torch.inference_mode():
            return hf.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(prompt))

    ids = prompt[0].tolist()
    same = run_hf()[0, 16:].tolist() == fp32.generate_ids([ids], params)[0].token_ids
    t_hf = timed(run_hf, repeats)
    t_fp32 = timed(lambda: fp32.generate_ids([ids], params), repeats)
    t_int8 = timed(lambda: int8.generate_ids([ids], params), repeats)
    return {"gen_tok_s_hf": new_tokens / t_hf, "gen_tok_s_gptlab_fp32": new_tokens / t_fp32,
            "gen_tok_s_gptlab_int8": new_tokens / t_int8, "gen_ratio_fp32": t_hf / t_fp32,
            "gen_ratio_int8": t_hf / t_int8, "greedy_identical_to_hf": same}


def int8_quality(run: str, data: str, prompts: int = 20, new_tokens: int = 64) -> dict:
    """Perplexity on the validation split and greedy agreement of the int8 path vs fp32 on a trained run."""
    from gptlab.checkpoint import load_run
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
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--run", help="a trained run directory for the int8 quality check")
    ap.add_argument("--data", help="its prepared data directory")
    args = ap.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    hf, ours = same_weights(0)
    print(f"GPT-2 small: {GPT.num_params(ours):,} parameters, {torch.get_num_threads()} threads")
    res = bench_training(hf, ours, args.batch, args.seq, args.repeats)
    print(f"train step  B={args.batch} T={args.seq}: transformers {res['train_tok_s_hf']:.0f} tok/s, "
          f"gptlab {res['train_tok_s_gptlab']:.0f} tok/s, ratio {res['train_ratio']:.2f}x")
    gen = bench_generation(hf, ours, args.new_tokens, args.repeats)
    res.update(gen)
    print(f"generation  B=1 +{args.new_tokens}: transformers {gen['gen_tok_s_hf']:.1f} tok/s, "
          f"gptlab fp32 {gen['gen_tok_s_gptlab_fp32']:.1f} tok/s ({gen['gen_ratio_fp32']:.2f}x), "
          f"gptlab int8 {gen['gen_tok_s_gptlab_int8']:.1f} tok/s ({gen['gen_ratio_int8']:.2f}x); "
          f"greedy fp32 identical to transformers: {gen['greedy_identical_to_hf']}")
    if args.run and args.data:
        q = int8_quality(args.run, args.data)
        res.update(q)
        print(f"int8 quality on {args.run}: ppl fp32 {q['ppl_fp32']:.3f}, int8 {q['ppl_int8']:.3f} "
              f"(x{q['ppl_ratio']:.4f}); greedy tokens identical before first divergence: "
              f"{q['greedy_identical_prefix']:.1%}")
    return res


if __name__ == "__main__":
    main()
