"""The shared training loop: one trainer for every stage (pretrain, finetune, sft, rm, dpo).

A stage supplies the objective and the data; the trainer owns everything else:
device and dtype, DDP / FSDP2 under ``torchrun``, AdamW with decay only on
matrices, linear warmup + cosine decay, gradient accumulation and clipping,
evaluation, atomic checkpoints with exact resume, the progress bar,
``metrics.jsonl`` and ``loss.png``.

    env = setup_distributed("auto")
    stage = PretrainStage(data, batch_size=12, block_size=64, seed=1337,
                          rank=env.rank, world_size=env.world_size)
    result = Trainer(model, stage, TrainConfig(max_steps=2000), "runs/x", env=env).fit()

The stage protocol (see ``Stage``) is two methods: ``batch(step, micro_step)``
returns this rank's micro batch as a pure function of its arguments (the
trainer may ask for it ahead of time, and a resumed run asks again), and
``loss(model, batch)`` returns ``(mean loss, metrics)``. Optional hooks:
``evaluate(model) -> dict``, ``sample(model) -> str``, ``num_tokens(batch)``
and ``save(run_dir, model)``.

Steps are counted from 1: step ``s`` is the s-th optimizer update and uses
``lr_at(s, cfg)``; checkpoint ``step-000000s`` holds the state after it, and a
resumed run continues at ``s + 1``. Because batches are stateless in
``(seed, step, micro_step)``, restoring model, optimizer and RNG states is all
that exact resumption needs: on CPU a resumed run's losses equal an
uninterrupted run's bit for bit.

Checkpoint layout (``RUN_DIR/checkpoints/step-00000250/``): ``model.safetensors``
(full state dict; a tied weight is stored once under its first name),
``optimizer.pt`` (the full, name-keyed AdamW state; tensors and plain values
only, read back with ``torch.load(weights_only=True)``), ``rng.pt`` (python,
numpy, torch and CUDA generator states for every rank), ``trainer_state.json``
(step, data cursor, metrics line count, schedule) and ``manifest.json`` (the
sha256 of every file, checked on resume). The directory is written under a
temporary name and renamed, so a checkpoint either exists whole or not at all.
Under DDP or FSDP the full state is gathered first, so checkpoints have the
same format whatever the number of processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import random
import re
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm.auto import tqdm

from .atomic import atomic_write_bytes, atomic_write_json, fsync_dir, sha256_file
from .checkpoint import save_model
from .config import GPTConfig
from .errors import CheckpointError, ConfigError, UserError

__all__ = [
    "TrainConfig", "Stage", "Trainer", "TrainResult", "TrainingDiverged", "DistEnv",
    "setup_distributed", "teardown_distributed", "distributed", "lr_at", "param_groups", "make_optimizer",
    "load_config_file", "build_model_config", "epoch_config", "peak_flops", "latest_checkpoint",
    "checkpoint_dirs", "verify_checkpoint", "read_metrics", "plot_losses", "check_run_dir",
]


class TrainingDiverged(UserError):
    """The loss or gradient norm became NaN/inf; the last good checkpoint is kept."""


# ===================================================================== config
DTYPES = ("auto", "float32", "bfloat16")


@dataclass
class TrainConfig:
    """Everything about a training run that is not the model's shape.

    ``batch_size`` is the micro batch of one rank; one optimizer step sees
    ``batch_size * grad_accum * world_size`` sequences. Intervals of 0 disable
    the periodic action (evaluation, checkpoint and sample still happen at the
    end of the run).
    """

    max_steps: int = 1000
    batch_size: int = 12
    block_size: int | None = None  # None: the model's context
    grad_accum: int = 1
    lr: float = 6e-4
    min_lr: float = 6e-5  # floor of the cosine decay
    warmup_steps: int = 100
    lr_decay_steps: int | None = None  # None: max_steps
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0: no clipping
    dropout: float | None = None  # None: the model config's
    seed: int = 1337
    eval_every: int = 250
    eval_batches: int = 20
    checkpoint_every: int = 250
    keep_last: int = 3
    sample_every: int | None = None  # None: at every evaluation
    sample_tokens: int = 64
    sample_prompt: str = "\n"
    sample_temperature: float = 0.8  # 0: greedy
    log_every: int = 1
    compile: bool = False
    fsdp: bool = False
    device: str = "auto"  # auto: cuda:LOCAL_RANK when available, else cpu
    dtype: str = "auto"  # auto: bf16 autocast on CUDA when supported, fp32 otherwise

    def __post_init__(self) -> None:
        self.validate()

    @property
    def decay_steps(self) -> int:
        return self.max_steps if self.lr_decay_steps is None else self.lr_decay_steps

    def validate(self, source: str = "train config") -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(f"{source}: {msg}")

        for key in ("max_steps", "batch_size", "grad_accum", "keep_last", "log_every"):
            need(getattr(self, key) >= 1, f"{key}={getattr(self, key)!r} must be >= 1")
        for key in ("warmup_steps", "eval_every", "eval_batches", "checkpoint_every", "sample_tokens"):
            need(getattr(self, key) >= 0, f"{key}={getattr(self, key)!r} must be >= 0")
        need(self.block_size is None or self.block_size >= 1, f"block_size={self.block_size!r} must be >= 1")
        need(self.lr > 0, f"lr={self.lr!r} must be > 0")
        need(0 <= self.min_lr <= self.lr, f"min_lr={self.min_lr!r} must be in [0, lr={self.lr}]")
        need(self.lr_decay_steps is None or self.lr_decay_steps >= 1,
             f"lr_decay_steps={self.lr_decay_steps!r} must be >= 1")
        need(self.weight_decay >= 0, f"weight_decay={self.weight_decay!r} must be >= 0")
        need(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, f"beta1, beta2 = {self.beta1}, {self.beta2} must be in [0, 1)")
        need(self.grad_clip >= 0, f"grad_clip={self.grad_clip!r} must be >= 0 (0 disables clipping)")
        need(self.dropout is None or 0 <= self.dropout < 1, f"dropout={self.dropout!r} must be in [0, 1)")
        need(self.sample_every is None or self.sample_every >= 0, f"sample_every={self.sample_every!r} must be >= 0")
        need(self.sample_temperature >= 0, f"sample_temperature={self.sample_temperature!r} must be >= 0")
        need(self.dtype in DTYPES, f"dtype={self.dtype!r} must be one of {', '.join(DTYPES)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "train config") -> "TrainConfig":
        """Build from a mapping, naming ``source`` and the key on an unknown key or a wrong type."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ConfigError(f"{source}: unknown train field(s) {', '.join(unknown)}; "
                              f"known fields: {', '.join(fields)}")
        values = {key: _coerce(key, value, str(fields[key].type), source) for key, value in data.items()}
        obj = cls.__new__(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else None
            setattr(obj, f.name, values.get(f.name, default))
        obj.validate(source)
        return obj

    def replace(self, **changes: Any) -> "TrainConfig":
        return TrainConfig.from_dict({**self.to_dict(), **changes})


def _coerce(key: str, value: Any, annotation: str, source: str) -> Any:
    """Check ``value`` against a field annotation such as ``"int | None"``."""
    kinds = {k.strip() for k in annotation.split("|")}
    if value is None and "None" in kinds:
        return None
    if "bool" in kinds and isinstance(value, bool):
        return value
    if "int" in kinds and isinstance(value, int) and not isinstance(value, bool):
        return value
    if "float" in kinds:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            with contextlib.suppress(ValueError):
                return float(value)
    if "str" in kinds and isinstance(value, str):
        return value
    raise ConfigError(f"{source}: field {key}={value!r} should be of type {annotation}")


CONFIG_SECTIONS = ("model", "train")


def load_config_file(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """Read a YAML or JSON run config with sections ``model:`` and ``train:``.

    Returns ``{"model": {...}, "train": {...}}`` (missing sections are empty).
    The model section holds GPTConfig fields and/or ``preset: NAME``. Unknown
    sections, unknown keys and wrong types raise ``ConfigError`` naming the file.
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    text = p.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{p}: cannot parse: {first}") from None
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping with sections {', '.join(CONFIG_SECTIONS)}")
    unknown = sorted(set(data) - set(CONFIG_SECTIONS))
    if unknown:
        raise ConfigError(f"{p}: unknown section(s) {', '.join(map(str, unknown))}; "
                          f"known sections: {', '.join(CONFIG_SECTIONS)}")
    out: dict[str, dict[str, Any]] = {}
    for section in CONFIG_SECTIONS:
        value = data.get(section) or {}
        if not isinstance(value, dict):
            raise ConfigError(f"{p}: section {section} must be a mapping of field: value")
        out[section] = dict(value)
    _check_model_keys(out["model"], f"{p}: model")
    TrainConfig.from_dict(out["train"], source=f"{p}: train")  # type-check now, with the file's name
    return out


def epoch_config(out_dir: str | os.PathLike[str], n_items: int, overrides: Mapping[str, Any] | None,
                 defaults: Mapping[str, Any], epochs: float, *, resume: bool = False,
                 source: str = "flags") -> tuple[TrainConfig, dict[str, Any]]:
    """The train config of an epoch-based stage run, and the run's saved config.json (``{}`` when fresh).

    defaults < (resume: the run's saved ``train`` section) < the non-None ``overrides``.
    A fresh run derives what is not given: ``max_steps`` = ``epochs`` passes over
    ``n_items`` at the global batch (``batch_size * grad_accum * $WORLD_SIZE``),
    ``warmup_steps`` = 10% of it, ``eval_every`` = ``checkpoint_every`` = a tenth of it.
    """
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    path = Path(out_dir) / CONFIG_FILE
    if resume and path.is_file():
        from .checkpoint import read_run_config

        saved = read_run_config(out_dir)
        return TrainConfig.from_dict({**(saved.get("train") or {}), **given}, source=f"{path}: train"), saved
    cfg = {**defaults, **given}
    per_step = cfg["batch_size"] * cfg.get("grad_accum", 1) * int(os.environ.get("WORLD_SIZE", "1"))
    cfg.setdefault("max_steps", max(1, math.ceil(epochs * n_items / per_step)))
    cfg.setdefault("warmup_steps", math.ceil(0.1 * cfg["max_steps"]))
    every = max(1, math.ceil(cfg["max_steps"] / 10))
    cfg.setdefault("eval_every", every)
    cfg.setdefault("checkpoint_every", every)
    return TrainConfig.from_dict(cfg, source=source), {}


def _check_model_keys(section: Mapping[str, Any], source: str) -> None:
    known = [f.name for f in dataclasses.fields(GPTConfig)] + ["preset"]
    unknown = sorted(set(section) - set(known))
    if unknown:
        raise ConfigError(f"{source}: unknown model field(s) {', '.join(map(str, unknown))}; "
                          f"known fields: {', '.join(known)}")


def build_model_config(model_section: Mapping[str, Any], vocab_size: int, train: TrainConfig,
                       source: str = "model config") -> GPTConfig:
    """The model config for a run: preset, then the section's fields, then the run's overrides.

    ``vocab_size`` always comes from the data's tokenizer (a section that names a
    different one is an error); ``train.block_size`` and ``train.dropout``
    override the preset's when set.
    """
    section = dict(model_section)
    _check_model_keys(section, source)
    preset = section.pop("preset", None)
    if "vocab_size" in section and section["vocab_size"] != vocab_size:
        raise ConfigError(f"{source}: vocab_size={section['vocab_size']} differs from the data's "
                          f"tokenizer ({vocab_size}); remove vocab_size, it comes from the data")
    section["vocab_size"] = vocab_size
    if train.block_size is not None:
        section["block_size"] = train.block_size
    if train.dropout is not None:
        section["dropout"] = train.dropout
    if preset is not None:
        if not isinstance(preset, str):
            raise ConfigError(f"{source}: preset={preset!r} should be a preset name")
        return GPTConfig.from_preset(preset, **section)
    return GPTConfig.from_dict(section, source=source)


# =================================================================== schedule
def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (1-based): linear warmup, cosine decay, floor.

    ``lr * step / warmup_steps`` up to ``warmup_steps`` (so the peak is reached
    exactly at the end of warmup), then a half cosine from ``lr`` down to
    ``min_lr`` at ``decay_steps``, and ``min_lr`` after that.
    """
    lr, floor, warmup, decay = cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.decay_steps
    if step <= warmup:
        return lr * step / warmup
    if step >= decay:
        return floor
    progress = (step - warmup) / (decay - warmup)
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - floor)


# ================================================================== optimizer
def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on matrices and embeddings (dim >= 2), none on biases and LayerNorm."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():  # a tied weight appears once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW, fused (one kernel for all parameters: 5x faster than foreach on CPU) unless the
    parameters are FSDP-sharded DTensors on the CPU, which the fused kernel does not take."""
    from torch.distributed.tensor import DTensor

    sharded = any(isinstance(p, DTensor) for p in model.parameters())
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                             betas=(cfg.beta1, cfg.beta2), eps=1e-8,
                             fused=True if device.type == "cuda" or not sharded else None)


# ================================================================ distributed
@dataclass
class DistEnv:
    """Where this process sits: rank, world size and device (world_size 1 = no process group)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # whether setup_distributed created the process group

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(spec: str = "auto", local_rank: int = 0) -> torch.device:
    spec = spec or "auto"
    if spec == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"device={spec!r} is not a device: use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device={spec!r} but CUDA is not available in this torch build/machine: use --device cpu")
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("device='mps' but MPS is not available: use --device cpu")
    return dev


