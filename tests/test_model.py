"""The model: preset sizes, every attention path against a naive masked softmax, cache equivalence."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gptlab import GPT, GPTConfig, KVCache
from gptlab.config import NOMINAL_PARAMS, PRESETS
from gptlab.errors import ConfigError, UserError
from gptlab.model import attention_mask, flex_band_attention


# ------------------------------------------------------------------ presets
EXACT = {"gpt1": 116_534_784, "gpt2": 124_439_808, "gpt2-medium": 354_823_168,
         "gpt2-large": 774_030_080, "gpt2-xl": 1_557_611_200}


@pytest.mark.parametrize("name", sorted(EXACT))
def test_gpt1_gpt2_parameter_counts_are_exact(name):
    assert GPT.count_params(GPTConfig.from_preset(name)) == EXACT[name]


@pytest.mark.parametrize("name", sorted(NOMINAL_PARAMS))
def test_gpt3_presets_within_two_percent_of_paper(name):
    n = GPT.count_params(GPTConfig.from_preset(name))
    assert abs(n / NOMINAL_PARAMS[name] - 1) <= 0.02


def test_gpt3_table_inconsistencies_resolved_as_documented():
    xl, b13 = GPTConfig.from_preset("gpt3-xl"), GPTConfig.from_preset("gpt3-13b")
    assert (xl.n_embd, xl.n_head, xl.head_dim) == (2048, 16, 128)
    assert (b13.n_embd, b13.n_head, b13.head_dim) == (5120, 40, 128)
    for name in NOMINAL_PARAMS:
        c = GPTConfig.from_preset(name)
        assert c.n_head * c.head_dim == c.n_embd
        assert c.block_size == 2048 and c.vocab_size == 50257
        assert [c.is_local(i) for i in range(4)] == [False, True, False, True]


def test_generations_differ_only_by_config():
    g1, g2 = GPTConfig.from_preset("gpt1"), GPTConfig.from_preset("gpt2")
    assert (g1.norm_position, g1.activation, g1.block_size, g1.scale_residual_init) == ("post", "gelu_tanh", 512, False)
    assert (g2.norm_position, g2.activation, g2.block_size, g2.scale_residual_init) == ("pre", "gelu_tanh", 1024, True)
    assert GPT(GPTConfig.from_preset("tiny-gpt1")).ln_f is None


def test_tiny_preset_is_about_one_million_parameters():
    assert 0.8e6 < GPT.count_params(GPTConfig.from_preset("tiny")) < 1.5e6


def test_residual_projection_init_is_scaled():
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=8, n_head=4, n_embd=256, block_size=32, vocab_size=64)
    m = GPT(cfg)
    std = torch.cat([b.attn.c_proj.weight.flatten() for b in m.h]).std().item()
    assert std == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert m.h[0].mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert m.lm_head.weight is m.wte.weight


@pytest.mark.parametrize("fields,needle", [
    (dict(n_embd=100, n_head=3), "divisible"),
    (dict(attention_pattern="DL", attn_window=64, block_size=64), "attn_window"),
    (dict(attention_pattern="DX"), "attention_pattern"),
    (dict(norm_position="middle"), "norm_position"),
    (dict(n_layer=0), "n_layer"),
])
def test_contradictory_configs_are_rejected(fields, needle):
    with pytest.raises(ConfigError, match=needle):
        GPTConfig(**fields)


def test_unknown_preset_and_unknown_field():
    with pytest.raises(ConfigError, match="gptlab presets"):
        GPTConfig.from_preset("gpt5")
    with pytest.raises(ConfigError, match="n_layers"):
        GPTConfig.from_dict({"n_layers": 2})
    with pytest.raises(ConfigError, match="type int"):
        GPTConfig.from_dict({"n_layer": "2"})


# ---------------------------------------------------------------- attention
def naive_attention(q, k, v, allowed):
    """Explicit masked softmax in float64: the reference every fast path must match."""
    scores = (q.double() @ k.double().transpose(-2, -1)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ v.double()).to(q.dtype)


def naive_mask(q_start, q_len, k_len, window, key_valid=None):
    """The rule written out element by element, independent of attention_mask's vectorisation."""
    B = 1 if key_valid is None else key_valid.shape[0]
    out = torch.zeros(B, 1, q_len, k_len, dtype=torch.bool)
    for b in range(B):
        for qi in range(q_len):
            i = q_start + qi
            for j in range(k_len):
                ok = j <= i and (window is None or i - window < j)
                if key_valid is not None:
                    ok = (ok and bool(key_valid[b, j])) or j == i
                out[b, 0, qi, j] = ok
    return out if key_valid is not None else out[0, 0]


