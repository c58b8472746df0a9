"""PPO seconds per iteration, gptlab vs TRL 1.12.0, same tiny models and prompts; RM loss/accuracy agreement.

    .venv/bin/pip install trl==1.12.0      # the last TRL with PPO (trl.experimental.ppo); see trl_side.py
    .venv/bin/python benchmarks/bench_ppo_trl.py [--quick] [--iterations 3 --rounds 5 --threads 2 --out FILE]

Both sides get the same random-initialised GPT-2-style policy (ours, exported with ``export_hf`` to a
GPT2LMHeadModel) and reward model (our ``ScalarModel`` with head bias 0, exported to a
GPT2ForSequenceClassification whose ``score.weight`` is our head weight); on both sides the value
function starts from the RM (all of it trained) and the reference is a frozen copy of the policy.
Vocabulary: a byte-level BPE trained in-process (pad != eos, chat tokens present); the same 64 rendered
chat prompts (18-22 tokens). One iteration = rollout of ``batch`` prompts (KV-cache sampling at T=1, up
to ``response_length`` tokens) + ``ppo_epochs`` x ``minibatches`` AdamW steps; fixed kl_coef, lr 3e-6.
Ours runs the real ``PPOStage`` on the shared ``Trainer`` and is timed by the trainer's own per-step
``time_s`` (which leaves out evaluation and checkpoints; both are off until the final step); TRL is
timed per update by a callback (trl_side.py). Model construction is not timed, the first iteration of
every run is warm-up, runs alternate (ours, TRL, TRL, ours, ...) in one process; we report medians.

Differences in per-iteration work, stated plainly:
  * TRL reuses the generation scores as old log-probs; gptlab recomputes them with one extra no-grad
    policy forward over the rollout (4 rollout forwards to TRL's 3).
  * TRL runs gc.collect() twice per update; "TRL excl. gc" subtracts that time (gptlab never collects).
  * gptlab clips the gradient norm (1.0) every step; TRL's PPO loop calls optimizer.step() unclipped.
  * Stop tokens: gptlab stops a row at <|end|> or EOS, TRL at <|end|> only (its one stop_token_id).
    With a random policy over 512+ tokens few rows stop, and both sides update on the full response
    width unless every row stopped. Both generate with a KV cache and step with fused AdamW.

Measured (AMD EPYC, 2 cores, 2 threads, quiet machine; defaults): tiny 0.148 vs 0.675 s/it (4.6x; TRL
without gc 0.225 s, 1.5x), small 0.436 vs 0.994 s/it (2.3x; without gc 0.554 s, 1.3x). The profile lines
show why the gc-free ratio shrinks with size: generation is 1.4-1.9x faster here, but the PPO update
(about half of our iteration at "small") is the same tensor math on both sides and compute-bound.
RM loss agrees to < 1e-7 with identical accuracy, for a random and a trained RM.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import trl_side  # noqa: E402  (first: it sets the offline environment before transformers loads)
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel  # noqa: E402

from gptlab.chat import render_pair, render_prompt  # noqa: E402
from gptlab.config import GPTConfig  # noqa: E402
from gptlab.engine import Engine  # noqa: E402
from gptlab.heads import ActorCritic, PolicyModel, ScalarModel  # noqa: E402
from gptlab.hf import export_hf  # noqa: E402
from gptlab.model import GPT  # noqa: E402
from gptlab.rl import ranking_loss  # noqa: E402
from gptlab.stages.ppo import PPOConfig, PPOStage, ppo_train_config  # noqa: E402
from gptlab.stages.common import pad_right  # noqa: E402
from gptlab.tokenizer import END_OF_TURN, train_bpe  # noqa: E402
from gptlab.train.loop import Trainer  # noqa: E402
from gptlab.train.optim import make_optimizer  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
warnings.filterwarnings("ignore", category=FutureWarning)
SETTINGS = {"tiny": dict(n_layer=2, n_head=4, n_embd=64, vocab=512),
            "small": dict(n_layer=4, n_head=4, n_embd=128, vocab=1024)}
PPO = dict(batch=16, minibatches=2, ppo_epochs=2, response_length=32, temperature=1.0, kl_coef=0.02, lr=3e-6)


def build(setting: dict, seed: int = 0) -> dict:
    """Tokenizer, prompts, RM pairs (chosen uses the first half of the words), our initial state dicts."""
    rng = random.Random(seed)
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 7))) for _ in range(3000)]
    tok = train_bpe(iter([" ".join(rng.choices(words, k=rng.randint(5, 15))) for _ in range(5000)]), setting["vocab"])
    end = tok.special_tokens[END_OF_TURN]
    assert tok.pad_id is not None and tok.pad_id not in (tok.eos_id, end)
    prompts = []
    while len(prompts) < 64:  # similar lengths: TRL left-pads each batch to its longest prompt
        ids = render_prompt(" ".join(rng.choices(words, k=6)), tok)
        prompts += [ids] if 18 <= len(ids) <= 22 else []

    def pair_of(p: str) -> tuple[list[int], list[int]]:
        return tuple(render_pair(p, " ".join(rng.choices(half, k=rng.randint(3, 9))), tok)[0]
                     for half in (words[:1500], words[1500:]))

    pairs = [pair_of(" ".join(rng.choices(words, k=6))) for _ in range(64)]
    cfg = GPTConfig(n_layer=setting["n_layer"], n_head=setting["n_head"], n_embd=setting["n_embd"],
                    block_size=128, vocab_size=tok.vocab_size, dropout=0.0)
    torch.manual_seed(seed)
    gpt = GPT(cfg)
    torch.manual_seed(seed + 1)
    rm = ScalarModel(GPT(cfg))
    torch.nn.init.zeros_(rm.head.bias)  # TRL's score layer has no bias
    return {"tok": tok, "end": end, "prompts": prompts, "pairs": pairs, "cfg": cfg,
            "policy_sd": copy.deepcopy(gpt.state_dict()), "rm_sd": copy.deepcopy(rm.state_dict())}


def loaded(module: torch.nn.Module, state: dict) -> torch.nn.Module:
    module.load_state_dict(state)
    return module


def export_pair(b: dict, rm_sd: dict, out: Path) -> tuple[str, str]:
    """Policy -> GPT2LMHeadModel dir; RM -> GPT2ForSequenceClassification(num_labels=1) dir, same weights."""
    export_hf(loaded(GPT(b["cfg"]), b["policy_sd"]), out / "policy")
    rm = loaded(ScalarModel(GPT(b["cfg"])), rm_sd)
    export_hf(rm.gpt, out / "rm_backbone")
    hf = GPT2ForSequenceClassification.from_pretrained(out / "rm_backbone", num_labels=1)
    with torch.no_grad():
        hf.score.weight.copy_(rm.head.weight)
    hf.save_pretrained(out / "rm")
    return str(out / "policy"), str(out / "rm")


@torch.no_grad()
def parity(b: dict, policy_dir: str, rm_dir: str) -> dict:
    """Max |gptlab - transformers| of policy logits and RM score on one sequence (checks the export)."""
    gpt, rm = loaded(GPT(b["cfg"]), b["policy_sd"]).eval(), loaded(ScalarModel(GPT(b["cfg"])), b["rm_sd"]).eval()
    hp, hr = GPT2LMHeadModel.from_pretrained(policy_dir), GPT2ForSequenceClassification.from_pretrained(rm_dir)
    x = torch.tensor([b["pairs"][0][0]])
    return {"policy_logits": float((gpt(x) - hp.eval()(x).logits).abs().max()),
            "rm_score": float((rm.score(x, torch.tensor([x.shape[1]])) - hr.eval()(x).logits[:, 0]).abs().max())}


def our_stage(b: dict, seed: int) -> tuple[ActorCritic, PPOStage, PPOConfig]:
    """The models and stage exactly as run_ppo builds them (the value function starts from the RM)."""
    gpt = loaded(GPT(b["cfg"]), b["policy_sd"])
    reward = loaded(ScalarModel(GPT(b["cfg"])), b["rm_sd"]).eval().requires_grad_(False)
    reference = PolicyModel(copy.deepcopy(gpt)).eval().requires_grad_(False)
    value = ScalarModel(copy.deepcopy(reward.gpt).requires_grad_(True))
    value.head.load_state_dict(reward.head.state_dict())
    model = ActorCritic(PolicyModel(gpt), value)
    cfg = PPOConfig(rollout_batch=PPO["batch"], minibatches=PPO["minibatches"], ppo_epochs=PPO["ppo_epochs"],
                    max_new_tokens=PPO["response_length"], temperature=PPO["temperature"], kl_coef=PPO["kl_coef"],
                    missing_eos_penalty=0.0)
    return model, PPOStage(model, reference, reward, b["tok"], b["prompts"], [], cfg, seed=seed), cfg


def ours_seconds(b: dict, iterations: int, seed: int, work: str) -> list[float]:
    """Seconds of each PPO iteration on the gptlab Trainer (differences of metrics.jsonl time_s)."""
    model, stage, cfg = our_stage(b, seed)
    tcfg = ppo_train_config(cfg, iterations, {"lr": PPO["lr"], "min_lr": PPO["lr"], "eval_every": 0,
                                              "checkpoint_every": 0, "device": "cpu", "seed": seed})
    Trainer(model, stage, tcfg, work, progress=False).fit()
    t = [0.0] + [json.loads(line)["time_s"] for line in open(os.path.join(work, "metrics.jsonl"))]
    u = cfg.updates_per_iteration
    return [t[(i + 1) * u] - t[i * u] for i in range(iterations)]


def trl_seconds(b: dict, dirs: tuple[str, str], iterations: int, seed: int, work: str) -> dict:
    return trl_side.trl_ppo_seconds_per_iteration(
        *dirs, b["prompts"], response_length=PPO["response_length"], batch_size=PPO["batch"],
        mini_batches=PPO["minibatches"], ppo_epochs=PPO["ppo_epochs"], temperature=PPO["temperature"],
        kl_coef=PPO["kl_coef"], iterations=iterations, pad_id=b["tok"].pad_id, eos_id=b["end"], seed=seed,
        work_dir=work, learning_rate=PPO["lr"])


@contextlib.contextmanager
def timing(owner, name: str, log: list):
    """Temporarily wrap the function ``owner.name`` so each call's seconds go to ``log``."""
    real = getattr(owner, name)

    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return real(*a, **k)
        finally:
            log.append(time.perf_counter() - t0)

    setattr(owner, name, wrapper)
    try:
        yield
    finally:
        setattr(owner, name, real)


