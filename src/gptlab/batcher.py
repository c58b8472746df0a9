"""Continuous (dynamic) batching: sequences join the running batch between decode steps.

    batcher = Batcher(engine, max_batch=16)
    ticket = batcher.submit(prompt_ids, params, emit)   # from any thread; emit(Piece) runs on the worker
    ticket.cancel()                                     # the client went away: its row leaves at the next step
    result = batcher.call(fn).result()                  # any other model work, between two steps

One worker thread owns the model. Each step it admits waiting sequences (their
prompts are prefilled together, then their caches are merged into the running
one), samples one token for every running row with that row's own sampling
parameters and seed, drops finished and cancelled rows, and feeds the rest one
token through the shared KV cache. Rows are right-aligned in the cache (left
padding is masked) and every row keeps its own positions, so a row decodes
exactly as it would alone, up to float rounding. The cache is rebuilt when rows
join or leave, trimmed to the longest remaining row, so its length never exceeds
the context however long the server runs.
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .engine import Completion, Engine, SamplingParams, _Row
from .config import GPTConfig
from .model import KVCache

CACHE_CHUNK = 64  # positions the cache grows by, so it is not re-allocated every step


@dataclass
class Piece:
    """What a sequence produced since its last piece: text safe to show, the tokens behind it
    (with log-probs and top alternatives), and the final Completion on the last piece."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]
    completion: Completion | None = None


class Ticket:
    """A submitted sequence; ``cancel()`` frees its slot at the next step."""

    def __init__(self, prompt: list[int], params: SamplingParams, emit: Callable[[Piece | BaseException], None],
                 stream: bool, images: torch.Tensor | None = None):
        self.prompt, self.params, self.emit, self.stream = prompt, params, emit, stream
        self.images = images  # (n, C, S, S) for the prompt's <|image|> runs (an image-input model), or None
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class _Seq:
    ticket: Ticket
    row: _Row
    stop_ids: set[int]
    track_text: bool
    max_new: int
    generator: torch.Generator | None
    steps: int = 0
    sent_tokens: int = 0  # tokens already handed out in pieces


def _real_lengths(cache: KVCache) -> list[int]:
    return cache.valid[:, :cache.length].sum(1).tolist()


def _combine(config: GPTConfig, parts: Sequence[tuple[KVCache, list[int]]], room: int) -> KVCache:
    """A new cache with rows ``rows`` of each part, right-aligned and trimmed to the longest row,
    with ``room`` free positions after it."""
    first = parts[0][0]
    lengths = [_real_lengths(cache) for cache, _ in parts]
    length = max(lengths[p][r] for p, (_, rows) in enumerate(parts) for r in rows)
    B = sum(len(rows) for _, rows in parts)
    out = KVCache(config, B, max_len=length + room, device=first.k.device, dtype=first.k.dtype)
    valid = torch.zeros(B, length, dtype=torch.bool, device=first.valid.device)
    b = 0
    for cache, rows in parts:
        if not rows:
            continue
        take = min(cache.length, length)
        idx = torch.tensor(rows, device=cache.k.device)
        span = slice(cache.length - take, cache.length)
        out.k[:, b:b + len(rows), :, length - take:length] = cache.k[:, idx, :, span]
        out.v[:, b:b + len(rows), :, length - take:length] = cache.v[:, idx, :, span]
        valid[b:b + len(rows), length - take:] = cache.valid[idx, span]
        b += len(rows)
    out.set_padding(valid)
    out.length = length
    return out


