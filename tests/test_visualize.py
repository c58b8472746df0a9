"""The 3-D view's data (visualize.py): every drawn value is the trace's, the sampling is what the data says,
GPT-2 small stays small, and `gptlab visualize` writes a page whose embedded data is the same view.
The page itself is tested in Chromium in test_web.py."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
import torch

from gptlab import GPT, GPTConfig
from gptlab.cli import main
from gptlab.config import MODERN
from gptlab.errors import ConfigError
from gptlab.runs import load_run, save_model
from gptlab.serve.offline import DATA_ID
from gptlab.tokenizer import CharTokenizer
from gptlab.visualize import ModelView, ViewConfig, strided

LETTERS = "abcdefghijklmnopqrstuvwxyz .,"
TEXT = "the quick brown fox jumps over the lazy dog, and then some more."


def unpack(packed: dict) -> np.ndarray:
    raw = np.frombuffer(base64.b64decode(packed["f16"]), dtype="<f2").astype(np.float32)
    return raw.reshape(packed["shape"])


def close(got: np.ndarray, want: torch.Tensor) -> None:
    """Equal within float16's rounding (three significant digits)."""
    np.testing.assert_allclose(got, want.float().numpy(), rtol=2e-3, atol=2e-3)


@pytest.fixture(scope="module")
def tok() -> CharTokenizer:
    return CharTokenizer.from_text(LETTERS)


def _model(tok: CharTokenizer, **fields) -> GPT:
    torch.manual_seed(0)
    cfg = dict(n_layer=2, n_head=4, n_embd=64, block_size=96, vocab_size=tok.vocab_size) | fields
    return GPT(GPTConfig(**cfg)).eval()


MODERN_MOE = {**MODERN, "zero_init_proj": False, "ffn": "moe", "n_experts": 4, "top_k": 2, "moe_every": 2}


@pytest.mark.parametrize("fields", [{}, {"norm_position": "post"}, {"attention_pattern": "LD", "attn_window": 6},
                                    {**MODERN, "zero_init_proj": False}, MODERN_MOE])
def test_every_drawn_value_is_the_traces(tok, fields):
    model = _model(tok, **fields)
    ids = tok.encode(TEXT)
    T, P = len(ids), 16
    data = ModelView(model, tok, ViewConfig(positions=P, columns=16, top=5)).view(ids)
    rows = list(range(T - P, T))
    trace = model.trace(torch.tensor([ids]), rows)
    assert data["rows"] == rows and data["tokens"] == [tok.token_text(i) for i in ids] and data["text"] == TEXT
    assert data["sampling"] == {"positions": P, "tokens": T, "channels": 16, "width": 64, "stride": 4}
    assert [b["norm"] for b in data["blocks"]] == [model.config.norm_position] * 2
    assert [b["window"] for b in data["blocks"]] == [block.attn.window for block in model.h]
    assert [(s["name"], s["layer"]) for s in data["steps"]] == [(s.name, s.layer) for s in trace.steps]
    assert [b["experts"] for b in data["blocks"]] == [4 * model.config.is_moe(i) for i in range(2)]
    labels = {s["id"]: s["label"] for s in data["steps"]}
    if model.config.norm == "rmsnorm":  # the model's own names: no wpe with rotary positions, RMSNorm, ReLU²
        assert "wpe" not in labels and labels["0.ln_1"] == "block 0 · RMSNorm 1" and labels["0.act"].endswith("ReLU²")
    if model.config.ffn == "moe":
        assert labels["1.gates"] == "block 1 · expert gates" and data["model"]["active_params"] < data["model"]["params"]
    for step, traced in zip(data["steps"], trace.steps):
        value, drawn = traced.value, unpack(step["data"])
        if step["kind"] == "attention":  # keys at the drawn positions, the earlier ones summed in front
            assert step["shape"] == [4, T, T] and step["earlier"] == T - P
            close(drawn[:, :, 0], value[:, :, :T - P].sum(-1))
            close(drawn[:, :, 1:], value[:, :, T - P:])
            np.testing.assert_allclose(drawn.sum(-1), 1, atol=1e-2)
        elif step["kind"] == "heads":
            assert step["shape"] == [4, T, 16] and step["cols"] == strided(16, 4) == [0, 4, 8, 12]
            close(drawn, value[:, :, step["cols"]])
        elif step["name"] == "logits":  # the most probable vocabulary entries at some drawn position
            best = torch.softmax(value, -1).amax(0)
            assert set(step["cols"]) == set(torch.topk(best, 16).indices.tolist())
            assert step["col_labels"] == [tok.token_text(i) for i in step["cols"]]
            close(drawn, value[:, step["cols"]])
        else:
            assert step["shape"] == [T, value.shape[-1]] and step["cols"] == strided(value.shape[-1], 16)
            close(drawn, value[:, step["cols"]])
        assert step["mean"] == pytest.approx(float(value.float().mean()), rel=1e-5, abs=1e-6)
        assert (step["min"], step["max"]) == (float(value.min()), float(value.max()))
        assert sum(step["hist"]["counts"]) == value.numel()
        assert step["explain"] and step["label"].startswith("block " if step["layer"] is not None else step["label"])
    fc = [s for s in data["steps"] if s["name"] == "fc"][-1]  # the last dense MLP's
    weight, layer = data["weights"][fc["weight"]], fc["layer"]
    w = model.h[layer].mlp.c_fc.weight.detach()
    assert weight["shape"] == [64, 256] and weight["param"] == f"h.{layer}.mlp.c_fc.weight"
    close(unpack(weight["data"]), w.T[weight["rows"]][:, weight["cols"]])
    assert weight["std"] == pytest.approx(float(w.std(unbiased=False)), rel=1e-5)
    lm_head = data["weights"][data["steps"][-1]["weight"]]
    tied = model.config.tie_embeddings
    assert lm_head["id"] == "lm_head.weight" and lm_head["param"] == ("wte.weight" if tied else "lm_head.weight")
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([ids]))[0, -1], -1)
    assert [t["id"] for t in data["next"][-1]] == torch.topk(probs, 5).indices.tolist()
    assert [t["prob"] for t in data["next"][-1]] == pytest.approx(torch.topk(probs, 5).values.tolist(), abs=1e-6)


