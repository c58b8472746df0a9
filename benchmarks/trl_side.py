"""TRL half of the gptlab-vs-TRL RLHF benchmark: PPO wall time per iteration and RM-loss agreement.

Peer: TRL 1.12.0, the last release that ships PPO (``trl.experimental.ppo``). Installed with

    .venv/bin/pip install trl==1.12.0      # adds only trl 1.12.0, accelerate 1.15.0, psutil 7.2.2;
                                           # torch 2.13.0+cpu and transformers 5.23.0 are left as they are

Everything runs offline from local ``save_pretrained`` directories; the tokenizer TRL insists on is built
in code (a WordLevel vocabulary "<0>".."<V-1>", so ids map 1:1 onto themselves).

What TRL's PPO does per iteration (``PPOTrainer.train``, one "update"):
  * rollout: ``model.generate`` (HF sampling, KV cache, ``temperature``, top_k=0, top_p=1, at most
    ``response_length`` new tokens, stopping early only if every row emitted ``stop_token_id``) on the
    left-padded prompts; the old-policy logprobs come from the generation scores (logits / temperature),
    NOT from a second policy forward. Then one no-grad forward each of the reference policy (logits /
    temperature), the value model (on the untruncated sequence) and the reward model (on the response
    truncated after the first stop token, read at the token before the first pad).
  * per-token KL penalty (k1) + score at the last token, GAE (gamma=1, lam=0.95), advantages whitened.
  * ``num_ppo_epochs`` x ``num_mini_batches`` optimizer steps, each one policy+value forward/backward
    (logits / temperature), clipped PG loss + vf_coef (0.1) x clipped value loss, AdamW.
  * two full ``gc.collect()`` calls (plus ``empty_cache``) per update; on the 2-core dev box they cost
    ~0.25 s each, i.e. most of a toy-size update, so the result also gives the time without them.
Caveat: TRL marks the response from the first ``pad_id`` on as padding, so with pad_id == eos_id the EOS
token itself is masked out of the PPO loss and the score is read at the token before it.

What ``RewardTrainer`` computes (``compute_loss``): loss = -logsigmoid(r_chosen - r_rejected), mean over
pairs; accuracy = mean(r_chosen > r_rejected) (ties count as wrong). No margin (no "margin" column), no
centering term (``center_rewards_coefficient`` is None), and since we hand it pre-tokenized
``chosen_ids``/``rejected_ids`` it does NOT append an EOS (it only does that for text datasets). Rows are
right-padded with pad_id; GPT2ForSequenceClassification reads the reward at the rightmost non-pad token.
"""

from __future__ import annotations

import gc
import os
import statistics
import tempfile
import time

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import (  # noqa: E402
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
    PrinterCallback,
    ProgressCallback,
    TrainerCallback,
)

import trl  # noqa: E402
from trl import RewardConfig, RewardTrainer  # noqa: E402
from trl.experimental.ppo import PPOConfig, PPOTrainer  # noqa: E402


def _tokenizer(vocab_size: int, pad_id: int, eos_id: int) -> PreTrainedTokenizerFast:
    """A tokenizer whose ids are the model's ids: token i is the string "<i>"."""
    vocab = {f"<{i}>": i for i in range(vocab_size)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=f"<{pad_id}>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=f"<{pad_id}>", eos_token=f"<{eos_id}>")
    assert tok.pad_token_id == pad_id and tok.eos_token_id == eos_id
    return tok


def _check_no_pad(seqs, pad_id: int, what: str) -> None:
    for s in seqs:
        if len(s) == 0 or pad_id in s:
            raise ValueError(f"{what}: every sequence must be non-empty and free of pad_id={pad_id}")


class _StepTimer(TrainerCallback):
    """Wall-clock stamps at train begin and after every PPO update (rollout + all minibatch steps)."""

    def __init__(self):
        self.stamps: list[float] = []

    def on_train_begin(self, args, state, control, **kw):
        self.stamps.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kw):
        self.stamps.append(time.perf_counter())


def _common_args(work_dir: str, seed: int) -> dict:
    return dict(output_dir=work_dir, report_to=[], bf16=False, fp16=False, use_cpu=True,
                gradient_checkpointing=False, save_strategy="no", eval_strategy="no",
                disable_tqdm=True, logging_strategy="no", seed=seed, dataloader_num_workers=0)


