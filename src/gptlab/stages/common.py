"""What every stage shares: the set-up of a run (``StageRun``), its training defaults, and sequence batches.

A stage's ``run_*`` walks the same path every time::

    run = StageRun("dpo", out_dir, resume=resume, config_file=config_file)  # checks --out, reads the saved run
    settings = run.settings(DPOConfig, given)                                # the stage's own, kept on resume
    train = run.train(given_train, DPO_TRAIN.values, DPO_TRAIN.derive(n_pairs))  # defaults < file < saved < given
    with run.joined(env, train) as env:                                      # torchrun's group, seeded
        ...load the model and data...
        run.begin(env, gpt.config, tokenizer, extra)                         # tokenizer/ + config.json, once
        return run.trainer(model, stage, train, env).fit()

Sequences for the alignment stages are right-padded: every real token keeps its
position and causal attention never looks right, so padding needs no mask.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, TypeVar

import numpy as np
import torch
from tqdm.auto import tqdm

from ..atomic import atomic_write_json, remove_stale
from ..chat import CHAT_TOKENS, stop_ids
from ..config import Config, GPTConfig
from ..data import rank_draw
from ..engine import Completion, Engine, SamplingParams
from ..errors import ConfigError, UserError
from ..lora import LoRAConfig
from ..model import GPT, with_tokens
from ..runs import CONFIG_FILE, check_run_dir, load_run, read_run_config, run_config, save_tokenizer
from ..tokenizer import PAD, Tokenizer
from ..train.config import Given, TrainConfig, load_config_file, resolve
from ..train.dist import DistEnv, distributed
from ..train.loop import M, Stage, Trainer

__all__ = ["StageRun", "TrainDefaults", "draw_weighted", "pad_right", "responses_of", "held_out", "split_held_out", "data_record", "count_unknown",
           "sample_replies", "load_chat_model", "chat_pad_id"]

C = TypeVar("C", bound=Config)
T = TypeVar("T")


@dataclass(frozen=True)
class TrainDefaults:
    """A stage's training defaults: fixed ``values``, and the fields that follow from ``epochs`` over its data.

    With ``epochs``: ``max_steps`` makes that many passes over the items at the
    global batch (``batch_size * grad_accum * $WORLD_SIZE``), ``warmup_steps`` is
    10% of it and ``eval_every`` = ``checkpoint_every`` a tenth of it.
    """

    values: Mapping[str, Any] = field(default_factory=dict)
    epochs: float | None = None

    def derive(self, n_items: int) -> Callable[[dict[str, Any]], dict[str, Any]]:
        def derived(merged: dict[str, Any]) -> dict[str, Any]:
            if self.epochs is None:
                return {}
            per_step = merged.get("batch_size", 12) * merged.get("grad_accum", 1) * int(os.environ.get("WORLD_SIZE", "1"))
            steps = merged.get("max_steps") or max(1, math.ceil(self.epochs * n_items / per_step))
            every = max(1, math.ceil(steps / 10))
            return {"max_steps": steps, "warmup_steps": math.ceil(0.1 * steps), "eval_every": every,
                    "checkpoint_every": every}
        return derived

    def help(self) -> dict[str, str]:
        """What the CLI shows as each field's default."""
        shown = {k: repr(v) for k, v in self.values.items()}
        if self.epochs is not None:
            shown.update(max_steps=f"{self.epochs:g} epochs", warmup_steps="10% of the steps",
                         eval_every="a tenth of the steps", checkpoint_every="a tenth of the steps")
        return shown

    def config(self, n_items: int, given: Given = None) -> TrainConfig:
        """The train config of a fresh run over ``n_items`` with ``given`` fields set."""
        return resolve(TrainConfig, given, defaults=self.values, derive=self.derive(n_items))