class Batcher:
    """The server's decode loop over one engine; see the module docstring."""

    def __init__(self, engine: Engine, max_batch: int = 16):
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch} must be >= 1")
        self.engine, self.max_batch = engine, max_batch
        self.block = engine.config.block_size
        self.cond = threading.Condition()
        self.waiting: deque[Ticket] = deque()
        self.jobs: deque[tuple[Callable[[], Any], Future]] = deque()
        self.active: list[_Seq] = []
        self.cache: KVCache | None = None
        self.logits: torch.Tensor | None = None
        self.next_pos: torch.Tensor | None = None
        self.closed = False
        self.steps = 0  # decode steps run (for tests and metrics)
        self.thread = threading.Thread(target=self._loop, name="gptlab-batcher", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------ public
    def submit(self, prompt: Sequence[int], params: SamplingParams,
               emit: Callable[[Piece | BaseException], None], stream: bool = True,
               images: torch.Tensor | None = None) -> Ticket:
        """Queue a sequence (with the images of its prompt). ``emit`` gets Pieces (text pieces only when
        ``stream``; the last carries the Completion) or the exception that ended it; it runs on the worker
        thread and must not block."""
        ticket = Ticket(list(prompt), params, emit, stream, images)
        with self.cond:
            if self.closed:
                raise RuntimeError("the batcher is closed")
            self.waiting.append(ticket)
            self.cond.notify()
        return ticket

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn()`` on the worker between two decode steps (model work that must not race the batch)."""
        future: Future = Future()
        with self.cond:
            if self.closed:
                raise RuntimeError("the batcher is closed")
            self.jobs.append((fn, future))
            self.cond.notify()
        return future

    @property
    def running(self) -> int:
        return len(self.active)

    @property
    def queued(self) -> int:
        return len(self.waiting)

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify()
        self.thread.join(timeout=30)

    # ------------------------------------------------------------ worker
    def _loop(self) -> None:
        while True:
            with self.cond:
                while not (self.closed or self.waiting or self.jobs or self.active):
                    self.cond.wait()
                if self.closed:
                    break
                jobs = list(self.jobs)
                self.jobs.clear()
                joining: list[Ticket] = []
                while self.waiting and len(self.active) + len(joining) < self.max_batch:
                    joining.append(self.waiting.popleft())
            for fn, future in jobs:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as e:  # noqa: BLE001 - handed to the caller
                        future.set_exception(e)
            with torch.inference_mode():
                try:
                    self._admit([t for t in joining if not t.cancelled])
                except Exception as e:  # noqa: BLE001 - the joining sequences get the error, the batch goes on
                    for t in joining:
                        t.emit(e)
                try:
                    if self.active:
                        self._step()
                except Exception as e:  # noqa: BLE001 - every running sequence gets the error, the loop goes on
                    for s in self.active:
                        s.ticket.emit(e)
                    self.active, self.cache, self.logits, self.next_pos = [], None, None, None
        for t in self.waiting:
            t.emit(RuntimeError("the server is shutting down"))
        for s in self.active:
            s.ticket.emit(RuntimeError("the server is shutting down"))

    def _admit(self, tickets: list[Ticket]) -> None:
        seqs = []
        for t in tickets:
            p = t.params
            generator = None
            if p.seed is not None:
                generator = torch.Generator(device=self.engine.device).manual_seed(p.seed)
            row = _Row(prompt_len=len(t.prompt), skip_special=p.skip_special_tokens)
            s = _Seq(t, row, self.engine.stop_ids(p), t.stream or bool(p.stop),
                     min(p.max_new_tokens, self.block - len(t.prompt)), generator)
            if s.max_new <= 0:
                s.row.finish, s.row.text = "length", ""
                self._finish(s)
            else:
                seqs.append(s)
        if not seqs:
            return
        logits, cache, next_pos = self.engine.prefill([s.ticket.prompt for s in seqs], room=0,
                                                      images=[s.ticket.images for s in seqs])
        if self.cache is None:
            parts = [(cache, list(range(len(seqs))))]
        else:
            assert self.logits is not None and self.next_pos is not None  # set and cleared with the cache
            parts = [(self.cache, list(range(len(self.active)))), (cache, list(range(len(seqs))))]
            logits = torch.cat([self.logits, logits])
            next_pos = torch.cat([self.next_pos, next_pos])
        self.cache = _combine(self.engine.config, parts, CACHE_CHUNK)
        self.active += seqs
        self.logits, self.next_pos = logits, next_pos

    def _step(self) -> None:
        assert self.cache is not None and self.logits is not None and self.next_pos is not None  # set with active
        tokens = [0] * len(self.active)
        for idx in self._groups():
            params = self.active[idx[0]].ticket.params
            seqs = [self.active[i] for i in idx]
            generators = [s.generator for s in seqs]  # all None: one draw from the global generator
            drawn, chosen, tops = self.engine.draw(self.logits[idx], [s.row for s in seqs], params,
                                                   None if not any(generators) else generators)
            for i, s, tok, lp, top in zip(idx, seqs, drawn.tolist(), chosen, tops):
                tokens[i] = tok
                s.row.accept(tok, lp, top, s.stop_ids, s.ticket.params.stop,
                             self.engine.tokenizer if s.track_text else None)
        for s in self.active:
            s.steps += 1
            if s.steps >= s.max_new:
                s.row.finish = s.row.finish or "length"
            if s.row.finish:
                self._finish(s)
            elif s.ticket.stream:
                self._send(s)
        self.steps += 1
        keep = [i for i, s in enumerate(self.active) if not (s.row.finish or s.ticket.cancelled)]
        if len(keep) < len(self.active):
            self.active = [self.active[i] for i in keep]
            if not keep:
                self.cache, self.logits, self.next_pos = None, None, None
                return
            self.cache = _combine(self.engine.config, [(self.cache, keep)], CACHE_CHUNK)
            self.next_pos = self.next_pos[keep]
        elif self.cache.length == self.cache.max_len:
            self.cache = _combine(self.engine.config, [(self.cache, keep)], CACHE_CHUNK)
        fed = torch.tensor([tokens[i] for i in keep], device=self.logits.device)
        self.logits = self.engine.model(fed[:, None], cache=self.cache, positions=self.next_pos)[:, -1]
        self.next_pos = self.next_pos + 1

    def _groups(self) -> list[list[int]]:
        """Rows that sample alike (same temperature, top-k/p, penalties, log-probs): one draw per group."""
        groups: dict[tuple, list[int]] = {}
        for i, s in enumerate(self.active):
            p = s.ticket.params
            key = (p.temperature, p.top_k, p.top_p, p.presence_penalty, p.frequency_penalty, p.logprobs)
            groups.setdefault(key, []).append(i)
        return list(groups.values())

    def _send(self, s: _Seq) -> None:
        text = s.row.fresh_text(s.ticket.params.stop)
        if not text and s.row.finish is None:
            return
        n = len(s.row.ids)  # the tokens behind a piece: all since the last one (held-back text included)
        piece = Piece(text, s.row.ids[s.sent_tokens:n], s.row.logprobs[s.sent_tokens:n],
                      s.row.top[s.sent_tokens:n])
        s.sent_tokens = n
        if s.row.finish:
            piece.completion = self.engine.completion(s.row)
        s.ticket.emit(piece)

    def _finish(self, s: _Seq) -> None:
        if s.ticket.stream:
            self._send(s)
        else:
            c = self.engine.completion(s.row)
            s.ticket.emit(Piece("", c.token_ids, c.logprobs, c.top_logprobs, c))
