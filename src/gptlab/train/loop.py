"""The training loop shared by every stage: ``Trainer.fit`` runs a ``Stage`` on a model.

    with distributed(None) as env:
        stage = PretrainStage(data, batch_size=12, block_size=64, seed=1337, rank=env.rank, world_size=env.world_size)
        result = Trainer(GPT(config), stage, TrainConfig(max_steps=2000), "runs/x", env=env).fit()

A stage gives its data and its objective (``Stage``); the trainer owns the
rest: device and dtype, DDP / FSDP2 under ``torchrun``, AdamW (or Muon + AdamW) and the schedule,
gradient accumulation and clipping, evaluation, atomic checkpoints with exact
resume, the progress bar, ``metrics.jsonl`` and ``loss.png``. One step of
``fit`` is visibly three phases: ``stage.prepare(step)`` (work outside the
gradient: PPO's rollout), the micro steps' forward and backward, and the
optimizer update; tokens/s and MFU measure the last two only.

Steps are counted from 1: step ``s`` is the s-th optimizer update and uses
``lr_at(s, cfg)``; checkpoint ``step-000000s`` holds the state after it, and a
resumed run continues at ``s + 1``. Because batches are stateless in
``(seed, step, micro_step)``, restoring model, optimizer, RNG and stage states
is all that exact resumption needs: on CPU a resumed run's losses equal an
uninterrupted run's bit for bit.
"""

from __future__ import annotations

import abc
import contextlib
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Generic, Mapping, Protocol, TypeVar, cast, runtime_checkable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (OptimizerStateType, StateDictOptions, ValueType,
                                                     get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ..errors import CheckpointError, TrainingDiverged, first_line
from ..model import MoE, router_losses
from ..runs import CKPT_DIR
from .checkpoints import (latest_checkpoint, read_checkpoint, remove_partial, rng_state, seed_everything,
                          set_rng_state, tied_aliases, write_checkpoint)
from .config import TrainConfig
from .dist import DistEnv, resolve_device, shard
from .metrics import METRICS_FILE, PLOT_FILE, MetricsLog, peak_flops, plot_losses
from .optim import lr_at, make_optimizers, set_lr

__all__ = ["Stage", "TrainableModel", "Trainer", "TrainResult"]


M = TypeVar("M", bound=nn.Module)
T = TypeVar("T")


class Stage(abc.ABC, Generic[M]):
    """What a training stage gives the trainer: its data, its objective and how its result is saved.

    Required: ``name`` ("pretrain", "finetune", "sft", "rm", "dpo", "ppo": recorded in
    checkpoints), ``batch``, ``loss`` and ``save``. The other hooks do nothing unless
    a stage overrides them. ``M`` is the module the stage trains (``GPT``, ``ScalarModel``,
    ...): ``evaluate``, ``sample`` and ``save`` get it unwrapped; ``loss`` gets what the
    trainer runs (it may be wrapped by DDP or torch.compile).
    """

    plot_keys: tuple[str, ...] = ()
    """metrics drawn in extra panels of loss.png (PPO: reward, kl)"""

    @property
    @abc.abstractmethod
    def name(self) -> str: ...

    def prepare(self, step: int) -> None:
        """Work before optimizer step ``step`` that is not part of its gradient (PPO: a rollout).

        Called once per step on every rank, outside autocast and outside the
        throughput measurements; ``batch`` must not depend on it (it is prefetched).
        """

    @abc.abstractmethod
    def batch(self, step: int, micro_step: int) -> Any:
        """This rank's micro batch of step ``step`` (1-based), micro step ``0 .. grad_accum-1``.

        CPU tensors in any nesting of tuples/lists/dicts, and a pure function of the
        arguments (seed a private generator from them, never the global RNG): the
        trainer prefetches and a resumed run asks again.
        """

    @abc.abstractmethod
    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, Mapping[str, Any]]:
        """(mean loss, metrics) of a micro batch already on the device.

        Call ``model`` itself (it may be wrapped by DDP/FSDP/compile), not its
        sub-modules. Metric values are floats or 0-d tensors, averaged over micro
        steps and ranks.
        """

    @abc.abstractmethod
    def save(self, run_dir: Path, model: M) -> None:
        """Write the final model into ``run_dir``: rank 0 only, with the unsharded model."""

    def num_tokens(self, batch: Any) -> int:
        """Tokens in a micro batch, for tokens/s (default: the size of its first tensor)."""
        t = _first_tensor(batch)
        return int(t.numel()) if t is not None else 0

    def evaluate(self, model: M) -> dict[str, float]:
        """Validation metrics, e.g. ``{"val_loss"}``: every rank calls it (reduce inside) under no_grad/eval."""
        return {}

    def sample(self, model: M) -> str | None:
        """A short text sample, printed and logged (None: the stage has none); every rank calls it."""
        return None

    def state_dict(self) -> dict[str, Any] | None:
        """State kept between steps (PPO's rollout buffer), saved per rank as ``stage.pt``; None when stateless.

        Tensors and plain values only: it is read back with ``weights_only=True``.
        """
        return None

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""