def profile_ours(b: dict, iterations: int) -> dict:
    """Median seconds per iteration of each part of our iteration, timed by hand (no Trainer around it)."""
    model, stage, cfg = our_stage(b, 0)
    opt = make_optimizer(model, ppo_train_config(cfg, 1, {"lr": PPO["lr"], "min_lr": PPO["lr"]}), torch.device("cpu"))
    gen, parts = [], {}
    with timing(Engine, "generate_ids", gen):
        for it in range(iterations + 1):
            t = [time.perf_counter()]
            stage._rollout(it)
            t.append(time.perf_counter())
            for u in range(cfg.updates_per_iteration):
                loss, _ = stage.loss(model, {"step": torch.tensor(it * cfg.updates_per_iteration + u + 1)})
                t.append(time.perf_counter())
                loss.backward()
                t.append(time.perf_counter())
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                t.append(time.perf_counter())
            d = [y - x for x, y in zip(t, t[1:])]
            for k, v in {"generate": gen[-1], "rollout_forwards": d[0] - gen[-1], "update_forward+loss": sum(d[1::3]),
                         "update_backward": sum(d[2::3]), "clip+adamw": sum(d[3::3])}.items():
                parts.setdefault(k, []).append(v)
    return {k: statistics.median(v[1:]) for k, v in parts.items()}  # the first iteration is warm-up


