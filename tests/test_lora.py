"""LoRA: adapters against the `peft` library (same names, same logits), training with them on every stage,
resume, `gptlab lora merge`, loading a run with adapters, PPO's reference without a second copy.

HF models are tiny random ones built in-process with transformers; nothing is downloaded.

    .venv/bin/pytest -q tests/test_lora.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gptlab.atomic import atomic_write_jsonl as write_jsonl
from gptlab import chat
from gptlab.cli import main
from gptlab.config import GPTConfig
from gptlab.heads import PolicyModel
from gptlab.hf import import_hf
from gptlab.lora import ADAPTER_CONFIG, ADAPTER_FILE, LoRAConfig, adapter_tensors, adapters, add_lora, merge_lora
from gptlab.model import GPT
from gptlab.runs import load_model, load_run, save_model
from gptlab.stages.ppo import BasePolicy
from gptlab.tokenizer import EOS, CharTokenizer
from gptlab.train.metrics import read_metrics

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

CFG = LoRAConfig(lora_rank=4, lora_alpha=8.0, lora_targets="c_attn,c_proj,c_fc")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    yield
    torch.set_num_threads(threads)


def randomize(gpt: torch.nn.Module, seed: int = 0) -> None:
    """Adapters with non-zero B, so that they change what the model computes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in adapters(gpt).values():
            for w in (adapter.lora_A.weight, adapter.lora_B.weight):
                w.copy_(torch.randn(w.shape, generator=g) * 0.1)


HF_CLASSES = {"gpt2": ("GPT2LMHeadModel", "GPT2Config", {"activation_function": "gelu_new"}),
              "openai-gpt": ("OpenAIGPTLMHeadModel", "OpenAIGPTConfig", {"afn": "gelu"})}


def hf_model(kind: str):
    model_cls, config_cls, extra = (getattr(transformers, n) if isinstance(n, str) else n for n in HF_CLASSES[kind])
    torch.manual_seed(0)
    return model_cls(config_cls(n_layer=2, n_embd=48, n_head=4, n_positions=32, vocab_size=97, **extra)).eval()


@pytest.mark.parametrize("kind", ["gpt2", "openai-gpt"])
def test_adapters_load_in_peft_with_the_same_logits(tmp_path, kind, capsys):
    hf = hf_model(kind)
    hf.save_pretrained(tmp_path / "hf")
    gpt = add_lora(import_hf(tmp_path / "hf")[0], CFG)
    randomize(gpt)
    run = save_model(tmp_path / "run", gpt, None, extra=CFG.record())
    assert main(["convert", "--to-hf", str(run), "--out", str(tmp_path / "export")]) == 0
    assert "PeftModel.from_pretrained" in capsys.readouterr().out
    model_cls = type(hf)
    idx = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = gpt.eval()(idx)
        base = model_cls.from_pretrained(tmp_path / "export")(idx).logits
        for adapter_dir in (tmp_path / "export" / "adapter", run):  # the export's copy, and the run itself
            peft_model = peft.PeftModel.from_pretrained(model_cls.from_pretrained(tmp_path / "export"), adapter_dir)
            theirs = peft_model.eval()(idx).logits
            torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)
    assert (ours - base).abs().max() > 1e-2  # the adapters were applied, not silently dropped
    # a run with adapters loads merged for every command; the same logits
    merged = load_model(run)
    torch.testing.assert_close(merged(idx), ours, atol=1e-5, rtol=1e-4)
    assert not adapters(merged)


def test_adapter_names_are_those_peft_writes(tmp_path):
    hf = hf_model("gpt2")
    hf.save_pretrained(tmp_path / "hf")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    peft.get_peft_model(hf, config).save_pretrained(tmp_path / "peft")
    theirs = load_file(str(tmp_path / "peft" / ADAPTER_FILE))
    ours = adapter_tensors(add_lora(import_hf(tmp_path / "hf")[0], CFG))
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


