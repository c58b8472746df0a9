"""GPT-4-style image input: the encoder's outputs stand exactly at the <|image|> positions; chat training."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from gptlab.chat import Message, render, stop_ids
from gptlab.chat_repl import run_chat
from gptlab.cli import main
from gptlab.config import GPTConfig
from gptlab.data import TokenData
from gptlab.engine import Engine, SamplingParams
from gptlab.images import image_split, prepare_images
from gptlab.model import GPT, Context
from gptlab.runs import load_run
from gptlab.serve.app import create_app
from gptlab.stages.pretrain import run_pretrain
from gptlab.stages.vision_chat import chat_tokenizer
from gptlab.train.metrics import read_metrics
from gptlab.vision import IMAGE, VisionConfig, VisionEncoder, load_vision_run, read_image, render_images, token_embeds

from serving import RunningApp

QUESTION = "What digit is this?"


@pytest.fixture(scope="module")
def vchat(tmp_path_factory):
    """A tiny image-input chat model trained for a few seconds, and a held-out digit as a PNG."""
    root = tmp_path_factory.mktemp("vchat")
    prepare_images("digits", root / "digits")
    assert main(["images", "chat-train", "--data", str(root / "digits"), "--out", str(root / "run"),
                 "--max-steps", "40"]) == 0
    data = TokenData(root / "digits")
    ids, _ = image_split(data, "val")
    png = root / "digit.png"
    Image.fromarray(data.tokenizer().image(ids[0])).resize((32, 32), Image.Resampling.NEAREST).save(png)
    return root, png


def direct_reply(engine: Engine, png) -> str:
    """The greedy reply to QUESTION about the image, from the engine itself."""
    prompt, _ = render_images([Message("user", QUESTION)], [1], engine.tokenizer, engine.vision.cfg.patches,
                              add_generation_prompt=True)
    params = SamplingParams(max_new_tokens=24, temperature=0, stop_token_ids=stop_ids(engine.tokenizer))
    return engine.generate_ids([prompt], params, images=[read_image(png, engine.vision.cfg)[None]])[0].text or ""


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


def test_chat_train_learns_and_saves_the_encoder(vchat):
    out = vchat[0] / "run"
    records = read_metrics(out / "metrics.jsonl")
    assert records[0]["loss"] > 2 * records[-1]["loss"]
    assert {"acc_digit", "acc_even", "acc_big", "acc_describe"} <= set(records[-1])
    config = json.loads((out / "config.json").read_text())
    assert config["vision"]["head"]["file"] == "vision.safetensors" and config["vision_chat"]["images"] is True
    assert (out / "vision.safetensors").is_file()


def test_engine_images_change_the_reply_and_text_alone_still_works(vchat):
    engine = Engine.from_spec(str(vchat[0] / "run"))
    assert engine.vision is not None
    prompt, _ = render_images([Message("user", QUESTION)], [1], engine.tokenizer, engine.vision.cfg.patches,
                              add_generation_prompt=True)
    params = SamplingParams(max_new_tokens=8, temperature=0, logprobs=1)
    black = torch.zeros(1, 1, 8, 8)
    white = torch.ones(1, 1, 8, 8)
    a, b = (engine.generate_ids([prompt], params, images=[im])[0] for im in (black, white))
    assert a.logprobs != b.logprobs  # the image reaches the model
    with pytest.raises(Exception, match="image tokens"):
        engine.generate_ids([prompt], params)  # image tokens without their image


def test_chat_repl_image_command(vchat):
    root, png = vchat
    engine = Engine.from_spec(str(root / "run"))
    out = io.StringIO()
    lines = [f"/image {png}", QUESTION]

    def read(_: str) -> str:
        if not lines:
            raise EOFError
        return lines.pop(0)

    run_chat(engine, SamplingParams(max_new_tokens=24, temperature=0), read=read, out=out)
    text = out.getvalue()
    assert f"(image {png} attached to your next message)" in text
    assert f"assistant> {direct_reply(engine, png)}" in text


def test_api_takes_image_url_data_parts_and_refuses_remote_urls(vchat):
    openai = pytest.importorskip("openai")
    root, png = vchat
    model, tok, config, vision = load_vision_run(str(root / "run"))
    running = RunningApp(create_app(model, tok, config, model_name="vchat", vision=vision))
    text_only = RunningApp(create_app(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=64,
                                                    vocab_size=tok.vocab_size)), tok, config, model_name="t"))
    try:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="x", max_retries=0, timeout=30)
        url = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()
        content = [{"type": "text", "text": QUESTION}, {"type": "image_url", "image_url": {"url": url}}]
        reply = client.chat.completions.create(model="vchat", messages=[{"role": "user", "content": content}],
                                               temperature=0, max_tokens=24)
        expected = direct_reply(Engine(model, tok, vision=vision), png)
        assert reply.choices[0].message.content == expected
        stream = client.chat.completions.create(model="vchat", messages=[{"role": "user", "content": content}],
                                                temperature=0, max_tokens=24, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected
        remote = [{"type": "image_url", "image_url": {"url": "https://example.com/seven.png"}}]
        with pytest.raises(openai.BadRequestError, match="not fetched"):
            client.chat.completions.create(model="vchat", messages=[{"role": "user", "content": remote}])
        broken = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGEgcG5n"}}]
        with pytest.raises(openai.BadRequestError, match="not a readable image"):
            client.chat.completions.create(model="vchat", messages=[{"role": "user", "content": broken}])
        other = openai.OpenAI(base_url=f"{text_only.url}/v1", api_key="x", max_retries=0, timeout=30)
        with pytest.raises(openai.BadRequestError, match="does not take images"):
            other.chat.completions.create(model="t", messages=[{"role": "user", "content": content}])
    finally:
        running.stop()
        text_only.stop()


def test_sft_reads_image_parts_and_trains_the_encoder(vchat, tmp_path, capsys):
    root, png = vchat
    chat = root / "digits" / "chat"
    first = json.loads((chat / "val.jsonl").read_text().splitlines()[0])
    assert first["messages"][0]["content"][0]["type"] == "image_url" and first["kind"] == "digit"
    out = tmp_path / "sft"
    assert main(["sft", "--model", str(root / "run"), "--data", str(chat / "val.jsonl"), "--out", str(out),
                 "--max-steps", "4", "--batch-size", "8", "--eval-every", "4"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["vision"]["head"]["file"] == "vision.safetensors" and config["chat_format"]
    assert "acc_val" in read_metrics(out / "metrics.jsonl")[-1]
    before = load_vision_run(str(root / "run"))[3].state_dict()
    after = load_vision_run(str(out))[3].state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the encoder was fine-tuned
    # a row with a file path (relative to the data file) and one with a remote URL
    rows = tmp_path / "rows.jsonl"
    user = [{"type": "image_url", "image_url": {"url": png.name}}, {"type": "text", "text": QUESTION}]
    good = {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": "seven"}]}
    (tmp_path / png.name).write_bytes(png.read_bytes())
    rows.write_text(json.dumps(good) + "\n")
    assert main(["sft", "--model", str(root / "run"), "--data", str(rows), "--val", str(rows),
                 "--out", str(tmp_path / "sft2"), "--max-steps", "1"]) == 0
    user[0]["image_url"]["url"] = "https://example.com/seven.png"
    rows.write_text(json.dumps(good) + "\n")
    capsys.readouterr()
    assert main(["sft", "--model", str(root / "run"), "--data", str(rows), "--out", str(tmp_path / "sft3")]) == 2
    err = capsys.readouterr().err
    assert f"{rows}:1" in err and "not fetched" in err and not (tmp_path / "sft3").exists()


def test_an_image_gpt_as_the_frozen_encoder(vchat, tmp_path):
    root, png = vchat
    igpt = tmp_path / "igpt"
    run_pretrain(root / "digits", igpt, {"n_layer": 2, "n_head": 2, "n_embd": 16, "block_size": 65},
                 {"max_steps": 3, "batch_size": 4, "eval_every": 0, "sample_tokens": 0}, progress=False)
    out = tmp_path / "chat"
    assert main(["images", "chat-train", "--data", str(root / "digits"), "--out", str(out), "--max-steps", "3",
                 "--encoder", "igpt", "--igpt", str(igpt), "--igpt-layer", "1"]) == 0
    _, _, config, vision = load_vision_run(str(out))
    assert config["vision"]["encoder"] == "igpt" and list(vision.state_dict()) == ["proj.weight", "proj.bias"]
    # the features: block 1's states at each pixel (read after <|endoftext|>), averaged over each 2x2 patch
    gpt, palette, _ = load_run(str(igpt))
    image = read_image(png, vision.cfg)[None]
    ids = torch.as_tensor(palette.quantize((image[0, 0] * 255).round()[..., None].expand(8, 8, 3).numpy()))
    states = gpt.h[0](gpt.drop(gpt.wte(torch.cat([torch.tensor([palette.eos_id]), ids.view(-1)]))[None]
                               + gpt.wpe(torch.arange(65))), None, Context({"D": "causal"}, None))[0, 1:]
    expect = states.view(4, 2, 4, 2, 16).mean((1, 3)).reshape(16, 16)
    torch.testing.assert_close(vision.igpt_features(image)[0], expect.detach())