@runtime_checkable
class TrainableModel(Protocol):
    """What the trainer asks of the module it trains (a ``GPT`` or a wrapper of one, see ``heads``)."""

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token, for MFU."""
        ...

    def shard_units(self) -> list[nn.Module]:
        """The sub-modules FSDP shards one by one (the transformer blocks)."""
        ...

    def empty_copy(self: T) -> T:
        """A new, unsharded module of the same class on the CPU, to load a full state dict into."""
        ...


@dataclass
class TrainResult:
    run_dir: Path
    step: int  # last completed optimizer step
    steps_run: int  # steps run by this invocation
    loss: float | None  # last logged training loss
    val_loss: float | None
    val_bpb: float | None
    ms_per_iter: float | None  # mean wall time of a training step (eval/checkpoints excluded)
    signal: int | None = None  # SIGINT/SIGTERM that stopped the run early
    checkpoint: Path | None = None


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop finishes the step, checkpoints and returns.

    A second signal of the same kind aborts at once (KeyboardInterrupt), unless it
    comes within ``repeat_window_s`` of the first: torchrun forwards the Ctrl-C
    that the terminal already sent to every worker, and that echo must not abort.
    """

    repeat_window_s = 2.0

    def __init__(self) -> None:
        self.signum: int | None = None
        self._when = 0.0
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum, self._when = signum, time.monotonic()
            tqdm.write(f"{signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
                       f"(press Ctrl-C again to abort without saving)")
        elif signum == self.signum and time.monotonic() - self._when > self.repeat_window_s:
            raise KeyboardInterrupt


Pending = tuple[int, torch.Tensor, torch.Tensor, dict[str, torch.Tensor], int]  # step, loss, norm, metrics, tokens


