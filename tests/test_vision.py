"""GPT-4-style image input: the encoder's outputs stand exactly at the <|image|> positions; chat training."""

from __future__ import annotations

import json

import torch

from gptlab.chat import Message, render
from gptlab.cli import main
from gptlab.config import GPTConfig
from gptlab.images import prepare_images
from gptlab.model import GPT
from gptlab.stages.vision_chat import chat_tokenizer
from gptlab.train.metrics import read_metrics
from gptlab.vision import IMAGE, VisionConfig, VisionEncoder, render_images, token_embeds


def test_image_embeddings_replace_exactly_the_image_tokens():
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=20))
    cfg = VisionConfig(image_size=4, channels=1, patch=2, width=8)
    enc = VisionEncoder(cfg, 16)
    image_id = 19
    idx = torch.tensor([[1, 19, 19, 19, 19, 2, 3], [4, 5, 19, 19, 19, 19, 6]])
    images = torch.rand(2, 1, 4, 4)
    x = token_embeds(gpt, enc, idx, image_id, images)
    patches = enc(images)
    text = idx != image_id
    torch.testing.assert_close(x[text], gpt.wte(idx)[text])
    torch.testing.assert_close(x[0, 1:5], patches[0])
    torch.testing.assert_close(x[1, 2:6], patches[1])
    # a text-only forward is the model's own: token_embeds = wte(idx) changes nothing
    plain = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(gpt(plain, token_embeds=gpt.wte(plain)), gpt(plain))


def test_render_places_images_after_the_user_token_and_never_trains_on_them():
    tok = chat_tokenizer([str(i) for i in range(10)])
    msgs = [Message("user", "What digit is this?"), Message("assistant", "seven")]
    ids, mask = render_images(msgs, [1, 0], tok, 4)
    plain, plain_mask = render(msgs, tok)
    image_id = tok.special_tokens[IMAGE]
    assert ids == [plain[0], *[image_id] * 4, *plain[1:]]
    assert mask == [plain_mask[0], *[False] * 4, *plain_mask[1:]]
    assert render_images(msgs, [0, 0], tok, 4) == (plain, plain_mask)


def test_chat_train_learns_and_saves_the_encoder(tmp_path, capsys):
    prepare_images("digits", tmp_path / "digits")
    out = tmp_path / "vchat"
    assert main(["images", "chat-train", "--data", str(tmp_path / "digits"), "--out", str(out),
                 "--max-steps", "40"]) == 0
    assert "held-out answer accuracy: digit" in capsys.readouterr().out
    records = read_metrics(out / "metrics.jsonl")
    assert records[0]["loss"] > 2 * records[-1]["loss"]
    assert {"acc_digit", "acc_even", "acc_big", "acc_describe"} <= set(records[-1])
    config = json.loads((out / "config.json").read_text())
    assert config["vision"]["head"]["file"] == "vision.safetensors" and config["vision_chat"]["images"] is True
    assert (out / "vision.safetensors").is_file()
