"""InstructGPT step 3: PPO against the reward model, with a per-token KL penalty and the pretraining mix.

    gptlab ppo --model runs/sft --reward runs/rm --prompts prompts.jsonl --out runs/ppo
        [--ptx-data data/ --ptx-coef 1.0 --kl-coef 0.02 --kl-target 6 --iterations 100]

One PPO iteration: sample one response per prompt for ``rollout_batch`` prompts
with the engine (KV cache, temperature T); recompute the policy's log-probs at
the same T with a full forward pass (the numbers the update compares against),
the frozen SFT reference's log-probs and the value function's values; score
``prompt + response`` with the reward model (minus ``missing_eos_penalty`` when
the response never reached ``<|end|>``); build the per-token reward
``-β·KL(π‖π_ref)`` with the score added at the last token; GAE (γ, λ);
whiten the advantages; then ``ppo_epochs`` passes over the rollouts in
``minibatches`` shuffled minibatches, each one optimizer step of the clipped
policy loss + ``vf_coef`` · clipped value loss (+ ``ptx_coef`` · LM loss on a
pretraining batch: PPO-ptx).

As in the paper the policy starts from the SFT model, the value function from
the reward model, and the reference is the SFT model, frozen. Dropout is off
for all of them (rollout and update log-probs must come from the same function).

It runs on the shared trainer: one trainer step is one minibatch update, so a
run of ``I`` iterations is ``I · ppo_epochs · minibatches`` steps, with the
trainer's schedule, clipping, checkpoints and metrics. The rollout buffer is
stage state saved in every checkpoint, and rollouts are seeded by
``(seed, iteration, rank)``: a resumed run continues bit for bit, even from a
checkpoint in the middle of an iteration. A rollout whose KL per sequence is
not finite or exceeds ``max_kl`` stops the run (``TrainingDiverged``), keeping
the last good checkpoint.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..align_data import load_prompts
from ..chat import CHAT_FORMAT, render_prompt, stop_ids
from ..config import Config
from ..data import PretrainBatches, TokenData
from ..engine import Engine, SamplingParams
from ..errors import ConfigError, DataError, TrainingDiverged, naming
from ..heads import ActorCritic, PolicyModel, ScalarModel, response_positions
from ..lora import add_lora, adapters_disabled
from ..model import rebuilt
from ..rl import (KL_KINDS, AdaptiveKLController, gae, kl_penalty, masked_mean, masked_whiten, per_token_rewards,
                  ppo_policy_loss, value_loss)
from ..runs import save_model
from ..tokenizer import ASSISTANT, END_OF_TURN, USER, Tokenizer, check_tokenizers_match, tokenizer_difference
from ..train.checkpoints import latest_checkpoint
from ..train.config import Given, TrainConfig, resolve
from ..train.dist import DistEnv
from ..train.loop import Stage, TrainResult
from .common import StageRun, chat_pad_id, held_out, load_chat_model, pad_right, responses_of
from .reward import load_reward_model
from .sft import sft_sample

__all__ = ["PPOConfig", "PPOStage", "PPO_TRAIN", "encode_prompts", "ppo_train_config", "run_ppo", "rollout"]

# Constant, small lr; no warmup; one optimizer step per minibatch update; batch_size is the pretraining
# (ptx) rows per update.
PPO_TRAIN: dict[str, Any] = {"lr": 1e-5, "min_lr": 1e-5, "warmup_steps": 0, "weight_decay": 0.0, "batch_size": 8}
PPO_ITERATIONS = 100


@dataclass
class PPOConfig(Config):
    """PPO's own settings, config.json's ``ppo`` section (names from the papers: β = kl_coef, γ_ptx = ptx_coef)."""

    section: ClassVar[str] = "ppo"

    rollout_batch: int = 64
    """prompts (one response each) per iteration, per rank"""
    minibatches: int = 4
    """optimizer steps per pass over the rollouts"""
    ppo_epochs: int = 4
    """passes over the rollouts per iteration"""
    max_new_tokens: int = 32
    """longest response sampled"""
    temperature: float = 1.0
    """sampling temperature of rollouts (log-probs are taken at it too)"""
    kl_coef: float = 0.02
    """β: weight of the per-token KL penalty to the SFT policy"""
    kl_target: float | None = None
    """KL per sequence (nats) an adaptive β aims for (default: a fixed β)"""
    kl_horizon: int = 10000
    """horizon of the adaptive KL controller (in sequences)"""
    kl_kind: str = "k1"
    """KL estimator of the penalty: k1, k2 or k3"""
    gamma: float = 1.0
    """γ: discount of GAE"""
    lam: float = 0.95
    """λ: GAE's bias/variance trade-off"""
    clip_range: float = 0.2
    """ε of the clipped policy loss"""
    vf_clip: float = 0.2
    """clip range of the value loss"""
    vf_coef: float = 0.1
    """weight of the value loss"""
    ptx_coef: float = 0.0
    """γ_ptx: weight of the pretraining LM loss (PPO-ptx; 0 = plain PPO; needs --ptx-data)"""
    missing_eos_penalty: float = 1.0
    """subtracted from the score of a response that never ends"""
    whiten_advantages: bool = True
    """normalise the advantages of each rollout to mean 0, variance 1"""
    max_kl: float = 100.0
    """KL per sequence (nats) beyond which the run stops as diverged"""
    val_fraction: float = 0.05
    """share of prompts held out for val_reward / val_kl"""
    val_max: int = 64
    """most held-out prompts evaluated"""

    def validate(self) -> None:
        for key in ("rollout_batch", "minibatches", "ppo_epochs", "max_new_tokens", "kl_horizon",
                    "val_max"):
            self.need(getattr(self, key) >= 1, f"{key}={getattr(self, key)!r} must be >= 1")
        self.need(self.minibatches <= self.rollout_batch, f"minibatches={self.minibatches} must be <= "
                  f"rollout_batch={self.rollout_batch}")
        self.need(self.temperature > 0, f"temperature={self.temperature} must be > 0 (PPO samples)")
        self.need(self.kl_coef >= 0, f"kl_coef={self.kl_coef} must be >= 0")
        self.need(self.kl_target is None or self.kl_target > 0, f"kl_target={self.kl_target} must be > 0")
        self.need(self.kl_kind in KL_KINDS, f"kl_kind={self.kl_kind!r} must be one of {', '.join(KL_KINDS)}")
        self.need(0 <= self.gamma <= 1 and 0 <= self.lam <= 1, f"gamma={self.gamma}, lam={self.lam} must be in [0, 1]")
        self.need(self.clip_range > 0 and self.vf_clip > 0, "clip_range and vf_clip must be > 0")
        self.need(self.vf_coef >= 0 and self.ptx_coef >= 0, "vf_coef and ptx_coef must be >= 0")
        self.need(self.max_kl > 0, f"max_kl={self.max_kl} must be > 0")
        self.need(0 <= self.val_fraction < 1, f"val_fraction={self.val_fraction} must be in [0, 1)")

    @property
    def updates_per_iteration(self) -> int:
        return self.ppo_epochs * self.minibatches


