"""Pretraining: next-token prediction over a prepared token data directory.

    gptlab prepare --input input.txt --tokenizer char --out data/shakespeare
    gptlab train --data data/shakespeare --out runs/baby --config configs/baby-shakespeare-char.yaml
    torchrun --nproc_per_node 8 -m gptlab.cli train --data ... --out ... --preset gpt2 [--fsdp]

or from Python::

    run_pretrain("data/shakespeare", "runs/baby", "tiny", {"max_steps": 2000, "block_size": 64})
    run_pretrain("data/shakespeare", "runs/baby", config_file="configs/baby-shakespeare-char.yaml")
    run_pretrain("data/shakespeare", "runs/baby", resume=True)   # the run's own configs
    run_pretrain("data/mytext", "runs/ft", init_from="hf:gpt2-dir", train={"block_size": 256})

The model is a preset name, a mapping of GPTConfig fields (with an optional
``preset`` underneath them) or a GPTConfig; the vocabulary always comes from the
data, and ``train.block_size`` / ``train.dropout`` shape a new model. With
``init_from`` (a run directory or ``hf:DIR``) the model's config and weights are
the source's instead (nanoGPT's ``init_from``): the data must have been tokenized
with the source's tokenizer, ``train.block_size`` may only crop its context,
``train.dropout`` may change, and config.json records the source's path and
weights sha256; the optimizer starts fresh. Batches are
random windows of the train split, drawn statelessly from ``(seed, step,
micro_step)`` by ``data.PretrainBatches`` (each rank takes its slice of the same
global batch); evaluation scores a fixed set of sequential val windows (loss and
bits per byte) and prints a short sample.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from ..config import GPTConfig
from ..data import PretrainBatches, TokenData
from ..data import eval_batches as sequential_batches
from ..engine import Engine, SamplingParams
from ..errors import ConfigError, TokenizerError, UserError
from ..evaluate import lm_loss_sums
from ..hf import hf_dir_from_spec, hf_weights_sha256
from ..lora import add_lora
from ..model import GPT, rebuilt
from ..runs import CONFIG_FILE, TOKENIZER_DIR, load_run, save_model
from ..tokenizer import Tokenizer, check_tokenizers_match, load_tokenizer
from ..train.config import Given, TrainConfig
from ..train.dist import DistEnv
from ..train.loop import Stage, TrainResult
from .common import StageRun

__all__ = ["PretrainStage", "build_model_config", "run_pretrain"]

ModelGiven = GPTConfig | Mapping[str, Any] | str | None


class PretrainStage(Stage[GPT]):
    """Next-token loss over random train windows; val loss / bits per byte over fixed val windows."""

    name = "pretrain"

    def __init__(self, data: TokenData, batch_size: int, block_size: int, seed: int, *, rank: int = 0,
                 world_size: int = 1, eval_batches: int = 20, tokenizer: Tokenizer | None = None,
                 sample_tokens: int = 64, sample_prompt: str = "\n", sample_temperature: float = 0.8,
                 save_extra: dict[str, Any] | None = None) -> None:
        self.data = data
        self.rank, self.world_size = rank, world_size
        self.batches = PretrainBatches(data.split("train"), batch_size, block_size, seed,
                                       rank=rank, world_size=world_size)
        # A fixed, deterministic validation set: the same windows at every evaluation and for any
        # number of processes (global batches of batch_size * world_size; each rank scores its rows).
        rows = slice(rank * batch_size, (rank + 1) * batch_size)
        self.val = [(x[rows], y[rows]) for x, y in sequential_batches(
            data.split("val"), batch_size * world_size, block_size, eval_batches)] if eval_batches > 0 else []
        self.val_bytes_per_token = float(data.bytes_per_token("val")) if self.val else 1.0
        self.tokenizer = tokenizer
        self.sample_tokens, self.sample_prompt = sample_tokens, sample_prompt
        self.sample_temperature, self.seed = sample_temperature, seed
        self.save_extra = save_extra or {}

    def batch(self, step: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batches.get(step, micro_step)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        x, y = batch
        _, loss = model(x, y)
        return loss, {}

    def evaluate(self, model: GPT) -> dict[str, float]:
        if not self.val:
            return {}
        nats, n = lm_loss_sums(model, self.val, world_size=self.world_size)
        loss = nats / n
        return {"val_loss": loss, "val_bpb": loss / math.log(2) / self.val_bytes_per_token}

    def sample(self, model: GPT) -> str:
        if self.tokenizer is None or self.sample_tokens == 0:
            return ""
        try:
            ids = self.tokenizer.encode(self.sample_prompt) or [self.tokenizer.eos_id]
        except TokenizerError:  # the prompt has characters outside a char vocabulary
            ids = [self.tokenizer.eos_id]
        params = SamplingParams(max_new_tokens=self.sample_tokens, temperature=self.sample_temperature,
                                top_k=200 if self.sample_temperature > 0 else None, seed=self.seed)
        completion = Engine(model, self.tokenizer).generate_ids([ids], params)[0]
        return self.tokenizer.decode(ids) + (completion.text or "")

    def save(self, run_dir: Path, model: GPT) -> None:
        save_model(run_dir, model, self.tokenizer, stage=self.name, extra=self.save_extra)


def build_model_config(section: Mapping[str, Any], vocab_size: int, train: TrainConfig,
                       source: str = "model config") -> GPTConfig:
    """A new model's config: the preset named by ``section["preset"]``, then the section's fields, then
    ``train.block_size`` / ``train.dropout``. ``vocab_size`` is the data's (a section may not name another)."""
    GPTConfig.check_keys(section, source, extra=("preset",))
    fields = dict(section)
    preset = fields.pop("preset", None)
    if "vocab_size" in fields and fields["vocab_size"] != vocab_size:
        raise ConfigError(f"{source}: vocab_size={fields['vocab_size']} differs from the data's "
                          f"tokenizer ({vocab_size}); remove vocab_size, it comes from the data")
    fields["vocab_size"] = vocab_size
    if train.block_size is not None:
        fields["block_size"] = train.block_size
    if train.dropout is not None:
        fields["dropout"] = train.dropout
    if preset is None:
        return GPTConfig.from_dict(fields, source=source)
    if not isinstance(preset, str):
        raise ConfigError(f"{source}: preset={preset!r} should be a preset name")
    return GPTConfig.from_preset(preset, **fields)


