"""Run directories, integrity checks, atomic writes and the `gptlab convert` command.

    .venv/bin/pytest -q tests/test_checkpoint.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from gptlab import GPT, GPTConfig
from gptlab.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text, sha256_file
from gptlab.hf import export_hf
from gptlab.runs import load_model, load_run, save_model
from gptlab.weights import atomic_save_safetensors, model_tensors
from gptlab.cli import main
from gptlab.errors import CheckpointError, ConfigError

BASE = dict(n_layer=2, n_embd=64, n_head=4, block_size=48, vocab_size=300)
CONFIGS = {
    "gpt2-tied": {},
    "untied-nobias": {"tie_embeddings": False, "bias": False},
    "gpt1-post": {"norm_position": "post", "activation": "gelu", "scale_residual_init": False},
    "gpt3-banded": {"attention_pattern": "DL", "attn_window": 8, "n_layer": 3},
}


def make_model(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**BASE, **kw})).eval()


def assert_same(a: GPT, b: GPT) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert a.config == b.config
    assert (b.lm_head.weight is b.wte.weight) == a.config.tie_embeddings


@pytest.fixture
def small_tokenizer():
    from gptlab.tokenizer import train_bpe

    return train_bpe(iter(["to be or not to be, that is the question. " * 20]), 280)


@pytest.fixture
def run_dir(tmp_path) -> Path:
    save_model(tmp_path / "run", make_model())
    return tmp_path / "run"


# ---------------------------------------------------------------- round trip
@pytest.mark.parametrize("name", CONFIGS)
def test_save_load_round_trip_bit_exact(tmp_path, name):
    model = make_model(**CONFIGS[name])
    save_model(tmp_path, model)
    back = load_model(tmp_path)
    assert_same(model, back)
    idx = torch.randint(0, 300, (2, 48))
    with torch.no_grad():
        assert torch.equal(model(idx), back(idx))
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:  # tied weights stored once
        assert ("lm_head.weight" in f.keys()) == (not model.config.tie_embeddings)


def test_load_run_with_tokenizer_and_extra(tmp_path, small_tokenizer):
    model = make_model()
    save_model(tmp_path, model, small_tokenizer, stage="sft", extra={"step": 7})
    back, tok, cfg = load_run(tmp_path)
    assert_same(model, back)
    assert tok.encode("not to be") == small_tokenizer.encode("not to be")
    assert cfg["stage"] == "sft" and cfg["step"] == 7 and cfg["tokenizer"] == "tokenizer"
    assert cfg["format_version"] == 1 and cfg["model"] == model.config.to_dict()
    assert cfg["weights"]["sha256"] == sha256_file(tmp_path / "model.safetensors")
    assert load_model(str(tmp_path)).config == model.config
    with pytest.raises(ValueError, match="reserved"):
        save_model(tmp_path, model, extra={"model": {}})


def test_save_unwraps_wrappers_and_keeps_dtype(tmp_path):
    class Wrapper(torch.nn.Module):  # what DDP looks like from outside: .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    model = make_model().to(torch.bfloat16)
    assert "lm_head.weight" not in model_tensors(Wrapper(model))
    save_model(tmp_path, Wrapper(model))
    back = load_model(tmp_path)
    assert back.wte.weight.dtype == torch.bfloat16
    assert_same(model, back)


def test_tokenizer_larger_than_model_vocab_is_refused(tmp_path, small_tokenizer):
    with pytest.raises(CheckpointError, match="vocab_size"):
        save_model(tmp_path, make_model(vocab_size=100), small_tokenizer)


# ---------------------------------------------------------------- integrity
def test_corrupted_weights_are_detected(run_dir):
    path = run_dir / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*sha256.*earlier checkpoint"):
        load_model(run_dir)


def test_truncated_weights_are_detected(run_dir):
    path = run_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        load_model(run_dir)
    # Even without the recorded size and checksum, safetensors' own header check catches it.
    cfg = json.loads((run_dir / "config.json").read_text())
    del cfg["weights"]
    (run_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_model(run_dir)


def _edit_config(run_dir: Path, edit) -> None:
    cfg = json.loads((run_dir / "config.json").read_text())
    edit(cfg)
    (run_dir / "config.json").write_text(json.dumps(cfg))


def test_config_problems_are_one_line_errors(run_dir, tmp_path):
    errors = []
    with pytest.raises(CheckpointError, match="no such run directory") as e:
        load_model(tmp_path / "nope")
    errors.append(e.value)
    _edit_config(run_dir, lambda c: c["model"].update(n_embd=128))
    with pytest.raises(CheckpointError, match="wrong shape") as e:
        load_model(run_dir)
    errors.append(e.value)
    _edit_config(run_dir, lambda c: c["model"].update(n_embd=64, n_layers=3))
    with pytest.raises(ConfigError, match="unknown model field.*n_layers") as e:
        load_model(run_dir)
    errors.append(e.value)
    _edit_config(run_dir, lambda c: (c["model"].pop("n_layers"), c.update(format_version=99)))
    with pytest.raises(CheckpointError, match="newer gptlab") as e:
        load_model(run_dir)
    errors.append(e.value)
    _edit_config(run_dir, lambda c: c.update(format_version=1, tokenizer="tokenizer"))
    with pytest.raises(CheckpointError, match="tokenizer directory") as e:
        load_run(run_dir)
    errors.append(e.value)
    (run_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing") as e:
        load_model(run_dir)
    errors.append(e.value)
    (run_dir / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON") as e:
        load_model(run_dir)
    errors.append(e.value)
    assert all("\n" not in str(err) for err in errors)


# ---------------------------------------------------------------- atomic writes
def _leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]


def test_atomic_writes_keep_old_file_when_writer_raises(tmp_path):
    target = tmp_path / "state.bin"
    atomic_write_bytes(target, b"old contents")

    def half_then_fail(fh):
        fh.write(b"new, half written")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write_bytes(target, half_then_fail)
    assert target.read_bytes() == b"old contents"

    text = tmp_path / "notes.txt"
    atomic_write_text(text, "old")
    with pytest.raises(ZeroDivisionError):
        atomic_write_text(text, lambda fh: (fh.write("partial"), 1 / 0))
    assert text.read_text() == "old"

    js = tmp_path / "config.json"
    atomic_write_json(js, {"a": 1})
    with pytest.raises(TypeError):  # json.dump streams: "b" is written before the bad value is reached
        atomic_write_json(js, {"b": list(range(1000)), "c": object()})
    assert json.loads(js.read_text()) == {"a": 1}
    assert _leftovers(tmp_path) == []


def test_atomic_writes_replace_and_use_normal_permissions(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    target = atomic_write_json(tmp_path / "sub" / "x.json", {"k": [1, 2]})
    assert json.loads(target.read_text()) == {"k": [1, 2]}
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    atomic_write_bytes(target, b"{}")
    assert target.read_bytes() == b"{}"
    tensors = {"a": torch.arange(6.0).view(2, 3).t(), "b": torch.ones(2, dtype=torch.bfloat16)}
    digest = atomic_save_safetensors(tensors, tmp_path / "t.safetensors", {"step": "3"})
    assert digest == sha256_file(tmp_path / "t.safetensors")
    with safe_open(str(tmp_path / "t.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt", "step": "3"}
        assert torch.equal(f.get_tensor("a"), tensors["a"]) and torch.equal(f.get_tensor("b"), tensors["b"])
    assert _leftovers(tmp_path) == [] and _leftovers(tmp_path / "sub") == []


# ---------------------------------------------------------------- CLI
def test_cli_convert_both_directions(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model = make_model(seed=4)
    export_hf(model, tmp_path / "hf")
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    assert "wrote run directory" in capsys.readouterr().out
    back, tok, cfg = load_run(tmp_path / "run")
    assert tok is None and cfg["source"] == f"hf:{tmp_path / 'hf'}"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))

    assert main(["convert", "--to-hf", str(tmp_path / "run"), "--out", str(tmp_path / "hf2")]) == 0
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf2").eval()
    idx = torch.randint(0, 300, (1, 48))
    with torch.no_grad():
        assert (hf(idx).logits - model(idx)).abs().max().item() <= 1e-4

    # A non-empty --out needs --force.
    assert main(["convert", "--to-hf", str(tmp_path / "run"), "--out", str(tmp_path / "hf2")]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--force" in err and err.count("\n") == 1
    assert main(["convert", "--to-hf", str(tmp_path / "run"), "--out", str(tmp_path / "hf2"), "--force"]) == 0


@pytest.mark.parametrize("flag", ["--from-hf", "--to-hf"])
def test_cli_convert_bad_directory(tmp_path, capsys, flag):
    bad = tmp_path / "does-not-exist"
    assert main(["convert", flag, str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gptlab convert: error:") and str(bad) in err and err.count("\n") == 1


def test_cli_convert_unsupported_model_type(tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "bert" in err and "gpt2" in err and err.count("\n") == 1