def trl_ppo_seconds_per_iteration(policy_dir: str, reward_dir: str, prompts: list[list[int]], *,
                                  response_length: int, batch_size: int, mini_batches: int, ppo_epochs: int,
                                  temperature: float, kl_coef: float, iterations: int, pad_id: int,
                                  eos_id: int, seed: int = 0, work_dir: str,
                                  learning_rate: float = 3e-6) -> dict:
    """Run ``iterations`` TRL PPO updates of ``batch_size`` rollouts each on CPU; median seconds per update.

    One update = rollout of batch_size prompts (one generate call) + ppo_epochs x mini_batches optimizer
    steps of batch_size // mini_batches rollouts (per_device_train_batch_size=batch_size,
    gradient_accumulation_steps=1, num_mini_batches=mini_batches: no micro-batching). The first update is
    discarded as warm-up when iterations > 1. Model loading / trainer construction is not timed.
    """
    if len(prompts) < batch_size:
        raise ValueError("need at least batch_size prompts (TRL's dataloader drops ragged batches)")
    if batch_size % mini_batches:
        raise ValueError("batch_size must be a multiple of mini_batches")
    _check_no_pad(prompts, pad_id, "prompts")
    torch.manual_seed(seed)
    policy = GPT2LMHeadModel.from_pretrained(policy_dir)
    ref = GPT2LMHeadModel.from_pretrained(policy_dir).eval().requires_grad_(False)
    reward = GPT2ForSequenceClassification.from_pretrained(reward_dir).eval().requires_grad_(False)
    value = GPT2ForSequenceClassification.from_pretrained(reward_dir)  # value model initialised from the RM
    for m in (policy, ref, reward, value):
        m.config.pad_token_id = pad_id
    policy.generation_config.pad_token_id = pad_id
    tok = _tokenizer(policy.config.vocab_size, pad_id, eos_id)
    tok.padding_side = "left"  # DataCollatorWithPadding left-pads the prompts

    config = dict(total_episodes=iterations * batch_size, per_device_train_batch_size=batch_size,
                  gradient_accumulation_steps=1, num_mini_batches=mini_batches, num_ppo_epochs=ppo_epochs,
                  local_rollout_forward_batch_size=batch_size, response_length=response_length,
                  temperature=temperature, kl_coef=kl_coef, stop_token_id=eos_id, missing_eos_penalty=None,
                  num_sample_generations=0, learning_rate=learning_rate)
    args = PPOConfig(**config, **_common_args(work_dir, seed))
    timer = _StepTimer()
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         value_model=value, train_dataset=Dataset.from_dict({"input_ids": prompts}),
                         callbacks=[timer])
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    # TRL calls gc.collect() twice per update (~0.25 s each here on a 2-core CPU, a large share of a toy-size
    # update); it is part of TRL's per-iteration cost, but we also report the time without it.
    gc_log, real_collect = [], gc.collect

    def timed_collect(*a):
        t = time.perf_counter()
        r = real_collect(*a)
        gc_log.append((time.perf_counter(), time.perf_counter() - t))
        return r

    gc.collect = timed_collect
    try:
        trainer.train()
    finally:
        gc.collect = real_collect
    spans = list(zip(timer.stamps, timer.stamps[1:]))
    assert len(spans) == iterations, (len(spans), iterations)
    per_iter = [b - a for a, b in spans]
    gc_iter = [sum(d for t, d in gc_log if a < t <= b) for a, b in spans]
    k = 1 if iterations > 1 else 0  # first update is warm-up
    return {"seconds_per_iteration": statistics.median(per_iter[k:]), "iterations": iterations - k,
            "seconds_per_iteration_excl_gc": statistics.median([x - y for x, y in zip(per_iter, gc_iter)][k:]),
            "gc_seconds_per_iteration": statistics.median(gc_iter[k:]),
            "all_iteration_seconds": per_iter, "all_gc_seconds": gc_iter, "trl_version": trl.__version__,
            "config": {**config, "vf_coef": args.vf_coef, "cliprange": args.cliprange,
                       "cliprange_value": args.cliprange_value, "gamma": args.gamma, "lam": args.lam,
                       "kl_estimator": args.kl_estimator, "whiten_rewards": args.whiten_rewards,
                       "torch_threads": torch.get_num_threads()}}


