"""InstructGPT stages end to end on tiny real models: SFT masks/batches/packing and learning, the K-way reward
loss against a hand formula, reward normalisation and head checks, DPO's reference and learning, PPO rollouts
checked sequence by sequence, exact resume from the middle of an iteration, PPO-ptx, divergence, bad input
refused before anything is written, and the four commands through the CLI.

One base model (1 layer, 32 wide) over a character vocabulary with only <|endoftext|>, so SFT has to grow the
chat tokens; the SFT, reward-model and DPO runs are built once per module. No mocks.
"""

from __future__ import annotations

import copy
import json
import math
import random
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gptlab.atomic import atomic_write_jsonl as write_jsonl
from gptlab import chat
from gptlab.align_data import load_rankings
from gptlab.runs import load_run, save_model
from gptlab.cli import main
from gptlab.config import GPTConfig
from gptlab.errors import CheckpointError, ConfigError, DataError
from gptlab.heads import ScalarModel
from gptlab.model import GPT
from gptlab.stages.dpo import DPOStage, encode_pairs, run_dpo
from gptlab.stages.ppo import PPOConfig, encode_prompts, ppo_train_config, rollout, run_ppo
from gptlab.stages.reward import (RewardStage, encode_rankings, load_reward_model, run_rm, sample_responses,
                                  save_reward_model)
from gptlab.heads import PolicyModel
from gptlab.stages.common import pad_right
from gptlab.stages.common import load_chat_model
from gptlab.stages.sft import IGNORE, SFTStage, encode_sft, run_sft, sft_sample
from gptlab.tokenizer import ASSISTANT, END_OF_TURN, EOS, PAD, SYSTEM, USER, CharTokenizer, load_tokenizer
from gptlab.errors import TrainingDiverged
from gptlab.train.checkpoints import checkpoint_dirs, verify_checkpoint
from gptlab.train.config import TrainConfig
from gptlab.train.metrics import read_metrics

ALPHABET = "abcdefghijklmnopqrstuvwxyz ."
MODEL = {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 64}
SFT_ROWS = {"ab": "cab", "ba": "dcd"}  # prompt -> the one response the demonstrations give
TIMING_KEYS = {"time_s", "tokens_per_sec", "mfu", "rollout_s", "rollout_tokens_per_sec"}


def cpu_cfg(**kw) -> TrainConfig:
    base = {"batch_size": 8, "lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 0, "weight_decay": 0.0, "eval_every": 0,
            "checkpoint_every": 0, "sample_every": 0, "device": "cpu"}
    return TrainConfig(**{**base, **kw})


def ranking_rows(n: int, seed: int) -> list[dict]:
    """Responses of 6 letters; the more a's the better (K = 2 and K = 3 mixed, both row forms)."""
    rng = random.Random(seed)
    rows, prompts = [], set()
    while len(rows) < n:
        prompt = "".join(rng.choice("defgh") for _ in range(4))
        if prompt in prompts:
            continue
        prompts.add(prompt)
        k = 2 if len(rows) % 2 else 3
        counts = sorted(rng.sample([0, 2, 4, 6], k), reverse=True)  # best first
        texts = []
        for c in counts:
            letters = ["a"] * c + [rng.choice("bc") for _ in range(6 - c)]
            rng.shuffle(letters)
            texts.append("".join(letters))
        if k == 2 and len(rows) % 4 == 1:
            rows.append({"prompt": prompt, "chosen": texts[0], "rejected": texts[1]})
        else:
            order = list(range(k))
            rng.shuffle(order)  # responses listed in a random order, ranking gives best -> worst
            rows.append({"prompt": prompt, "responses": [texts[i] for i in order],
                         "ranking": sorted(range(k), key=lambda j: order[j])})
    return rows