def encode_prompts(path: str | os.PathLike[str], tokenizer: Tokenizer, block_size: int, max_new_tokens: int) -> list[list[int]]:
    """Each prompt rendered for generation; one that leaves no room for ``max_new_tokens`` is an error."""
    room = block_size - max_new_tokens
    out = []
    for n, prompt in enumerate(load_prompts(path), 1):
        with naming(f"{path}: prompt {n}"):
            ids = render_prompt(prompt, tokenizer)
        if len(ids) > room:
            raise DataError(f"{path}: prompt {n} has {len(ids)} tokens and leaves no room for a "
                            f"{max_new_tokens}-token response in the context of {block_size}; "
                            f"shorten it or lower --max-new-tokens")
        out.append(ids)
    return out


@torch.no_grad()
def rollout(policy: PolicyModel, reference: PolicyModel, reward: ScalarModel, tokenizer: Tokenizer,
            prompts: Sequence[list[int]], cfg: PPOConfig, seed: int, kl_coef: float,
            value: ScalarModel | None = None) -> dict[str, torch.Tensor]:
    """Sample, score and (with ``value``) compute advantages for one batch of prompts; CPU tensors.

    Keys: idx, starts, targets, mask (the responses), old_logp, ref_logp, score, ended, and with
    ``value``: old_values, advantages, returns.
    """
    gpt = policy.gpt
    was_training = gpt.training
    device = gpt.wte.weight.device
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=seed,
                            stop_token_ids=stop_ids(tokenizer))
    completions = Engine(gpt, tokenizer).generate_ids(prompts, params)
    gpt.train(was_training)
    seqs, ended = [], []
    for p, c in zip(prompts, completions):
        end = [c.stop_token] if c.stop_token is not None else []
        seqs.append(list(p) + c.token_ids + end)
        ended.append(bool(end))
    idx, lengths = pad_right(seqs, chat_pad_id(tokenizer))
    starts = torch.tensor([len(p) for p in prompts])
    targets, mask = responses_of(idx, starts, lengths)  # never empty: a response has a token or its stop token
    idx, starts, targets, mask, lengths = (t.to(device) for t in (idx, starts, targets, mask, lengths))
    ended_t = torch.tensor(ended, device=device)
    old_logp, _ = policy(idx, starts, targets, cfg.temperature)
    ref_logp, _ = reference(idx, starts, targets, cfg.temperature)
    score = reward.score(idx, lengths) - cfg.missing_eos_penalty * (~ended_t).float()
    out = {"idx": idx, "starts": starts, "targets": targets, "mask": mask, "old_logp": old_logp,
           "ref_logp": ref_logp, "score": score, "ended": ended_t}
    if value is not None:
        values = value(idx).gather(1, response_positions(starts, targets.shape[1], idx.shape[1]))
        rewards, _ = per_token_rewards(score, old_logp, ref_logp, mask, kl_coef, cfg.kl_kind)
        advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        out.update(old_values=values, advantages=advantages, returns=returns)
    return {k: v.cpu() for k, v in out.items()}