class StageRun:
    """A stage run's set-up, done once: the run directory's state, its resolved configs, the start of the run.

    Constructed on every rank before anything is written: a started run without
    ``resume`` is an error here. ``resume`` on a directory that holds no run yet
    starts it.
    """

    def __init__(self, name: str, out_dir: str | os.PathLike[str], *, resume: bool = False,
                 config_file: str | os.PathLike[str] | None = None, sections: Sequence[str] = ()) -> None:
        self.name = name
        self.out_dir = Path(out_dir)
        self.started = check_run_dir(self.out_dir, resume)
        self.resume = resume
        self.saved = read_run_config(self.out_dir) if resume and (self.out_dir / CONFIG_FILE).is_file() else None
        known = ("train", LoRAConfig.section, *sections)
        self.file = load_config_file(config_file, known) if config_file is not None else {}
        self.config_file = os.fspath(config_file) if config_file is not None else None

    def saved_section(self, section: str) -> Mapping[str, Any] | None:
        if self.saved is None:
            return None
        value = self.saved.get(section)
        return value if isinstance(value, dict) else {}

    def _source(self, section: str) -> str:
        named = self.config_file and self.file.get(section)  # a file without the section is not the source
        return f"{self.config_file}: {section}" if named else f"{self.name} {section}"

    def train(self, given: Given = None, defaults: Mapping[str, Any] | None = None,
              derive: Callable[[dict[str, Any]], Mapping[str, Any]] | None = None) -> TrainConfig:
        """The run's TrainConfig: defaults < derived < file < saved run < given (given may change a resumed run)."""
        return resolve(TrainConfig, given, defaults=defaults, derive=derive, file=self.file.get("train"),
                       saved=self.saved_section("train"), source=self._source("train"))

    def settings(self, cls: type[C], given: Given = None) -> C:
        """The stage's own settings: on a resumed run the saved ones, which ``given`` may not change."""
        return resolve(cls, given, file=self.file.get(cls.section), saved=self.saved_section(cls.section),
                       changeable=False, source=self._source(cls.section))

    def lora(self, given: Given, train: TrainConfig) -> LoRAConfig:
        """The run's LoRA settings (kept by a resumed run, like the stage's own)."""
        lora = self.settings(LoRAConfig, given)
        if lora.enabled and train.fsdp:
            raise ConfigError("LoRA adapters are not sharded with FSDP: drop --fsdp (DDP trains them)")
        return lora

    @contextlib.contextmanager
    def joined(self, env: DistEnv | None, train: TrainConfig) -> Iterator[DistEnv]:
        """This process's place under torchrun for the run, after every rank has looked at ``out_dir``;
        torch seeded so that new weights agree across ranks."""
        with distributed(env, train.device) as joined:
            joined.barrier()
            torch.manual_seed(train.seed)
            yield joined

    def begin(self, env: DistEnv, model: GPTConfig, tokenizer: Tokenizer | None, extra: dict[str, Any]) -> None:
        """Write ``tokenizer/`` and ``config.json`` when the run starts (rank 0). A resumed run keeps its own,
        with the train config it now runs with, so that a later resume without flags knows where it ends."""
        if env.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            remove_stale(self.out_dir)
            if not self.started:
                tok_sha = save_tokenizer(self.out_dir, tokenizer) if tokenizer is not None else None
                atomic_write_json(self.out_dir / CONFIG_FILE, run_config(self.name, model, tok_sha, extra))
            elif self.saved is not None and "train" in extra:
                atomic_write_json(self.out_dir / CONFIG_FILE, {**self.saved, "train": extra["train"]})
        env.barrier()

    def trainer(self, model: M, stage: Stage[M], train: TrainConfig, env: DistEnv,
                progress: bool = True) -> Trainer[M]:
        return Trainer(model, stage, train, self.out_dir, env=env, resume=self.resume, progress=progress)


# ===================================================================== batches
def draw_weighted(seed: Sequence[int], counts: Sequence[int], batch_size: int, rank: int = 0,
                  world_size: int = 1) -> tuple[np.ndarray, float]:
    """This rank's items of one global draw (``data.rank_draw``), and the weight of their mean loss.

    When a loss is a mean over units that vary per item (target tokens), each rank's
    mean weighs its units differently from the global batch's mean. The weight
    ``world_size * mine / everyone's`` (``counts``: units per item) turns this rank's mean
    into its share of the global mean, so averaging over ranks (DDP's gradients, the
    logged loss) gives exactly one process's loss on the whole batch; it is 1 in one process.
    """
    everyone = rank_draw(seed, len(counts), batch_size * world_size)
    mine = everyone[rank * batch_size:(rank + 1) * batch_size]
    return mine, world_size * sum(counts[i] for i in mine) / max(1, sum(counts[i] for i in everyone))