def stable_records(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(run / "metrics.jsonl")]


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run several times faster on one thread (and are immune to a busy second core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("align")


@pytest.fixture(scope="module")
def base_run(work) -> Path:
    """A fresh tiny model whose tokenizer has <|endoftext|> only: no chat tokens, no <|pad|>."""
    tok = CharTokenizer.from_text(ALPHABET, special_tokens=[EOS])
    torch.manual_seed(0)
    return save_model(work / "base", GPT(GPTConfig(vocab_size=tok.vocab_size, **MODEL)), tok)


@pytest.fixture(scope="module")
def chat_tok(base_run) -> CharTokenizer:
    tok = load_tokenizer(base_run / "tokenizer")
    chat.add_chat_tokens(tok)
    tok.add_special_tokens([PAD])
    return tok


@pytest.fixture(scope="module")
def sft_files(work) -> tuple[Path, Path]:
    rows = [{"prompt": p, "response": r} for p, r in SFT_ROWS.items()] * 25
    val = [{"prompt": p, "response": r} for p, r in SFT_ROWS.items()]
    return write_jsonl(work / "sft.jsonl", rows), write_jsonl(work / "sft_val.jsonl", val)


@pytest.fixture(scope="module")
def sft_run(work, base_run, sft_files) -> Path:
    train, val = sft_files
    run_sft(str(base_run), train, work / "sft", cpu_cfg(max_steps=60, eval_every=20), val_file=val, progress=False)
    return work / "sft"


@pytest.fixture(scope="module")
def rank_files(work) -> tuple[Path, Path]:
    return (write_jsonl(work / "rankings.jsonl", ranking_rows(64, seed=1)),
            write_jsonl(work / "rankings_val.jsonl", ranking_rows(16, seed=2)))


RM_CFG = {"max_steps": 50, "lr": 3e-3, "min_lr": 3e-4, "eval_every": 10, "seed": 5}
RM_NORM_TOKENS = 8


@pytest.fixture(scope="module")
def rm_run(work, sft_run, rank_files) -> Path:
    train, val = rank_files
    run_rm(str(sft_run), train, work / "rm", cpu_cfg(**RM_CFG), {"norm_tokens": RM_NORM_TOKENS}, val_file=val,
           progress=False)
    return work / "rm"


@pytest.fixture(scope="module")
def prompts_file(work) -> Path:
    rng = random.Random(3)
    prompts = ["ab", "ba"] + ["".join(rng.choice("abcd") for _ in range(rng.randint(2, 5))) for _ in range(18)]
    return write_jsonl(work / "prompts.jsonl", [{"prompt": p} for p in dict.fromkeys(prompts)])


# ======================================================================== SFT
def test_encode_sft_masks_only_assistant_tokens_and_their_end(work, chat_tok):
    path = write_jsonl(work / "turns.jsonl", [
        {"messages": [{"role": "system", "content": "be ."}, {"role": "user", "content": "ab"},
                      {"role": "assistant", "content": "cab"}, {"role": "user", "content": "ba"},
                      {"role": "assistant", "content": "dcd"}]},
        {"prompt": "x", "response": "yz"}])
    (ids, mask, first_user, line), (ids2, mask2, _, line2) = encode_sft(path, chat_tok, 65)
    sp = chat_tok.special_tokens
    S, U, A, E = sp[SYSTEM], sp[USER], sp[ASSISTANT], sp[END_OF_TURN]
    enc = chat_tok.encode
    assert ids == [S, *enc("be ."), E, U, *enc("ab"), E, A, *enc("cab"), E, U, *enc("ba"), E, A, *enc("dcd"), E]
    assert chat_tok.decode([i for i, m in zip(ids, mask) if m]) == "cab<|end|>dcd<|end|>"
    assert chat_tok.decode([i for i, m in zip(ids, mask) if not m]) == \
        "<|system|>be .<|end|><|user|>ab<|end|><|assistant|><|user|>ba<|end|><|assistant|>"
    assert (first_user, line, line2) == ("ab", 1, 2)
    assert chat_tok.decode([i for i, m in zip(ids2, mask2) if m]) == "yz<|end|>"
    # cut to max_len tokens; a row whose reply does not fit at all names its line
    ids3, mask3, _, _ = encode_sft(path, chat_tok, 13)[0]
    assert ids3 == ids[:13] and chat_tok.decode([i for i, m in zip(ids3, mask3) if m]) == "ca"
    long = write_jsonl(work / "long.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "a" * 70, "response": "b"}])
    with pytest.raises(DataError, match=r"long\.jsonl:2: no response token fits in 65 tokens"):
        encode_sft(long, chat_tok, 65)


def sft_stage(path: Path, tok, pack: bool, batch_size: int = 6) -> SFTStage:
    rows = [(ids, mask) for ids, mask, _, _ in encode_sft(path, tok, 65)]
    return SFTStage(rows, [], batch_size=batch_size, seed=3, pad_id=tok.pad_id, pack=pack, max_len=65, tokenizer=tok)


def real_length(x_row: torch.Tensor, pad_id: int) -> int:
    """Tokens before the padding (real tokens are never the pad id)."""
    real = (x_row != pad_id).tolist()
    n = real.index(False) if False in real else len(real)
    assert not any(real[n:]), "padding must only be on the right"
    return n


VARIED_SFT = [{"prompt": "ab", "response": "cab"}, {"prompt": "hello there", "response": "hi"},
              {"prompt": "x", "response": "a long reply ."}, {"prompt": "what", "response": "z"}]


def test_sft_batch_targets_padding_and_purity(work, chat_tok):
    path = write_jsonl(work / "varied.jsonl", VARIED_SFT)
    stage = sft_stage(path, chat_tok, pack=False)
    pad, end, eos = chat_tok.pad_id, chat_tok.special_tokens[END_OF_TURN], chat_tok.eos_id
    assert len({pad, end, eos}) == 3
    replies = {tuple(chat.render_prompt(r["prompt"], chat_tok)): r["response"] for r in VARIED_SFT}
    b = stage.batch(2, 0)
    x, y = b["x"], b["y"]
    assert x.shape == y.shape and x.shape[0] == 6
    padded = 0
    for r in range(6):
        n = real_length(x[r], pad)
        padded += n < x.shape[1]
        seq = x[r, :n].tolist() + [int(y[r, n - 1])]  # the last target is the closing <|end|>
        ids, mask = chat.render([chat.Message("user", chat_tok.decode(seq[1:seq.index(end)])),
                                 chat.Message("assistant", replies[tuple(seq[:seq.index(end) + 2])])], chat_tok)
        assert seq == ids  # one whole example per row
        assert y[r, :n].tolist() == [t if m else IGNORE for t, m in zip(ids[1:], mask[1:])]
        # targets are exactly the reply and its <|end|>; inputs beyond the example are <|pad|>
        targets = [t for t in y[r].tolist() if t != IGNORE]
        assert chat_tok.decode(targets) == replies[tuple(seq[:seq.index(end) + 2])] + "<|end|>"
        assert (y[r, n:] == IGNORE).all() and (x[r, n:] == pad).all()
    assert padded >= 2  # rows of different lengths, so padding was exercised
    assert stage.num_tokens(b) == int((y != IGNORE).sum())
    # a batch is a pure function of (step, micro_step)
    again = stage.batch(2, 0)
    assert torch.equal(again["x"], x) and torch.equal(again["y"], y)
    others = [stage.batch(s, m) for s, m in ((3, 0), (2, 1), (7, 0))]
    assert any(x.shape != o["x"].shape or not torch.equal(o["x"], x) for o in others)


def test_sft_packing_keeps_whole_examples_and_the_same_targets(work, chat_tok):
    rng = random.Random(0)
    rows = [{"prompt": "".join(rng.choice("abc") for _ in range(rng.randint(1, 6))),
             "response": "".join(rng.choice("xyz") for _ in range(rng.randint(1, 8)))} for _ in range(20)]
    path = write_jsonl(work / "packme.jsonl", rows)
    examples = {tuple(ids): mask for ids, mask, _, _ in encode_sft(path, chat_tok, 65)}
    stage = sft_stage(path, chat_tok, pack=True, batch_size=3)
    plain = sft_stage(path, chat_tok, pack=False, batch_size=3)
    user = chat_tok.special_tokens[USER]
    b = stage.batch(5, 0)
    assert torch.equal(stage.batch(5, 0)["y"], b["y"])
    x, y = b["x"], b["y"]
    assert x.shape[0] <= 3 and x.shape[1] <= 64
    packed_examples = 0
    rows = x.shape[0]
    for r in range(rows):
        n = real_length(x[r], chat_tok.pad_id)
        seq = x[r, :n].tolist() + [int(y[r, n - 1])]
        starts = [i for i, t in enumerate(seq) if t == user] + [len(seq)]
        assert starts[0] == 0
        mask: list[bool] = []
        for a, z in zip(starts, starts[1:]):
            assert tuple(seq[a:z]) in examples  # whole examples, never a cut one
            mask += examples[tuple(seq[a:z])]
            packed_examples += 1
        assert y[r, :n].tolist() == [t if m else IGNORE for t, m in zip(seq[1:], mask[1:])]
        assert (y[r, n:] == IGNORE).all()
        if r < rows - 1:  # a row is closed only when the next example (< 20 tokens) does not fit
            assert n + 1 > 65 - 20
    assert packed_examples > 3 * 3  # several examples per row, unlike one per row unpacked
    assert plain.batch(5, 0)["x"].shape[0] == 3


def test_sft_learns_the_responses_and_writes_a_chat_run(sft_run, base_run):
    records = read_metrics(sft_run / "metrics.jsonl")
    assert records[-1]["loss"] < 0.1 * records[0]["loss"]
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(vals) == 3 and vals[-1] < vals[0] and vals[-1] < 0.1
    config = json.loads((sft_run / "config.json").read_text())
    assert config["chat_format"] == chat.CHAT_FORMAT and config["stage"] == "sft"
    gpt, tok, _ = load_run(sft_run)
    base_gpt, base_tok, _ = load_run(base_run)
    assert not chat.has_chat_tokens(base_tok) and base_tok.pad_id is None
    assert chat.has_chat_tokens(tok) and tok.pad_id is not None
    assert gpt.config.vocab_size == tok.vocab_size == base_tok.vocab_size + 5  # four chat tokens + <|pad|>
    assert max(tok.special_tokens.values()) < gpt.config.vocab_size
    for prompt, response in SFT_ROWS.items():  # greedy replies, cut at <|end|>
        assert sft_sample(gpt, tok, prompt) == response
        ids = chat.render_prompt(prompt, tok)
        out = gpt(torch.tensor([ids + tok.encode(response)]))[0, -1].argmax()
        assert int(out) == tok.special_tokens[END_OF_TURN]  # it stops by itself, with <|end|>
    assert records[-1]["sample"].endswith("→ cab")


# ========================================================================= RM
def test_ranking_loss_equals_the_hand_formula(sft_run, rank_files):
    gpt, tok, _ = load_chat_model(sft_run)
    torch.manual_seed(1)
    model = ScalarModel(gpt).eval()
    groups = [g for _, g in encode_rankings(rank_files[0], tok, 64)][:6]
    assert {len(g) for g in groups} == {2, 3}
    stage = RewardStage(groups, [], batch_size=5, seed=0, pad_id=tok.pad_id)
    for step in range(1, 20):
        batch = stage.batch(step, 0)
        if (batch["slot"] < 0).any() and (batch["slot"] >= 0).all(1).any():
            break  # K = 2 (padded) and K = 3 groups in one batch
    else:
        pytest.fail("no batch mixes K=2 and K=3")
    loss, metrics = stage.loss(model, batch)
    group_losses, correct, total = [], 0, 0
    for row in batch["slot"].tolist():
        members = [i for i in row if i >= 0]
        seqs = [batch["idx"][i, : batch["lengths"][i]] for i in members]
        with torch.no_grad():  # each response alone, unpadded
            s = [float(model.score(q[None], torch.tensor([len(q)]))) for q in seqs]
        pairs = [(i, j) for i in range(len(s)) for j in range(i + 1, len(s))]
        assert len(pairs) == math.comb(len(s), 2)
        group_losses.append(-sum(math.log(1 / (1 + math.exp(-(s[i] - s[j])))) for i, j in pairs) / len(pairs))
        correct += sum(s[i] > s[j] for i, j in pairs)
        total += len(pairs)
    assert float(loss.detach()) == pytest.approx(sum(group_losses) / len(group_losses), rel=1e-5, abs=1e-6)
    assert float(metrics["accuracy"]) == pytest.approx(correct / total)
    loss.backward()  # one graph through the shared backbone
    assert model.head.weight.grad is not None and model.gpt.wte.weight.grad.abs().sum() > 0


def test_rm_learns_the_rankings_and_normalises_rewards(rm_run, sft_run, rank_files):
    records = read_metrics(rm_run / "metrics.jsonl")
    accs = [r["val_accuracy"] for r in records if "val_accuracy" in r]
    assert len(accs) == 5 and accs[-1] >= 0.9
    assert records[-1]["val_loss"] < records[0]["loss"]
    model, tok, config = load_reward_model(rm_run)
    assert config["stage"] == "rm" and config["chat_format"] == chat.CHAT_FORMAT
    assert not model.training and model.head.bias.shape == (1,)
    # the SFT model's own responses, sampled again exactly as run_rm did, score mean 0
    gpt, sft_tok, _ = load_chat_model(sft_run)
    prompts = list(dict.fromkeys(r.prompt for r in load_rankings(rank_files[0])))
    seqs = sample_responses(gpt, sft_tok, prompts, max_new_tokens=RM_NORM_TOKENS, seed=RM_CFG["seed"])
    assert config["reward"]["normalized_on"] == len(seqs) == 64
    idx, lengths = pad_right(seqs, tok.pad_id)
    with torch.no_grad():
        scores = model.score(idx, lengths)
    assert abs(float(scores.mean())) < 1e-4
    shift = config["reward"]["bias_shift"]
    assert abs(shift) > 1e-3  # the normalisation did move the bias
    # the better response still scores higher after the shift (val accuracy is about the trained model)
    chosen, rejected = encode_rankings(rank_files[1], tok, 64)[0][1][:2]
    with torch.no_grad():
        a, b = (float(model.score(torch.tensor([s]), torch.tensor([len(s)]))) for s in (chosen, rejected))
    assert a > b


def test_load_reward_model_rejects_other_runs_and_a_modified_head(rm_run, sft_run, tmp_path):
    with pytest.raises(CheckpointError, match="not a reward-model run"):
        load_reward_model(sft_run)
    copy_dir = tmp_path / "rm-copy"
    shutil.copytree(rm_run, copy_dir, ignore=shutil.ignore_patterns("checkpoints"))
    load_reward_model(copy_dir)  # an intact copy loads
    from safetensors.torch import load_file, save_file

    head = load_file(str(copy_dir / "reward_head.safetensors"))
    head["bias"] = head["bias"] + 1.0
    save_file(head, str(copy_dir / "reward_head.safetensors"))
    with pytest.raises(CheckpointError, match="reward_head.safetensors: missing or does not match"):
        load_reward_model(copy_dir)
    (copy_dir / "reward_head.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing or does not match"):
        load_reward_model(copy_dir)


# ======================================================================== DPO
def hand_logprob(gpt: GPT, ids: list[int], start: int) -> float:
    """Summed log-prob of ids[start:] given what precedes, from the full logits."""
    with torch.no_grad():
        logp = F.log_softmax(gpt(torch.tensor([ids]))[0].float(), -1)
    return float(sum(logp[t - 1, ids[t]] for t in range(start, len(ids))))


def test_dpo_reference_equals_the_policy_at_step_zero(sft_run, rank_files):
    gpt, tok, _ = load_chat_model(sft_run)
    pairs = [p for _, p in encode_pairs(rank_files[0], tok, 64)][:10]
    reference = PolicyModel(copy.deepcopy(gpt)).eval()
    stage = DPOStage(pairs, pairs[:3], reference, batch_size=4, seed=0, pad_id=tok.pad_id, beta=0.5)
    assert stage.ref_train.shape == (10, 2) and stage.ref_val.shape == (3, 2)
    for k, (chosen, c0, rejected, r0) in enumerate(pairs):
        assert float(stage.ref_train[k, 0]) == pytest.approx(hand_logprob(gpt, chosen, c0), abs=1e-4)
        assert float(stage.ref_train[k, 1]) == pytest.approx(hand_logprob(gpt, rejected, r0), abs=1e-4)
        assert tok.decode(chosen[c0:]).endswith("<|end|>") and c0 == len(chat.render_prompt(
            tok.decode(chosen[1:c0 - 2]), tok))
    policy = PolicyModel(gpt).train()
    loss, stats = stage.loss(policy, stage.batch(1, 0))
    assert float(loss.detach()) == pytest.approx(math.log(2), abs=1e-5)
    assert abs(float(stats["reward_margin"])) < 1e-5
    with torch.no_grad():  # as the trainer calls it
        assert stage.evaluate(policy)["val_loss"] == pytest.approx(math.log(2), abs=1e-5)
    with pytest.raises(ConfigError, match="beta"):
        DPOStage(pairs, [], reference, batch_size=4, seed=0, pad_id=tok.pad_id, beta=0.0)


def test_dpo_learns_the_preferences(work, sft_run, rank_files):
    out = work / "dpo"
    run_dpo(str(sft_run), rank_files[0], out, cpu_cfg(max_steps=30, lr=3e-3, min_lr=3e-4, eval_every=10), {"beta": 0.5},
            val_file=rank_files[1], progress=False)
    records = read_metrics(out / "metrics.jsonl")
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at step 1
    assert records[-1]["loss"] < 0.5 * math.log(2)
    vals = [r for r in records if "val_accuracy" in r]
    assert vals[-1]["val_accuracy"] >= 0.9 and vals[-1]["val_loss"] < math.log(2)
    assert records[-1]["reward_margin"] > 0
    gpt, tok, config = load_run(out)
    assert config["stage"] == "dpo" and config["dpo"]["beta"] == 0.5 and chat.has_chat_tokens(tok)
    assert config["dpo"]["train_pairs"] == len(encode_pairs(rank_files[0], tok, 64))
    sft_gpt, _, _ = load_run(sft_run)
    assert not torch.equal(gpt.wte.weight, sft_gpt.wte.weight)


# ======================================================================== PPO
def test_rollout_masks_flags_and_scores_match_the_sequences(sft_run, rm_run, prompts_file):
    gpt, tok, _ = load_chat_model(sft_run, dropout=0.0)
    policy = PolicyModel(gpt)
    reference = PolicyModel(copy.deepcopy(gpt)).eval()
    reward, _, _ = load_reward_model(rm_run)
    value = ScalarModel(copy.deepcopy(reward.gpt))
    cfg = PPOConfig(rollout_batch=4, minibatches=1, max_new_tokens=4, temperature=1.5, missing_eos_penalty=0.7)
    prompts = encode_prompts(prompts_file, tok, 64, cfg.max_new_tokens) * 2
    buf = rollout(policy, reference, reward, tok, prompts, cfg, seed=11, kl_coef=0.05, value=value)
    stops = set(chat.stop_ids(tok))
    ended = buf["ended"].tolist()
    assert 0 < sum(ended) < len(prompts), "the test needs ended and unfinished responses"
    for r, p in enumerate(prompts):
        start, n = int(buf["starts"][r]), int(buf["mask"][r].sum())
        assert start == len(p) and buf["idx"][r, :start].tolist() == p
        response = buf["idx"][r, start: start + n].tolist()
        assert buf["targets"][r, :n].tolist() == response
        assert (buf["targets"][r, n:] == 0).all() and not buf["mask"][r, n:].any() and buf["mask"][r, :n].all()
        assert (buf["idx"][r, start + n:] == tok.pad_id).all()
        if ended[r]:  # the stop token is part of the response, and only at its end
            assert response[-1] in stops and not stops & set(response[:-1]) and n <= cfg.max_new_tokens
        else:
            assert n == cfg.max_new_tokens and not stops & set(response)
        seq = torch.tensor([p + response])
        with torch.no_grad():
            alone = float(reward.score(seq, torch.tensor([seq.shape[1]])))
        assert float(buf["score"][r]) == pytest.approx(alone - (0 if ended[r] else 0.7), abs=1e-5)
        with torch.no_grad():  # old log-probs at the rollout temperature, from the full logits
            logits = gpt(seq)[0, start - 1: start + n - 1].float() / cfg.temperature
        want = F.log_softmax(logits, -1).gather(1, torch.tensor(response)[:, None])[:, 0]
        assert torch.allclose(buf["old_logp"][r, :n], want, atol=1e-5)
    assert torch.equal(buf["old_logp"], buf["ref_logp"])  # policy == reference: KL exactly 0
    m = buf["mask"]
    adv = buf["advantages"][m]
    assert abs(float(adv.mean())) < 1e-5 and float(adv.var()) == pytest.approx(1.0, abs=1e-3)  # whitened
    assert (buf["advantages"][~m] == 0).all() and (buf["returns"][~m] == 0).all()


def ppo_cfg(**kw) -> PPOConfig:
    return PPOConfig(**{"rollout_batch": 8, "minibatches": 2, "ppo_epochs": 2, "max_new_tokens": 8, **kw})


def ppo_tc(cfg: PPOConfig, iterations: int, **kw) -> TrainConfig:
    return ppo_train_config(cfg, iterations, {"device": "cpu", "lr": 1e-3, "min_lr": 1e-3, **kw})


@pytest.fixture(scope="module")
def ppo_run(work, sft_run, rm_run, prompts_file) -> Path:
    """Two iterations of 4 updates, uninterrupted: the run every resumed run must reproduce."""
    cfg = ppo_cfg()
    tc = ppo_tc(cfg, 2, eval_every=2)
    assert tc.max_steps == 8 and tc.grad_accum == 1 and tc.batch_size == 8  # the ptx rows per update
    run_ppo(str(sft_run), str(rm_run), prompts_file, work / "ppo", tc, cfg.replace(val_fraction=0.3), progress=False)
    return work / "ppo"


def test_ppo_run_logs_reward_and_kl_and_starts_at_zero_kl(ppo_run):
    records = read_metrics(ppo_run / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 9))
    for r in records:
        assert {"reward", "kl", "kl_coef", "pg_loss", "value_loss", "approx_kl", "clip_frac", "entropy"} <= set(r)
        assert all(math.isfinite(r[k]) for k in ("reward", "kl", "loss"))
        assert ("val_reward" in r and "val_kl" in r) == (r["step"] % 2 == 0)
    first = records[0]  # policy == reference == the policy that sampled (approx_kl from a differently
    assert first["kl"] == 0.0 and first["approx_kl"] < 1e-12 and first["clip_frac"] == 0.0  # shaped batch)
    assert [r["reward"] for r in records[:4]] == [first["reward"]] * 4  # one rollout per 4 updates
    assert records[4]["reward"] != first["reward"] and records[4]["kl"] != 0.0
    assert records[4]["approx_kl"] < 1e-12  # the first update of an iteration: policy == old policy
    assert records[1]["approx_kl"] > 0.0 and records[3]["val_kl"] != 0.0  # it moved after updates
    assert (ppo_run / "loss.png").stat().st_size > 0
    gpt, tok, config = load_run(ppo_run)
    assert config["stage"] == "ppo" and config["ppo"]["rollout_batch"] == 8 and chat.has_chat_tokens(tok)
    assert config["data"]["val_prompts"] > 0 and config["chat_format"] == chat.CHAT_FORMAT
    PPOConfig.from_dict(config["ppo"])  # a finished run's config still resumes (gptlab ppo --resume)
    assert config["ppo_result"]["final_kl_coef"] > 0


def test_ppo_trains_policy_and_whole_value_function(ppo_run, sft_run, rm_run):
    """The checkpoint holds policy and value; both move from their inits (SFT model, reward model)."""
    from safetensors.torch import load_file

    state = load_file(str(checkpoint_dirs(ppo_run)[-1] / "model.safetensors"))
    sft, rm = load_file(str(sft_run / "model.safetensors")), load_file(str(rm_run / "model.safetensors"))
    head = load_file(str(rm_run / "reward_head.safetensors"))
    assert {k.split(".")[0] for k in state} == {"policy", "value"}  # the frozen reference is not trained
    for name in ("h.0.attn.c_attn.weight", "h.0.mlp.c_fc.weight", "wte.weight"):
        assert not torch.equal(state[f"policy.gpt.{name}"], sft[name])
        assert not torch.equal(state[f"value.gpt.{name}"], rm[name]), f"value backbone {name} never trained"
    assert not torch.equal(state["value.head.weight"], head["weight"])
    final, _, _ = load_run(ppo_run)
    assert torch.equal(final.wte.weight, state["policy.gpt.wte.weight"])  # the saved model is the policy


def test_ppo_resumes_bit_for_bit_from_the_middle_of_an_iteration(work, ppo_run, sft_run, rm_run, prompts_file):
    out = work / "ppo-resumed"
    cfg = ppo_cfg()
    assert cfg.updates_per_iteration == 4
    args = (str(sft_run), str(rm_run), prompts_file, out)
    run_ppo(*args, ppo_tc(cfg, 2, eval_every=2, checkpoint_every=2, max_steps=6), cfg.replace(val_fraction=0.3),
            progress=False)  # stops after step 6: update 2 of iteration 2
    ckpts = checkpoint_dirs(out)
    assert [c.name for c in ckpts] == ["step-00000002", "step-00000004", "step-00000006"]
    stage_state = torch.load(ckpts[-1] / "stage.pt", weights_only=True)[0]
    assert stage_state["iteration"] == 1 and stage_state["buffer"]["idx"].shape[0] == 8
    run_ppo(*args, ppo_tc(cfg, 2, eval_every=2, checkpoint_every=2, max_steps=8), cfg.replace(val_fraction=0.3),
            resume=True, progress=False)
    assert stable_records(out) == stable_records(ppo_run)  # losses, rewards, KL, samples: bit for bit
    from safetensors.torch import load_file

    a, b = load_file(str(ppo_run / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ppo_ptx_needs_data_and_logs_the_pretraining_loss(work, base_run, sft_run, rm_run, prompts_file):
    from gptlab.data import prepare

    cfg = ppo_cfg(ptx_coef=0.5, ppo_epochs=1)
    out = work / "ppo-ptx"
    with pytest.raises(ConfigError, match="ptx_coef > 0 needs pretraining data"):
        run_ppo(str(sft_run), str(rm_run), prompts_file, out, ppo_tc(cfg, 1, batch_size=2), cfg, progress=False)
    assert not (out / "config.json").exists()
    rng = random.Random(4)
    text = " ".join("".join(rng.choice("abcde") for _ in range(rng.randint(2, 7))) for _ in range(300))
    (work / "ptx.txt").write_text(text, encoding="utf-8")
    # tokenized with the base run's tokenizer, from before SFT added the chat tokens
    prepare([work / "ptx.txt"], str(base_run / "tokenizer"), work / "ptx-data", val_fraction=0.0, progress=False)
    out = work / "ppo-ptx-2"
    run_ppo(str(sft_run), str(rm_run), prompts_file, out, ppo_tc(cfg, 1, batch_size=2), cfg.replace(val_fraction=0.3),
            ptx_data=work / "ptx-data", progress=False)
    records = read_metrics(out / "metrics.jsonl")
    assert len(records) == 2
    for r in records:  # an untrained LM loss on these letters: a few nats, part of the total
        assert 0.5 < r["ptx_loss"] < 10
        assert r["loss"] == pytest.approx(r["pg_loss"] + cfg.vf_coef * r["value_loss"] + 0.5 * r["ptx_loss"],
                                          rel=1e-4, abs=1e-5)
    assert json.loads((out / "config.json").read_text())["data"]["ptx_data"] == str(work / "ptx-data")


def test_ppo_divergence_stops_and_keeps_the_last_good_checkpoint(work, sft_run, rm_run, prompts_file):
    cfg = ppo_cfg(ppo_epochs=1, max_kl=1e-9, kl_kind="k3")  # k3 >= 0, and 0 only when policy == reference
    out = work / "ppo-diverged"
    tc = ppo_tc(cfg, 3, lr=5e-2, min_lr=5e-2, checkpoint_every=2, eval_every=0)
    with pytest.raises(TrainingDiverged) as info:
        run_ppo(str(sft_run), str(rm_run), prompts_file, out, tc, cfg.replace(val_fraction=0.3), progress=False)
    good = out / "checkpoints" / "step-00000002"
    message = str(info.value)
    assert "PPO diverged at iteration 2" in message and f"the last good checkpoint is {good}" in message
    assert "max_kl 1e-09" in message
    assert checkpoint_dirs(out) == [good]
    assert verify_checkpoint(good)["step"] == 2
    assert not (out / "model.safetensors").exists()  # no final model from a diverged run
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]


# ============================================================ resume from Python
RESUME_CASES = {  # stage: (its section in config.json, the settings a run starts with, a different value on resume)
    "sft": ("sft", {"pack": True}, {"pack": False}),
    "rm": ("reward", {"norm_tokens": 4}, {"norm_tokens": 8}),
    "dpo": ("dpo", {"beta": 0.5}, {"beta": 0.1}),
    "ppo": ("ppo", {"kl_coef": 0.3}, {"kl_coef": 0.02}),
}


@pytest.mark.parametrize("stage", RESUME_CASES)
def test_a_resumed_run_restores_its_own_settings_from_python(work, sft_run, rm_run, sft_files, rank_files,
                                                               prompts_file, stage):
    """run_*(resume=True) without settings continues with the saved ones; different ones are a clear error."""
    section, first, other = RESUME_CASES[stage]
    out = work / f"resume-{stage}"

    def run(settings, resume: bool, steps: int):
        train = {**cpu_cfg(checkpoint_every=1).to_dict(), "max_steps": steps}
        if stage == "sft":
            return run_sft(str(sft_run), sft_files[0], out, train, settings, resume=resume, progress=False)
        if stage == "rm":
            return run_rm(str(sft_run), rank_files[0], out, train, settings, resume=resume, progress=False)
        if stage == "dpo":
            return run_dpo(str(sft_run), rank_files[0], out, train, settings, resume=resume, progress=False)
        ppo = None if settings is None else {**ppo_cfg().to_dict(), **settings}
        return run_ppo(str(sft_run), str(rm_run), prompts_file, out, ppo_tc(ppo_cfg(), 1, max_steps=steps), ppo,
                       resume=resume, progress=False)

    run(first, resume=False, steps=2)
    saved = json.loads((out / "config.json").read_text())
    with pytest.raises(ConfigError, match=f"resumed run keeps its {section} settings: {next(iter(other))}="):
        run(other, resume=True, steps=4)
    assert json.loads((out / "config.json").read_text()) == saved  # nothing was written
    result = run(None, resume=True, steps=4)
    assert result.step == 4 and result.steps_run == 2
    config = json.loads((out / "config.json").read_text())
    assert {k: config[section][k] for k in first} == first  # the final save records what the stage ran with
    assert config["train"]["max_steps"] == 4  # the training loop may change


# ================================================================ bad input
def test_bad_input_is_refused_before_anything_is_written(work, sft_run, rm_run, prompts_file, rank_files):
    bad = write_jsonl(work / "dup.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"},
                                           {"prompt": "q", "responses": ["a", "b", "c"], "ranking": [0, 0, 1]}])
    where = re.escape(f"{bad}:2: field 'ranking' lists index 0 more than once")
    with pytest.raises(DataError, match=where):
        run_rm(str(sft_run), bad, work / "bad-rm", cpu_cfg(max_steps=1), progress=False)
    with pytest.raises(DataError, match=where):
        run_dpo(str(sft_run), bad, work / "bad-dpo", cpu_cfg(max_steps=1), progress=False)
    # a reward model over another vocabulary
    other_tok = CharTokenizer.from_text("xyz")
    torch.manual_seed(0)
    other = ScalarModel(GPT(GPTConfig(vocab_size=other_tok.vocab_size, **MODEL)))
    save_reward_model(work / "other-rm", other, other_tok, {})
    cfg = ppo_cfg()
    with pytest.raises(ConfigError, match="different tokenizers"):
        run_ppo(str(sft_run), str(work / "other-rm"), prompts_file, work / "bad-ppo-tok", ppo_tc(cfg, 1), cfg,
                progress=False)
    # a prompt with no room for the response
    long_prompts = write_jsonl(work / "long_prompts.jsonl", [{"prompt": "ab"}, {"prompt": "a" * 60}])
    with pytest.raises(DataError, match=r"prompt 2 has 63 tokens and leaves no room for a 8-token response"):
        run_ppo(str(sft_run), str(rm_run), long_prompts, work / "bad-ppo-long", ppo_tc(cfg, 1), cfg, progress=False)
    with pytest.raises(ConfigError, match="grad-accum"):
        run_ppo(str(sft_run), str(rm_run), prompts_file, work / "bad-ppo-accum", ppo_tc(cfg, 1, grad_accum=2), cfg,
                progress=False)
    for name in ("bad-rm", "bad-dpo", "bad-ppo-tok", "bad-ppo-long", "bad-ppo-accum"):
        assert not (work / name / "config.json").exists() and not (work / name).exists()


