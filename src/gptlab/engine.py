"""Inference engine: KV-cache generation for the CLI, evaluation, RL rollouts and the server.

    engine = Engine.from_spec("runs/shakespeare")          # or Engine(model, tokenizer)
    engine.complete("ROMEO:", SamplingParams(max_new_tokens=50, temperature=0.8)).text
    for piece in engine.stream_text("ROMEO:", params): print(piece, end="")

Prompts of different lengths are left-padded into one batch and decoded in
lock-step through one preallocated ``KVCache``. Log-probs are those of the
distribution sampled from: ``log_softmax(logits / T)`` (T = 1 when greedy), so
RL rollouts get log-probs at their sampling temperature. ``score`` gives the
log-likelihood of given continuations (in-context evaluation, the server).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterator, Sequence

import torch

from .errors import UserError
from .model import GPT, KVCache
from .quantize import with_precision
from .runs import load_run
from .vision import VisionEncoder, image_token_id, load_vision, token_embeds
from .tokenizer import Tokenizer


Images = Sequence[torch.Tensor | None] | None  # per prompt: its images (n, C, S, S), or None


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: int = 0  # how many top alternatives to return per token
    stop_at_eos: bool = True
    stop_token_ids: list[int] = field(default_factory=list)  # e.g. chat.stop_ids: end of an assistant turn
    presence_penalty: float = 0.0  # OpenAI's: subtracted from the logit of every token generated so far
    frequency_penalty: float = 0.0  # ... times how often it was generated
    slide: bool = False  # past the context, go on reading its last block_size tokens (nanoGPT's window)
    skip_special_tokens: bool = True  # special tokens (<|end|>, ...) are not text: left out of decoded output

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise UserError(f"max_new_tokens={self.max_new_tokens} must be >= 0")
        if self.temperature < 0:
            raise UserError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"top_k={self.top_k} must be >= 1")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise UserError(f"top_p={self.top_p} must be in (0, 1]")


@dataclass
class Completion:
    token_ids: list[int]
    text: str | None
    finish_reason: str  # "stop" (stop string or EOS) or "length"
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]
    prompt_tokens: int
    stop_token: int | None = None  # the stop id that ended it (not in token_ids), if one did


@dataclass
class _Row:
    """One sequence being decoded; shared by the engine's lock-step loop and the server's batcher."""

    prompt_len: int
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    text: str | None = None
    finish: str | None = None
    stop_token: int | None = None
    shown: int = 0  # characters of ``text`` already handed out by ``fresh_text``
    skip_special: bool = True  # ``SamplingParams.skip_special_tokens``

    def decode(self, tokenizer: Tokenizer) -> str:
        return tokenizer.decode_text(self.ids) if self.skip_special else tokenizer.decode(self.ids)

    def accept(self, token: int, logprob: float, top: list[tuple[int, float]] | None, stop_ids: set[int],
               stops: Sequence[str], tokenizer: Tokenizer | None) -> None:
        """Append a sampled token; a stop id ends the row (and is not kept), as does a stop string
        (the text is cut before it). ``tokenizer`` None: no text is tracked."""
        if token in stop_ids:
            self.finish, self.stop_token = "stop", token
        else:
            self.ids.append(token)
            self.logprobs.append(logprob)
            if top is not None:
                self.top.append(top)
        if tokenizer is not None:
            self.text = self.decode(tokenizer)
            cut = min((self.text.find(s) for s in stops if s in self.text), default=-1)
            if cut >= 0:
                self.text, self.finish = self.text[:cut], "stop"

    def fresh_text(self, stops: Sequence[str]) -> str:
        """Text that became safe to show since the last call: never a partial stop string or UTF-8 char."""
        text = self.text or ""
        safe = len(text) if self.finish else len(text) - _held_back(text, stops)
        if safe <= self.shown:
            return ""
        piece, self.shown = text[self.shown:safe], safe
        return piece


def sample_next(logits: torch.Tensor, params: SamplingParams,
                generator: torch.Generator | None | Sequence[torch.Generator | None]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row from (B, V) logits; returns (tokens (B,), log-probs (B, V)).

    ``generator``: one for the whole batch, or one per row (the server's requests each have their own
    seed; a row then draws exactly what it would draw alone).
    """
    if params.temperature == 0:
        return logits.argmax(-1), torch.log_softmax(logits.float(), -1)
    logits = logits.float() / params.temperature
    logprobs = torch.log_softmax(logits, -1)
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, -1) >= params.top_p  # keep the token that crosses p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    # Exponential race (argmax p / E, E ~ Exp(1)) draws from p like torch.multinomial, 2-4x faster on CPU
    probs = torch.softmax(logits, -1)
    race = torch.empty_like(probs)
    if isinstance(generator, Sequence):
        for row, g in zip(race, generator):
            row.exponential_(generator=g)
    else:
        race.exponential_(generator=generator)
    return (probs / race).argmax(-1), logprobs


