"""The RLHF pieces both demos walk (``gptlab rlhf-demo`` on tweets, ``gptlab chat-demo --rlhf`` on
conversations): a fine-tuned classifier standing in for InstructGPT's human labelers, K responses sampled
from a policy per prompt and ranked by it (the rankings file ``gptlab rm`` reads), and the KL of a tuned
policy to its reference on the policy's own samples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from .align_data import Ranking
from .chat import render_prompt
from .heads import response_positions
from .model import GPT
from .stages.common import pad_right, responses_of, sample_replies
from .stages.finetune import Example, head_outputs, load_finetuned, transform
from .tokenizer import Tokenizer

__all__ = ["Labeler", "sample_responses", "rank_samples", "sequence_kl"]


class Labeler:
    """P(``label``) of task rows from a GPT-1 style fine-tuned run: the stand-in for a human labeler."""

    def __init__(self, run_dir: str | Path, label: str) -> None:
        self.model, self.tokenizer, ft = load_finetuned(run_dir)
        self.task_type = str(ft["task_type"])
        self.max_len = int(ft["max_len"])
        self.index = list(ft["labels"]).index(label)

    @torch.no_grad()
    def probability(self, rows: Sequence[Mapping[str, Any]]) -> list[float]:
        """P(label) per row; a row has the fields of the labeler's task type (``text``, or ``premise`` and
        ``hypothesis``)."""
        examples = [Example(transform(self.task_type, row, self.tokenizer, self.max_len), None) for row in rows]
        return [float(torch.softmax(o, -1)[self.index]) for o in head_outputs(self.model, examples, 64)]


def sample_responses(gpt: GPT, tokenizer: Tokenizer, prompts: Sequence[str], n: int, tokens: int,
                     seed: int) -> list[list[str]]:
    """``n`` sampled responses (text, T = 1) to each single-turn prompt."""
    ids = [render_prompt(p, tokenizer) for p in prompts for _ in range(n)]
    out = [(c.text or "").strip() for c in sample_replies(gpt.eval(), tokenizer, ids, max_new_tokens=tokens,
                                                          seed=seed, batch_size=64)]
    return [out[j * n:(j + 1) * n] for j in range(len(prompts))]


def rank_samples(prompts: Sequence[str], samples: Sequence[Sequence[str]],
                 score: Callable[[str, list[str]], list[float]]) -> list[Ranking]:
    """One ranking per prompt of its distinct non-empty samples, best ``score`` first; prompts with fewer
    than two distinct samples have nothing to compare and are left out."""
    rankings = []
    for prompt, responses in zip(prompts, samples):
        distinct = [r for r in dict.fromkeys(responses) if r.strip()]
        if len(distinct) < 2:
            continue
        scores = score(prompt, distinct)
        order = sorted(range(len(distinct)), key=lambda i: -scores[i])
        rankings.append(Ranking(prompt, [distinct[i] for i in order]))
    return rankings


@torch.no_grad()
def sequence_kl(policy: GPT, reference: GPT, pairs: Sequence[tuple[list[int], int]], pad_id: int) -> float:
    """Mean over sequences of Σ_t KL(π(·|x, y<t) ‖ π_ref(·|x, y<t)) over each response; ``pairs`` are
    (ids of prompt + response + ``<|end|>``, where the response starts), as ``chat.render_pair`` gives.

    Summing the exact per-token KL over the vocabulary (rather than log π(y_t) − log π_ref(y_t) at the
    sampled token) estimates the same sequence KL with far less variance, and is never negative.
    """
    total = 0.0
    for i in range(0, len(pairs), 64):
        chunk = pairs[i: i + 64]
        idx, lengths = pad_right([ids for ids, _ in chunk], pad_id)
        starts = torch.tensor([s for _, s in chunk])
        _, mask = responses_of(idx, starts, lengths)
        pos = response_positions(starts, mask.shape[1], idx.shape[1])[..., None]
        lp = torch.log_softmax(policy(idx).float(), -1)
        lr = torch.log_softmax(reference(idx).float(), -1)
        lp, lr = (x.gather(1, pos.expand(-1, -1, x.shape[-1])) for x in (lp, lr))
        total += float(((lp.exp() * (lp - lr)).sum(-1) * mask).sum())
    return total / max(len(pairs), 1)