def setup_distributed(device: str = "auto") -> DistEnv:
    """Join the process group when launched by ``torchrun`` (RANK/WORLD_SIZE/LOCAL_RANK set).

    NCCL on CUDA, gloo on CPU. A plain ``python`` launch is a world of one.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or "RANK" not in os.environ:
        return DistEnv(device=resolve_device(device))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local)
    owns = False
    if not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
            dist.init_process_group("nccl", device_id=dev)
        else:
            dist.init_process_group("gloo")
        owns = True
    return DistEnv(rank=rank, local_rank=local, world_size=world, device=dev, owns_group=owns)


def teardown_distributed(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed(env: DistEnv | None, device: str = "auto") -> Iterator[DistEnv]:
    """``env`` as given, or this process's place under torchrun for the duration of a stage run."""
    if env is not None:
        yield env
        return
    env = setup_distributed(device)
    try:
        yield env
    finally:
        teardown_distributed(env)


# ======================================================================= MFU
# Dense (no 2:4 sparsity) peak tensor-core throughput per GPU in FLOP/s, from
# NVIDIA's datasheets. "bf16" is the autocast rate (FP32 accumulate), "tf32"
# applies to fp32 training with TF32 matmuls enabled, "fp32" to true fp32.
# Matched in order against torch.cuda.get_device_name() (lower-cased); an
# unknown device has no MFU rather than a guessed one.
PEAK_FLOPS: list[tuple[str, str, dict[str, float]]] = [
    (r"h100.*pcie", "H100 PCIe", {"bf16": 756e12, "tf32": 378e12, "fp32": 51e12}),
    (r"h100.*nvl", "H100 NVL", {"bf16": 835e12, "tf32": 418e12, "fp32": 60e12}),
    (r"h100|gh200", "H100 SXM / GH200", {"bf16": 989e12, "tf32": 495e12, "fp32": 67e12}),
    (r"h200.*nvl", "H200 NVL", {"bf16": 835e12, "tf32": 418e12, "fp32": 60e12}),
    (r"h200", "H200 SXM", {"bf16": 989e12, "tf32": 495e12, "fp32": 67e12}),
    (r"a100", "A100", {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    (r"l40s", "L40S", {"bf16": 362e12, "tf32": 183e12, "fp32": 91.6e12}),
    (r"\bl4\b", "L4", {"bf16": 121e12, "tf32": 60e12, "fp32": 30.3e12}),
    (r"\ba10\b", "A10", {"bf16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12}),
    (r"rtx 4090", "RTX 4090", {"bf16": 165e12, "tf32": 82.6e12, "fp32": 82.6e12}),
    (r"rtx 3090", "RTX 3090", {"bf16": 71e12, "tf32": 35.6e12, "fp32": 35.6e12}),
    (r"v100", "V100", {"fp32": 15.7e12}),
]


def peak_flops(device_name: str, precision: str) -> float | None:
    """Peak FLOP/s of one GPU called ``device_name`` at ``precision`` (bf16/tf32/fp32), or None."""
    name = device_name.lower()
    for pattern, _, table in PEAK_FLOPS:
        if re.search(pattern, name):
            return table.get(precision)
    return None


# ================================================================ checkpoints
CKPT_DIR = "checkpoints"
CKPT_RE = re.compile(r"^step-(\d{8})$")
MANIFEST = "manifest.json"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
CONFIG_FILE = "config.json"


def checkpoint_dirs(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def verify_checkpoint(ckpt: str | os.PathLike[str]) -> dict[str, Any]:
    """Check every file of a checkpoint against its manifest; returns the manifest.

    Raises ``CheckpointError`` naming the missing, truncated or corrupted file.
    """
    ckpt = Path(ckpt)
    hint = (f"delete {ckpt} to resume from the previous checkpoint "
            f"(or start a new run with a new --out)")
    mpath = ckpt / MANIFEST
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(f"checkpoint {ckpt} has no readable {MANIFEST}: {hint}") from None
    for name, info in files.items():
        path = ckpt / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path} is missing: {hint}")
        size = path.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(f"checkpoint file {path} is truncated or corrupted "
                                  f"({size} bytes, expected {info['bytes']}): {hint}")
        if sha256_file(path) != info["sha256"]:
            raise CheckpointError(f"checkpoint file {path} is corrupted (sha256 mismatch): {hint}")
    return manifest


def _tied_aliases(model: nn.Module) -> dict[str, str]:
    """Parameter names that alias an earlier one (tied weights): alias -> first name."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def _rng_state(device: torch.device) -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# ==================================================================== metrics
class MetricsLog:
    """``metrics.jsonl``: one JSON object per logged step, appended and flushed line by line."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.enabled = enabled
        self.records: list[dict[str, Any]] = read_metrics(path) if enabled and path.exists() else []

    @property
    def lines(self) -> int:
        return len(self.records)

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` complete lines (drops lines a killed run wrote after its checkpoint)."""
        if not self.enabled:
            return
        kept = self.records[:n]
        text = "".join(json.dumps(r) + "\n" for r in kept)
        atomic_write_bytes(self.path, text.encode("utf-8"))
        self.records = kept

    def append(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
        self.records.append(record)


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The complete lines of a metrics.jsonl (a partial last line from a killed run is ignored)."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.endswith("\n"):
                break
            try:
                out.append(json.loads(line))
            except ValueError:
                break
    return out


def plot_losses(records: list[dict[str, Any]], path: str | os.PathLike[str], title: str = "",
                extra_keys: Sequence[str] = ()) -> None:
    """Write the train/val loss curve, and one panel per ``extra_keys`` metric, as a PNG (atomically).

    Agg backend, no pyplot global state. An extra key's ``val_`` twin, when
    logged, is drawn in the same panel.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = 1 + len(extra_keys)
    fig = Figure(figsize=(7, 4.2 + 2.6 * (panels - 1)), dpi=110)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(panels, 1, i + 1) for i in range(panels)]

    def series(key: str) -> list[tuple[int, float]]:
        return [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]

    for ax, key in zip(axes, ["loss", *extra_keys]):
        train, val = series(key), series(f"val_{key}")
        if train:
            ax.plot(*zip(*train), label="train", linewidth=1.0, alpha=0.8)
        if val:
            ax.plot(*zip(*val), "o-", label="val", markersize=3)
        ax.set_ylabel(key if key != "loss" or extra_keys else "loss (nats/token)")
        ax.grid(alpha=0.3)
        if train or val:
            ax.legend()
    axes[-1].set_xlabel("step")
    if title:
        axes[0].set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(Path(path), buf.getvalue())


# ====================================================================== stage
@runtime_checkable
class Stage(Protocol):
    """What a training stage gives the trainer.

    Required:
      - ``name``: "pretrain", "finetune", "sft", "rm", "dpo" ... (recorded in checkpoints)
      - ``batch(step, micro_step)``: this rank's micro batch for optimizer step
        ``step`` (1-based) and micro step ``0 .. grad_accum-1``: tensors on the
        CPU (any nesting of tuples/lists/dicts), a pure function of its arguments
        (seed a private generator from them; never use the global RNG), because
        the trainer prefetches and a resumed run asks again.
      - ``loss(model, batch)``: ``(mean loss tensor, metrics)`` for a micro batch
        already moved to the device. Call ``model`` itself (it may be wrapped in
        DDP/FSDP/compile), not its sub-modules. Metrics values are floats or
        0-d tensors; they are averaged over micro steps and ranks and logged.

    Optional (looked up with getattr):
      - ``evaluate(model) -> dict[str, float]``: e.g. ``{"val_loss", "val_bpb"}``;
        called on every rank (reduce across ranks inside) under no_grad/eval/autocast.
      - ``sample(model) -> str``: a short text sample, printed and logged; every rank calls it.
      - ``num_tokens(batch) -> int``: tokens in a micro batch, for tokens/s (default:
        numel of the first tensor).
      - ``state_dict() -> dict`` / ``load_state_dict(state)``: state a stage keeps between
        steps (PPO's rollout buffer), saved per rank in the checkpoint as ``stage.pt``
        (tensors and plain values only: it is read back with ``weights_only=True``).
      - ``plot_keys``: metric names drawn in extra panels of ``loss.png`` (PPO: reward, kl).
      - ``save(run_dir, model)``: write the final model (default for a ``GPT``:
        ``checkpoint.save_model(run_dir, model, stage=name)``). Rank 0 only, with
        an unsharded model on the CPU or the training device.
    """

    name: str

    def batch(self, step: int, micro_step: int) -> Any: ...

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]: ...


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


# =============================================================== run dir rules
def check_run_dir(run_dir: str | os.PathLike[str], resume: bool) -> bool:
    """Whether ``run_dir`` holds a run to resume; a started run without ``resume`` is an error."""
    run = Path(run_dir)
    started = (run / CONFIG_FILE).exists() or (run / CKPT_DIR).exists()
    if started and not resume:
        raise UserError(f"run directory {run} already holds a run: use --resume to continue it "
                        f"or a new --out")
    return started


# ==================================================================== trainer
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


class Trainer:
    """Runs ``stage`` on ``model`` for ``config.max_steps`` optimizer steps into ``run_dir``.

    ``model`` is the module being trained, built on the CPU (or already on the
    device) with the run's seed; the trainer moves it, shards/wraps/compiles it
    and, with ``resume=True``, restores the latest checkpoint of ``run_dir``.
    ``run_config`` (a JSON-able dict) is written to ``RUN_DIR/config.json`` when
    a run starts; ``final_save`` overrides how the final model is written.
    """

    def __init__(self, model: nn.Module, stage: Stage, config: TrainConfig, run_dir: str | os.PathLike[str], *,
                 env: DistEnv | None = None, resume: bool = False, run_config: dict[str, Any] | None = None,
                 progress: bool = True) -> None:
        self.cfg = config
        self.stage = stage
        self.env = env or DistEnv(device=resolve_device(config.device))
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.device = self.env.device
        is_main = self.env.is_main

        resume = check_run_dir(self.run_dir, resume) and resume
        ckpt = latest_checkpoint(self.run_dir) if resume else None
        self._barrier()  # every rank has looked before rank 0 writes config.json
        if is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            for tmp in (self.run_dir / CKPT_DIR).glob(".tmp-*") if (self.run_dir / CKPT_DIR).is_dir() else []:
                shutil.rmtree(tmp, ignore_errors=True)  # a checkpoint write that never finished
            if run_config is not None and not (resume and (self.run_dir / CONFIG_FILE).exists()):
                atomic_write_json(self.run_dir / CONFIG_FILE, run_config)
        self._barrier()

        # ---- precision: bf16 autocast when asked, or by default on a CUDA device that has it
        dev = self.device
        bf16 = config.dtype == "bfloat16" or (config.dtype == "auto" and dev.type == "cuda"
                                              and torch.cuda.is_bf16_supported())
        self.amp_dtype = torch.bfloat16 if bf16 else None
        if dev.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 for fp32 matmuls (those autocast leaves)
        self.autocast = (lambda: torch.autocast(dev.type, dtype=self.amp_dtype)) if self.amp_dtype \
            else contextlib.nullcontext

        # ---- model, optimizer, state
        self.raw_model = model.to(dev)
        self.aliases = _tied_aliases(self.raw_model)
        self.fsdp = config.fsdp and self.env.is_distributed
        if config.fsdp and not self.fsdp and is_main and progress:
            tqdm.write("note: --fsdp has no effect in a single process (launch with torchrun "
                       "--nproc_per_node N to shard); training unsharded")
        if self.fsdp:
            self._shard(self.raw_model)
        self.optimizer = make_optimizer(self.raw_model, config, dev)
        self.step = 0
        self._updating = False
        self.metrics = MetricsLog(self.run_dir / METRICS_FILE, enabled=is_main)
        self.train_time = 0.0
        self.tokens_seen = 0
        self.last_val: dict[str, Any] = {}
        self.last_ckpt: Path | None = None
        _seed_everything(config.seed + self.env.rank)  # dropout and anything else random in training
        if ckpt is not None:
            self._load_checkpoint(ckpt)
        elif is_main:
            self.metrics.truncate(0)  # a run with no checkpoint yet starts its metrics afresh

        # ---- wrappers: DDP (not with FSDP), then compile; raw_model stays the saved module
        self.model: nn.Module = self.raw_model
        if self.env.is_distributed and not self.fsdp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(self.raw_model, device_ids=[dev.index] if dev.type == "cuda" else None)
        if config.compile:
            self.model = torch.compile(self.model)

        # ---- throughput accounting
        flops = getattr(self.raw_model, "flops_per_token", None)
        block = config.block_size or getattr(getattr(self.raw_model, "config", None), "block_size", None)
        self.flops_per_token = flops(block) if callable(flops) else None
        self.peak = None
        if dev.type == "cuda":
            precision = "bf16" if self.amp_dtype is not None else (
                "tf32" if torch.get_float32_matmul_precision() != "highest" else "fp32")
            self.peak = peak_flops(torch.cuda.get_device_name(dev), precision)

    # ------------------------------------------------------------ distributed
    def _shard(self, model: nn.Module) -> None:
        """FSDP2: shard each transformer block, then the root (embeddings, final norm, head)."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=self.amp_dtype, reduce_dtype=torch.float32) \
            if self.amp_dtype is not None else MixedPrecisionPolicy()
        blocks = getattr(model, "h", None)
        if blocks is None and hasattr(model, "gpt"):
            blocks = getattr(model.gpt, "h", None)
        for block in blocks or []:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)

    def _barrier(self) -> None:
        if self.env.is_distributed:
            dist.barrier()

    def _all_reduce(self, t: torch.Tensor, op: Any = None) -> torch.Tensor:
        if self.env.is_distributed:
            dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
        return t

    # ------------------------------------------------------------- checkpoints
    def _full_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Full (unsharded) model and optimizer state dicts on the CPU, complete on rank 0."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd = get_model_state_dict(self.raw_model, options=opts)
        optim_sd = get_optimizer_state_dict(self.raw_model, self.optimizer, options=opts)
        model_sd = {k: v for k, v in model_sd.items() if k not in self.aliases}
        return model_sd, optim_sd

    def _gather_rng(self, rng: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        return self._gather_object(rng or _rng_state(self.device))

    def _gather_object(self, mine: Any) -> list[Any]:
        """Every rank's ``mine``, indexed by rank (a one-element list in a single process)."""
        if not self.env.is_distributed:
            return [mine]
        everyone: list[Any] = [None] * self.env.world_size
        dist.all_gather_object(everyone, mine)
        return everyone

    def save_checkpoint(self, rng: dict[str, Any] | None = None) -> Path:
        """Write ``checkpoints/step-{step:08d}`` (all ranks call this; rank 0 writes) and prune old ones."""
        from safetensors.torch import save_file

        final = self.run_dir / CKPT_DIR / f"step-{self.step:08d}"
        model_sd, optim_sd = self._full_state()
        rngs = self._gather_rng(rng)
        stage_state = getattr(self.stage, "state_dict", None)
        stage_states = self._gather_object(stage_state()) if callable(stage_state) else None
        if self.env.is_main and not final.exists():
            tmp = self.run_dir / CKPT_DIR / f".tmp-step-{self.step:08d}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_file({k: v.contiguous() for k, v in model_sd.items()}, str(tmp / "model.safetensors"),
                      metadata={"format": "pt", "step": str(self.step)})
            torch.save(optim_sd, tmp / "optimizer.pt")
            torch.save(rngs, tmp / "rng.pt")
            if stage_states is not None:
                torch.save(stage_states, tmp / "stage.pt")
            state = {
                "format": 1, "stage": getattr(self.stage, "name", "unknown"), "step": self.step,
                "cursor": {"step": self.step + 1, "micro_step": 0},
                "metrics_lines": self.metrics.lines, "lr": lr_at(self.step, self.cfg) if self.step else 0.0,
                "world_size": self.env.world_size, "tokens_seen": self.tokens_seen,
                "train_time_s": self.train_time, "last_val": self.last_val,
                "tied": self.aliases,
            }
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
            files = {}
            for path in sorted(tmp.iterdir()):
                with open(path, "rb") as fh:
                    os.fsync(fh.fileno())
                files[path.name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
            (tmp / MANIFEST).write_text(json.dumps({"step": self.step, "files": files}, indent=2) + "\n",
                                        encoding="utf-8")
            with open(tmp / MANIFEST, "rb") as fh:
                os.fsync(fh.fileno())
            fsync_dir(tmp)
            os.replace(tmp, final)
            fsync_dir(final.parent)
            for old in checkpoint_dirs(self.run_dir)[:-self.cfg.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        self._barrier()
        self.last_ckpt = final
        return final

    def _load_checkpoint(self, ckpt: Path) -> None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        verify_checkpoint(ckpt)
        try:
            state = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
            model_sd = load_file(str(ckpt / "model.safetensors"))
            optim_sd = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
            rngs = torch.load(ckpt / "rng.pt", map_location="cpu", weights_only=True)
            stage_states = (torch.load(ckpt / "stage.pt", map_location="cpu", weights_only=True)
                            if (ckpt / "stage.pt").is_file() else None)
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
            raise CheckpointError(f"cannot read checkpoint {ckpt}: {exc}; delete it to resume from "
                                  f"the previous checkpoint") from None
        for alias, name in self.aliases.items():
            if name in model_sd:
                model_sd[alias] = model_sd[name]
        opts = StateDictOptions(full_state_dict=True)
        try:
            set_model_state_dict(self.raw_model, model_sd, options=opts)
            set_optimizer_state_dict(self.raw_model, self.optimizer, optim_sd, options=opts)
        except (RuntimeError, KeyError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"checkpoint {ckpt} does not fit this model/optimizer ({first}); "
                                  f"resume with the run's own config or start a new --out") from None
        load_stage = getattr(self.stage, "load_state_dict", None)
        if callable(load_stage) and stage_states is not None and self.env.rank < len(stage_states):
            load_stage(stage_states[self.env.rank])
        if self.env.rank < len(rngs):
            _set_rng_state(rngs[self.env.rank], self.device)
        else:  # resumed on more ranks than wrote it: fresh, deterministic streams
            _seed_everything(self.cfg.seed + self.env.rank + 7919 * state["step"])
        self.step = int(state["step"])
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.train_time = float(state.get("train_time_s", 0.0))
        self.last_val = dict(state.get("last_val") or {})
        self.metrics.truncate(int(state["metrics_lines"]))
        self.last_ckpt = ckpt
        if self.env.is_main:
            tqdm.write(f"resumed from {ckpt} (step {self.step})")

    # --------------------------------------------------------------- the loop
    def _fetch(self, step: int, micro: int) -> Any:
        return _to_device(self.stage.batch(step, micro), self.device)

    def _next_cursor(self, step: int, micro: int) -> tuple[int, int]:
        return (step, micro + 1) if micro + 1 < self.cfg.grad_accum else (step + 1, 0)

    def _num_tokens(self, batch: Any) -> int:
        fn = getattr(self.stage, "num_tokens", None)
        if callable(fn):
            return int(fn(batch))
        t = _first_tensor(batch)
        return int(t.numel()) if t is not None else 0

    def forward_backward(self, step: int, batch: Any | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor], Any]:
        """All micro steps of optimizer step ``step``: gradients accumulate in ``.grad``.

        Returns (mean loss over micro steps (detached), mean metrics, the prefetched
        first batch of the next step). Does not touch the optimizer.
        """
        accum = self.cfg.grad_accum
        ddp = hasattr(self.model, "no_sync") or hasattr(getattr(self.model, "_orig_mod", None), "no_sync")
        fsdp = hasattr(self.raw_model, "set_requires_gradient_sync")
        if batch is None:
            batch = self._fetch(step, 0)
        loss_sum = torch.zeros((), device=self.device)
        metric_sums: dict[str, torch.Tensor] = {}
        tokens = 0
        for micro in range(accum):
            last = micro == accum - 1
            if ddp and not last:
                inner = self.model._orig_mod if hasattr(self.model, "_orig_mod") else self.model
                sync = inner.no_sync()
            else:
                sync = contextlib.nullcontext()
            if fsdp:
                self.raw_model.set_requires_gradient_sync(last)
            with sync:
                with self.autocast():
                    loss, metrics = self.stage.loss(self.model, batch)
                tokens += self._num_tokens(batch)
                batch = self._fetch(*self._next_cursor(step, micro))  # overlaps the GPU's work
                (loss / accum).backward()
            loss_sum += loss.detach().float()
            for k, v in metrics.items():
                v = v.detach().float() if isinstance(v, torch.Tensor) else torch.tensor(float(v))
                metric_sums[k] = metric_sums.get(k, 0) + v.to(self.device)
        self.tokens_seen += tokens * self.env.world_size
        return loss_sum / accum, {k: v / accum for k, v in metric_sums.items()}, batch

    def _optimizer_step(self, step: int) -> torch.Tensor:
        lr = lr_at(step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), clip)
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP
            norm = norm.full_tensor()
        self._updating = True  # parameters are half-updated until step() returns
        self.optimizer.step()
        self._updating = False
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach().float()

    def _stop_requested(self, flag: _StopFlag) -> int | None:
        """The signal that asks to stop, agreed by all ranks (so they stop at the same step)."""
        if not self.env.is_distributed:
            return flag.signum
        t = torch.tensor([flag.signum or 0], device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item()) or None

    def _evaluate(self, step: int, do_eval: bool, do_sample: bool) -> dict[str, Any]:
        out: dict[str, Any] = {}
        was_training = self.raw_model.training
        self.raw_model.eval()
        try:
            evaluate = getattr(self.stage, "evaluate", None)
            if do_eval and callable(evaluate):
                with torch.no_grad(), self.autocast():
                    out.update({k: (float(v) if isinstance(v, (int, float, torch.Tensor)) else v)
                                for k, v in evaluate(self.raw_model).items()})
            sample = getattr(self.stage, "sample", None)
            if do_sample and callable(sample):
                out["sample"] = sample(self.raw_model)
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
                   dynamic_ncols=True, unit="step", desc=getattr(self.stage, "name", "train"))
        sample_every = cfg.eval_every if cfg.sample_every is None else cfg.sample_every
        pending: list[tuple[int, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]] = []
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
                rng_at_step_start = _rng_state(self.device)
                in_step = True
                t0 = time.perf_counter()
                tokens_before = self.tokens_seen
                loss, metrics, batch = self.forward_backward(step, batch)
                norm = self._optimizer_step(step)
                self.step = step
                in_step = False
                pending.append((step, loss, norm, metrics))

                final = step == cfg.max_steps
                do_eval = final or (cfg.eval_every > 0 and step % cfg.eval_every == 0)
                do_sample = final or (sample_every > 0 and step % sample_every == 0)
                do_ckpt = final or (cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0)
                stop = self._stop_requested(flag)
                do_log = step % cfg.log_every == 0 or do_eval or do_sample or do_ckpt or stop is not None

                if do_log:
                    record = self._flush(pending)  # syncs; raises on NaN/inf
                    pending = []
                    dt = time.perf_counter() - t0
                else:
                    record, dt = None, time.perf_counter() - t0
                self.train_time += dt
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
                        ev = self._evaluate(step, do_eval, do_sample)
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
                self.optimizer.zero_grad(set_to_none=True)
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
            msg = f"step {self.step}/{cfg.max_steps}"
            if result.loss is not None:
                msg += f": train loss {result.loss:.4f}"
            if result.val_loss is not None:
                msg += f", val loss {result.val_loss:.4f}"
            if result.val_bpb is not None:
                msg += f", val bpb {result.val_bpb:.4f}"
            if ms is not None:
                msg += f"; {ms:.1f} ms/iter over {steps_run} steps"
            if stopped_by is not None:
                msg += f"; stopped by {signal.Signals(stopped_by).name}, resume with --resume"
            tqdm.write(msg)
            tqdm.write(f"saved {self.run_dir}")
        return result

    def _plot(self) -> None:
        plot_losses(self.metrics.records, self.run_dir / PLOT_FILE,
                    title=f"{self.run_dir.name} ({getattr(self.stage, 'name', '')})",
                    extra_keys=getattr(self.stage, "plot_keys", ()))

    def _flush(self, pending: list[tuple[int, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]
               ) -> dict[str, Any] | None:
        """Reduce the pending steps' losses across ranks (one sync), check them, return the last's record."""
        if not pending:
            return None
        losses = torch.stack([p[1] for p in pending])
        norms = torch.stack([p[2] for p in pending])
        names = sorted(pending[-1][3])
        last_metrics = torch.stack([pending[-1][3][k] for k in names]) if names else torch.zeros(0, device=self.device)
        packed = torch.cat([losses, last_metrics]).to(self.device if self.device.type == "cuda" else "cpu")
        if self.env.is_distributed:
            self._all_reduce(packed)
            packed /= self.env.world_size
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
        """The final model in RUN_DIR (model.safetensors + config.json + tokenizer/), rank 0 writes."""
        model = self.raw_model
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if self.env.is_main:
                model = type(model)(model.config)  # an unsharded copy on the CPU
                model.load_state_dict(sd)
        if self.env.is_main:
            save = getattr(self.stage, "save", None)
            if callable(save):
                save(self.run_dir, model)
            else:
                save_model(self.run_dir, model, stage=getattr(self.stage, "name", "pretrain"))
        self._barrier()