def _model_config(run: StageRun, given: ModelGiven, vocab: int, train: TrainConfig) -> GPTConfig:
    """The run's model: a new one from file < given (< train's block_size/dropout), or on resume the saved
    one, which a given or file model must match."""
    wanted = {"preset": given} if isinstance(given, str) else (
        given.to_dict() if isinstance(given, GPTConfig) else {k: v for k, v in (given or {}).items() if v is not None})
    section = {**run.file.get("model", {}), **wanted}
    source = "the model flags" if wanted else f"{run.config_file}"
    if run.saved is not None:
        saved = GPTConfig.from_dict(run.saved["model"], source=str(run.out_dir / CONFIG_FILE))
        if saved.vocab_size != vocab:
            raise ConfigError(f"--resume: the run {run.out_dir} has vocab_size {saved.vocab_size} but the data "
                              f"has {vocab}; resume with the run's own data")
        if section and build_model_config(section, vocab, train, f"{source}: model") != saved:  # names aside
            raise ConfigError(f"--resume: the model from {source} differs from the run's ({run.out_dir / CONFIG_FILE}); "
                              f"drop --config/--preset and the model flags when resuming, or use a new --out")
        return saved
    if not section:
        if run.config_file is not None:
            raise ConfigError(f"{run.config_file}: no model: section; add one (see configs/) or pass --preset NAME")
        raise ConfigError("no model given: pass --preset NAME or --config FILE (with a model: section)")
    return build_model_config(section, vocab, train, source=f"{source}: model")


def _source_model(spec: str | os.PathLike[str], data: TokenData, data_dir: str | os.PathLike[str],
                  train: TrainConfig) -> tuple[GPT, Tokenizer | None, dict[str, Any]]:
    """The model a run continues from, cropped to ``train.block_size`` and with ``train.dropout``; its
    tokenizer; and the record of where it came from (path and weights sha256)."""
    gpt, tokenizer, config = load_run(spec)
    spec_s = os.fspath(spec)
    hf_dir = hf_dir_from_spec(spec_s)
    data_spec = data.meta.get("tokenizer")
    check_tokenizers_match(tokenizer, data.tokenizer(), model_vocab=gpt.config.vocab_size,
                           data_vocab=int(data.meta["vocab_size"]), model_name=spec_s, data_name=os.fspath(data_dir),
                           model_spec=hf_dir if hf_dir is not None else f"{spec_s}/tokenizer",
                           data_spec=data_spec if isinstance(data_spec, str) else None)
    source = gpt.config.block_size
    if train.block_size is not None and train.block_size > source:
        raise ConfigError(f"--block-size {train.block_size} exceeds the context of --init-from {spec_s} ({source}); "
                          f"a pretrained model's positions stop there: use --block-size <= {source}")
    if hf_dir is not None:
        record = {"path": f"hf:{hf_dir.resolve()}", "weights_sha256": hf_weights_sha256(hf_dir)}
    else:
        record = {"path": str(Path(spec_s).expanduser().resolve()), "weights_sha256": config["weights"]["sha256"]}
    return rebuilt(gpt, block_size=train.block_size, dropout=train.dropout).train(), tokenizer, record