class Trainer(Generic[M]):
    """Runs ``stage`` on ``model`` for ``config.max_steps`` optimizer steps into ``run_dir``.

    ``model`` (a ``TrainableModel``) is built on the CPU (or already on the device)
    with the run's seed; the trainer moves it, shards/wraps/compiles it and, with
    ``resume=True``, restores the latest checkpoint of ``run_dir``. The run
    directory's config.json and tokenizer are the caller's (``stages.common.StageRun``).
    """

    def __init__(self, model: M, stage: Stage[M], config: TrainConfig, run_dir: str | Path, *,
                 env: DistEnv | None = None, resume: bool = False, progress: bool = True) -> None:
        trainable = _trainable(model)
        self.cfg, self.stage = config, stage
        self.env = env or DistEnv(device=resolve_device(config.device))
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.device = dev = self.env.device
        is_main = self.env.is_main
        ckpt = latest_checkpoint(self.run_dir) if resume else None
        if is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            remove_partial(self.run_dir)
        self.env.barrier()

        # ---- precision: bf16 autocast when asked, or by default on a CUDA device that has it
        bf16 = config.dtype == "bfloat16" or (config.dtype == "auto" and dev.type == "cuda"
                                              and torch.cuda.is_bf16_supported())
        self.amp_dtype = torch.bfloat16 if bf16 else None
        if dev.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 for fp32 matmuls (those autocast leaves)
        amp_dtype = self.amp_dtype
        self.autocast: Callable[[], ContextManager[Any]] = (
            (lambda: torch.autocast(dev.type, dtype=amp_dtype)) if amp_dtype is not None else contextlib.nullcontext)

        # ---- model, optimizer, state
        self.raw_model: M = model.to(dev)
        self.aliases = tied_aliases(self.raw_model)
        self.fsdp = config.fsdp and self.env.is_distributed
        if config.fsdp and not self.fsdp and is_main and progress:
            tqdm.write("note: --fsdp has no effect in a single process (launch with torchrun "
                       "--nproc_per_node N to shard); training unsharded")
        if self.fsdp:
            shard(self.raw_model, trainable.shard_units(), self.amp_dtype)
        self.optimizers = make_optimizers(self.raw_model, config, dev)
        self.step = 0
        self._updating = False
        self.metrics = MetricsLog(self.run_dir / METRICS_FILE, enabled=is_main)
        self.train_time = 0.0
        self.tokens_seen = 0
        self.last_val: dict[str, Any] = {}
        self.last_ckpt: Path | None = None
        seed_everything(config.seed + self.env.rank)  # dropout and anything else random in training
        if ckpt is not None:
            self._load_checkpoint(ckpt)
        elif is_main:
            self.metrics.truncate(0)  # a run with no checkpoint yet starts its metrics afresh

        # ---- wrappers: DDP (not with FSDP), then compile; raw_model stays the saved module
        self.model: nn.Module = self.raw_model
        if self.env.is_distributed and not self.fsdp:
            self.model = DistributedDataParallel(self.raw_model, device_ids=[dev.index] if dev.type == "cuda" else None)
        self.ddp = self.model if isinstance(self.model, DistributedDataParallel) else None
        if config.compile:
            self.model = torch.compile(self.model)  # type: ignore[assignment]  # typed as a plain callable

        # ---- throughput accounting
        self.flops_per_token = trainable.flops_per_token(config.block_size)
        self.peak = None
        if dev.type == "cuda":
            precision = "bf16" if self.amp_dtype is not None else (
                "tf32" if torch.get_float32_matmul_precision() != "highest" else "fp32")
            self.peak = peak_flops(torch.cuda.get_device_name(dev), precision)

    # ------------------------------------------------------------- checkpoints
    def _full_state(self) -> tuple[dict[str, torch.Tensor], OptimizerStateType]:
        """Full (unsharded) model and optimizer state dicts on the CPU, complete on rank 0."""
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full = get_model_state_dict(self.raw_model, options=opts)
        optim_sd = get_optimizer_state_dict(self.raw_model, self.optimizers, options=opts)
        # a full model state dict holds plain tensors (torch types it as any state-dict value)
        model_sd = {k: cast(torch.Tensor, v) for k, v in full.items() if k not in self.aliases}
        return model_sd, optim_sd

    def save_checkpoint(self, rng: dict[str, Any] | None = None) -> Path:
        """Write ``checkpoints/step-{step:08d}`` (all ranks call this; rank 0 writes) and prune old ones."""
        model_sd, optim_sd = self._full_state()
        rngs = self.env.gather(rng or rng_state(self.device))
        stage_state = self.stage.state_dict()
        stages = self.env.gather(stage_state) if stage_state is not None else None
        state = {"stage": self.stage.name, "step": self.step, "cursor": {"step": self.step + 1, "micro_step": 0},
                 "metrics_lines": self.metrics.lines, "lr": lr_at(self.step, self.cfg) if self.step else 0.0,
                 "world_size": self.env.world_size, "tokens_seen": self.tokens_seen,
                 "train_time_s": self.train_time, "last_val": self.last_val, "tied": self.aliases}
        final = self.run_dir / CKPT_DIR / f"step-{self.step:08d}"
        if self.env.is_main:
            final = write_checkpoint(self.run_dir, self.step, model_sd, optim_sd, rngs, stages, state,
                                     self.cfg.keep_last)
        self.env.barrier()
        self.last_ckpt = final
        return final

    def _load_checkpoint(self, ckpt: Path) -> None:
        saved = read_checkpoint(ckpt)
        model_sd: dict[str, ValueType] = dict(saved.model)
        for alias, name in self.aliases.items():
            if name in model_sd:
                model_sd[alias] = model_sd[name]
        opts = StateDictOptions(full_state_dict=True)
        try:
            set_model_state_dict(self.raw_model, model_sd, options=opts)
            set_optimizer_state_dict(self.raw_model, self.optimizers, saved.optimizer, options=opts)
        except (RuntimeError, KeyError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {ckpt} does not fit this model/optimizer ({first_line(exc)}); "
                                  f"resume with the run's own config or start a new --out") from None
        rank = self.env.rank
        state = saved.state
        try:
            if saved.stages is not None and rank < len(saved.stages):
                self.stage.load_state_dict(saved.stages[rank])
            if rank < len(saved.rngs):
                set_rng_state(saved.rngs[rank], self.device)
            else:  # resumed on more ranks than wrote it: fresh, deterministic streams
                seed_everything(self.cfg.seed + rank + 7919 * state["step"])
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
            raise CheckpointError(f"checkpoint {ckpt}: its stage or RNG state is not what gptlab writes "
                                  f"({first_line(exc)}); delete it to resume from the previous checkpoint") from None
        self.step = int(state["step"])
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.train_time = float(state.get("train_time_s", 0.0))
        self.last_val = dict(state.get("last_val") or {})
        missing = self.metrics.truncate(int(state["metrics_lines"]))
        self.last_ckpt = ckpt
        if self.env.is_main:
            tqdm.write(f"resumed from {ckpt} (step {self.step})")
            if missing:
                tqdm.write(f"warning: {self.metrics.path} lacks {missing} of the {state['metrics_lines']} lines the "
                           f"checkpoint recorded (cut or deleted by hand); the log goes on from step {self.step}")

    # --------------------------------------------------------------- the loop
    def _fetch(self, step: int, micro: int) -> Any:
        return _to_device(self.stage.batch(step, micro), self.device)

    def _next_cursor(self, step: int, micro: int) -> tuple[int, int]:
        return (step, micro + 1) if micro + 1 < self.cfg.grad_accum else (step + 1, 0)

    def forward_backward(self, step: int, batch: Any | None = None
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor], Any, int]:
        """All micro steps of optimizer step ``step``: gradients accumulate in ``.grad``.

        Returns (mean loss over micro steps (detached), mean metrics, the prefetched
        first batch of the next step, this rank's tokens). Does not touch the optimizer.
        """
        accum = self.cfg.grad_accum
        if batch is None:
            batch = self._fetch(step, 0)
        loss_sum = torch.zeros((), device=self.device)
        metric_sums: dict[str, torch.Tensor] = {}
        tokens = 0
        router_losses(self.raw_model)  # drop records of forwards outside this step's gradient
        for micro in range(accum):
            last = micro == accum - 1
            sync = self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext()
            if self.fsdp:
                self.raw_model.set_requires_gradient_sync(last)  # type: ignore[operator]  # fully_shard's class swap
            with sync:
                with self.autocast():
                    loss, metrics = self.stage.loss(self.model, batch)
                router = router_losses(self.raw_model)  # MoE: load balancing and z-loss join the objective
                objective = loss if router is None else loss + router.loss
                if router is not None:
                    metrics = {**metrics, **router.metrics}
                tokens += self.stage.num_tokens(batch)
                batch = self._fetch(*self._next_cursor(step, micro))  # overlaps the GPU's work
                (objective / accum).backward()
            loss_sum += loss.detach().float()
            for k, v in metrics.items():
                v = v.detach().float() if isinstance(v, torch.Tensor) else torch.tensor(float(v))
                metric_sums[k] = metric_sums.get(k, 0) + v.to(self.device)
        return loss_sum / accum, {k: v / accum for k, v in metric_sums.items()}, batch, tokens

    def _optimizer_step(self, step: int) -> torch.Tensor:
        set_lr(self.optimizers, step, self.cfg)
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), clip)
        if isinstance(norm, DTensor):  # under FSDP
            norm = norm.full_tensor()
        self._updating = True  # parameters are half-updated until step() returns
        for opt in self.optimizers:
            opt.step()
        self._updating = False
        self._zero_grad()
        return norm.detach().float()

    def _zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def _stop_requested(self, flag: _StopFlag) -> int | None:
        """The signal that asks to stop, agreed by all ranks (so they stop at the same step)."""
        if not self.env.is_distributed:
            return flag.signum
        t = torch.tensor([flag.signum or 0], device=self.env.collective_device())
        self.env.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item()) or None

    def _evaluate(self, do_eval: bool, do_sample: bool) -> dict[str, Any]:
        out: dict[str, Any] = {}
        was_training = self.raw_model.training
        self.raw_model.eval()
        try:
            if do_eval:
                with torch.no_grad(), self.autocast():
                    out.update({k: float(v) for k, v in self.stage.evaluate(self.raw_model).items()})
            if do_sample:
                sample = self.stage.sample(self.raw_model)
                if sample is not None:
                    out["sample"] = sample
        finally:
            self.raw_model.train(was_training)
        return out

    def fit(self) -> TrainResult:
        cfg, env = self.cfg, self.env
        is_main = env.is_main
        flag = _StopFlag()
        flag.install()
        start = self.step
        bar = tqdm(total=cfg.max_steps, initial=start, disable=not (is_main and self.progress),
                   dynamic_ncols=True, unit="step", desc=self.stage.name)
        sample_every = cfg.eval_every if cfg.sample_every is None else cfg.sample_every
        pending: list[Pending] = []
        last_loss: float | None = None
        window_time, window_tokens = 0.0, 0
        stopped_by: int | None = None
        rng_at_step_start: dict[str, Any] | None = None
        in_step = False
        step_times: list[float] = []
        self.raw_model.train()
        try:
            batch = self._fetch(self.step + 1, 0) if self.step < cfg.max_steps else None
            while self.step < cfg.max_steps:
                step = self.step + 1
                rng_at_step_start = rng_state(self.device)
                in_step = True
                t_prepare = time.perf_counter()
                self.stage.prepare(step)  # phase 1: the stage's work outside the gradient (PPO: a rollout)
                t0 = time.perf_counter()
                tokens_before = self.tokens_seen
                loss, metrics, batch, tokens = self.forward_backward(step, batch)  # phase 2: gradients
                norm = self._optimizer_step(step)  # phase 3: the update
                self.step = step
                in_step = False
                pending.append((step, loss, norm, metrics, tokens))

                final = step == cfg.max_steps
                do_eval = final or (cfg.eval_every > 0 and step % cfg.eval_every == 0)
                do_sample = final or (sample_every > 0 and step % sample_every == 0)
                do_ckpt = final or (cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0)
                stop = self._stop_requested(flag)
                do_log = step % cfg.log_every == 0 or do_eval or do_sample or do_ckpt or stop is not None

                record = self._flush(pending) if do_log else None  # syncs; raises on NaN/inf
                if do_log:
                    pending = []
                dt = time.perf_counter() - t0
                self.train_time += time.perf_counter() - t_prepare
                step_times.append(dt)
                window_time += dt
                window_tokens += self.tokens_seen - tokens_before
                bar.update(1)
                if record is not None:
                    tps = window_tokens / window_time if window_time > 0 else 0.0
                    window_time, window_tokens = 0.0, 0
                    record.update(lr=lr_at(step, cfg), tokens_per_sec=tps, tokens=self.tokens_seen,
                                  time_s=round(self.train_time, 3))
                    if self.flops_per_token and self.peak:
                        record["mfu"] = self.flops_per_token * tps / (self.peak * env.world_size)
                    last_loss = record["loss"]
                    if do_eval or do_sample:
                        ev = self._evaluate(do_eval, do_sample)
                        record.update(ev)
                        self.last_val.update({k: v for k, v in ev.items() if k != "sample"})
                        if is_main and self.progress:
                            vals = ", ".join(f"{k} {v:.4f}" for k, v in ev.items() if isinstance(v, float))
                            if vals:
                                tqdm.write(f"step {step}: train loss {record['loss']:.4f}, {vals}")
                            if ev.get("sample"):
                                tqdm.write(f"--- sample at step {step} ---\n{ev['sample']}\n---")
                    self.metrics.append(record)
                    post = f"loss {record['loss']:.4f} lr {record['lr']:.2e} {tps:,.0f} tok/s"
                    if "mfu" in record:
                        post += f" mfu {100 * record['mfu']:.1f}%"
                    bar.set_postfix_str(post, refresh=False)
                    if is_main and do_eval:
                        self._plot()
                if do_ckpt or stop is not None:
                    self.save_checkpoint()
                if stop is not None:
                    stopped_by = stop
                    break
        except KeyboardInterrupt:
            # Raised without our handler (second Ctrl-C, or from inside a stage): save the last
            # completed step unless the user asked to abort, or ranks could disagree.
            if flag.signum is None and not env.is_distributed and self.step > 0 and not self._updating:
                self._zero_grad()
                try:
                    self._flush(pending)  # never checkpoint a diverged state
                except TrainingDiverged:
                    raise KeyboardInterrupt from None
                # mid-step: the model is still at the last completed step; so must the RNG be
                self.save_checkpoint(rng=rng_at_step_start if in_step else None)
                if is_main:
                    tqdm.write(f"interrupted: checkpoint {self.last_ckpt} saved; continue with --resume")
            raise
        finally:
            bar.close()
            flag.restore()

        self._save_final()
        if is_main:
            self._plot()
        steps_run = self.step - start
        ms = None
        if step_times:
            steady = step_times[1:] if len(step_times) > 1 else step_times  # the first step warms up
            ms = 1000.0 * sum(steady) / len(steady)
        result = TrainResult(run_dir=self.run_dir, step=self.step, steps_run=steps_run, loss=last_loss,
                             val_loss=self.last_val.get("val_loss"), val_bpb=self.last_val.get("val_bpb"),
                             ms_per_iter=ms, signal=stopped_by, checkpoint=self.last_ckpt)
        if is_main and self.progress:
            tqdm.write(_summary(result, cfg.max_steps))
            tqdm.write(f"saved {self.run_dir}")
        return result

    def _plot(self) -> None:
        moe = any(isinstance(m, MoE) for m in self.raw_model.modules())
        plot_losses(self.metrics.records, self.run_dir / PLOT_FILE, title=f"{self.run_dir.name} ({self.stage.name})",
                    extra_keys=(*self.stage.plot_keys, *(("moe_load_*", "moe_balance") if moe else ())))

    def _flush(self, pending: list[Pending]) -> dict[str, Any] | None:
        """Reduce the pending steps' losses, metrics and tokens across ranks (one sync), check them, count the
        tokens, return the last step's record. Tokens are summed, not multiplied by the world size: ranks'
        batches of variable-length sequences hold different numbers of tokens."""
        if not pending:
            return None
        losses = torch.stack([p[1] for p in pending])
        norms = torch.stack([p[2] for p in pending])
        names = sorted(pending[-1][3])
        last_metrics = torch.stack([pending[-1][3][k] for k in names]) if names else torch.zeros(0, device=self.device)
        tokens = torch.tensor([float(sum(p[4] for p in pending))], dtype=torch.float64, device=losses.device)
        packed = torch.cat([losses.double(), last_metrics.double().to(losses.device), tokens])
        packed = packed.to(self.env.collective_device())
        self.env.all_reduce(packed)
        self.tokens_seen += int(packed[-1].item())
        packed = packed[:-1] / self.env.world_size
        values = packed.tolist()
        loss_values = values[: len(pending)]
        norm_values = norms.tolist()
        for (step, *_), lv, nv in zip(pending, loss_values, norm_values):
            if not (math.isfinite(lv) and math.isfinite(nv)):
                what = f"loss is {lv}" if not math.isfinite(lv) else f"gradient norm is {nv}"
                good = latest_checkpoint(self.run_dir)
                keep = (f"the last good checkpoint is {good}" if good is not None
                        else "no checkpoint was saved yet")
                raise TrainingDiverged(f"training diverged at step {step}: {what} (lr {lr_at(step, self.cfg):.3g}); "
                                       f"{keep}; lower --lr or raise --warmup-steps and --resume")
        step = pending[-1][0]
        record: dict[str, Any] = {"step": step, "loss": loss_values[-1], "grad_norm": norm_values[-1]}
        record.update(zip(names, values[len(pending):]))
        return record

    def _save_final(self) -> None:
        """The stage writes the final model (rank 0); under FSDP from an unsharded copy of the full state."""
        model = self.raw_model
        if self.fsdp:
            sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if self.env.is_main:
                model = cast(M, _trainable(model).empty_copy())  # empty_copy: a new module of model's class
                model.load_state_dict(sd)
        if self.env.is_main:
            self.stage.save(self.run_dir, model)
        self.env.barrier()


