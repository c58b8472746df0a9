"""Image GPT: the palette tokenizer, image data directories, completion, the linear probe, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from gptlab.cli import main
from gptlab.data import TokenData
from gptlab.errors import DataError, TokenizerError
from gptlab.igpt import complete_images, layer_features, logistic_probe, probe
from gptlab.images import fit_palette, image_split, load_images, prepare_images
from gptlab.images_demo import run_images_demo
from gptlab.runs import load_run
from gptlab.stages.pretrain import run_pretrain
from gptlab.tasks import load_task
from gptlab.tokenizer import EOS, PaletteTokenizer, load_tokenizer
from gptlab.train.metrics import read_metrics
from gptlab.vision import load_vision_run

GREYS = np.array([[v, v, v] for v in (0, 85, 170, 255)], np.uint8)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("igpt") / "digits"
    prepare_images("digits", out, palette=16)
    return out


@pytest.fixture(scope="module")
def igpt_run(digits):
    """A tiny Image GPT trained for a few seconds on the digits."""
    out = digits.parent / "run"
    run_pretrain(digits, out, {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 130},
                 {"max_steps": 60, "batch_size": 16, "lr": 3e-3, "warmup_steps": 5, "eval_every": 30,
                  "eval_batches": 4, "sample_tokens": 0}, progress=False)
    return out


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 3), max_size=40), st.sampled_from(["", " ", "\n"]))
def test_palette_text_round_trip(ids, sep):
    tok = PaletteTokenizer(GREYS, (2, 2), grey=True)
    text = tok.decode(ids)
    assert tok.encode(text) == ids
    assert tok.encode(sep.join(tok.token_text(i) for i in ids)) == ids  # whitespace between pixels is ignored


def test_palette_saves_loads_and_gives_pixels(tmp_path):
    tok = PaletteTokenizer(np.array([[0, 0, 0], [255, 0, 0], [0, 0, 255]]), (1, 3))
    tok.add_special_tokens(["<|image|>"])
    back = load_tokenizer(tok.save(tmp_path / "tok"))
    assert isinstance(back, PaletteTokenizer) and back.special_tokens == tok.special_tokens
    assert back.vocab_size == 3 + len(tok.special_tokens) and back.image_size == (1, 3)
    assert back.encode("#f00000 #0000ef #101010") == [1, 2, 0]  # the nearest colour
    assert back.image([1, 2, 0]).tolist() == [[[255, 0, 0], [0, 0, 255], [0, 0, 0]]]
    assert back.encode(EOS + "#ff0000", allow_special=True) == [back.eos_id, 1]
    with pytest.raises(TokenizerError, match="not a pixel colour"):
        back.encode("#ff0000 red")
    with pytest.raises(TokenizerError, match="palette ids"):
        back.image([1, back.eos_id, 0])


def test_fit_palette_keeps_few_colours_and_finds_clusters():
    px = GREYS[np.random.default_rng(0).integers(0, 4, 500)]
    assert fit_palette(px, 16, grey=True).tolist() == GREYS.tolist()  # no more levels than asked: lossless
    rng = np.random.default_rng(1)
    centres = np.array([[20, 30, 200], [220, 40, 40], [30, 200, 60]])
    blobs = np.clip(centres[rng.integers(0, 3, 3000)] + rng.normal(0, 6, (3000, 3)), 0, 255).astype(np.uint8)
    found = fit_palette(blobs, 3, grey=False).astype(int)
    assert np.abs(np.array(sorted(found.tolist())) - np.array(sorted(centres.tolist()))).max() <= 3


def test_prepare_digits_is_a_token_data_directory(digits):
    data = TokenData(digits)
    data.verify()
    tok = data.tokenizer()
    assert isinstance(tok, PaletteTokenizer) and tok.image_size == (8, 8) and tok.palette_size == 16
    ids, labels = image_split(data, "val")
    train_ids, train_labels = image_split(data, "train")
    assert len(ids) + len(train_ids) == 1797 and ids.shape[1] == 64
    assert set(labels.tolist()) == set(range(10)) and len(labels) == len(ids)
    # the pixels are the digits' own, through the palette (17 levels -> 16 clusters: nearly exact)
    raw = load_images("digits")
    order = json.loads((digits / "meta.json").read_text())["images"]["count"]
    assert order == {"train": len(train_ids), "val": len(ids)}
    assert np.abs(tok.image(train_ids[0]).astype(int) - raw.pixels[0].astype(int)).max() <= 16
    task = load_task(digits / "classify" / "val.jsonl")
    assert [tok.encode(r["text"]) for r in task.rows[:5]] == ids[:5].tolist()
    assert [r["label"] for r in task.rows[:5]] == [str(v) for v in labels[:5]]


def test_prepare_a_folder_of_labelled_images(tmp_path):
    rng = np.random.default_rng(0)
    for label, colour in (("red", (230, 20, 20)), ("blue", (20, 20, 230))):
        (tmp_path / "in" / label).mkdir(parents=True)
        for i in range(6):
            px = np.clip(np.array(colour) + rng.normal(0, 10, (20, 12, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(px).save(tmp_path / "in" / label / f"{i}.png")
    assert main(["images", "prepare", "--input", str(tmp_path / "in"), "--image-size", "4", "--palette", "8",
                 "--val-fraction", "0.25", "--out", str(tmp_path / "data")]) == 0
    data = TokenData(tmp_path / "data")
    ids, labels = image_split(data, "train")
    tok = data.tokenizer()
    assert ids.shape == (9, 16) and not tok.grey and tok.palette_size <= 8
    reds = tok.colours[ids[labels == 1]][..., 0]  # classes sorted: blue 0, red 1
    assert reds.mean() > 150


def test_prepare_errors_are_one_line_and_leave_nothing(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "broken.png").write_bytes(b"not a png")
    assert main(["images", "prepare", "--input", str(tmp_path / "in"), "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "broken.png" in err and "not a readable image" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]
    assert main(["images", "prepare", "--input", "nowhere", "--out", str(tmp_path / "d")]) == 2
    with pytest.raises(DataError, match="--palette 1"):
        prepare_images("digits", tmp_path / "d", palette=1)


def test_igpt_trains_and_completes(igpt_run):
    records = read_metrics(igpt_run / "metrics.jsonl")
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert records[0]["loss"] > records[-1]["loss"] + 0.5 and vals[-1] < vals[0]
    model, tok, _ = load_run(str(igpt_run))
    data = TokenData(igpt_run.parent / "digits")
    originals = torch.as_tensor(image_split(data, "val")[0][:3])
    given = originals[:, :24]
    out = complete_images(model, tok, given, 4, seed=3)
    assert out.shape == (3, 4, 64) and int(out.max()) < tok.palette_size
    assert (out[:, :, :24] == given[:, None]).all()
    assert torch.equal(out, complete_images(model, tok, given, 4, seed=3))
    # greedy decoding through the KV cache equals argmax of a full forward pass at every step
    greedy = complete_images(model, tok, given[:1], 1, temperature=0)[0, 0]
    seq = torch.cat([torch.tensor([tok.eos_id]), greedy])[None]
    full = model(seq[:, :-1])[0, 24:, :tok.palette_size].argmax(-1)
    assert torch.equal(full, greedy[24:])


def test_layer_features_and_probe(igpt_run):
    model, tok, _ = load_run(str(igpt_run))
    data = TokenData(igpt_run.parent / "digits")
    train, test = image_split(data, "train"), image_split(data, "val")
    feats = layer_features(model, tok, test[0][:5])
    assert len(feats) == 3 and feats[0].shape == (5, 32)
    # the embeddings' average is the mean of the token + position embeddings over the pixels
    ids = torch.as_tensor(test[0][:1])
    expect = (model.wte(ids) + model.wpe(torch.arange(1, 65))).mean(1)
    torch.testing.assert_close(feats[0][:1], expect.detach())
    result = probe(model, tok, train, test, cnn_seconds=0.5)
    assert result.pixels > 0.9  # the digits are nearly linearly separable in pixel space
    assert result.cnn > 0.5 and max(result.layers) > 2 * result.chance


def test_logistic_probe_separates_separable_classes():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (300,), generator=g)
    x = torch.randn(300, 5, generator=g) * 0.3 + torch.nn.functional.one_hot(y, 5).float() * 3
    assert logistic_probe(x[:200], y[:200], x[200:], y[200:]) == 1.0


def test_cli_complete_and_probe(igpt_run, tmp_path, capsys):
    grid = tmp_path / "grid.png"
    assert main(["images", "complete", "--model", str(igpt_run), "--from-val", "2", "--keep-rows", "3",
                 "--samples", "3", "--out", str(grid)]) == 0
    with Image.open(grid) as img:
        assert img.size[0] > img.size[1] > 0
    img_file = tmp_path / "seven.png"
    Image.fromarray(np.kron(np.eye(8, dtype=np.uint8) * 255, np.ones((4, 4), np.uint8))).save(img_file)
    assert main(["images", "complete", "--model", str(igpt_run), "--input", str(img_file), "--samples", "2",
                 "--out", str(tmp_path / "one.png")]) == 0
    assert main(["images", "probe", "--model", str(igpt_run), "--layer", "2", "--cnn-seconds", "0.2",
                 "--out", str(tmp_path / "probe")]) == 0
    saved = json.loads((tmp_path / "probe" / "probe.json").read_text())
    assert saved["best_layer"] == 2 and saved["layers"][0] is None and (tmp_path / "probe" / "probe.png").is_file()
    capsys.readouterr()
    assert main(["images", "complete", "--model", str(igpt_run), "--out", str(tmp_path / "x.png")]) == 2
    assert "--from-val" in capsys.readouterr().err


def test_finetune_classification_on_image_rows(igpt_run, tmp_path):
    """GPT-1's fine-tuning reads the image rows `images prepare` writes, unchanged (the palette is text)."""
    rows = igpt_run.parent / "digits" / "classify"
    out = tmp_path / "ft"
    assert main(["finetune", "--task", "classification", "--model", str(igpt_run), "--train", str(rows / "train.jsonl"),
                 "--val", str(rows / "val.jsonl"), "--out", str(out), "--max-steps", "200", "--batch-size", "16",
                 "--lr", "5e-3", "--eval-every", "200"]) == 0
    accuracy = [r["val_accuracy"] for r in read_metrics(out / "metrics.jsonl") if "val_accuracy" in r]
    assert accuracy[-1] > 0.2  # ten classes: chance is about 0.1 (the benchmark trains longer: docs/BENCHMARKS.md)


def test_images_demo_makes_both_models(tmp_path, capsys):
    out = run_images_demo(tmp_path / "demo", minutes=0.02, min_steps=4)
    text = capsys.readouterr().out
    assert text.count("What digit is this? ->") == 5 and "small CNN" in text
    assert (out / "igpt" / "completions.png").is_file() and (out / "igpt" / "probe" / "probe.png").is_file()
    probe_json = json.loads((out / "igpt" / "probe" / "probe.json").read_text())
    assert len(probe_json["layers"]) == 7  # the embeddings and six blocks
    _, tok, config, vision = load_vision_run(str(out / "chat"))
    assert vision is not None and config["chat_format"] and "<|image|>" in tok.special_tokens
    assert config["vision"]["encoder"] == "igpt" and config["vision"]["igpt"] == str(out / "igpt")
    assert main(["images", "demo", "--out", str(out)]) == 2  # never over an earlier demo
