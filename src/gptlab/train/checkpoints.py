"""Training checkpoints: ``RUN_DIR/checkpoints/step-NNNNNNNN/``, written whole or not at all, and exact resume state.

A checkpoint holds ``model.safetensors`` (the full state dict; a tied weight is
stored once under its first name), ``optimizer.pt`` (the full, name-keyed
optimizer state: tensors and plain values only, read back with
``torch.load(weights_only=True)``), ``rng.pt`` (python, numpy, torch and CUDA
generator states of every rank), ``stage.pt`` when the stage keeps state (PPO's
rollout buffer), ``trainer_state.json`` (step, data cursor, metrics line count,
schedule) and ``manifest.json`` (the sha256 and size of every file, checked on
resume). It is written under a temporary name and renamed, so a crash leaves
either the whole checkpoint or none of it. Under DDP or FSDP the state is
gathered first, so checkpoints have the same format whatever the number of processes.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..atomic import fsync_dir, remove_stale, sha256_file, temporary_name
from ..jsonsafe import parse_json
from ..errors import CheckpointError, first_line
from ..runs import CKPT_DIR

__all__ = ["CKPT_DIR", "Checkpoint", "checkpoint_dirs", "latest_checkpoint", "verify_checkpoint", "write_checkpoint",
           "read_checkpoint", "remove_partial", "tied_aliases", "rng_state", "set_rng_state", "seed_everything"]

CKPT_RE = re.compile(r"^step-(\d{8})$")
MANIFEST = "manifest.json"
FORMAT = 1


@dataclass
class Checkpoint:
    """What a checkpoint holds, read back; ``stages`` and ``rngs`` are indexed by the rank that wrote them."""

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rngs: list[dict[str, Any]]
    stages: list[dict[str, Any]] | None
    state: dict[str, Any]  # trainer_state.json


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


def remove_partial(run_dir: str | os.PathLike[str]) -> None:
    """Delete what killed writers left in a run directory: unfinished checkpoints and temporary files."""
    remove_stale(run_dir)
    remove_stale(Path(run_dir) / CKPT_DIR)


def verify_checkpoint(ckpt: str | os.PathLike[str]) -> dict[str, Any]:
    """Check every file of a checkpoint against its manifest; returns the manifest.

    Raises ``CheckpointError`` naming the missing, truncated or corrupted file.
    """
    ckpt = Path(ckpt)
    hint = f"delete {ckpt} to resume from the previous checkpoint (or start a new run with a new --out)"
    try:
        manifest = parse_json((ckpt / MANIFEST).read_bytes())
        files = manifest["files"]
        if not all(isinstance(i, dict) and isinstance(i.get("bytes"), int) and isinstance(i.get("sha256"), str)
                   for i in files.values()):
            raise ValueError("bad file records")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
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


def write_checkpoint(run_dir: Path, step: int, model: Mapping[str, torch.Tensor], optimizer: Mapping[str, Any],
                     rngs: list[Any], stages: list[Any] | None, state: Mapping[str, Any], keep_last: int) -> Path:
    """Write ``checkpoints/step-{step:08d}`` atomically (temp dir, fsync, rename) and prune to ``keep_last``."""
    final = run_dir / CKPT_DIR / f"step-{step:08d}"
    if final.exists():
        return final
    tmp = run_dir / CKPT_DIR / temporary_name(final.name, "ckpt")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.items()}, str(tmp / "model.safetensors"),
              metadata={"format": "pt", "step": str(step)})
    torch.save(dict(optimizer), tmp / "optimizer.pt")
    torch.save(rngs, tmp / "rng.pt")
    if stages is not None:
        torch.save(stages, tmp / "stage.pt")
    (tmp / "trainer_state.json").write_text(json.dumps({"format": FORMAT, **state}, indent=2) + "\n",
                                            encoding="utf-8")
    files = {}
    for path in sorted(tmp.iterdir()):
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
        files[path.name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=2) + "\n", encoding="utf-8")
    with open(tmp / MANIFEST, "rb") as fh:
        os.fsync(fh.fileno())
    fsync_dir(tmp)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    for old in checkpoint_dirs(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint(ckpt: Path) -> Checkpoint:
    """A verified checkpoint's contents on the CPU (pickles only as ``weights_only``)."""
    verify_checkpoint(ckpt)
    try:
        state = parse_json((ckpt / "trainer_state.json").read_bytes())
        model = load_file(str(ckpt / "model.safetensors"))
        optimizer = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
        rngs = torch.load(ckpt / "rng.pt", map_location="cpu", weights_only=True)
        stages = (torch.load(ckpt / "stage.pt", map_location="cpu", weights_only=True)
                  if (ckpt / "stage.pt").is_file() else None)
    except (OSError, ValueError, KeyError, RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile,
            SafetensorError) as exc:  # weights_only refuses any pickle that is not plain tensors and values
        raise CheckpointError(f"cannot read checkpoint {ckpt}: {first_line(exc)}; delete it to resume from "
                              f"the previous checkpoint") from None
    counts = ("step", "metrics_lines", "tokens_seen")
    if (not isinstance(state, dict) or not all(isinstance(state.get(k, 0), int) for k in counts)
            or not isinstance(state.get("train_time_s", 0.0), (int, float)) or not isinstance(state.get("last_val", {}), dict)
            or not isinstance(rngs, list) or not isinstance(optimizer, dict) or (stages is not None and not isinstance(stages, list))):
        raise CheckpointError(f"checkpoint {ckpt}: trainer_state.json, rng.pt or optimizer.pt does not hold what "
                              f"gptlab writes (edited by hand?); delete it to resume from the previous checkpoint")
    return Checkpoint(model, optimizer, rngs, stages, state)


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """Parameter names that alias an earlier one (tied weights): alias -> first name."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def rng_state(device: torch.device) -> dict[str, Any]:
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple)  # the global RandomState is an MT19937, whose legacy state is a tuple
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