def run_pretrain(data_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], model: ModelGiven = None,
                 train: Given = None, *, init_from: str | os.PathLike[str] | None = None, lora: Given = None,
                 config_file: str | os.PathLike[str] | None = None, resume: bool = False,
                 verify_data: bool = True, progress: bool = True, env: DistEnv | None = None) -> TrainResult:
    """Pretrain a new GPT, continue ``init_from``'s, or resume ``out_dir``, on ``data_dir``; configs resolve
    as in ``train.config``.

    The data's shards are checked against meta.json first (``TokenData.verify``, once per change;
    ``verify_data=False`` skips it for corpora too large to read twice). Under torchrun this joins the
    process group (DDP, or FSDP2 with ``fsdp``); only rank 0 writes files and prints.
    """
    run = StageRun(PretrainStage.name, out_dir, resume=resume, config_file=config_file, sections=("model",))
    data = TokenData(os.fspath(data_dir))
    if verify_data:
        data.verify()
    vocab = data.meta.get("vocab_size")
    if not isinstance(vocab, int) or vocab < 1:
        raise UserError(f"{data_dir}: meta.json has no valid vocab_size; re-run gptlab prepare")
    train_cfg = run.train(train)
    lora_cfg = run.lora(lora, train_cfg)
    if lora_cfg.enabled and init_from is None and not run.started:
        raise ConfigError("--lora-rank adapts a trained model: pass --init-from RUN_DIR|hf:DIR")
    source: tuple[GPT, Tokenizer | None, dict[str, Any]] | None = None
    if init_from is not None and (model or run.file.get("model")):
        raise ConfigError(f"--init-from {os.fspath(init_from)} gives the model: drop --preset, the model flags and "
                          f"the config file's model: section (--block-size and --dropout may still change it)")
    if init_from is not None and not run.started:
        source = _source_model(init_from, data, data_dir, train_cfg)
        model_cfg = source[0].config
    else:  # on resume the run's own model, whose weights the checkpoint restores
        model_cfg = _model_config(run, model, vocab, train_cfg)
    block = train_cfg.block_size or model_cfg.block_size
    if block > model_cfg.block_size:
        raise ConfigError(f"block_size {block} exceeds the model's context {model_cfg.block_size}")
    if train_cfg.dropout is not None and train_cfg.dropout != model_cfg.dropout:
        model_cfg = model_cfg.replace(dropout=train_cfg.dropout)
    with run.joined(env, train_cfg) as env:
        tokenizer = data.tokenizer() if source is None or source[1] is None else source[1]
        if run.started and run.saved is not None and "init_from" in run.saved and run.saved.get("tokenizer"):
            tokenizer = load_tokenizer(run.out_dir / TOKENIZER_DIR)  # the source's, which may extend the data's
        spec = data.meta.get("tokenizer")
        extra: dict[str, Any] = {"train": train_cfg.to_dict(),
                                 "data": {"dir": os.path.abspath(os.fspath(data_dir)),
                                          "tokenizer": spec if isinstance(spec, (str, dict)) else None}}
        extra.update(lora_cfg.record())
        if source is not None:
            extra["init_from"] = source[2]
        elif run.saved is not None and isinstance(run.saved.get("init_from"), dict):
            extra["init_from"] = run.saved["init_from"]
        run.begin(env, model_cfg, tokenizer, extra)
        stage = PretrainStage(data, train_cfg.batch_size, block, train_cfg.seed, rank=env.rank,
                              world_size=env.world_size, eval_batches=train_cfg.eval_batches, tokenizer=tokenizer,
                              sample_tokens=train_cfg.sample_tokens, sample_prompt=train_cfg.sample_prompt,
                              sample_temperature=train_cfg.sample_temperature, save_extra=extra)
        gpt = add_lora(source[0] if source is not None else GPT(model_cfg), lora_cfg)
        return run.trainer(gpt, stage, train_cfg, env, progress).fit()
