"""Training configuration: ``TrainConfig``, run-config files, and the one rule that resolves a run's configs.

Every config of a run (the model's, the training loop's, a stage's own
settings) is resolved by ``resolve`` from layers, later ones winning::

    dataclass defaults < stage defaults < derived defaults < config file < saved run < given (flags)

A fresh run has no saved layer; a resumed run's saved config is complete, so
defaults and the file no longer apply there. Given values may change a resumed
run's training loop (``--max-steps`` to train longer) but not its model or its
stage's objective (``changeable=False``): those are the run's, and a different
value is an error naming the field rather than a silently different run.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Mapping, TypeVar

import yaml

from ..config import Config, field_types
from ..jsonsafe import parse_json, unencodable
from ..errors import ConfigError

__all__ = ["TrainConfig", "load_config_file", "resolve", "Given"]

C = TypeVar("C", bound=Config)
# What a caller passes for a config: a whole config object, the fields it sets, or nothing.
Given = Config | Mapping[str, Any] | None


@dataclass
class TrainConfig(Config):
    """Everything about a training run that is not the model's shape.

    ``batch_size`` is the micro batch of one rank; one optimizer step sees
    ``batch_size * grad_accum * world_size`` sequences. Intervals of 0 disable
    the periodic action (evaluation, checkpoint and sample still happen at the
    end of the run).
    """

    section: ClassVar[str] = "train"

    max_steps: int = 1000
    """optimizer steps"""
    batch_size: int = 12
    """micro batch per process (sequences, rows or prompts, by stage)"""
    block_size: int | None = None
    """context length of training sequences (default: the model's; also a new model's block_size)"""
    grad_accum: int = 1
    """micro steps per optimizer step"""
    lr: float = 6e-4
    """peak learning rate"""
    min_lr: float = 6e-5
    """floor of the cosine decay"""
    warmup_steps: int = 100
    """linear warmup steps"""
    lr_decay_steps: int | None = None
    """step where the cosine reaches min_lr (default: max_steps)"""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices and embeddings"""
    beta1: float = 0.9
    """AdamW beta1"""
    beta2: float = 0.95
    """AdamW beta2"""
    optimizer: Literal["adamw", "muon"] = "adamw"
    """adamw for every parameter, or muon: Muon for the blocks' 2-D matrices, AdamW (lr) for the rest"""
    muon_lr: float = 0.02
    """Muon's peak learning rate (the warmup and cosine scale it as they scale lr)"""
    muon_momentum: float = 0.95
    """Muon's (Nesterov) momentum"""
    muon_weight_decay: float = 0.0
    """Muon's decoupled weight decay"""
    grad_clip: float = 1.0
    """max gradient norm (0: no clipping)"""
    dropout: float | None = None
    """dropout probability (default: the model's; also a new model's dropout)"""
    seed: int = 1337
    """random seed of weights, batches and dropout"""
    eval_every: int = 250
    """evaluate every N steps (0: only at the end)"""
    eval_batches: int = 20
    """validation batches per evaluation"""
    checkpoint_every: int = 250
    """checkpoint every N steps (0: only at the end and on Ctrl-C)"""
    keep_last: int = 3
    """checkpoints to keep"""
    sample_every: int | None = None
    """print a sample every N steps (default: at each evaluation; 0: never)"""
    sample_tokens: int = 64
    """tokens per sample"""
    sample_prompt: str = "\n"
    """text the samples start from"""
    sample_temperature: float = 0.8
    """temperature of the samples (0: greedy)"""
    log_every: int = 1
    """log metrics every N steps"""
    compile: bool = False
    """torch.compile the model"""
    fsdp: bool = False
    """shard parameters with FSDP2 (under torchrun)"""
    device: str = "auto"
    """auto (cuda:LOCAL_RANK when available, else cpu), cpu, cuda, cuda:N or mps"""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """auto: bf16 autocast on CUDA when supported, fp32 otherwise"""

    @property
    def decay_steps(self) -> int:
        return self.max_steps if self.lr_decay_steps is None else self.lr_decay_steps

    def validate(self) -> None:
        for key in ("max_steps", "batch_size", "grad_accum", "keep_last", "log_every"):
            self.need(getattr(self, key) >= 1, f"{key}={getattr(self, key)!r} must be >= 1")
        for key in ("warmup_steps", "eval_every", "eval_batches", "checkpoint_every", "sample_tokens"):
            self.need(getattr(self, key) >= 0, f"{key}={getattr(self, key)!r} must be >= 0")
        self.need(self.block_size is None or self.block_size >= 1, f"block_size={self.block_size!r} must be >= 1")
        self.need(self.lr > 0, f"lr={self.lr!r} must be > 0")
        self.need(0 <= self.min_lr <= self.lr, f"min_lr={self.min_lr!r} must be in [0, lr={self.lr}]")
        self.need(self.lr_decay_steps is None or self.lr_decay_steps >= 1,
                  f"lr_decay_steps={self.lr_decay_steps!r} must be >= 1")
        self.need(self.weight_decay >= 0, f"weight_decay={self.weight_decay!r} must be >= 0")
        self.need(self.optimizer in ("adamw", "muon"), f"optimizer={self.optimizer!r} must be 'adamw' or 'muon'")
        self.need(self.muon_lr > 0 and 0 <= self.muon_momentum < 1 and self.muon_weight_decay >= 0,
                  f"muon_lr={self.muon_lr!r} must be > 0, muon_momentum={self.muon_momentum!r} in [0, 1), "
                  f"muon_weight_decay={self.muon_weight_decay!r} >= 0")
        self.need(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, f"beta1, beta2 = {self.beta1}, {self.beta2} must be in [0, 1)")
        self.need(self.grad_clip >= 0, f"grad_clip={self.grad_clip!r} must be >= 0 (0 disables clipping)")
        self.need(self.dropout is None or 0 <= self.dropout < 1, f"dropout={self.dropout!r} must be in [0, 1)")
        self.need(self.sample_every is None or self.sample_every >= 0, f"sample_every={self.sample_every!r} must be >= 0")
        self.need(self.sample_temperature >= 0, f"sample_temperature={self.sample_temperature!r} must be >= 0")
        self.need(self.dtype in ("auto", "float32", "bfloat16"),
                  f"dtype={self.dtype!r} must be one of auto, float32, bfloat16")


