"""Run directories, the unit users pass around: write them, check them, read them back.

    run/config.json        {"format_version": 1, "model": GPTConfig.to_dict(), "tokenizer": "tokenizer" | null,
                            "stage": "pretrain", "weights": {"file", "sha256", "bytes"}, ...the stage's sections}
    run/model.safetensors  the backbone's weights; a tied lm_head is stored once (as wte)
    run/tokenizer/         Tokenizer.save()
    run/<head>.safetensors a stage's head (fine-tuning, reward model), named with its sha256 in config.json
    run/adapter_model.safetensors, adapter_config.json   LoRA adapters as peft writes them (``lora`` section)

``config.json`` is written when a training run starts (``run_config``: model,
train and stage settings, so any run can be reproduced and resumed) and again,
last, by ``save_model`` with the weights' sha256, which every load checks.
Every command that takes a model takes a run directory or ``hf:DIR`` (a
transformers GPT-2 / OpenAI-GPT directory, see ``hf``).

    from gptlab.runs import save_model, load_run
    save_model("runs/x", model, tokenizer)
    model, tokenizer, config = load_run("runs/x")
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file

from .atomic import PathLike, atomic_write, atomic_write_json, fsync_dir, remove_stale, sha256_file, temporary_name
from .config import GPTConfig
from .errors import CheckpointError, UserError
from .hf import hf_dir_from_spec, import_hf, read_json_file
from .lora import (ADAPTER_CONFIG, ADAPTER_FILE, LoRAConfig, adapter_tensors, has_lora, load_adapter_tensors,
                   merge_lora, peft_config)
from .model import GPT
from .tokenizer import Tokenizer, load_checked_tokenizer, tokenizer_digest
from .weights import FIX_WEIGHTS, atomic_save_safetensors, build_model, model_tensors, unwrap

__all__ = ["FORMAT_VERSION", "CONFIG_FILE", "WEIGHTS_FILE", "TOKENIZER_DIR", "CKPT_DIR", "run_config", "save_model",
           "read_run_config", "load_model", "load_run", "load_head", "load_with_head", "save_tokenizer",
           "check_run_dir", "prepare_out_dir", "save_merged", "copy_recorded"]

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
CKPT_DIR = "checkpoints"  # training checkpoints (gptlab.train.checkpoints)
# Keys of a run's config.json that save_model owns; ``extra`` may not override them.
_RESERVED = ("format_version", "model", "tokenizer", "tokenizer_sha256", "stage", "weights")
_NEXT = ".next.safetensors"  # a replacing save's files before they take their names


def run_config(stage: str, model: GPTConfig, tokenizer_sha256: dict[str, str] | None,
               extra: dict[str, Any]) -> dict[str, Any]:
    """The config.json of a run: what ``save_model`` writes, without the weights record."""
    clash = sorted(set(extra) & set(_RESERVED))
    if clash:
        raise ValueError(f"run config: extra may not set reserved key(s) {', '.join(clash)}")
    config: dict[str, Any] = {"format_version": FORMAT_VERSION, "model": model.to_dict(),
                              "tokenizer": TOKENIZER_DIR if tokenizer_sha256 is not None else None}
    if tokenizer_sha256 is not None:
        config["tokenizer_sha256"] = tokenizer_sha256
    return {**config, "stage": stage, **extra}


def save_tokenizer(run_dir: Path, tokenizer: Tokenizer) -> dict[str, str]:
    """Write ``run_dir/tokenizer/``; returns its files' sha256 for config.json."""
    directory = run_dir / TOKENIZER_DIR
    remove_stale(directory)
    tokenizer.save(directory)
    return tokenizer_digest(directory)