@pytest.mark.parametrize("q_start,q_len,window", [(0, 12, None), (0, 12, 4), (5, 3, 4), (9, 1, 3), (9, 1, None)])
def test_attention_mask_matches_elementwise_rule(q_start, q_len, window):
    k_len = q_start + q_len
    assert torch.equal(attention_mask(q_start, q_len, k_len, window), naive_mask(q_start, q_len, k_len, window))
    valid = torch.ones(2, k_len, dtype=torch.bool)
    valid[1, :3] = False
    assert torch.equal(attention_mask(q_start, q_len, k_len, window, valid),
                       naive_mask(q_start, q_len, k_len, window, valid))


def _capture_qkv(model, idx):
    """Run the model and capture each layer's q, k, v and attention output via hooks on real modules."""
    records = []

    def hook(module, args, out):
        x = args[0]
        B, T, C = x.shape
        q, k, v = module.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, module.n_head, -1).transpose(1, 2) for t in (q, k, v))
        records.append((module, q, k, v, out))

    handles = [b.attn.register_forward_hook(hook) for b in model.h]
    model(idx)
    for h in handles:
        h.remove()
    return records


@pytest.mark.parametrize("pattern", ["D", "L", "DL"])
def test_layer_attention_equals_naive_reference(pattern):
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=40, vocab_size=50,
                    attention_pattern=pattern, attn_window=5)
    model = GPT(cfg).eval()
    idx = torch.randint(0, 50, (2, 40))
    with torch.no_grad():
        for module, q, k, v, out in _capture_qkv(model, idx):
            ref = naive_attention(q, k, v, naive_mask(0, 40, 40, module.window))
            ref = module.c_proj(ref.transpose(1, 2).reshape(2, 40, 32))
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm,pattern", [("pre", "D"), ("pre", "DL"), ("post", "LD")])
def test_attention_weights_times_values_reproduce_the_layer_output(norm, pattern):
    """The explorer's weights are the model's: weights @ v through c_proj equals what each layer computed (SDPA)."""
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=24, vocab_size=50, norm_position=norm,
                    attention_pattern=pattern, attn_window=5)
    model = GPT(cfg).eval()
    idx = torch.randint(0, 50, (2, 24))
    records = _capture_qkv(model, idx)
    weights = model.attention_weights(idx)
    assert weights.shape == (2, 2, 4, 24, 24)
    for layer, (module, _, _, v, out) in enumerate(records):
        w = weights[:, layer]
        torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 24))
        assert torch.all(w[:, :, ~naive_mask(0, 24, 24, module.window)] == 0)  # causal, and banded when local
        y = module.c_proj((w @ v).transpose(1, 2).reshape(2, 24, 32))
        torch.testing.assert_close(y, out, atol=1e-5, rtol=1e-5)
    last = model.attention_weights(idx, queries=1)
    assert last.shape == (2, 2, 4, 1, 24)
    torch.testing.assert_close(last, weights[:, :, :, -1:])


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_band_attention_equals_naive_reference():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 256, 16) for _ in range(3))
    out = flex_band_attention(q, k, v, window=37)
    torch.testing.assert_close(out, naive_attention(q, k, v, naive_mask(0, 256, 256, 37)), atol=1e-5, rtol=1e-5)


def test_band_limits_what_a_token_can_see():
    """Changing a token outside every band window must not change a local-only model's later outputs."""
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=32, vocab_size=20,
                    attention_pattern="L", attn_window=4)
    model = GPT(cfg).eval()
    idx = torch.randint(0, 20, (1, 32))
    idx2 = idx.clone()
    idx2[0, 0] = (idx[0, 0] + 1) % 20
    with torch.no_grad():
        a, b = model(idx), model(idx2)
    reach = 2 * (4 - 1)  # two local layers, each sees 3 positions back
    assert not torch.allclose(a[0, reach], b[0, reach])
    torch.testing.assert_close(a[0, reach + 1:], b[0, reach + 1:])


