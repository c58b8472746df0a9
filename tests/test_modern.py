"""The modern block family and the mixture of experts: each option against a plain reference computation,
the router against a per-token loop, one expert against the dense model, gradients, the cache and the trace."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from gptlab import GPT, GPTConfig, KVCache
from gptlab.cli import main
from gptlab.config import MODERN, PRESETS
from gptlab.engine import Engine, SamplingParams
from gptlab.errors import ConfigError
from gptlab.model import MoE, apply_rotary, rotary_angles, router_losses
from gptlab.runs import load_run, save_model
from gptlab.tokenizer import EOS, CharTokenizer
from gptlab.train.metrics import read_metrics

BASE = dict(n_layer=2, n_head=4, n_embd=32, block_size=48, vocab_size=61)
OPTIONS = {  # each modern option alone, then all of them, then MoE (dense-style and modern)
    "rotary": dict(pos_embedding="rotary"), "rmsnorm": dict(norm="rmsnorm"), "qk_norm": dict(qk_norm=True),
    "relu2": dict(activation="relu2"), "untied": dict(tie_embeddings=False), "no_bias": dict(bias=False),
    "softcap": dict(logit_softcap=2.0), "post_rms": dict(norm_position="post", norm="rmsnorm"),
    "modern": {**MODERN, "logit_softcap": 2.0},
    "moe": dict(ffn="moe", n_experts=4, top_k=2), "moe_top1": dict(ffn="moe", n_experts=3, top_k=1, moe_every=2),
    "modern_moe": {**MODERN, "logit_softcap": 2.0, "ffn": "moe", "n_experts": 4, "top_k": 2},
}


def randomised(cfg: GPTConfig, seed: int = 0) -> GPT:
    """A model whose every parameter is random (zero-initialised projections and unit norms would hide bugs)."""
    torch.manual_seed(seed)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    return model


# ------------------------------------------------------------- references
def ref_norm(cfg, module, x):
    if cfg.norm == "rmsnorm":
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + cfg.layer_norm_eps) * module.weight
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    y = (x - mu) / torch.sqrt(var + cfg.layer_norm_eps) * module.weight
    return y + module.bias if module.bias is not None else y


def ref_rotary(x, positions, base):
    """Each pair (x[i], x[i + d/2]) as the complex number x[i] + j x[i + d/2], times e^(j p base^(-2i/d))."""
    d = x.shape[-1]
    z = torch.complex(x[..., : d // 2].double(), x[..., d // 2:].double())
    theta = torch.tensor([base ** (-2 * i / d) for i in range(d // 2)], dtype=torch.float64)
    z = z * torch.polar(torch.ones_like(theta), positions.double()[:, None] * theta)
    return torch.cat([z.real, z.imag], -1).to(x.dtype)


def ref_act(cfg, h):
    if cfg.activation == "relu2":
        return torch.where(h > 0, h * h, torch.zeros_like(h))
    return F.gelu(h, approximate="tanh" if cfg.activation == "gelu_tanh" else "none")


def ref_mlp(cfg, mlp, x):
    return mlp.c_proj(ref_act(cfg, mlp.c_fc(x)))


def ref_moe(cfg, moe, x):
    """Token by token: softmax over the router, the top_k experts by probability, their outputs weighted."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        probs = torch.softmax(moe.router(x[t]).double(), -1)
        chosen = sorted(range(cfg.n_experts), key=lambda e: -float(probs[e]))[: cfg.top_k]
        total = sum(float(probs[e]) for e in chosen)
        for e in chosen:
            gate = float(probs[e]) / total if cfg.top_k > 1 else float(probs[e])
            out[t] += gate * ref_mlp(cfg, moe.experts[e], x[t])
    return out