def save_model(run_dir: PathLike, model: nn.Module, tokenizer: Tokenizer | None = None, stage: str = "pretrain",
               extra: dict[str, Any] | None = None, head: tuple[str, str, nn.Module] | None = None) -> Path:
    """Write ``model`` (and ``tokenizer``, and ``head`` = (config section, file name, module)) as a run directory.

    ``extra`` adds JSON-serialisable top-level keys to config.json (not the reserved
    ones). A reader always finds one complete state, old or new: the first save writes
    the files, then config.json, which records their sha256; a save over an earlier one
    writes the files as ``*.next.safetensors``, switches config.json to them, gives them
    their names (hard links, so that the switched config stays valid), switches
    config.json back and removes the ``next`` files. Returns the run directory.
    """
    gpt = unwrap(model)
    run_dir = Path(run_dir)
    extra = dict(extra or {})
    run_config("", gpt.config, None, extra)  # reserved keys: refused before anything is written
    if run_dir.exists() and not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: exists and is not a directory; choose another output path")
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_stale(run_dir)
    tok_sha = None
    if tokenizer is not None:
        if tokenizer.vocab_size > gpt.config.vocab_size:
            raise CheckpointError(f"{run_dir}: tokenizer has {tokenizer.vocab_size} ids but the model's "
                                  f"vocab_size is {gpt.config.vocab_size}; build the model with "
                                  f"vocab_size >= the tokenizer's")
        tok_sha = save_tokenizer(run_dir, tokenizer)
    files = {WEIGHTS_FILE: model_tensors(gpt)}
    recorded: dict[str, tuple[str, str]] = {}  # file -> (config section, key of its record there)
    if head is not None:
        files[head[1]] = dict(head[2].state_dict())
        recorded[head[1]] = (head[0], "head")
    if has_lora(gpt):
        if not isinstance(extra.get(LoRAConfig.section), dict):
            raise ValueError(f"save_model: a model with LoRA adapters needs extra[{LoRAConfig.section!r}] (its LoRAConfig)")
        lora = _lora_settings(extra[LoRAConfig.section])
        files[ADAPTER_FILE] = adapter_tensors(gpt)
        recorded[ADAPTER_FILE] = (LoRAConfig.section, "adapter")
        atomic_write_json(run_dir / ADAPTER_CONFIG, peft_config(lora, gpt))
    replacing = any((run_dir / name).exists() for name in files)
    staged = {name: run_dir / (name.removesuffix(".safetensors") + _NEXT if replacing else name) for name in files}
    digests = {name: atomic_save_safetensors(tensors, staged[name],
                                             metadata={"gptlab_format_version": str(FORMAT_VERSION)})
               for name, tensors in files.items()}

    def config(on: dict[str, Path]) -> dict[str, Any]:
        records = {n: {"file": on[n].name, "sha256": digests[n], "bytes": on[n].stat().st_size} for n in files}
        out = {**run_config(stage, gpt.config, tok_sha, extra), "weights": records[WEIGHTS_FILE]}
        for name, (section, key) in recorded.items():
            out[section] = {**out.get(section, {}), key: records[name]}
        return out

    atomic_write_json(run_dir / CONFIG_FILE, config(staged))
    if replacing:
        final = {name: run_dir / name for name in files}
        for name in files:
            _replace_keeping(staged[name], final[name])
        atomic_write_json(run_dir / CONFIG_FILE, config(final))
        for path in staged.values():
            path.unlink()
    return run_dir


def _replace_keeping(src: Path, dst: Path) -> None:
    """Atomically make ``dst`` hold ``src``'s content while ``src`` stays (a hard link, else a copy)."""
    tmp = dst.with_name(temporary_name(dst.name, "link"))
    try:
        os.link(src, tmp)
    except OSError:  # no hard links on this file system
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    fsync_dir(dst.parent)


def read_run_config(run_dir: PathLike) -> dict[str, Any]:
    """Parse and check a run directory's config.json (format version, model fields); returns the dict."""
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no such run directory; pass a directory written by "
                              f"gptlab train/convert, or hf:DIR for a Hugging Face directory")
    path = run_dir / CONFIG_FILE
    config = read_json_file(path, "not a gptlab run directory (train or convert a model into it)")
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise CheckpointError(f"{path}: has no 'model' section; not a gptlab run config "
                              f"(for a Hugging Face directory pass hf:{run_dir})")
    version = config.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{path}: missing or invalid format_version; not a gptlab run config")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {version} was written by a newer gptlab "
                              f"(this one reads {FORMAT_VERSION}); upgrade gptlab")
    GPTConfig.from_dict(config["model"], source=str(path))  # unknown/mistyped fields -> ConfigError
    return config


def _lora_settings(section: dict[str, Any], source: str | None = None) -> LoRAConfig:
    """The LoRA settings of a run config's lora section, without the adapter file's record beside them."""
    return LoRAConfig.from_dict({k: v for k, v in section.items() if k != "adapter"}, source=source)