def penalize(logits: torch.Tensor, histories: Sequence[Sequence[int]], params: SamplingParams) -> torch.Tensor:
    """OpenAI's presence and frequency penalties on (B, V) logits, from each row's generated tokens."""
    if not (params.presence_penalty or params.frequency_penalty) or not any(histories):
        return logits
    counts = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
    for b, ids in enumerate(histories):
        if ids:
            counts[b].index_add_(0, torch.tensor(ids, device=logits.device),
                                 torch.ones(len(ids), device=logits.device))
    return logits.float() - params.frequency_penalty * counts - params.presence_penalty * (counts > 0)


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters could still grow into a stop string (or are a partial UTF-8 char)."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                hold = max(hold, k)
                break
    if text.endswith("\ufffd"):
        hold = max(hold, len(text) - len(text.rstrip("\ufffd")))
    return hold


class Engine:
    """Generation over a model; ``precision="int8"`` decodes through int8 weights on CPU (quantize.py).

    With a ``vision`` encoder (an image-input chat run), a prompt may come with its images: a tensor
    (n, C, S, S) per prompt, one image for each run of ``<|image|>`` tokens in it (vision.py).
    """

    def __init__(self, model: GPT, tokenizer: Tokenizer | None = None, precision: str = "fp32",
                 vision: VisionEncoder | None = None):
        self.model = with_precision(model.eval(), precision)
        self.tokenizer = tokenizer
        self.config = model.config
        self.vision = vision.eval() if vision is not None else None

    @classmethod
    def from_spec(cls, spec: str, device: str | torch.device = "cpu", precision: str = "fp32") -> "Engine":
        model, tokenizer, config = load_run(spec, device=device)
        return cls(model, tokenizer, precision, load_vision(spec, config, model))

    @property
    def device(self) -> torch.device:
        return self.model.wte.weight.device

    # -------------------------------------------------------------- public
    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise UserError("this model has no tokenizer: pass token ids, or convert/train with a tokenizer")
        return self.tokenizer.encode(text)

    def complete(self, prompt: str, params: SamplingParams) -> Completion:
        return self.generate([prompt], params)[0]

    def generate(self, prompts: Sequence[str], params: SamplingParams) -> list[Completion]:
        return self.generate_ids([self.encode(p) for p in prompts], params)

    def generate_ids(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                     images: Images = None) -> list[Completion]:
        rows: list[_Row] = []
        for rows in self._decode(prompts, params, images=images):
            pass
        return [self.completion(r) for r in rows]

    @torch.inference_mode()
    def score(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
              batch_size: int = 16) -> list[tuple[float, int, bool]]:
        """(summed log-prob, token count, is-greedy) of each continuation given its context.

        lm-evaluation-harness's ``loglikelihood``: log-probs at temperature 1, and
        is-greedy is True when every continuation token is the argmax given what
        precedes it (so greedy decoding would reproduce the continuation). A
        context is truncated from the left so context + continuation fit the
        window: the last token is only predicted, never fed, so up to
        ``block_size + 1`` tokens fit. Requests are sorted longest first (a batch
        holds similar lengths, and an out-of-memory shows on the first batch) and
        right-padded: every real token keeps its unpadded position and causal
        attention never looks right, so padding needs no mask.
        """
        if batch_size < 1:
            raise UserError(f"batch_size={batch_size} must be >= 1")
        block = self.config.block_size
        seqs: list[list[int]] = []
        for context, continuation in requests:
            if not continuation:
                raise UserError("empty continuation: give at least one token to score")
            if not context:
                raise UserError("empty context: give at least one token (e.g. the end-of-text token)")
            if len(continuation) > block:
                raise UserError(f"continuation of {len(continuation)} tokens does not fit the model's "
                                f"context of {block} tokens")
            seqs.append((list(context) + list(continuation))[-(block + 1):])
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        out: list[tuple[float, int, bool]] = [(0.0, 0, False)] * len(seqs)
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            T = len(seqs[chunk[0]]) - 1
            idx = torch.zeros(len(chunk), T, dtype=torch.long)
            for b, i in enumerate(chunk):
                idx[b, :len(seqs[i]) - 1] = torch.tensor(seqs[i][:-1])
            hidden = self.model.hidden_states(idx.to(self.device))
            for b, i in enumerate(chunk):
                n, end = len(requests[i][1]), len(seqs[i]) - 1
                logprobs = torch.log_softmax(self.model.logits(hidden[b, end - n:end]).float(), -1)
                target = torch.tensor(seqs[i][-n:], device=self.device)
                total = logprobs.gather(-1, target[:, None]).sum().item()
                out[i] = (total, n, bool((logprobs.argmax(-1) == target).all()))
        return out

    def stream_text(self, prompt: str, params: SamplingParams) -> Iterator[str]:
        """Yield the continuation's text piece by piece; a stop string never appears, even partially."""
        return self.stream_ids(self.encode(prompt), params)

    def stream_ids(self, prompt: Sequence[int], params: SamplingParams,
                   images: torch.Tensor | None = None) -> Iterator[str]:
        """``stream_text`` for a prompt given as token ids (e.g. a rendered chat) and its images."""
        for piece, _ in self.stream_pieces(prompt, params, images):
            if piece:
                yield piece

    def stream_pieces(self, prompt: Sequence[int], params: SamplingParams, images: torch.Tensor | None = None
                      ) -> Iterator[tuple[str, Completion | None]]:
        """Text pieces as they become safe to show, then ``("", the final Completion)``.

        What a server needs to stream: the text, and at the end the finish reason and token counts.
        """
        row = None
        for (row,) in self._decode([list(prompt)], params, track_text=True,
                                   images=None if images is None else [images]):
            piece = row.fresh_text(params.stop)
            if piece:
                yield piece, None
        if row is not None:
            yield "", self.completion(row)

    def stop_ids(self, params: SamplingParams) -> set[int]:
        """Token ids that end a sequence: the params' own, and EOS unless ``stop_at_eos`` is off."""
        ids = set(params.stop_token_ids)
        if self.tokenizer is not None and params.stop_at_eos:
            ids.add(self.tokenizer.eos_id)
        return ids

    # ------------------------------------------------------------- internals
    def completion(self, row: _Row) -> Completion:
        text = row.text
        if text is None and self.tokenizer is not None:
            text = row.decode(self.tokenizer)
        return Completion(token_ids=row.ids, text=text, finish_reason=row.finish or "length",
                          logprobs=row.logprobs, top_logprobs=row.top, prompt_tokens=row.prompt_len,
                          stop_token=row.stop_token)

    def prefill(self, prompts: Sequence[Sequence[int]], room: int, images: Images = None
                ) -> tuple[torch.Tensor, KVCache, torch.Tensor]:
        """Run left-padded prompts (with their images) through a new cache with ``room`` free positions.

        Returns the next-token logits (B, V), the cache, and each row's next position (B, 1).
        """
        B, T = len(prompts), max(len(p) for p in prompts)
        idx = torch.zeros(B, T, dtype=torch.long)
        valid = torch.zeros(B, T, dtype=torch.bool)
        for b, p in enumerate(prompts):
            idx[b, T - len(p):] = torch.tensor(list(p), dtype=torch.long)
            valid[b, T - len(p):] = True
        idx, valid = idx.to(self.device), valid.to(self.device)
        positions = (valid.long().cumsum(1) - 1).clamp(min=0)
        cache = KVCache(self.config, B, max_len=T + room, device=self.device, dtype=self.model.wte.weight.dtype)
        cache.set_padding(valid)
        logits = self.model(idx, cache=cache, positions=positions, token_embeds=self.image_embeds(idx, images))[:, -1]
        return logits, cache, positions[:, -1:] + 1

    def image_embeds(self, idx: torch.Tensor, images: Images) -> torch.Tensor | None:
        """The token embeddings of ``idx`` with its images in place, or None for text alone."""
        given = [im for im in images or [] if im is not None and len(im)]
        if self.vision is None or self.tokenizer is None:
            if given:
                raise UserError("this model does not take images: serve or load an image-input chat run "
                                "(gptlab images chat-train)")
            return None
        image_id = image_token_id(self.tokenizer)
        if not given and not bool((idx == image_id).any()):
            return None
        cfg = self.vision.cfg
        pics = torch.cat(given) if given else torch.zeros(0, cfg.channels, cfg.image_size, cfg.image_size)
        return token_embeds(self.model, self.vision, idx, image_id, pics)  # image tokens and images must agree

    @staticmethod
    def draw(logits: torch.Tensor, rows: Sequence[_Row], params: SamplingParams,
             generator: torch.Generator | None | Sequence[torch.Generator | None]
             ) -> tuple[torch.Tensor, list[float], list[list[tuple[int, float]] | None]]:
        """One token per row from (B, V) logits after the rows' penalties: (tokens (B,), their log-probs,
        their top alternatives (None without ``params.logprobs``))."""
        logits = penalize(logits, [r.ids for r in rows], params)
        tokens, logprobs = sample_next(logits, params, generator)
        chosen = logprobs.gather(-1, tokens[:, None]).squeeze(-1).tolist()
        if not params.logprobs:
            return tokens, chosen, [None] * len(rows)
        top = torch.topk(logprobs, params.logprobs, dim=-1)
        return tokens, chosen, [list(zip(i, v)) for i, v in zip(top.indices.tolist(), top.values.tolist())]

    @torch.inference_mode()
    def _decode(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                track_text: bool = False, images: Images = None) -> Iterator[list[_Row]]:
        """The decoding loop; yields the rows after every step (the last yield is final)."""
        cfg = self.config
        if not prompts:
            return
        lengths = [len(p) for p in prompts]
        if min(lengths) == 0:
            raise UserError("empty prompt: give at least one token (e.g. the end-of-text token)")
        if images is not None and params.slide:
            params = replace(params, slide=False)  # a window sliding past an image would cut it in two
        if max(lengths) >= cfg.block_size and not params.slide:
            raise UserError(f"prompt of {max(lengths)} tokens does not fit the model's context of "
                            f"{cfg.block_size} with room to generate: shorten it (or let the window slide)")
        history = [list(p) for p in prompts]  # what a sliding window reads from
        prompts = [p[-cfg.block_size:] for p in history]
        room = cfg.block_size - max(len(p) for p in prompts)
        max_new = params.max_new_tokens if params.slide else min(params.max_new_tokens, room)
        track_text = track_text or bool(params.stop)
        if track_text and self.tokenizer is None:
            raise UserError("stop strings and streaming need a tokenizer")
        stop_ids = self.stop_ids(params)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)

        rows = [_Row(prompt_len=n, skip_special=params.skip_special_tokens) for n in lengths]
        if max_new == 0:
            for r in rows:
                r.finish, r.text = "length", "" if track_text else None
            yield rows
            return
        logits, cache, next_pos = self.prefill(prompts, room=min(max_new, room), images=images)
        for step in range(max_new):
            tokens, chosen, tops = self.draw(logits, rows, params, generator)
            for r, tok, lp, top in zip(rows, tokens.tolist(), chosen, tops):
                if not r.finish:
                    r.accept(tok, lp, top, stop_ids, params.stop, self.tokenizer if track_text else None)
            if step == max_new - 1:
                for r in rows:
                    r.finish = r.finish or "length"
            yield rows
            if all(r.finish for r in rows):
                return
            if cache.length < cache.max_len:
                logits = self.model(tokens[:, None], cache=cache, positions=next_pos)[:, -1]
                next_pos = next_pos + 1
            else:  # the context is full: the next token sees the last block_size tokens, as in nanoGPT
                logits, cache, next_pos = self.prefill([(h + r.ids)[-cfg.block_size:] for h, r in zip(history, rows)],
                                                       room=0)
