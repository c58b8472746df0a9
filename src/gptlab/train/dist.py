"""Where a process sits in a run: device, torchrun's process group, and the collectives the trainer uses.

A plain ``python`` launch is a world of one; under ``torchrun`` (RANK, WORLD_SIZE,
LOCAL_RANK set) a process joins the group: NCCL on CUDA, gloo on CPU. Every
collective here is a no-op in a world of one, so callers never branch on it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from ..errors import ConfigError, UserError

__all__ = ["DistEnv", "resolve_device", "setup_distributed", "teardown_distributed", "distributed", "shard"]


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

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()

    def all_reduce(self, t: torch.Tensor, op: Any = None) -> torch.Tensor:
        """Sum (or ``op``) of ``t`` over ranks, in place; collectives on gloo need CPU tensors."""
        if self.is_distributed:
            dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
        return t

    def gather(self, mine: Any) -> list[Any]:
        """Every rank's ``mine``, indexed by rank (a one-element list in a single process)."""
        if not self.is_distributed:
            return [mine]
        everyone: list[Any] = [None] * self.world_size
        dist.all_gather_object(everyone, mine)
        return everyone

    def collective_device(self) -> torch.device:
        """Where tensors for collectives live: the GPU under NCCL, the CPU under gloo."""
        return self.device if self.device.type == "cuda" else torch.device("cpu")


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
    """Join the process group when launched by ``torchrun``; otherwise a world of one on ``device``."""
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
    """``env`` as given, or this process's place under torchrun for the duration of a run."""
    if env is not None:
        yield env
        return
    env = setup_distributed(device)
    try:
        yield env
    finally:
        teardown_distributed(env)


def shard(model: nn.Module, units: Iterable[nn.Module], amp_dtype: torch.dtype | None) -> None:
    """FSDP2: shard each unit (a transformer block), then the root (embeddings, final norm, heads)."""
    mp = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32) \
        if amp_dtype is not None else MixedPrecisionPolicy()
    for unit in units:
        fully_shard(unit, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