def _load_weights(run_dir: Path, config: dict[str, Any], device: str | torch.device, merge: bool = True) -> GPT:
    model_cfg = GPTConfig.from_dict(config["model"], source=str(run_dir / CONFIG_FILE))
    weights = config.get("weights")
    info: dict[str, Any] = weights if isinstance(weights, dict) else {}
    name = info.get("file", WEIGHTS_FILE)
    if not isinstance(name, str) or Path(name).name != name:
        raise CheckpointError(f"{run_dir / CONFIG_FILE}: weights.file must be a file name inside the run "
                              f"directory, got {name!r}")
    path = run_dir / name
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; the run directory is incomplete: {FIX_WEIGHTS}")
    size = info.get("bytes")
    if isinstance(size, int) and path.stat().st_size != size:
        raise CheckpointError(f"{path}: is {path.stat().st_size} bytes, config.json says {size} "
                              f"(truncated or replaced): {FIX_WEIGHTS}")
    digest = info.get("sha256")
    if isinstance(digest, str) and sha256_file(path) != digest:
        raise CheckpointError(f"{path}: sha256 does not match config.json (corrupted or modified "
                              f"after saving): {FIX_WEIGHTS}")
    try:
        tensors = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors file ({str(e).splitlines()[0][:100]}): "
                              f"{FIX_WEIGHTS}") from None
    gpt = build_model(model_cfg, tensors, str(path), device)
    lora = config.get(LoRAConfig.section)
    if not isinstance(lora, dict) or "adapter" not in lora:
        return gpt
    where = str(run_dir / CONFIG_FILE)
    settings = _lora_settings(lora, source=f"{where}: lora")
    load_adapter_tensors(gpt, settings, _recorded_tensors(run_dir, lora["adapter"], "LoRA adapter"),
                         str(run_dir / ADAPTER_FILE))
    return merge_lora(gpt) if merge else gpt


def load_model(spec: PathLike, device: str | torch.device = "cpu") -> GPT:
    """Load a model from a run directory or ``"hf:DIR"`` (eval mode, weights' stored dtype, adapters merged)."""
    hf_dir = hf_dir_from_spec(spec)
    if hf_dir is not None:
        return import_hf(hf_dir, with_tokenizer=False)[0].to(device)
    run_dir = Path(spec).expanduser()
    return _load_weights(run_dir, read_run_config(run_dir), device)


def load_run(spec: PathLike, device: str | torch.device = "cpu",
             merge: bool = True) -> tuple[GPT, Tokenizer | None, dict[str, Any]]:
    """(model, tokenizer or None, config dict) from a run directory or ``"hf:DIR"``.

    A run trained with LoRA comes with its adapters merged into the weights (a plain GPT, for every
    command that reads a model), or with ``merge=False`` attached and separate (``lora.adapters``).
    For an HF directory the config dict is synthesised in the run-config layout
    (``format_version``, ``model``, ``tokenizer`` None, ``stage``, ``source``).
    """
    hf_dir = hf_dir_from_spec(spec)
    if hf_dir is not None:
        model, tokenizer = import_hf(hf_dir)
        config = {"format_version": FORMAT_VERSION, "model": model.config.to_dict(), "tokenizer": None,
                  "stage": "pretrain", "source": f"hf:{hf_dir}"}
        return model.to(device), tokenizer, config
    run_dir = Path(spec).expanduser()
    config = read_run_config(run_dir)
    tokenizer = None
    rel = config.get("tokenizer")
    if rel is not None:
        if not isinstance(rel, str):
            raise CheckpointError(f"{run_dir / CONFIG_FILE}: 'tokenizer' must be a directory name or null")
        tok_dir = run_dir / rel
        if not tok_dir.is_dir():
            raise CheckpointError(f"{tok_dir}: tokenizer directory named by config.json is missing; "
                                  f"copy the whole run directory")
        tokenizer = load_checked_tokenizer(tok_dir, config.get("tokenizer_sha256"), str(run_dir / CONFIG_FILE))
    model = _load_weights(run_dir, config, device, merge)
    if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
        raise CheckpointError(f"{run_dir}: tokenizer has {tokenizer.vocab_size} ids but the model's "
                              f"vocab_size is {model.config.vocab_size}; the tokenizer does not belong "
                              f"to this model")
    return model, tokenizer, config