def ref_forward(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """Logits (T, V) of one sequence, from the parameters with plain math: no module's forward but Linear's."""
    cfg, T = model.config, idx.shape[1]
    C, H = cfg.n_embd, cfg.n_head
    d = C // H
    pos = torch.arange(T)
    x = model.wte.weight[idx[0]]
    if cfg.pos_embedding == "learned":
        x = x + model.wpe.weight[:T]
    for block in model.h:
        pre = cfg.norm_position == "pre"
        a_in = ref_norm(cfg, block.ln_1, x) if pre else x
        q, k, v = (t.view(T, H, d).transpose(0, 1) for t in block.attn.c_attn(a_in).split(C, dim=-1))
        if cfg.qk_norm:
            q = q / torch.sqrt(q.pow(2).mean(-1, keepdim=True) + cfg.layer_norm_eps) * block.attn.q_norm.weight
            k = k / torch.sqrt(k.pow(2).mean(-1, keepdim=True) + cfg.layer_norm_eps) * block.attn.k_norm.weight
        if cfg.pos_embedding == "rotary":
            q, k = ref_rotary(q, pos, cfg.rope_base), ref_rotary(k, pos, cfg.rope_base)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        y = block.attn.c_proj((scores.softmax(-1) @ v).transpose(0, 1).reshape(T, C))
        x = x + y if pre else ref_norm(cfg, block.ln_1, x + y)
        m_in = ref_norm(cfg, block.ln_2, x) if pre else x
        f = ref_moe(cfg, block.mlp, m_in) if isinstance(block.mlp, MoE) else ref_mlp(cfg, block.mlp, m_in)
        x = x + f if pre else ref_norm(cfg, block.ln_2, x + f)
    if model.ln_f is not None:
        x = ref_norm(cfg, model.ln_f, x)
    logits = x @ model.lm_head.weight.t()
    if cfg.logit_softcap:
        logits = cfg.logit_softcap * torch.tanh(logits / cfg.logit_softcap)
    return logits


# ------------------------------------------------------------------ tests
@pytest.mark.parametrize("option", list(OPTIONS))
def test_each_option_equals_its_plain_reference(option):
    model = randomised(GPTConfig(**BASE, **OPTIONS[option]))
    idx = torch.randint(0, 61, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], ref_forward(model, idx), atol=2e-4, rtol=2e-4)