# ------------------------------------------------------------------ trace
def _reference_steps(model: GPT, idx: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Each block's intermediate tensors computed from its parameters by hand (no hooks, no trace)."""
    T, C = idx.shape[1], model.config.n_embd
    H, d = model.config.n_head, C // model.config.n_head
    x = model.wte(idx) + model.wpe(torch.arange(T))
    out = []
    for block in model.h:
        pre = block.pre_norm
        a_in = block.ln_1(x) if pre else x
        q, k, v = (t.view(1, T, H, d).transpose(1, 2) for t in block.attn.c_attn(a_in).split(C, dim=2))
        w = naive_attention(q, k, v, naive_mask(0, T, T, block.attn.window)).transpose(1, 2).reshape(1, T, C)
        attn_out = block.attn.c_proj(w)
        resid_attn = x + attn_out
        mid = resid_attn if pre else block.ln_1(resid_attn)  # GPT-1 normalises the sum itself
        m_in = block.ln_2(mid) if pre else mid
        fc = block.mlp.c_fc(m_in)
        act = F.gelu(fc, approximate="tanh")
        mlp_out = block.mlp.c_proj(act)
        resid_mlp = mid + mlp_out
        x = resid_mlp if pre else block.ln_2(resid_mlp)
        out.append({"q": q, "k": k, "v": v, "attn_out": attn_out, "resid_attn": resid_attn, "fc": fc, "act": act,
                    "mlp_out": mlp_out, "resid_mlp": resid_mlp, "ln_1": a_in if pre else mid,
                    "ln_2": m_in if pre else x})
    return out


@pytest.mark.parametrize("preset", ["tiny", "tiny-gpt1", "tiny-gpt3"])
def test_trace_is_the_models_forward_pass(preset):
    """The logits equal model(idx)'s exactly, each block's output equals running the block, and every step
    equals the block's math done by hand (q/k/v, attention, MLP, the sums and norms where GPT-1/2 put them)."""
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset(preset, n_layer=2, block_size=48, attn_window=7, vocab_size=300)
    model = GPT(cfg).eval()
    idx = torch.randint(0, 300, (1, 40))
    trace = model.trace(idx)
    with torch.no_grad():
        torch.testing.assert_close(trace.step("logits").value, model(idx)[0], rtol=0, atol=0)
        x = model.wte(idx) + model.wpe(torch.arange(40))
        torch.testing.assert_close(trace.step("embed").value, x[0], rtol=0, atol=0)
        masks = model._context(40, None, None, torch.arange(40))
        weights = model.attention_weights(idx)
        for layer, (block, ref) in enumerate(zip(model.h, _reference_steps(model, idx))):
            x = block(x, None, masks)
            assert trace.blocks[layer].norm == cfg.norm_position and trace.blocks[layer].window == block.attn.window
            last = trace.steps[[i for i, s in enumerate(trace.steps) if s.layer == layer][-1]]
            torch.testing.assert_close(last.value, x[0], rtol=0, atol=0)  # the block's own output
            torch.testing.assert_close(trace.step("attn", layer).value, weights[0, layer])
            for name, want in ref.items():
                got = trace.step(name, layer).value
                torch.testing.assert_close(got, want[0], atol=1e-5, rtol=1e-5, msg=f"layer {layer} {name}")
            heads = trace.step("heads", layer).value  # (H, T, d): attention @ v, head by head
            torch.testing.assert_close(heads, weights[0, layer] @ ref["v"][0], atol=1e-5, rtol=1e-5)
    names = [s.name for s in trace.steps if s.layer == 0]
    if cfg.norm_position == "pre":  # a norm opens each branch; the sums are the stream
        assert names == ["ln_1", "q", "k", "v", "attn", "heads", "attn_out", "resid_attn", "ln_2", "fc", "act",
                         "mlp_out", "resid_mlp"]
    else:  # GPT-1: the norms sit on the stream after each sum
        assert names == ["q", "k", "v", "attn", "heads", "attn_out", "resid_attn", "ln_1", "fc", "act", "mlp_out",
                         "resid_mlp", "ln_2"]
    final = ["ln_f", "logits"] if cfg.norm_position == "pre" else ["logits"]  # GPT-1 has no final norm
    assert [s.name for s in trace.steps if s.layer is None] == ["wte", "wpe", "embed", *final]


def test_trace_keeps_only_the_asked_rows():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny-gpt3", n_layer=2, block_size=32, attn_window=5)).eval()
    idx = torch.randint(0, 2048, (1, 30))
    full, part = model.trace(idx), model.trace(idx, rows=[3, 29])
    assert part.rows == [3, 29] and len(part.steps) == len(full.steps)
    for a, b in zip(part.steps, full.steps):
        assert (a.name, a.kind, a.branch, a.module, a.layer) == (b.name, b.kind, b.branch, b.module, b.layer)
        want = b.value[:, [3, 29]] if b.kind != "vector" else b.value[[3, 29]]
        torch.testing.assert_close(a.value, want, atol=1e-5, rtol=1e-5)
    band = part.step("attn", 1).value  # a banded layer: query 29 sees keys 25..29 only
    assert torch.all(band[:, 1, :25] == 0) and torch.all(band[:, 1, 25:] > 0)
    assert part.step("q", 0).module == "h.0.attn.c_attn" and part.step("resid_attn", 0).module == "h.0"


def test_trace_rejects_what_it_cannot_trace():
    model = GPT(GPTConfig.from_preset("tiny", n_layer=1, block_size=16)).eval()
    with pytest.raises(ValueError, match="one sequence"):
        model.trace(torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(UserError, match="exceeds the model's context of 16"):
        model.trace(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="rows must be positions 0..3"):
        model.trace(torch.zeros(1, 4, dtype=torch.long), rows=[4])


# ------------------------------------------------------------------ caching
@pytest.mark.parametrize("preset", ["tiny", "tiny-gpt1", "tiny-gpt3"])
def test_incremental_decoding_with_cache_equals_full_forward(preset):
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset(preset, block_size=80, attn_window=8)
    model = GPT(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 70))
    cache = KVCache(cfg, batch_size=2, max_len=80)
    with torch.no_grad():
        full = model(idx)
        chunks = [model(idx[:, :30], cache=cache), model(idx[:, 30:33], cache=cache)]
        chunks += [model(idx[:, t:t + 1], cache=cache) for t in range(33, 70)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 70


@pytest.mark.parametrize("preset", ["tiny", "tiny-gpt3"])
def test_left_padded_batch_equals_rows_alone(preset):
    """Rows of different lengths, left-padded, give the same logits as each row run alone."""
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset(preset, block_size=64, attn_window=6)
    model = GPT(cfg).eval()
    rows = [torch.randint(0, cfg.vocab_size, (n,)) for n in (20, 13, 7)]
    T = max(len(r) for r in rows)
    idx = torch.zeros(3, T, dtype=torch.long)
    valid = torch.zeros(3, T, dtype=torch.bool)
    for b, r in enumerate(rows):
        idx[b, T - len(r):] = r
        valid[b, T - len(r):] = True
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        batched = model(idx, valid=valid, positions=positions)
        cache = KVCache(cfg, batch_size=3, max_len=64)
        cache.set_padding(valid)
        prefill = model(idx, cache=cache, positions=positions)
        for b, r in enumerate(rows):
            alone = model(r[None])
            torch.testing.assert_close(batched[b, T - len(r):], alone[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(prefill[b, T - len(r):], alone[0], atol=1e-5, rtol=1e-5)


def test_context_overflow_is_a_user_error():
    model = GPT(GPTConfig.from_preset("tiny", block_size=16)).eval()
    with pytest.raises(UserError, match="context of 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_loss_ignores_masked_targets_and_matches_cross_entropy():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny")).eval()
    idx = torch.randint(0, 2048, (2, 16))
    targets = torch.randint(0, 2048, (2, 16))
    targets[:, :5] = -100
    logits, loss = model(idx, targets)
    ref = F.cross_entropy(logits[:, 5:].reshape(-1, 2048), targets[:, 5:].reshape(-1))
    torch.testing.assert_close(loss, ref)


def test_flops_per_token_counts_band_as_window():
    dense = GPT(GPTConfig.from_preset("tiny"))
    banded = GPT(GPTConfig.from_preset("tiny-gpt3"))
    assert banded.flops_per_token(256) < dense.flops_per_token(256)
    n = dense.num_params(non_embedding=True) + 2048 * 128
    assert dense.flops_per_token(256) == 6 * n + 12 * 4 * 128 * 256
    untied = GPT(GPTConfig.from_preset("tiny", tie_embeddings=False))
    assert untied.flops_per_token(256) == dense.flops_per_token(256)


def test_presets_cover_every_generation():
    assert {"gpt1", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "tiny"} <= set(PRESETS)
    assert sum(name.startswith("gpt3-") for name in PRESETS) == 8