def _recorded_tensors(run_dir: PathLike, record: Any, what: str) -> dict[str, torch.Tensor]:
    """The tensors of a file beside the weights (a head, an adapter) whose record ``save_model`` wrote,
    checked against its sha256."""
    if not isinstance(record, dict) or not isinstance(record.get("file"), str) or \
            Path(record["file"]).name != record["file"]:
        raise CheckpointError(f"{run_dir}: config.json does not name the {what} file; "
                              f"train it again or copy the whole run directory")
    path = Path(run_dir) / record["file"]
    if not path.is_file() or sha256_file(path) != record.get("sha256"):
        raise CheckpointError(f"{path}: missing or does not match config.json (sha256); copy the whole run "
                              f"directory or train the model again")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc})") from None


def load_head(run_dir: PathLike, record: Any, head: nn.Module, what: str) -> nn.Module:
    """Load the head file ``record`` (written by ``save_model``'s ``head``) into ``head``, checking its sha256."""
    tensors = _recorded_tensors(run_dir, record, f"{what} head")
    try:
        head.load_state_dict(tensors)
    except RuntimeError as exc:
        raise CheckpointError(f"{Path(run_dir) / record['file']}: the wrong shape ({exc})") from None
    return head


def load_with_head(spec: PathLike, section: str, head: Callable[[GPT, dict[str, Any]], nn.Module], what: str,
                   hint: str, device: str | torch.device = "cpu") -> tuple[nn.Module, Tokenizer, dict[str, Any]]:
    """(``head(backbone, config[section])`` with its head file loaded, in eval mode; tokenizer; config.json)
    of a run saved by ``save_model`` with a ``head``; ``hint`` says how to make one."""
    gpt, tokenizer, config = load_run(spec, device=device)
    record = config.get(section)
    if not isinstance(record, dict) or not isinstance(record.get("head"), dict):
        raise CheckpointError(f"{spec}: not a {what} run (config.json has no {section} section); {hint}")
    if tokenizer is None:
        raise CheckpointError(f"{spec}: the run has no tokenizer directory; copy the whole run directory")
    model = head(gpt, record)
    load_head(spec, record["head"], model.get_submodule("head"), what)
    return model.to(device).eval(), tokenizer, config


def copy_recorded(run_dir: PathLike, record: Any, out: PathLike, what: str) -> None:
    """Copy a file a run's config.json records (a head, an adapter) into ``out`` after checking its sha256."""
    _recorded_tensors(run_dir, record, what)
    src = Path(run_dir) / record["file"]

    def copy(tmp: str) -> None:
        shutil.copyfile(src, tmp)

    atomic_write(Path(out) / src.name, copy)


def save_merged(run_dir: PathLike, out: PathLike) -> Path:
    """The LoRA run ``run_dir`` as a plain run in ``out``: adapters merged into the weights, heads and
    settings kept, ``lora_merged_from`` recorded."""
    run_dir = Path(run_dir).expanduser()
    gpt, tokenizer, config = load_run(run_dir)
    if not isinstance(config.get(LoRAConfig.section), dict):
        raise UserError(f"{run_dir}: has no LoRA adapters (config.json has no lora section); nothing to merge")
    extra = {k: v for k, v in config.items() if k not in (*_RESERVED, LoRAConfig.section)}
    for name, section in extra.items():
        if isinstance(section, dict) and isinstance(section.get("head"), dict):
            copy_recorded(run_dir, section["head"], out, f"{name} head")
    extra["lora_merged_from"] = str(run_dir.resolve())
    return save_model(out, gpt, tokenizer, stage=str(config.get("stage", "pretrain")), extra=extra)


def check_run_dir(run_dir: PathLike, resume: bool) -> bool:
    """Whether ``run_dir`` holds a run to resume (a checkpoint or a saved model); a started run without ``resume``
    is an error. A run that failed before its first checkpoint left only its config: it may start again."""
    run = Path(run_dir)
    checkpoints = run / CKPT_DIR
    started = (run / WEIGHTS_FILE).exists() or (checkpoints.is_dir() and any(
        p.is_dir() and p.name.startswith("step-") for p in checkpoints.iterdir()))
    if started and not resume:
        raise UserError(f"run directory {run} already holds a run: use --resume to continue it or a new --out")
    return started


def prepare_out_dir(path: PathLike, force: bool = False) -> Path:
    """Check an output directory: absent or empty is fine; non-empty needs ``force`` (files are overwritten, others kept)."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"{out}: directory exists and is not empty; choose another --out or pass --force "
                        f"to overwrite")
    return out

