"""What the alignment stages (sft, rm, dpo, ppo) share: prompt + response batches, held-out splits, run configs.

Sequences are right-padded: every real token keeps its position and causal
attention never looks right, so padding needs no attention mask. A response's
log-probs are read from the hidden states at the positions that predict it
(``starts - 1 + t``), so the vocabulary-sized logits exist only for response
tokens, never for the whole (B, T, V) sequence.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from typing import Any, Iterator, Sequence, TypeVar

import torch
import torch.nn as nn

from ..model import GPT
from ..rl import entropy_from_logits, token_logprobs

__all__ = ["pad_right", "response_positions", "responses_of", "held_out", "split_held_out", "data_record",
           "align_run_config", "stage_run", "sample_replies", "PolicyModel"]

T = TypeVar("T")


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx (N, L) right-padded with ``pad_id``, lengths (N,))."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    idx = torch.full((len(seqs), int(lengths.max())), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        idx[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    return idx, lengths


def response_positions(starts: torch.Tensor, width: int, seq_len: int) -> torch.Tensor:
    """Positions (N, width) whose next-token distribution predicts response token t (clamped in range)."""
    t = torch.arange(width, device=starts.device)
    return (starts[:, None] - 1 + t[None]).clamp(0, seq_len - 1)


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


def data_record(model_spec: Any, data_file: Any, val_file: Any = None) -> dict[str, Any]:
    """The ``data`` section of a run config: where the model and the files came from."""
    return {"train": os.path.abspath(data_file), "val": os.path.abspath(val_file) if val_file else None,
            "base_model": os.fspath(model_spec)}


def align_run_config(stage: str, gpt_config: Any, train: Any, section: dict[str, Any], data: dict[str, Any],
                     key: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the extra config.json keys of the saved model, the run's config.json) of an alignment stage.

    ``section`` is stored under ``key`` (default: the stage's name).
    """
    from ..chat import CHAT_FORMAT

    extra = {"chat_format": CHAT_FORMAT, "train": train.to_dict(), key or stage: section, "data": data}
    return extra, {"format_version": 1, "model": gpt_config.to_dict(), "tokenizer": "tokenizer", "stage": stage,
                   **extra}


def sample_replies(gpt: GPT, tokenizer: Any, prompts: Sequence[list[int]], *, max_new_tokens: int, seed: int,
                   temperature: float = 1.0, batch_size: int = 32) -> list[Any]:
    """The engine's ``Completion`` of each rendered chat prompt, ending at the end of the assistant's turn.

    Batch ``b`` (prompts ``b .. b + batch_size``) samples with ``seed + b``; ``gpt``'s train/eval mode is kept.
    """
    from ..chat import stop_ids
    from ..engine import Engine, SamplingParams

    was_training = gpt.training
    engine = Engine(gpt, tokenizer)
    out = []
    for b in range(0, len(prompts), batch_size):
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + b,
                                stop_token_ids=stop_ids(tokenizer))
        out.extend(engine.generate_ids(prompts[b: b + batch_size], params))
    gpt.train(was_training)
    return out


@contextlib.contextmanager
def stage_run(out_dir: Any, resume: bool, train: Any, env: Any, val_fraction: float = 0.0) -> Iterator[tuple[Any, bool]]:
    """(this process's ``DistEnv``, whether ``out_dir`` holds a run to resume) for a stage's ``run_*``.

    Checks the flags first, joins torchrun's group when launched by it, lets every rank look at
    ``out_dir`` before rank 0 writes there, and seeds torch so new weights agree across ranks.
    """
    from ..errors import ConfigError
    from ..trainer import check_run_dir, distributed

    if not 0 <= val_fraction < 1:
        raise ConfigError(f"val_fraction={val_fraction} must be in [0, 1)")
    with distributed(env, train.device) as env:
        started = check_run_dir(out_dir, resume)
        if env.is_distributed:
            torch.distributed.barrier()
        torch.manual_seed(train.seed)
        yield env, started


class PolicyModel(nn.Module):
    """A GPT seen as a policy over responses: per-token log-probs (and entropy) of given response tokens.

    One module call computes everything a loss needs, so DDP wraps it like any model.
    """

    def __init__(self, gpt: GPT) -> None:
        super().__init__()
        self.gpt = gpt
        self.config = gpt.config

    def flops_per_token(self, seq_len: int | None = None) -> float:
        return self.gpt.flops_per_token(seq_len)

    def forward(self, idx: torch.Tensor, starts: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(log-probs (N, W) of ``targets`` at ``temperature``, entropy (N, W) or None)."""
        h = self.gpt.hidden_states(idx)
        pos = response_positions(starts, targets.shape[1], idx.shape[1])
        logits = self.gpt.lm_head(h.gather(1, pos[..., None].expand(-1, -1, h.shape[-1])))
        logp = token_logprobs(logits, targets, temperature)
        return logp, entropy_from_logits(logits, temperature) if with_entropy else None