class _ConfigLoader(yaml.SafeLoader):
    """Safe YAML without aliases: a config has no use for them, and nested ones expand exponentially
    (the "billion laughs") in everything that walks the result."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.YAMLError(f"line {event.start_mark.line + 1}: an alias (*{event.anchor}); write the value out")
        return super().compose_node(parent, index)


def load_config_file(path: str | os.PathLike[str], sections: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """The sections of a YAML or JSON run config, each a mapping (missing ones are empty).

    An unknown section, a section that is not a mapping, or a file that does not
    parse is a ``ConfigError`` naming the file; the fields are checked when the
    configs are resolved.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (bad byte at offset {e.start}); save it as UTF-8") from None
    try:
        data = parse_json(text) if p.suffix == ".json" else yaml.load(text, Loader=_ConfigLoader)
    except RecursionError:
        raise ConfigError(f"{p}: cannot parse: nested too deeply") from None
    except (ValueError, yaml.YAMLError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{p}: cannot parse: {first}") from None
    data = data or {}
    bad = unencodable(data)
    if bad is not None:
        raise ConfigError(f"{p}: {bad} is not valid Unicode (a lone UTF-16 surrogate such as \\ud800); fix the text")
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping with sections {', '.join(sections)}")
    unknown = sorted(set(map(str, data)) - set(sections))
    if unknown:
        raise ConfigError(f"{p}: unknown section(s) {', '.join(unknown)}; known sections: {', '.join(sections)}")
    out: dict[str, dict[str, Any]] = {}
    for section in sections:
        value = data.get(section) or {}
        if not isinstance(value, dict):
            raise ConfigError(f"{p}: section {section} must be a mapping of field: value")
        out[section] = dict(value)
    return out


def resolve(cls: type[C], given: Given = None, *, defaults: Mapping[str, Any] | None = None,
            derive: Callable[[dict[str, Any]], Mapping[str, Any]] | None = None,
            file: Mapping[str, Any] | None = None, saved: Mapping[str, Any] | None = None,
            changeable: bool = True, source: str | None = None) -> C:
    """The ``cls`` config of a run from its layers (see the module docstring).

    ``given`` is a whole config (used as it is on a fresh run) or the fields set
    by the caller (a None value counts as not set). ``derive`` computes defaults that depend on other fields (an
    epoch's steps from the batch size); it fills only fields no layer set.
    ``saved`` (the run's config.json section) makes it a resumed run; with
    ``changeable`` False a given field that differs from the saved one is an error.
    """
    section = cls.section
    source = source or f"{section} config"
    given_fields = given.to_dict() if isinstance(given, Config) else {k: v for k, v in (given or {}).items()
                                                                      if v is not None}  # None: not given
    if not isinstance(given, Config):  # a bad flag is named as given, not as the file it would override
        cls.typed_fields(given_fields, f"the given {section} settings")
    if saved is None:
        if isinstance(given, cls):
            return given
        merged = {**(defaults or {}), **(file or {}), **given_fields}
        for key, value in (derive(merged) if derive is not None else {}).items():
            merged.setdefault(key, value)
        try:
            return cls.from_dict(merged, source=source)
        except ConfigError:
            if given_fields and file:  # the file is named only when it is wrong without the flags on top
                without = {**(defaults or {}), **file}
                for key, value in (derive(without) if derive is not None else {}).items():
                    without.setdefault(key, value)
                cls.from_dict(without, source=source)
                cls.from_dict(merged, source=f"the given {section} settings")
            raise
    compared = {f.name for f in dataclasses.fields(cls) if f.compare}
    base = {k: v for k, v in saved.items() if k in field_types(cls) and v is not None}  # older runs may lack one
    if not changeable:
        baseline = cls.from_dict(base, source=f"the run's saved {section} config")
        wanted = cls.from_dict({**baseline.to_dict(), **given_fields}, source=source)
        changed = [k for k in given_fields if k in compared and getattr(wanted, k) != getattr(baseline, k)]
        if changed:
            k = changed[0]
            raise ConfigError(f"{source}: a resumed run keeps its {section} settings: {k}={getattr(baseline, k)!r} "
                              f"was saved, {getattr(wanted, k)!r} given; drop it or start a new run with another --out")
        return baseline
    if isinstance(given, cls):
        return given
    return cls.from_dict({**base, **given_fields}, source=source)