def profile_trl(b: dict, dirs: tuple[str, str], iterations: int, work: str) -> dict:
    """TRL's update split into generation (its batch_generation), gc.collect and the rest."""
    import trl.experimental.ppo.ppo_trainer as pt

    gen: list[float] = []
    with timing(pt, "batch_generation", gen):
        t = trl_seconds(b, dirs, iterations + 1, 0, work)
    rest = [a - g - c for a, g, c in zip(t["all_iteration_seconds"], gen, t["all_gc_seconds"])]
    return {"generate": statistics.median(gen[1:]), "gc": statistics.median(t["all_gc_seconds"][1:]),
            "rest": statistics.median(rest[1:])}


def rm_loss_acc(b: dict, rm: ScalarModel) -> tuple[torch.Tensor, float]:
    """gptlab.rl.ranking_loss over all pairs as K=2 groups (chosen first) and the pairwise accuracy."""
    idx, lengths = pad_right([s for pair in b["pairs"] for s in pair], b["tok"].pad_id)
    valid = torch.ones(len(b["pairs"]), 2, dtype=torch.bool)
    loss, correct, total = ranking_loss(rm.score(idx, lengths).view(-1, 2), valid)
    return loss, float(correct / total)


def trained_rm(b: dict, steps: int = 30) -> dict:
    """A slightly trained RM: full-batch Adam on ranking_loss (the head bias stays 0)."""
    rm = loaded(ScalarModel(GPT(b["cfg"])), b["rm_sd"])
    rm.head.bias.requires_grad_(False)
    opt = torch.optim.Adam([p for p in rm.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        rm_loss_acc(b, rm)[0].backward()
        opt.step()
    return copy.deepcopy(rm.state_dict())


def bench_setting(name: str, args, tmp: Path) -> dict:
    b = build(SETTINGS[name])
    dirs = export_pair(b, b["rm_sd"], tmp / name)
    res: dict = {"setting": {**SETTINGS[name], "vocab_size": b["cfg"].vocab_size, "params": GPT(b["cfg"]).num_params()},
                 "ppo": PPO, "export_max_abs_diff": parity(b, *dirs)}
    print(f"\n[{name}] {res['setting']}, export parity (max abs diff) {res['export_max_abs_diff']}", flush=True)
    runs: dict[str, list[float]] = {"gptlab": [], "trl": [], "trl_excl_gc": [], "trl_gc": []}
    n = args.iterations + 1  # one warm-up iteration per run, dropped on both sides
    for r in range(args.rounds):
        for side in (("ours", "trl") if r % 2 == 0 else ("trl", "ours")):
            work = tempfile.mkdtemp(dir=tmp)
            if side == "ours":
                runs["gptlab"] += ours_seconds(b, n, r, work)[1:]
            else:
                t = trl_seconds(b, dirs, n, r, work)
                runs["trl"] += t["all_iteration_seconds"][1:]
                runs["trl_gc"] += t["all_gc_seconds"][1:]
                runs["trl_excl_gc"] += [x - g for x, g in zip(t["all_iteration_seconds"], t["all_gc_seconds"])][1:]
        med = {k: statistics.median(v) for k, v in runs.items()}
        print(f"  round {r + 1}/{args.rounds}: gptlab {med['gptlab']:.3f} s/it, TRL {med['trl']:.3f} s/it "
              f"(excl. gc {med['trl_excl_gc']:.3f}) [running medians]", flush=True)
    res.update(seconds_per_iteration=med, ratio_trl_over_gptlab=med["trl"] / med["gptlab"],
               ratio_trl_excl_gc_over_gptlab=med["trl_excl_gc"] / med["gptlab"], all_iteration_seconds=runs,
               profile_gptlab=profile_ours(b, max(2, args.iterations)),
               profile_trl=profile_trl(b, dirs, max(2, args.iterations), tempfile.mkdtemp(dir=tmp)))
    res["rm_agreement"] = {}
    for label, sd in (("random", b["rm_sd"]), ("trained", trained_rm(b))):
        with torch.no_grad():
            loss, acc = rm_loss_acc(b, loaded(ScalarModel(GPT(b["cfg"])), sd).eval())
        ours = {"loss": float(loss), "accuracy": acc, "n": len(b["pairs"])}
        theirs = trl_side.trl_reward_loss_accuracy(export_pair(b, sd, tmp / f"{name}_{label}")[1], b["pairs"],
                                                   pad_id=b["tok"].pad_id, eos_id=b["end"],
                                                   work_dir=str(tmp / f"rm_{label}"))
        res["rm_agreement"][label] = {"gptlab": ours, "trl": theirs,
                                      "abs_loss_diff": abs(ours["loss"] - theirs["loss"]),
                                      "accuracy_equal": ours["accuracy"] == theirs["accuracy"]}
    return res


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny setting only, 2 timed iterations, 1 round")
    ap.add_argument("--iterations", type=int, default=3, help="timed iterations per run (after 1 warm-up)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (gptlab/TRL alternating)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads, both sides")
    ap.add_argument("--settings", default="tiny,small", help=f"comma-separated, of {','.join(SETTINGS)}")
    ap.add_argument("--out", default=str(HERE / "results" / "ppo_trl.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.settings, args.iterations, args.rounds = "tiny", 2, 1
    torch.set_num_threads(args.threads)
    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), cpu)
    hw = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
          "transformers": transformers.__version__, "trl": trl_side.trl.__version__,
          "python": platform.python_version(), "loadavg_at_start": os.getloadavg()[0]}
    print("hardware: " + ", ".join(f"{k} {v}" for k, v in hw.items()))
    out = {"hardware": hw, "args": vars(args), "settings": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.settings.split(","):
            out["settings"][name] = bench_setting(name, args, Path(tmp))
    out["hardware"]["loadavg_at_end"] = os.getloadavg()[0]
    print(f"\n{'setting':8} {'gptlab s/it':>11} {'TRL s/it':>9} {'ratio':>6} {'TRL excl. gc':>12} {'ratio':>6}")
    for name, r in out["settings"].items():
        s = r["seconds_per_iteration"]
        print(f"{name:8} {s['gptlab']:11.3f} {s['trl']:9.3f} {r['ratio_trl_over_gptlab']:5.2f}x "
              f"{s['trl_excl_gc']:12.3f} {r['ratio_trl_excl_gc_over_gptlab']:5.2f}x")
    print("ratio = TRL s/it / gptlab s/it (> 1: gptlab faster); target >= 1.5x against TRL as shipped (with its gc)")
    for name, r in out["settings"].items():
        for label, c in r["rm_agreement"].items():
            print(f"{name:8} RM {label:7}: gptlab loss {c['gptlab']['loss']:.7f} acc {c['gptlab']['accuracy']:.4f} | "
                  f"TRL loss {c['trl']['loss']:.7f} acc {c['trl']['accuracy']:.4f} | |dloss| {c['abs_loss_diff']:.1e}, "
                  f"same accuracy {c['accuracy_equal']}")
        for side in ("gptlab", "trl"):
            parts = ", ".join(f"{k} {v:.3f}" for k, v in r[f"profile_{side}"].items())
            print(f"{name:8} {side} profile (s/it): {parts}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