def test_a_short_text_is_drawn_whole(tok):
    data = ModelView(_model(tok), tok).view(tok.encode("abc"))
    assert data["rows"] == [0, 1, 2] and data["sampling"]["positions"] == 3
    attention = next(s for s in data["steps"] if s["kind"] == "attention")
    assert "earlier" in attention and attention["earlier"] == 0 and unpack(attention["data"]).shape == (4, 3, 3)


def test_gpt2_small_view_stays_a_few_megabytes(tok):
    """GPT-2 small's shapes (768 wide, 12 layers, 12 heads): the JSON is capped whatever the text's length."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("gpt2", vocab_size=tok.vocab_size, block_size=128)).eval()
    data = ModelView(model, tok).view(tok.encode(TEXT * 2)[:128])
    size = len(json.dumps(data))
    assert 0.5e6 < size < 2.5e6, size
    assert data["sampling"] == {"positions": 32, "tokens": 128, "channels": 64, "width": 768, "stride": 12}
    assert len(data["steps"]) == 3 + 12 * 13 + 2


def test_view_config_is_bounded():
    with pytest.raises(ConfigError, match="positions=0 must be in 1..64"):
        ViewConfig(positions=0)
    with pytest.raises(ConfigError, match="columns=300 must be in 8..256"):
        ViewConfig.from_dict({"columns": 300})


# ------------------------------------------------------------------ gptlab visualize
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("viz")
    save_model(root / "run", _model(tok, block_size=32), tok)
    return root / "run"


def test_cli_writes_a_self_contained_page(run_dir, tmp_path, tok, capsys):
    out = tmp_path / "view.html"
    long = TEXT * 2  # longer than the context of 32: the view keeps its last 32 tokens, as the server does
    assert main(["visualize", "--model", str(run_dir), "--text", long, "--out", str(out), "--positions", "8"]) == 0
    assert "the first 96 cut to fit the context" in capsys.readouterr().out
    html = out.read_text(encoding="utf-8")
    assert not re.search(r'(src|href)="(https?:)?/(/|static)', html)  # nothing from a server or another host
    assert "<script src" not in html and "<link rel=\"stylesheet\"" not in html
    embedded = re.search(rf'<script type="application/json" id="{DATA_ID}">(.*?)</script>', html, re.S).group(1)
    data = json.loads(embedded)
    ids = tok.encode(long)[-32:]
    model, saved_tok, _ = load_run(run_dir)  # the same view from the saved run
    view = ModelView(model, saved_tok, ViewConfig(positions=8), name="run").view(ids, 96)
    assert data == json.loads(json.dumps(view))
    assert data["truncated"] == 96 and len(data["rows"]) == 8


@pytest.mark.parametrize("argv,needle", [
    (["--positions", "0"], "positions=0 must be in 1..64"),
    (["--text", ""], "type some text first"),
    (["--text", "ABC"], "is not in the char vocabulary"),
])
def test_cli_bad_input_is_one_line(run_dir, tmp_path, capsys, argv, needle):
    args = {"--text": "hello", "--out": str(tmp_path / "v.html"), **dict(zip(argv[::2], argv[1::2]))}
    assert main(["visualize", "--model", str(run_dir), *[x for kv in args.items() for x in kv]]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err and not (tmp_path / "v.html").exists()