# =================================================================== sequences
def pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx (N, L) right-padded with ``pad_id``, lengths (N,))."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    idx = torch.full((len(seqs), int(lengths.max())), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        idx[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    return idx, lengths


def responses_of(idx: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor,
                 width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Response tokens (N, W) aligned at their start, and their mask (N, W), from right-padded ``idx``."""
    n_resp = lengths - starts
    width = int(n_resp.max()) if width is None else width
    t = torch.arange(width, device=idx.device)
    pos = (starts[:, None] + t[None]).clamp(max=idx.shape[1] - 1)
    mask = t[None] < n_resp[:, None]
    return idx.gather(1, pos) * mask, mask


def held_out(key: str, fraction: float, seed: int) -> bool:
    """Whether ``key`` (a prompt) is in the validation share: a seeded hash, so identical prompts stay together."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


def split_held_out(keys: Sequence[str], items: Sequence[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """(train, val) of ``items``: an item is held out when its key (prompt) hashes into ``fraction``."""
    side = [held_out(k, fraction, seed) for k in keys]
    return [x for x, v in zip(items, side) if not v], [x for x, v in zip(items, side) if v]


def data_record(model_spec: Any, data_file: Any, val_file: Any = None, unk_tokens: int = 0) -> dict[str, Any]:
    """The ``data`` section of a run config: where the model and the files came from."""
    return {"train": os.path.abspath(data_file), "val": os.path.abspath(val_file) if val_file else None,
            "base_model": os.fspath(model_spec), "unk_tokens": unk_tokens}


def count_unknown(tokenizer: Tokenizer, seqs: Iterable[Sequence[int]], where: Any, say: bool) -> int:
    """The ``<|unk|>`` tokens standing for characters the vocabulary lacks in a stage's encoded rows: said
    once and recorded, as ``prepare`` counts them, rather than trained on silently."""
    unk = tokenizer.unk_id
    if unk is None:
        return 0
    n = total = 0
    for seq in seqs:
        n += sum(1 for i in seq if i == unk)
        total += len(seq)
    if n and say:
        tqdm.write(f"note: {os.fspath(where)}: {n:,} of {total:,} tokens stand for characters the vocabulary "
                   f"lacks (its unknown token)")
    return n


# ==================================================================== chat models
def load_chat_model(spec: str | os.PathLike[str], dropout: float | None = None) -> tuple[GPT, Tokenizer, dict[str, Any]]:
    """A run (or ``hf:DIR``) with the chat tokens and ``<|pad|>`` in its tokenizer and embeddings."""
    gpt, tokenizer, config = load_run(spec)
    if tokenizer is None:
        raise UserError(f"{spec}: has no tokenizer gptlab can use; alignment stages need one")
    return with_tokens(gpt, tokenizer, [*CHAT_TOKENS, PAD], dropout), tokenizer, config


def chat_pad_id(tokenizer: Tokenizer) -> int:
    """The id of ``<|pad|>``, which ``load_chat_model`` adds to every chat tokenizer."""
    if tokenizer.pad_id is None:
        raise UserError(f"the tokenizer has no {PAD} token; give a run trained with gptlab sft, rm, ppo or dpo")
    return tokenizer.pad_id


def sample_replies(gpt: GPT, tokenizer: Tokenizer, prompts: Sequence[list[int]], *, max_new_tokens: int, seed: int,
                   temperature: float = 1.0, batch_size: int = 32) -> list[Completion]:
    """The engine's ``Completion`` of each rendered chat prompt, ending at the end of the assistant's turn.

    Batch ``b`` (prompts ``b .. b + batch_size``) samples with ``seed + b``; ``gpt``'s train/eval mode is kept.
    """
    was_training = gpt.training
    engine = Engine(gpt, tokenizer)
    out = []
    for b in range(0, len(prompts), batch_size):
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + b,
                                stop_token_ids=stop_ids(tokenizer))
        out.extend(engine.generate_ids(prompts[b: b + batch_size], params))
    gpt.train(was_training)
    return out