def _trainable(model: nn.Module) -> TrainableModel:
    # takes an nn.Module, not an M: mypy wrongly deems isinstance(<type variable>, <protocol>) never true
    if not isinstance(model, TrainableModel):
        raise TypeError(f"{type(model).__name__} cannot be trained: it needs flops_per_token, shard_units "
                        f"and empty_copy (see gptlab.train.loop.TrainableModel)")
    return model


def _summary(result: TrainResult, max_steps: int) -> str:
    msg = f"step {result.step}/{max_steps}"
    if result.loss is not None:
        msg += f": train loss {result.loss:.4f}"
    if result.val_loss is not None:
        msg += f", val loss {result.val_loss:.4f}"
    if result.val_bpb is not None:
        msg += f", val bpb {result.val_bpb:.4f}"
    if result.ms_per_iter is not None:
        msg += f"; {result.ms_per_iter:.1f} ms/iter over {result.steps_run} steps"
    if result.signal is not None:
        msg += f"; stopped by {signal.Signals(result.signal).name}, resume with --resume"
    return msg


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        if device.type == "cuda":
            return batch.pin_memory().to(device, non_blocking=True)
        return batch.to(device)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _first_tensor(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, torch.Tensor):
        return batch
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else []
    for b in items:
        t = _first_tensor(b)
        if t is not None:
            return t
    return None