def test_options_change_the_parameters_as_documented():
    modern = GPT(GPTConfig(**BASE, **MODERN))
    names = dict(modern.named_parameters())
    assert modern.wpe is None and modern.lm_head.weight is not modern.wte.weight
    assert not any(name.endswith("bias") for name in names)
    assert all(isinstance(m, torch.nn.RMSNorm) for m in (modern.h[0].ln_1, modern.h[0].ln_2, modern.ln_f))
    assert "h.0.attn.q_norm.weight" in names and "h.0.attn.k_norm.weight" in names
    for block in modern.h:  # zero-initialised output projections: every block starts as the identity
        assert not block.attn.c_proj.weight.any() and not block.mlp.c_proj.weight.any()
    idx = torch.randint(0, 61, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(modern.hidden_states(idx), modern.ln_f(modern.wte(idx)))
    assert GPTConfig.from_preset("gpt2") == GPTConfig(**PRESETS["gpt2"])  # new fields default to GPT-2's
    for name in ("modern-tiny", "modern-small", "modern-gpt2"):
        assert GPTConfig.from_preset(name).pos_embedding == "rotary"


def test_rotary_turns_pairs_and_sees_only_relative_positions():
    x = torch.randn(2, 3, 7, 8)
    pos = torch.arange(5, 12)
    torch.testing.assert_close(apply_rotary(x, rotary_angles(pos, 8, 100.0)), ref_rotary(x, pos, 100.0))
    model = randomised(GPTConfig(**BASE, pos_embedding="rotary"))
    idx = torch.randint(0, 61, (1, 12))
    with torch.no_grad():  # shifting every position leaves the logits unchanged: only distances matter
        torch.testing.assert_close(model(idx, positions=torch.arange(12) + 30), model(idx), atol=1e-4, rtol=1e-4)


def test_softcap_bounds_the_logits():
    model = randomised(GPTConfig(**BASE, logit_softcap=1.5))
    with torch.no_grad():
        assert model(torch.randint(0, 61, (1, 10))).abs().max() < 1.5


@pytest.mark.parametrize("option", ["modern", "modern_moe", "rotary"])
def test_cached_decoding_and_left_padding_equal_the_full_forward(option):
    model = randomised(GPTConfig(**BASE, **OPTIONS[option]))
    cfg = model.config
    idx = torch.randint(0, 61, (2, 30))
    cache = KVCache(cfg, batch_size=2, max_len=48)
    with torch.no_grad():
        full = model(idx)
        chunks = [model(idx[:, :11], cache=cache)] + [model(idx[:, t:t + 1], cache=cache) for t in range(11, 30)]
        torch.testing.assert_close(torch.cat(chunks, 1), full, atol=1e-4, rtol=1e-4)
        short = idx[1, 18:]  # row 1 left-padded to the length of row 0
        padded = torch.stack([idx[0], torch.cat([torch.zeros(18, dtype=torch.long), short])])
        valid = torch.ones(2, 30, dtype=torch.bool)
        valid[1, :18] = False
        positions = (valid.long().cumsum(1) - 1).clamp(min=0)
        out = model(padded, valid=valid, positions=positions)
        torch.testing.assert_close(out[1, 18:], model(short[None])[0], atol=1e-4, rtol=1e-4)


# -------------------------------------------------------------------- MoE
def test_router_with_capacity_equals_a_per_token_loop():
    """Capacity, per sequence and in training: first choices before second ones, earlier tokens first; a full
    expert drops the assignment. Evaluation is dropless."""
    torch.manual_seed(0)
    cfg = GPTConfig(**BASE, ffn="moe", n_experts=3, top_k=2, capacity_factor=0.5)
    moe = MoE(cfg)
    x = torch.randn(2, 10, 32)
    r = moe.route(x)
    capacity = math.ceil(0.5 * 2 * 10 / 3)
    kept = torch.zeros(20, 2, dtype=torch.bool)
    for b in range(2):
        used = [0] * 3
        for slot in range(2):
            for t in range(b * 10, b * 10 + 10):
                e = int(r.experts[t, slot])
                used[e] += 1
                kept[t, slot] = used[e] <= capacity
    assert torch.equal(r.kept, kept) and not kept.all()
    with torch.no_grad():
        out = moe(x).view(20, 32)
        flat = x.view(20, 32)
        want = torch.zeros_like(flat)
        for t in range(20):
            for slot in range(2):
                if kept[t, slot]:
                    want[t] += r.gates[t, slot] * ref_mlp(cfg, moe.experts[int(r.experts[t, slot])], flat[t])
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(moe(x[1:]), out.view(2, 10, 32)[1:])  # a row's routing is its own
        assert moe.eval().route(x).kept.all()


def test_moe_with_one_expert_equals_the_dense_model():
    dense = randomised(GPTConfig(**BASE))
    moe = GPT(GPTConfig(**BASE, ffn="moe", n_experts=1, top_k=1)).eval()
    state = {k.replace(".mlp.", ".mlp.experts.0."): v for k, v in dense.state_dict().items()}
    state.update({k: v for k, v in moe.state_dict().items() if "router" in k})
    moe.load_state_dict(state)
    idx = torch.randint(0, 61, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(moe(idx), dense(idx), atol=1e-6, rtol=1e-6)
    assert moe.num_params() == dense.num_params() + 2 * 32  # two routers of one row


def test_gradients_reach_every_expert_that_received_tokens_and_router_losses_are_taken_once():
    torch.manual_seed(0)
    cfg = GPTConfig(**BASE, ffn="moe", n_experts=4, top_k=1, capacity_factor=0.3)
    model = GPT(cfg).train()
    inputs = {}
    for i, block in enumerate(model.h):
        block.mlp.register_forward_hook(lambda m, args, out, i=i: inputs.__setitem__(i, args[0].detach()))
    idx = torch.randint(0, 61, (2, 24))
    _, loss = model(idx, idx)
    taken = router_losses(model)
    assert taken is not None and router_losses(model) is None  # taken once
    (loss + taken.loss).backward()
    assert taken.metrics["moe_dropped"] > 0
    loads = torch.stack([taken.metrics[f"moe_load_{e}"] for e in range(4)])
    assert float(loads.sum()) == pytest.approx(1 - float(taken.metrics["moe_dropped"]), abs=1e-6)
    for i, block in enumerate(model.h):
        r = block.mlp.route(inputs[i])
        received = set(r.experts[r.kept].tolist())
        assert block.mlp.router.weight.grad.abs().sum() > 0  # the router learns from the loss and its losses
        for e, expert in enumerate(block.mlp.experts):
            grad = expert.c_fc.weight.grad  # present for all: every expert takes part (DDP needs it)
            assert (grad.abs().sum() > 0) == (e in received), (i, e, received)
    with torch.no_grad():
        model(idx)
    assert router_losses(model) is None  # evaluation records nothing


def test_moe_counts_active_parameters_and_flops():
    cfg = GPTConfig.from_preset("tiny-moe")
    dense = GPT.count_params(GPTConfig.from_preset("tiny"))
    per_expert = 2 * 128 * 512 + 512 + 128
    router = 128 * 8
    assert GPT.count_params(cfg) == dense + 4 * (7 * per_expert + router)
    assert GPT.count_params(cfg, active=True) == dense + 4 * (per_expert + router)
    model = GPT(cfg)
    assert model.flops_per_token(64) == pytest.approx(GPT(GPTConfig.from_preset("tiny")).flops_per_token(64)
                                                      + 6 * 4 * (per_expert + router))
    assert [cfg.replace(moe_every=2).is_moe(i) for i in range(4)] == [False, True, False, True]


@pytest.mark.parametrize("fields,needle", [
    (dict(ffn="moe", n_experts=2, top_k=3), "top_k"), (dict(pos_embedding="rotary", n_embd=36, n_head=4), "even"),
    (dict(logit_softcap=-1.0), "logit_softcap"), (dict(ffn="moe", moe_every=9), "moe_every"),
])
def test_contradictory_modern_configs_are_rejected(fields, needle):
    with pytest.raises(ConfigError, match=needle):
        GPTConfig(**{**BASE, **fields})


@pytest.mark.parametrize("option", ["modern", "modern_moe"])
def test_trace_of_modern_and_moe_blocks_is_the_forward_pass(option):
    model = randomised(GPTConfig(**BASE, **OPTIONS[option]))
    idx = torch.randint(0, 61, (1, 14))
    trace = model.trace(idx, rows=range(4, 14))
    with torch.no_grad():
        torch.testing.assert_close(trace.step("logits").value, model(idx)[0, 4:], rtol=0, atol=0)
        weights = model.attention_weights(idx)
    torch.testing.assert_close(trace.step("attn", 1).value, weights[0, 1, :, 4:])
    assert [s.name for s in trace.steps if s.layer is None][:2] == ["wte", "embed"]  # rotary: no wpe
    names = [s.name for s in trace.steps if s.layer == 0]
    if model.config.ffn == "moe":
        assert names[-4:] == ["router", "gates", "mlp_out", "resid_mlp"] and trace.blocks[0].experts == 4
        gates = trace.step("gates", 0).value
        assert ((gates > 0).sum(-1) == 2).all()  # top_k experts per token
        torch.testing.assert_close(gates.sum(-1), torch.ones(10))
    else:
        assert names[-4:] == ["fc", "act", "mlp_out", "resid_mlp"]


# -------------------------------------------------------------- every stage
def test_every_stage_trains_a_modern_moe_model_with_muon(tmp_path):
    """finetune, sft, rm, dpo and ppo on a modern MoE backbone with Muon: each runs, its router losses join the
    loss (the expert loads are logged) and its saved model generates through the engine."""
    rng = random.Random(0)
    tok = CharTokenizer.from_text("abcdefghij .", special_tokens=[EOS])

    def words(n: int) -> str:
        return " ".join("".join(rng.choice("abcdefghij") for _ in range(rng.randint(1, 4))) for _ in range(n))

    def jsonl(name: str, rows: list[dict]) -> str:
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return str(tmp_path / name)

    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=tok.vocab_size, **MODERN,
                    ffn="moe", n_experts=3, top_k=2)
    base = str(save_model(tmp_path / "base", GPT(cfg), tok))
    task = jsonl("task.jsonl", [{"text": words(3), "label": rng.choice(["x", "y"])} for _ in range(16)])
    sft = jsonl("sft.jsonl", [{"prompt": words(2), "response": words(3)} for _ in range(16)])
    ranks = jsonl("rank.jsonl", [{"prompt": words(2), "responses": [words(2) + s for s in "abc"], "ranking": [0, 1, 2]}
                                 for _ in range(16)])
    prompts = jsonl("prompts.jsonl", [{"prompt": words(2)} for _ in range(8)])
    common = ["--max-steps", "2", "--batch-size", "4", "--optimizer", "muon", "--seed", "3", "--device", "cpu",
              "--sample-tokens", "0"]
    commands = {
        "finetune": ["finetune", "--task", "classification", "--model", base, "--train", task, "--val", task, *common],
        "sft": ["sft", "--model", base, "--data", sft, *common],
        "rm": ["rm", "--model", base, "--data", ranks, *common],
        "dpo": ["dpo", "--model", base, "--data", ranks, *common],
    }
    for stage, command in commands.items():
        assert main([*command, "--out", str(tmp_path / stage)]) == 0, stage
    assert main(["ppo", "--policy", base, "--reward", str(tmp_path / "rm"), "--prompts", prompts, "--iterations", "1",
                 "--rollout-batch", "4", "--minibatches", "2", "--ppo-epochs", "1", "--max-new-tokens", "4",
                 "--optimizer", "muon", "--seed", "3", "--device", "cpu", "--out", str(tmp_path / "ppo")]) == 0
    for stage in (*commands, "ppo"):
        last = read_metrics(tmp_path / stage / "metrics.jsonl")[-1]
        assert "moe_load_0" in last and last["moe_balance"] >= 1.0 - 1e-6, stage
    model, tokenizer = load_run(tmp_path / "sft")[:2]
    assert model.config.ffn == "moe" and model.config.pos_embedding == "rotary"
    out = Engine(model, tokenizer).generate_ids([tokenizer.encode("ab c")], SamplingParams(
        max_new_tokens=5, temperature=0, stop_at_eos=False))[0]
    assert len(out.token_ids) == 5
