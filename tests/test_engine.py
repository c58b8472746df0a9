"""The engine: cache vs no cache, batched vs one-by-one, stop strings, seeds, log-probs, streaming."""

from __future__ import annotations

import pytest
import torch

from gptlab import GPT, GPTConfig
from gptlab.engine import Engine, SamplingParams, sample_next
from gptlab.errors import UserError
from gptlab.model import MoE
from gptlab.tokenizer import CharTokenizer

ALPHABET = "abcdefghijklmnopqrstuvwxyz .,!\n"


@pytest.fixture(scope="module", params=["tiny", "tiny-gpt1", "tiny-gpt3", "modern-tiny-moe"])
def model(request):
    torch.manual_seed(0)
    # modern: random output projections, or every block would start as the identity
    modern = {"zero_init_proj": False} if request.param.startswith("modern") else {}
    cfg = GPTConfig.from_preset(request.param, vocab_size=64, block_size=96, attn_window=8, **modern)
    return GPT(cfg).eval()


def greedy_without_cache(model, prompt, n):
    """Reference: recompute the whole sequence every step, no cache, no padding."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_with_cache_equals_greedy_without_cache(model):
    prompt = [3, 14, 15, 9, 2, 6]
    out = Engine(model).generate_ids([prompt], SamplingParams(max_new_tokens=40, temperature=0))[0]
    assert out.token_ids == greedy_without_cache(model, prompt, 40)
    assert out.finish_reason == "length" and out.prompt_tokens == 6


def test_batched_equals_one_by_one(model):
    engine = Engine(model)
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [5], [40, 41, 42, 43]]
    params = SamplingParams(max_new_tokens=25, temperature=0, logprobs=3)
    batched = engine.generate_ids(prompts, params)
    for p, b in zip(prompts, batched):
        alone = engine.generate_ids([p], params)[0]
        assert b.token_ids == alone.token_ids
        torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(alone.logprobs), atol=1e-4, rtol=0)


def test_same_seed_same_sample_and_different_seed_differs(model):
    engine = Engine(model)
    p = SamplingParams(max_new_tokens=30, temperature=1.0, seed=123)
    a = engine.generate_ids([[1, 2, 3]], p)[0].token_ids
    b = engine.generate_ids([[1, 2, 3]], p)[0].token_ids
    c = engine.generate_ids([[1, 2, 3]], SamplingParams(max_new_tokens=30, temperature=1.0, seed=124))[0].token_ids
    assert a == b and a != c


def test_logprobs_are_at_the_sampling_temperature(model):
    engine = Engine(model)
    prompt = [7, 8, 9]
    out = engine.generate_ids([prompt], SamplingParams(max_new_tokens=5, temperature=0.7, seed=0, logprobs=4))[0]
    ids = prompt + out.token_ids
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0, len(prompt) - 1:-1] / 0.7
    ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(out.token_ids)[:, None]).squeeze(-1)
    torch.testing.assert_close(torch.tensor(out.logprobs), ref, atol=1e-4, rtol=0)
    assert all(len(t) == 4 for t in out.top_logprobs)
    assert all(t[0][1] >= t[-1][1] for t in out.top_logprobs)


def test_top_k_one_is_greedy_and_top_p_keeps_the_crossing_token():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    g = torch.Generator().manual_seed(0)
    tok, _ = sample_next(logits, SamplingParams(temperature=1.0, top_k=1), g)
    assert torch.equal(tok, logits.argmax(-1))
    tok, _ = sample_next(logits, SamplingParams(temperature=1.0, top_p=1e-6), g)
    assert torch.equal(tok, logits.argmax(-1))
    allowed = set()
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    for s in range(200):
        t, _ = sample_next(probs, SamplingParams(temperature=1.0, top_p=0.7), torch.Generator().manual_seed(s))
        allowed.add(int(t))
    assert allowed == {0, 1}


# ------------------------------------------------------------ text-level
@pytest.fixture(scope="module")
def char_engine():
    torch.manual_seed(0)
    tok = CharTokenizer.from_text(ALPHABET)
    cfg = GPTConfig.from_preset("tiny", vocab_size=tok.vocab_size, block_size=128)
    return Engine(GPT(cfg).eval(), tok)


def test_stop_strings_cut_exactly(char_engine):
    sampled = dict(max_new_tokens=60, temperature=1.0, seed=0, stop_at_eos=False)
    base = char_engine.complete("hello", SamplingParams(**sampled))
    assert base.finish_reason == "length" and len(base.token_ids) == 60
    stop = base.text[20:23]
    first = base.text.find(stop)
    out = char_engine.complete("hello", SamplingParams(**sampled, stop=[stop, "\x00never"]))
    assert out.text == base.text[:first] and stop not in out.text
    assert out.finish_reason == "stop"


def test_streaming_concatenates_to_the_completion_and_never_leaks_a_stop(char_engine):
    base = char_engine.complete("the ", SamplingParams(max_new_tokens=50, temperature=1.0, seed=1, stop_at_eos=False))
    stop = base.text[30:34]
    params = SamplingParams(max_new_tokens=50, temperature=1.0, seed=1, stop=[stop], stop_at_eos=False)
    pieces = list(char_engine.stream_text("the ", params))
    full = char_engine.complete("the ", params)
    assert full.finish_reason == "stop" and full.text == base.text[:base.text.find(stop)]
    # Any partially emitted stop string would make the stream longer than the cut completion.
    assert "".join(pieces) == full.text
    assert len(pieces) > 5


def test_eos_stops_generation_and_is_not_returned():
    tok = CharTokenizer.from_text(ALPHABET)
    cfg = GPTConfig.from_preset("tiny", vocab_size=tok.vocab_size, block_size=64)
    model = GPT(cfg).eval()
    with torch.no_grad():  # make EOS the argmax everywhere
        model.lm_head.weight.data[tok.eos_id] = 0
        model.h[-1].mlp.c_proj.bias.data.zero_()
        model.ln_f.bias.data.zero_()
        model.ln_f.bias.data[0] = 50.0
        model.lm_head.weight.data[tok.eos_id, 0] = 1.0
    out = Engine(model, tok).complete("abc", SamplingParams(max_new_tokens=10, temperature=0))
    assert out.token_ids == [] and out.finish_reason == "stop" and out.text == ""


def test_prompt_beyond_context_and_bad_params_are_user_errors(char_engine):
    with pytest.raises(UserError, match="context"):
        char_engine.complete("a" * 200, SamplingParams(max_new_tokens=5))
    with pytest.raises(UserError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(UserError, match="top_p"):
        SamplingParams(top_p=1.5)


def test_max_new_tokens_is_clamped_to_the_context(char_engine):
    out = char_engine.complete("a" * 120, SamplingParams(max_new_tokens=50, temperature=0, stop_at_eos=False))
    assert len(out.token_ids) == 8 and out.finish_reason == "length"


# ------------------------------------------------------------------ int8 path
def test_int8_linear_matches_float_within_quantisation_error():
    from gptlab.quantize import Int8DynamicLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 200)
    x = torch.randn(3, 7, 96)
    with torch.inference_mode():
        ref, out = lin(x), Int8DynamicLinear(lin)(x)
    assert out.shape == ref.shape
    assert (out - ref).abs().max() / ref.abs().max() < 0.03


def test_int8_engine_copies_the_model_and_tracks_fp32_logits():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny")).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    engine = Engine(model, precision="int8")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    x = torch.randint(0, 2048, (2, 40))
    with torch.inference_mode():
        ref, out = model(x), engine.model(x)
    assert (out - ref).abs().max() / ref.abs().max() < 0.05
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
    with pytest.raises(UserError, match="precision"):
        Engine(model, precision="int4")


def test_int8_keeps_moe_routers_in_float32():
    model = GPT(GPTConfig.from_preset("tiny-moe", n_layer=2)).eval()
    fast = Engine(model, precision="int8").model
    assert all(type(block.mlp.router) is torch.nn.Linear and type(block.mlp.experts[0].c_fc) is not torch.nn.Linear
               for block in fast.h)


def test_sampling_draws_from_the_softmax_distribution():
    """40,000 draws from a known 4-way distribution land within 4 standard errors of its probabilities."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().repeat(40_000, 1)
    tokens, _ = sample_next(logits, SamplingParams(temperature=1.0), torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens, minlength=4).float() / len(tokens)
    stderr = (probs * (1 - probs) / len(tokens)).sqrt()
    assert ((freq - probs).abs() < 4 * stderr).all(), freq