def rollout_stats(buf: Mapping[str, torch.Tensor], kl_kind: str = "k1") -> dict[str, float]:
    """Per-sequence means of one rollout: reward (the score PPO maximises), KL to the reference, length."""
    mask = buf["mask"].float()
    kl = (kl_penalty(buf["old_logp"], buf["ref_logp"], kl_kind) * mask).sum(1)
    return {"reward": float(buf["score"].mean()), "kl": float(kl.mean()),
            "response_length": float(mask.sum(1).mean()), "ended": float(buf["ended"].float().mean())}


class BasePolicy(PolicyModel):
    """A LoRA policy's reference: its own backbone with the adapters off, so no second copy is held."""

    def forward(self, idx: torch.Tensor, starts: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        with adapters_disabled(self.gpt):
            return super().forward(idx, starts, targets, temperature, with_entropy)


class PPOStage(Stage[ActorCritic]):
    """PPO as a trainer stage: step ``s`` is minibatch update ``(s-1) % U`` of iteration ``(s-1) // U``.

    ``prepare(step)`` is the rollout phase: a step that starts an iteration samples,
    scores and computes the advantages of a new batch of responses; every step
    then picks its minibatch of that buffer. ``loss`` is the update on it.
    """

    name = "ppo"
    plot_keys = ("reward", "kl")

    def __init__(self, model: ActorCritic, reference: PolicyModel, reward: ScalarModel, tokenizer: Tokenizer,
                 prompts: Sequence[list[int]], val_prompts: Sequence[list[int]], cfg: PPOConfig, *, seed: int,
                 rank: int = 0, world_size: int = 1, ptx: PretrainBatches | None = None,
                 save_extra: dict[str, Any] | None = None, run_dir: str | os.PathLike[str] | None = None) -> None:
        if not prompts:
            raise DataError("no training prompts (all held out for validation?); add prompts")
        if cfg.ptx_coef > 0 and ptx is None:
            raise ConfigError("ptx_coef > 0 needs pretraining data: pass --ptx-data DATA_DIR")
        self.model, self.reference, self.reward, self.tokenizer = model, reference, reward, tokenizer
        self.prompts, self.val_prompts, self.cfg = list(prompts), list(val_prompts), cfg
        self.seed, self.rank, self.world_size, self.ptx = seed, rank, world_size, ptx
        self.save_extra, self.run_dir = save_extra or {}, run_dir
        self.kl = AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target else None
        self.kl_coef = cfg.kl_coef
        self.iteration = -1
        self.buffer: dict[str, torch.Tensor] = {}
        self.stats: dict[str, float] = {}
        self.minibatch: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------ stage state
    def state_dict(self) -> dict[str, Any]:
        return {"iteration": self.iteration, "kl_coef": self.kl_coef, "buffer": self.buffer, "stats": self.stats}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.iteration, self.kl_coef = int(state["iteration"]), float(state["kl_coef"])
        self.buffer, self.stats = dict(state["buffer"]), dict(state["stats"])
        if self.kl is not None:
            self.kl.kl_coef = self.kl_coef

    # ------------------------------------------------------------ the rollout phase
    def prepare(self, step: int) -> None:
        cfg = self.cfg
        iteration, update = divmod(step - 1, cfg.updates_per_iteration)
        if iteration != self.iteration:
            self._rollout(iteration)
        epoch, part = divmod(update, cfg.minibatches)
        gen = torch.Generator().manual_seed(int(np.random.default_rng([self.seed, iteration, epoch, self.rank])
                                                .integers(2**62)))
        rows = torch.randperm(cfg.rollout_batch, generator=gen).chunk(cfg.minibatches)[part]
        mb = {k: v[rows] for k, v in self.buffer.items()}
        width = int(mb["mask"].sum(1).max())  # drop columns that are padding for every row
        self.minibatch = {k: (v[:, :width] if v.dim() == 2 and k != "idx" else v) for k, v in mb.items()}

    def _rollout(self, iteration: int) -> None:
        cfg = self.cfg
        started = time.perf_counter()
        rng = np.random.default_rng([self.seed, iteration, self.rank])
        picks = rng.choice(len(self.prompts), cfg.rollout_batch, replace=cfg.rollout_batch > len(self.prompts))
        self.model.eval()
        buf = rollout(self.model.policy, self.reference, self.reward, self.tokenizer,
                      [self.prompts[i] for i in picks], cfg, seed=int(rng.integers(2**62)),
                      kl_coef=self.kl_coef, value=self.model.value)
        self.model.train()
        stats = rollout_stats(buf, cfg.kl_kind)
        if not math.isfinite(stats["kl"]) or stats["kl"] > cfg.max_kl or not math.isfinite(stats["reward"]):
            good = latest_checkpoint(self.run_dir) if self.run_dir is not None else None
            keep = f"the last good checkpoint is {good}" if good else "no checkpoint was saved yet"
            raise TrainingDiverged(f"PPO diverged at iteration {iteration + 1}: KL to the reference is "
                                   f"{stats['kl']:.3g} nats per response (max_kl {cfg.max_kl:g}), reward "
                                   f"{stats['reward']:.3g}; {keep}; raise --kl-coef or lower --lr")
        stats["kl_coef"] = self.kl_coef
        elapsed = time.perf_counter() - started
        stats["rollout_s"] = elapsed
        stats["rollout_tokens_per_sec"] = float(buf["mask"].sum()) / elapsed if elapsed > 0 else 0.0
        if self.kl is not None:  # the measured KL sets β for the next iteration
            self.kl_coef = self.kl.update(stats["kl"], cfg.rollout_batch * self.world_size)
        self.iteration, self.buffer, self.stats = iteration, buf, stats

    # -------------------------------------------------------------- the update
    def batch(self, step: int, micro_step: int) -> dict[str, torch.Tensor]:
        if self.ptx is None or self.cfg.ptx_coef == 0:
            return {}
        x, y = self.ptx.get(step, micro_step)
        return {"ptx_x": x, "ptx_y": y}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        cfg = self.cfg
        device = next(self.model.parameters()).device
        mb = {k: v.to(device) for k, v in self.minibatch.items()}
        logp, entropy, values, ptx = model(mb["idx"], mb["starts"], mb["targets"], cfg.temperature,
                                           batch.get("ptx_x"), batch.get("ptx_y"))
        mask = mb["mask"]
        pg_loss, pg_stats = ppo_policy_loss(logp, mb["old_logp"], mb["advantages"], mask, cfg.clip_range)
        vf_loss, vf_stats = value_loss(values, mb["old_values"], mb["returns"], mask, cfg.vf_clip)
        loss = pg_loss + cfg.vf_coef * vf_loss
        metrics: dict[str, Any] = {**self.stats, "pg_loss": pg_loss.detach(), "value_loss": vf_loss.detach(),
                                   "entropy": masked_mean(entropy.detach(), mask), **pg_stats, **vf_stats}
        if ptx is not None:
            loss = loss + cfg.ptx_coef * ptx
            metrics["ptx_loss"] = ptx.detach()
        return loss, metrics

    def num_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(self.minibatch["mask"].sum()) if self.minibatch else 0

    def evaluate(self, model: ActorCritic) -> dict[str, float]:
        """Reward and KL per response on the held-out prompts (fixed seed: comparable across steps)."""
        if not self.val_prompts:
            return {}
        buf = rollout(self.model.policy, self.reference, self.reward, self.tokenizer, self.val_prompts, self.cfg,
                      seed=self.seed + 1, kl_coef=self.kl_coef)
        stats = rollout_stats(buf, self.cfg.kl_kind)
        return {"val_reward": stats["reward"], "val_kl": stats["kl"], "val_response_length": stats["response_length"]}

    def sample(self, model: ActorCritic) -> str | None:
        if not self.val_prompts:
            return None
        prompt = prompt_text(self.tokenizer.decode(self.val_prompts[0]))
        return f"{prompt}\n→ {sft_sample(self.model.policy.gpt, self.tokenizer, prompt)}"

    def save(self, run_dir: Path, model: ActorCritic) -> None:
        save_model(run_dir, self.model.policy.gpt, self.tokenizer, stage=self.name,
                   extra={**self.save_extra, "ppo_result": {"final_kl_coef": self.kl_coef}})


def prompt_text(rendered: str) -> str:
    """The user's text inside a rendered prompt (for printing samples)."""
    return rendered.split(USER, 1)[-1].split(END_OF_TURN, 1)[0] if USER in rendered else rendered.replace(ASSISTANT, "")


def ppo_train_config(cfg: PPOConfig, iterations: int = PPO_ITERATIONS, given: Given = None) -> TrainConfig:
    """The trainer's config for ``iterations`` PPO iterations (one step per minibatch update).

    Evaluation and checkpoints default to every tenth of the run, on iteration
    boundaries; the batch is the pretraining (ptx) batch.
    """
    return resolve(TrainConfig, given, defaults=PPO_TRAIN, derive=_derive(cfg, iterations), source="ppo train")


def _derive(cfg: PPOConfig, iterations: int) -> Callable[[dict[str, Any]], dict[str, Any]]:
    updates = cfg.updates_per_iteration
    every = max(1, math.ceil(iterations / 10)) * updates
    return lambda _: {"max_steps": iterations * updates, "eval_every": every, "checkpoint_every": every}


def run_ppo(policy_spec: str, reward_spec: str, prompts_file: str | os.PathLike[str],
            out_dir: str | os.PathLike[str], train: Given = None, ppo: Given = None, *,
            iterations: int | None = None, ptx_data: str | os.PathLike[str] | None = None, lora: Given = None,
            config_file: str | os.PathLike[str] | None = None, resume: bool = False, verify_data: bool = True,
            progress: bool = True, env: DistEnv | None = None) -> TrainResult:
    """PPO of the SFT run ``policy_spec`` against the reward-model run ``reward_spec`` on ``prompts_file``.

    ``iterations`` (default 100 for a new run) sets the run's length: iterations x
    ppo_epochs x minibatches trainer steps; given on a resumed run it extends it.
    Held out for ``val_reward``/``val_kl``: up to ``val_max`` prompts hashing into ``val_fraction``.
    """
    run = StageRun(PPOStage.name, out_dir, resume=resume, config_file=config_file, sections=(PPOConfig.section,))
    cfg = run.settings(PPOConfig, ppo)
    given = train.to_dict() if isinstance(train, Config) else dict(train or {})
    if iterations is not None:
        given["max_steps"] = iterations * cfg.updates_per_iteration
    train_cfg = run.train(given, PPO_TRAIN, _derive(cfg, iterations or PPO_ITERATIONS))
    lora_cfg = run.lora(lora, train_cfg)
    if train_cfg.grad_accum != 1:
        raise ConfigError("ppo takes one minibatch per optimizer step: drop --grad-accum (set --minibatches instead)")
    if cfg.ptx_coef > 0 and ptx_data is None:
        raise ConfigError("ptx_coef > 0 needs pretraining data: pass --ptx-data DATA_DIR")
    if train_cfg.fsdp:
        raise ConfigError("ppo does not shard with FSDP (rollouts need whole models on every rank); drop --fsdp")
    with run.joined(env, train_cfg) as env:
        gpt, tokenizer, _ = load_chat_model(policy_spec, dropout=0.0)
        reward, reward_tok, _ = load_reward_model(reward_spec)
        why = tokenizer_difference(tokenizer, reward_tok)
        if why is not None or reward_tok.vocab_size != tokenizer.vocab_size:
            raise ConfigError(f"the reward model {reward_spec} and the policy {policy_spec} have different "
                              f"tokenizers ({why or 'vocab sizes differ'}); train the reward model from this SFT run")
        block = gpt.config.block_size
        raw = load_prompts(prompts_file)
        encoded = encode_prompts(prompts_file, tokenizer, min(block, reward.config.block_size), cfg.max_new_tokens)
        side = [held_out(p, cfg.val_fraction, train_cfg.seed) for p in raw]
        prompts = [e for e, v in zip(encoded, side) if not v]
        val_prompts = [e for e, v in zip(encoded, side) if v][:cfg.val_max]
        ptx = None
        if ptx_data is not None:
            td = TokenData(os.fspath(ptx_data))
            if verify_data:
                td.verify()
            check_tokenizers_match(tokenizer, td.tokenizer(), model_vocab=gpt.config.vocab_size,
                                   data_vocab=td.vocab_size, model_name=os.fspath(policy_spec),
                                   data_name=os.fspath(ptx_data))
            ptx = PretrainBatches(td.split("train"), train_cfg.batch_size, block, train_cfg.seed,
                                  rank=env.rank, world_size=env.world_size)
        device = env.device
        if lora_cfg.enabled:
            gpt = add_lora(gpt.to(device), lora_cfg)
            reference: PolicyModel = BasePolicy(gpt)  # the policy's own backbone with its adapters off
        else:
            reference = PolicyModel(copy.deepcopy(gpt)).eval().requires_grad_(False).to(device)
        reward = reward.requires_grad_(False).to(device)
        value_gpt = rebuilt(copy.deepcopy(reward.gpt), dropout=0.0).requires_grad_(True)  # the reward is frozen
        value = ScalarModel(value_gpt)
        value.head.load_state_dict(reward.head.state_dict())
        model = ActorCritic(PolicyModel(gpt), value)
        extra = {"chat_format": CHAT_FORMAT, "train": train_cfg.to_dict(), "ppo": cfg.to_dict(), "data": {
            "prompts": os.path.abspath(prompts_file), "train_prompts": len(prompts), "val_prompts": len(val_prompts),
            "ptx_data": os.path.abspath(ptx_data) if ptx_data is not None else None,
            "policy": os.fspath(policy_spec), "reward": os.fspath(reward_spec)}, **lora_cfg.record()}
        run.begin(env, gpt.config, tokenizer, extra)
        stage = PPOStage(model, reference, reward, tokenizer, prompts, val_prompts, cfg, seed=train_cfg.seed,
                         rank=env.rank, world_size=env.world_size, ptx=ptx, save_extra=extra, run_dir=out_dir)
        return run.trainer(model, stage, train_cfg, env, progress).fit()