# ======================================================================== CLI
def test_cli_sft_rm_dpo_ppo_end_to_end(work, base_run, sft_files, rank_files, prompts_file):
    cli = work / "cli"
    common = ["--device", "cpu", "--batch-size", "4", "--max-steps", "2"]
    assert main(["sft", "--model", str(base_run), "--data", str(sft_files[0]), "--val", str(sft_files[1]),
                 "--out", str(cli / "sft"), *common]) == 0
    assert main(["rm", "--model", str(cli / "sft"), "--data", str(rank_files[0]), "--val", str(rank_files[1]),
                 "--out", str(cli / "rm"), *common]) == 0
    assert main(["dpo", "--model", str(cli / "sft"), "--data", str(rank_files[0]), "--val", str(rank_files[1]),
                 "--out", str(cli / "dpo"), "--beta", "0.2", *common]) == 0
    assert main(["ppo", "--policy", str(cli / "sft"), "--reward", str(cli / "rm"), "--prompts", str(prompts_file),
                 "--out", str(cli / "ppo"), "--iterations", "1", "--rollout-batch", "4", "--minibatches", "2",
                 "--ppo-epochs", "1", "--max-new-tokens", "4", "--val-fraction", "0.3", "--device", "cpu"]) == 0
    for stage in ("sft", "rm", "dpo", "ppo"):
        config = json.loads((cli / stage / "config.json").read_text())
        assert config["stage"] == stage and config["chat_format"] == chat.CHAT_FORMAT
        assert (cli / stage / "model.safetensors").is_file() and (cli / stage / "loss.png").is_file()
        assert [r["step"] for r in read_metrics(cli / stage / "metrics.jsonl")] == [1, 2]
    load_reward_model(cli / "rm")
    assert json.loads((cli / "dpo" / "config.json").read_text())["dpo"]["beta"] == 0.2
    ppo_config = json.loads((cli / "ppo" / "config.json").read_text())
    assert ppo_config["ppo"]["rollout_batch"] == 4 and ppo_config["train"]["max_steps"] == 2


def test_cli_bad_rankings_exit_2_with_one_line(work, sft_run, capsys):
    bad = write_jsonl(work / "cli-dup.jsonl", [{"prompt": "q", "responses": ["a", "b"], "ranking": [1, 1]}])
    capsys.readouterr()
    assert main(["rm", "--model", str(sft_run), "--data", str(bad), "--out", str(work / "cli-bad"),
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"gptlab rm: error: {bad}:1: field 'ranking' lists index 1")
    assert not (work / "cli-bad").exists()
