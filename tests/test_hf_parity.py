"""Parity with Hugging Face transformers (the oracle) for GPT-2 and OpenAI-GPT (GPT-1).

HF models are built in-process from small random configs and saved with
save_pretrained to tmp_path; nothing is downloaded.

    .venv/bin/pytest -q tests/test_hf_parity.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from gptlab import GPT, GPTConfig  # noqa: E402
from gptlab.hf import export_hf, import_hf  # noqa: E402
from gptlab.runs import load_model, load_run  # noqa: E402
from gptlab.errors import CheckpointError, UserError  # noqa: E402

TOL = 1e-4
VOCAB, CTX = 700, 64


@pytest.fixture(autouse=True, scope="module")
def _quiet_transformers():
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    yield


def make_hf(kind: str, seed: int = 0, **overrides):
    """A randomly initialised GPT2LMHeadModel ("gpt2") or OpenAIGPTLMHeadModel ("openai-gpt")."""
    torch.manual_seed(seed)
    common = dict(n_layer=3, n_embd=96, n_head=4, n_positions=CTX, vocab_size=VOCAB,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None)
    common.update(overrides)
    if kind == "gpt2":
        config = transformers.GPT2Config(activation_function="gelu_new", **common)
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.OpenAIGPTConfig(afn="gelu", **common)
        model = transformers.OpenAIGPTLMHeadModel(config)
    return model.eval()


@pytest.fixture(scope="module", params=["gpt2", "openai-gpt"])
def hf_pair(request, tmp_path_factory):
    """(kind, HF model, saved directory, our imported model)."""
    kind = request.param
    hf = make_hf(kind)
    d = tmp_path_factory.mktemp(kind)
    hf.save_pretrained(d)
    ours, tok = import_hf(d)
    assert tok is None  # no tokenizer files were saved
    return kind, hf, d, ours


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ import
def test_imported_config(hf_pair):
    kind, hf, _, ours = hf_pair
    cfg = ours.config
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.block_size, cfg.vocab_size) == (3, 96, 4, CTX, VOCAB)
    assert cfg.norm_position == ("pre" if kind == "gpt2" else "post")
    assert cfg.activation == "gelu_tanh"  # gpt2 "gelu_new" and openai-gpt "gelu" are both the tanh form
    assert (ours.ln_f is None) == (kind == "openai-gpt")
    assert ours.lm_head.weight is ours.wte.weight


@pytest.mark.parametrize("length", [1, 17, CTX])  # CTX: every position up to the full context
def test_logits_match_transformers(hf_pair, length):
    _, hf, _, ours = hf_pair
    idx = random_ids(2, length)
    with torch.no_grad():
        expected = hf(idx).logits
        got = ours(idx)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= TOL


def test_load_model_hf_spec(hf_pair):
    _, hf, d, ours = hf_pair
    for spec in (f"hf:{d}", str(d)):  # a plain path to a transformers directory is recognised too
        m = load_model(spec)
        assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), ours.state_dict().values()))
    m = load_model(f"hf:{d}")
    model, tok, cfg = load_run(f"hf:{d}")
    assert tok is None and cfg["model"] == model.config.to_dict() and cfg["source"] == f"hf:{d}"


def test_greedy_generation_matches_transformers(hf_pair):
    engine_mod = pytest.importorskip("gptlab.engine")
    _, hf, _, ours = hf_pair
    prompts = [random_ids(1, n, seed=n)[0].tolist() for n in (5, 11, 3)]
    engine = engine_mod.Engine(ours)
    # One batch with prompts of different lengths (left-padded inside the engine).
    got = engine.generate_ids(prompts, engine_mod.SamplingParams(max_new_tokens=32, temperature=0.0))
    for prompt, completion in zip(prompts, got):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=32,
                              min_new_tokens=32, eos_token_id=None, pad_token_id=0)
        assert completion.token_ids == out[0, len(prompt):].tolist()


# ------------------------------------------------------------------ export
def _ours(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = dict(n_layer=2, n_embd=64, n_head=4, block_size=48, vocab_size=300)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


@pytest.mark.parametrize("kw, arch", [
    ({}, "GPT2LMHeadModel"),
    ({"activation": "gelu"}, "GPT2LMHeadModel"),
    ({"tie_embeddings": False, "bias": False}, "GPT2LMHeadModel"),
    ({"tie_embeddings": False, "bias": False, "zero_init_proj": True}, "GPT2LMHeadModel"),
    ({"norm_position": "post", "scale_residual_init": False}, "OpenAIGPTLMHeadModel"),
])
def test_export_loads_in_transformers(tmp_path, kw, arch):
    model = _ours(**kw)
    export_hf(model, tmp_path)
    hf_cfg = json.loads((tmp_path / "config.json").read_text())
    assert hf_cfg["architectures"] == [arch]
    cls = getattr(transformers, arch)
    hf, info = cls.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    idx = random_ids(2, 48) % 300
    with torch.no_grad():
        assert (hf.eval()(idx).logits - model(idx)).abs().max().item() <= TOL


@pytest.mark.parametrize("kw", [{}, {"tie_embeddings": False},
                                {"norm_position": "post", "scale_residual_init": False}])
def test_export_import_round_trip_bit_exact(tmp_path, kw):
    model = _ours(seed=3, **kw)
    export_hf(model, tmp_path)
    back, _ = import_hf(tmp_path)
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ca, cb = model.config.to_dict(), back.config.to_dict()
    ca.pop("name"), cb.pop("name")
    assert ca == cb
    assert (back.lm_head.weight is back.wte.weight) == model.config.tie_embeddings


def test_export_rejects_what_transformers_cannot_run(tmp_path):
    banded = _ours(attention_pattern="DL", attn_window=8)
    with pytest.raises(UserError, match="banded"):
        export_hf(banded, tmp_path / "a")
    exact_post = _ours(norm_position="post", activation="gelu")
    with pytest.raises(UserError, match="tanh"):
        export_hf(exact_post, tmp_path / "b")
    for option in ({"pos_embedding": "rotary"}, {"norm": "rmsnorm"}, {"qk_norm": True}, {"activation": "relu2"},
                   {"logit_softcap": 15.0}, {"ffn": "moe", "n_experts": 2, "top_k": 1}):
        with pytest.raises(UserError, match=f"cannot export a model with {next(iter(option))}="):
            export_hf(_ours(**option), tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_export_and_import_tokenizer(tmp_path):
    from gptlab.tokenizer import train_bpe

    text = ["the quick brown fox jumps over the lazy dog; " * 10, "Zwölf Boxkämpfer jagen Viktor 🙂 " * 5]
    tok = train_bpe(iter(text), 300)
    model = _ours(vocab_size=320)
    export_hf(model, tmp_path, tokenizer=tok)
    sample = "the lazy Zwölf fox 🙂<|endoftext|>"
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf_tok.encode(sample) == tok.encode(sample, allow_special=True)
    assert hf_tok.eos_token_id == tok.eos_id
    _, back = import_hf(tmp_path)
    assert back is not None and back.encode(sample) == tok.encode(sample)


# ------------------------------------------------------------ other layouts
class _NotATensor:
    pass


def test_bin_only_directory_without_prefix_and_with_mask_buffers(tmp_path):
    hf = make_hf("gpt2", seed=5)
    hf.config.to_json_file(tmp_path / "config.json")
    # Older checkpoints: no "transformer." prefix, attn.bias / attn.masked_bias buffers saved.
    state = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items()}
    for i in range(hf.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, CTX, CTX))
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, tmp_path / "pytorch_model.bin")
    ours, _ = import_hf(tmp_path)
    idx = random_ids(2, CTX)
    with torch.no_grad():
        assert (ours(idx) - hf(idx).logits).abs().max().item() <= TOL


def test_bin_with_pickled_objects_is_refused(tmp_path):
    make_hf("gpt2").config.to_json_file(tmp_path / "config.json")
    torch.save({"wte.weight": _NotATensor()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        import_hf(tmp_path)


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "n_layer": 2}))
    with pytest.raises(UserError, match="llama.*gpt2.*openai-gpt"):
        import_hf(tmp_path)
    with pytest.raises(UserError, match="llama"):
        load_model(f"hf:{tmp_path}")


def test_hf_dir_missing_weights(tmp_path):
    make_hf("openai-gpt").config.to_json_file(tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="no model.safetensors or pytorch_model.bin"):
        import_hf(Path(tmp_path))