def trl_reward_loss_accuracy(model_dir: str, pairs: list[tuple[list[int], list[int]]], *, pad_id: int,
                             eos_id: int, work_dir: str, batch_size: int = 16) -> dict:
    """TRL RewardTrainer's pairwise loss and accuracy on ``pairs`` (chosen ids, rejected ids), no training.

    Batches come from the trainer's own eval dataloader / DataCollatorForPreference and go through its
    ``compute_loss``; per-batch means are re-weighted by pair count so the result is the mean over pairs.
    The sequences are used exactly as given (no EOS appended, no truncation: max_length=None).
    """
    _check_no_pad([s for p in pairs for s in p], pad_id, "pairs")
    model = GPT2ForSequenceClassification.from_pretrained(model_dir)
    model.config.pad_token_id = pad_id  # RewardTrainer sets this too, from the tokenizer
    tok = _tokenizer(model.config.vocab_size, pad_id, eos_id)
    data = Dataset.from_dict({"chosen_ids": [list(c) for c, _ in pairs],
                              "rejected_ids": [list(r) for _, r in pairs]})
    args = RewardConfig(max_length=None, center_rewards_coefficient=None, per_device_eval_batch_size=batch_size,
                        **_common_args(work_dir, 0))
    trainer = RewardTrainer(model=model, args=args, train_dataset=data, eval_dataset=data, processing_class=tok)
    trainer.model.eval()
    loss_sum, acc_sum, n = 0.0, 0.0, 0
    with torch.no_grad():
        for batch in trainer.get_eval_dataloader():
            batch = trainer._prepare_inputs(batch)
            loss, out = trainer.compute_loss(trainer.model, batch, return_outputs=True)
            k = out.logits.shape[0] // 2
            loss_sum += loss.item() * k
            acc_sum += trainer._metrics["eval"]["accuracy"][-1] * k  # TRL's own (r_c > r_r).mean()
            n += k
    assert n == len(pairs), (n, len(pairs))
    return {"loss": loss_sum / n, "accuracy": acc_sum / n, "n": n, "trl_version": trl.__version__}


if __name__ == "__main__":
    from transformers import GPT2Config

    V, PAD, EOS = 512, 0, 1
    g = torch.Generator().manual_seed(0)

    def ids(n: int) -> list[int]:
        return torch.randint(2, V, (n,), generator=g).tolist()  # never PAD/EOS

    with tempfile.TemporaryDirectory() as tmp:
        kw = dict(vocab_size=V, n_positions=128, n_embd=64, n_layer=2, n_head=4,
                  pad_token_id=PAD, eos_token_id=EOS, bos_token_id=EOS)
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config(**kw)).save_pretrained(f"{tmp}/policy")
        GPT2ForSequenceClassification(GPT2Config(**kw, num_labels=1)).save_pretrained(f"{tmp}/rm")
        prompts = [ids(int(torch.randint(4, 17, (1,), generator=g))) for _ in range(64)]
        ppo = trl_ppo_seconds_per_iteration(f"{tmp}/policy", f"{tmp}/rm", prompts, response_length=24,
                                            batch_size=16, mini_batches=2, ppo_epochs=2, temperature=0.7,
                                            kl_coef=0.05, iterations=3, pad_id=PAD, eos_id=EOS,
                                            work_dir=f"{tmp}/ppo")
        print("PPO:", ppo)
        pairs = []
        for _ in range(37):  # not a multiple of the batch size on purpose
            p = ids(8)
            pairs.append((p + ids(int(torch.randint(3, 12, (1,), generator=g))),
                          p + ids(int(torch.randint(3, 12, (1,), generator=g)))))
        rm = trl_reward_loss_accuracy(f"{tmp}/rm", pairs, pad_id=PAD, eos_id=EOS, work_dir=f"{tmp}/rm_eval")
        # cross-check against a plain transformers computation (reward at the last real token)
        m = GPT2ForSequenceClassification.from_pretrained(f"{tmp}/rm").eval()
        with torch.no_grad():
            r = [[m(torch.tensor([s])).logits[0, 0] for s in pair] for pair in pairs]
        d = torch.stack([c - j for c, j in r])
        ref = {"loss": -torch.nn.functional.logsigmoid(d).mean().item(), "accuracy": (d > 0).float().mean().item()}
        print("RM:", rm, "plain transformers:", ref)
        assert abs(rm["loss"] - ref["loss"]) < 1e-5 and abs(rm["accuracy"] - ref["accuracy"]) < 1e-6
