"""Continuous batching: sequences that join and leave a running batch decode exactly as they would alone."""

from __future__ import annotations

import random
import threading

import pytest
import torch

from gptlab import GPT, GPTConfig
from gptlab.batcher import Batcher, Piece
from gptlab.config import MODERN
from gptlab.engine import Engine, SamplingParams, penalize
from gptlab.tokenizer import CharTokenizer

TOK = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz .!?")


def _engine(block: int = 48, **overrides) -> Engine:
    torch.manual_seed(0)
    config = dict(n_layer=2, n_head=2, n_embd=32, block_size=block, vocab_size=TOK.vocab_size, **overrides)
    return Engine(GPT(GPTConfig(**config)).eval(), TOK)


class _Sink:
    """Collects one sequence's pieces; ``done`` is set by its last piece or an error."""

    def __init__(self, name: str = "", finished: list[str] | None = None) -> None:
        self.name, self.finished = name, finished  # the order sequences finish in, when asked
        self.pieces: list[Piece] = []
        self.error: BaseException | None = None
        self.done = threading.Event()

    def __call__(self, item: Piece | BaseException) -> None:
        if isinstance(item, BaseException):
            self.error = item
        else:
            self.pieces.append(item)
        if self.error is not None or item.completion is not None:
            if self.finished is not None:
                self.finished.append(self.name)
            self.done.set()


def _jobs(n: int, seed: int = 0, block: int = 48) -> list[tuple[list[int], SamplingParams]]:
    rnd = random.Random(seed)
    jobs = []
    for i in range(n):
        prompt = TOK.encode("".join(rnd.choice("abcdef ") for _ in range(rnd.randint(1, block - 10))))
        jobs.append((prompt, SamplingParams(max_new_tokens=rnd.randint(1, 40), temperature=rnd.choice([0, 0.9]),
                                            top_k=rnd.choice([None, 5]), seed=i, logprobs=2, stop_at_eos=False,
                                            frequency_penalty=rnd.choice([0.0, 0.5]))))
    return jobs


@pytest.mark.parametrize("overrides", [{}, {"attention_pattern": "DL", "attn_window": 8},
                                       {"norm_position": "post", "activation": "gelu"},
                                       {**MODERN, "zero_init_proj": False, "ffn": "moe", "n_experts": 3}])
def test_joining_and_leaving_rows_decode_exactly_as_alone(overrides):
    """Twelve sequences of different lengths and settings, submitted while others run, four at a time."""
    engine = _engine(**overrides)
    batcher = Batcher(engine, max_batch=4)
    jobs = _jobs(12)
    sinks, peak = [], 0
    try:
        for i, (prompt, params) in enumerate(jobs):
            sinks.append(_Sink())
            batcher.submit(prompt, params, sinks[-1], stream=i % 2 == 0)
            peak = max(peak, batcher.running)
        assert all(s.done.wait(60) for s in sinks)
        for i, ((prompt, params), sink) in enumerate(zip(jobs, sinks)):
            ref = engine.generate_ids([prompt], params)[0]
            got = sink.pieces[-1].completion
            assert sink.error is None and got.token_ids == ref.token_ids and got.text == ref.text, i
            assert got.logprobs == pytest.approx(ref.logprobs, abs=1e-4)
            assert [t for t, _ in got.top_logprobs[0]] == [t for t, _ in ref.top_logprobs[0]]
            streamed = i % 2 == 0
            assert "".join(p.text for p in sink.pieces) == (got.text if streamed else "")
            assert sum((p.token_ids for p in sink.pieces), []) == got.token_ids  # every token comes out once
        total = sum(len(s.pieces[-1].completion.token_ids) for s in sinks)
        assert peak <= 4 and batcher.steps < total  # rows shared steps
    finally:
        batcher.close()


def test_cancel_frees_the_slot_and_the_cache_stays_within_the_context():
    engine = _engine(block=32)
    batcher = Batcher(engine, max_batch=2)
    finished: list[str] = []
    try:
        hog = batcher.submit(TOK.encode("abc"), SamplingParams(max_new_tokens=29, stop_at_eos=False), _Sink())
        long, short = _Sink("long", finished), _Sink("short", finished)
        batcher.submit(TOK.encode("abcd"), SamplingParams(max_new_tokens=28, stop_at_eos=False), long)
        batcher.submit(TOK.encode("b"), SamplingParams(max_new_tokens=3, stop_at_eos=False), short)
        hog.cancel()  # the short sequence takes the hog's slot instead of waiting for its 29 tokens
        assert short.done.wait(30) and long.done.wait(30)
        assert finished == ["short", "long"] and len(short.pieces[-1].completion.token_ids) == 3
        # many long sequences through one batcher: the shared cache never outgrows the context
        sinks = [_Sink() for _ in range(6)]
        lengths = []
        for i, s in enumerate(sinks):
            batcher.submit(TOK.encode("ab" * (i + 1)), SamplingParams(max_new_tokens=40, stop_at_eos=False), s)
        while not all(s.done.is_set() for s in sinks):
            cache = batcher.cache
            if cache is not None:
                lengths.append(cache.length)
        assert max(lengths) <= 32 and all(len(s.pieces[-1].completion.token_ids) == 32 - 2 * (i + 1)
                                           for i, s in enumerate(sinks))
        assert batcher.running == 0 and batcher.cache is None
    finally:
        batcher.close()


def test_calls_run_between_steps_and_errors_reach_the_caller():
    engine = _engine()
    batcher = Batcher(engine)
    try:
        assert batcher.call(lambda: engine.score([([1, 2], [3])])[0][1]).result(10) == 1
        with pytest.raises(ZeroDivisionError):
            batcher.call(lambda: 1 / 0).result(10)
        sink = _Sink()
        batcher.submit([], SamplingParams(max_new_tokens=3), sink)  # an empty prompt cannot be prefilled
        assert sink.done.wait(10) and sink.error is not None
        ok = _Sink()
        batcher.submit([1], SamplingParams(max_new_tokens=0), ok)  # nothing to generate: done at once
        assert ok.done.wait(10) and ok.pieces[-1].completion.finish_reason == "length"
    finally:
        batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit([1], SamplingParams(), _Sink())


def test_penalties_subtract_presence_and_frequency_from_generated_tokens():
    logits = torch.zeros(2, 5)
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    out = penalize(logits, [[1, 1, 3], []], params)
    assert out[0].tolist() == [0.0, -1.0, 0.0, -0.75, 0.0] and out[1].tolist() == [0.0] * 5
    assert penalize(logits, [[1]], SamplingParams()) is logits
    # a strong frequency penalty makes a greedy model stop repeating itself
    engine = _engine()
    prompt = TOK.encode("abab")
    plain = engine.generate_ids([prompt], SamplingParams(max_new_tokens=30, temperature=0, stop_at_eos=False))[0]
    spread = engine.generate_ids([prompt], SamplingParams(max_new_tokens=30, temperature=0, stop_at_eos=False,
                                                          frequency_penalty=2.0))[0]
    assert len(set(spread.token_ids)) > len(set(plain.token_ids))