def test_merge_and_disabled_adapters_compute_the_base_and_the_adapted_model():
    torch.manual_seed(0)
    base = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=30)).eval()
    gpt = add_lora(GPT(base.config).eval(), LoRAConfig(lora_rank=2, lora_targets="attn.c_proj,mlp.c_proj"))
    gpt.load_state_dict(base.state_dict(), strict=False)
    randomize(gpt)
    assert sorted(adapters(gpt)) == ["h.0.attn.c_proj", "h.0.mlp.c_proj", "h.1.attn.c_proj", "h.1.mlp.c_proj"]
    assert [n for n, p in gpt.named_parameters() if p.requires_grad] == [
        f"h.{i}.{m}.c_proj.lora.lora_{x}.weight" for i in range(2) for m in ("attn", "mlp") for x in "AB"]
    idx = torch.randint(0, 30, (3, 16))
    starts = torch.tensor([2, 5, 7])
    targets = idx[:, 8:]
    with torch.no_grad():
        adapted = gpt(idx)
        assert (adapted - base(idx)).abs().max() > 1e-3
        torch.testing.assert_close(BasePolicy(gpt)(idx, starts, targets)[0], PolicyModel(base)(idx, starts, targets)[0])
        torch.testing.assert_close(gpt(idx), adapted)  # the adapters are back after the reference's forward
        torch.testing.assert_close(merge_lora(gpt)(idx), adapted, atol=1e-5, rtol=1e-5)
    assert not adapters(gpt) and not gpt.h[0].attn.c_proj._forward_hooks


def test_bad_targets_are_a_config_error():
    from gptlab.errors import ConfigError

    with pytest.raises(ConfigError, match="lora_targets: 'q_proj' names none of"):
        LoRAConfig(lora_rank=4, lora_targets="c_attn,q_proj")


# ------------------------------------------------------------- training with adapters, every stage
ALPHABET = "abcdefghijklmnopqrstuvwxyz ."
TINY = {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 64}
COMMON = ["--device", "cpu", "--batch-size", "4", "--eval-every", "0", "--checkpoint-every", "0", "--sample-every", "0"]
LORA = ["--lora-rank", "4", "--lora-alpha", "8"]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lora")


@pytest.fixture(scope="module")
def base_run(work) -> Path:
    tok = CharTokenizer.from_text(ALPHABET, special_tokens=[EOS])
    torch.manual_seed(0)
    return save_model(work / "base", GPT(GPTConfig(vocab_size=tok.vocab_size, **TINY)), tok)


@pytest.fixture(scope="module")
def sft_data(work) -> Path:
    return write_jsonl(work / "sft.jsonl", [{"prompt": p, "response": r} for p, r in
                                            {"ab": "cab", "ba": "dcd", "cc": "aaa"}.items()] * 20)


@pytest.fixture(scope="module")
def sft_lora(work, base_run, sft_data) -> Path:
    out = work / "sft-lora"
    assert main(["sft", "--model", str(base_run), "--data", str(sft_data), "--out", str(out), *COMMON, *LORA,
                 "--max-steps", "40", "--lr", "3e-2", "--min-lr", "3e-3", "--warmup-steps", "0", "--log-every", "1",
                 "--lr-decay-steps", "40",
                 "--checkpoint-every", "20"]) == 0
    return out


def test_sft_trains_only_the_adapters_and_saves_them_beside_the_frozen_base(sft_lora, base_run):
    config = json.loads((sft_lora / "config.json").read_text())
    assert config["lora"]["lora_rank"] == 4 and config["lora"]["adapter"]["file"] == ADAPTER_FILE
    peft_cfg = json.loads((sft_lora / ADAPTER_CONFIG).read_text())
    assert (peft_cfg["r"], peft_cfg["lora_alpha"], peft_cfg["fan_in_fan_out"]) == (4, 8.0, True)
    before, after = load_file(str(base_run / "model.safetensors")), load_file(str(sft_lora / "model.safetensors"))
    for name, tensor in before.items():  # the base is frozen (the chat tokens' new rows aside)
        assert torch.equal(after[name][: tensor.shape[0]], tensor), name
    adapter = load_file(str(sft_lora / ADAPTER_FILE))
    # c_attn, attn.c_proj, mlp.c_fc and mlp.c_proj ("c_proj" names both): r·(in + out) each
    assert sum(t.numel() for t in adapter.values()) == 4 * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32))
    assert any(t.abs().max() > 0 for k, t in adapter.items() if "lora_B" in k)  # B left zero: nothing learned
    losses = [r["loss"] for r in read_metrics(sft_lora / "metrics.jsonl")]
    # a random base's frozen embeddings bound how sure it can get (tied head rows of norm ~0.1 after ln_f)
    assert sum(losses[-5:]) / 5 < losses[0] - 0.2, losses


def test_resume_with_adapters_is_exact(work, base_run, sft_data, sft_lora):
    out = work / "sft-lora-resumed"
    args = ["sft", "--model", str(base_run), "--data", str(sft_data), "--out", str(out), *COMMON, *LORA,
            "--lr", "3e-2", "--min-lr", "3e-3", "--warmup-steps", "0", "--log-every", "1", "--checkpoint-every", "20",
            "--lr-decay-steps", "40"]  # the first 20 steps are those of the 40-step run
    assert main([*args, "--max-steps", "20"]) == 0
    assert main(["sft", "--model", str(base_run), "--data", str(sft_data), "--out", str(out), "--resume",
                 "--max-steps", "40"]) == 0
    resumed, straight = load_file(str(out / ADAPTER_FILE)), load_file(str(sft_lora / ADAPTER_FILE))
    assert resumed.keys() == straight.keys()
    for name, tensor in straight.items():
        assert torch.equal(resumed[name], tensor), name


def test_merge_generate_and_every_stage_with_adapters(work, sft_lora, sft_data, capsys):
    gpt, _, _ = load_run(sft_lora, merge=False)
    merged_run = work / "sft-merged"
    assert main(["lora", "merge", "--model", str(sft_lora), "--out", str(merged_run)]) == 0
    config = json.loads((merged_run / "config.json").read_text())
    assert "lora" not in config and config["lora_merged_from"] == str(sft_lora.resolve())
    assert not (merged_run / ADAPTER_FILE).exists()
    idx = torch.randint(0, gpt.config.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(load_model(merged_run)(idx), gpt.eval()(idx), atol=1e-5, rtol=1e-5)
    capsys.readouterr()
    assert main(["generate", "--model", str(sft_lora), "--prompt", "ab", "--max-new-tokens", "4", "--seed", "0",
                 "--temperature", "0"]) == 0
    assert main(["lora", "merge", "--model", str(merged_run), "--out", str(work / "again")]) == 2
    assert "has no LoRA adapters" in capsys.readouterr().err
    # every other training command takes the same flags
    rankings = write_jsonl(work / "rank.jsonl", [{"prompt": p, "chosen": "aaa", "rejected": "bcb"}
                                                  for p in ("ab", "ba", "cd", "dc", "ef", "fe", "gh", "hg")])
    prompts = write_jsonl(work / "prompts.jsonl", [{"prompt": p} for p in ("ab", "ba", "cd", "dc", "ef", "fe")])
    steps = ["--max-steps", "2"]
    assert main(["rm", "--model", str(sft_lora), "--data", str(rankings), "--out", str(work / "rm"), *COMMON, *LORA,
                 *steps, "--norm-tokens", "4"]) == 0
    assert main(["dpo", "--model", str(sft_lora), "--data", str(rankings), "--out", str(work / "dpo"), *COMMON,
                 *LORA, *steps]) == 0
    assert main(["ppo", "--model", str(sft_lora), "--reward", str(work / "rm"), "--prompts", str(prompts),
                 "--out", str(work / "ppo"), "--iterations", "1", "--rollout-batch", "4", "--minibatches", "2",
                 "--ppo-epochs", "1", "--max-new-tokens", "4", "--val-fraction", "0", "--device", "cpu", *LORA]) == 0
    first = read_metrics(work / "ppo" / "metrics.jsonl")[0]
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)  # the reference is the policy with its adapters off
    for stage in ("rm", "dpo", "ppo"):
        assert json.loads((work / stage / "config.json").read_text())["lora"]["adapter"]["file"] == ADAPTER_FILE
    assert chat.CHAT_FORMAT == json.loads((work / "ppo" / "config.json").read_text())["chat_format"]
