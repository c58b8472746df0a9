"""End-to-end CLI: the commands and output formats other issues and users rely on, and one-line errors."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptlab import GPT, GPTConfig
from gptlab.runs import save_model
from gptlab.cli import main
from gptlab.config import PRESETS
from gptlab.engine import Engine, SamplingParams
from gptlab.tokenizer import load_tokenizer


def test_presets_lists_every_preset_with_exact_counts(capsys):
    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(PRESETS)
    rows = {line.split()[0]: line.split()[1:] for line in lines}
    assert rows["gpt2"] == ["12", "768", "12", "1024", "50257", "124439808", "124439808"]
    assert rows["gpt1"] == ["12", "768", "12", "512", "40478", "116534784", "116534784"]
    assert int(rows["gpt3-175b"][-1]) > 170e9
    total, active = map(int, rows["tiny-moe"][-2:])  # 8 experts, 2 per token
    assert active < total and total - active == 4 * 6 * (2 * 128 * 512 + 512 + 128)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, shakespeare_files):
    """A run directory with a BPE trained through the CLI and a freshly initialised model."""
    root = tmp_path_factory.mktemp("cli")
    assert main(["tokenizer", "train", "--input", *shakespeare_files[:3], "--vocab-size", "600",
                 "--out", str(root / "tok")]) == 0
    tok = load_tokenizer(root / "tok")
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", vocab_size=tok.vocab_size, block_size=64))
    save_model(root / "run", model, tok)
    return root / "run"


def test_generate_prints_only_the_greedy_continuation(run_dir, capsys):
    assert main(["generate", "--model", str(run_dir), "--prompt", "ROMEO:", "--max-new-tokens", "12",
                 "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    expected = Engine.from_spec(str(run_dir)).complete("ROMEO:", SamplingParams(max_new_tokens=12, temperature=0))
    assert out == expected.text + "\n"
    assert main(["generate", "--model", str(run_dir), "--prompt", "ROMEO:", "--max-new-tokens", "12",
                 "--temperature", "0", "--stream"]) == 0
    assert capsys.readouterr().out == expected.text + "\n"


@pytest.mark.parametrize("argv,needle", [
    (["generate", "--model", "{run}", "--prompt", "x " * 200, "--max-new-tokens", "4", "--no-slide"], "context"),
    (["generate", "--model", "/nonexistent/run", "--prompt", "hi"], "/nonexistent/run"),
    (["generate", "--model", "{run}", "--prompt", "hi", "--top-p", "2"], "top_p"),
    (["tokenizer", "train", "--input", "/nonexistent.txt", "--vocab-size", "300", "--out", "{tmp}"], "nonexistent"),
])
def test_bad_input_is_one_line_exit_2(run_dir, tmp_path, capsys, argv, needle):
    argv = [a.replace("{run}", str(run_dir)).replace("{tmp}", str(tmp_path / "t")) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err and "Traceback" not in err


def test_console_script_is_installed_and_reports_errors_in_one_line(run_dir):
    script = Path(sys.executable).parent / "gptlab"
    ok = subprocess.run([str(script), "presets"], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.startswith("gpt1 12 768 12 512 40478 116534784")
    bad = subprocess.run([str(script), "generate", "--model", "hf:/nope", "--prompt", "a"], capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and bad.stderr.count("\n") == 1


def test_generate_slides_past_the_context_like_nanogpt(run_dir, capsys):
    """300 new tokens from a 64-token model: all of them, each read from the last 64 tokens (nanoGPT's loop)."""
    argv = ["generate", "--model", str(run_dir), "--prompt", "ROMEO:", "--max-new-tokens", "300", "--temperature",
            "0", "--ignore-eos"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    engine = Engine.from_spec(str(run_dir))
    done = engine.complete("ROMEO:", SamplingParams(max_new_tokens=300, temperature=0, slide=True, stop_at_eos=False))
    assert len(done.token_ids) == 300 and out == done.text + "\n" and err == ""
    ids = engine.encode("ROMEO:")
    with torch.no_grad():
        for _ in range(300):
            ids.append(int(engine.model(torch.tensor([ids[-64:]]))[0, -1].argmax()))
    assert done.token_ids == ids[-300:]
    assert main([*argv, "--no-slide"]) == 0
    out, err = capsys.readouterr()
    assert err == "gptlab generate: stopped after 58 of 300 tokens at the model's context of 64 tokens " \
                  "(--slide goes on)\n"


def constant_run(run_dir: Path, out: Path, text: str) -> Path:
    """A model whose greedy choice (even at temperature 0.8) is always the token spelt ``text``."""
    tok = load_tokenizer(run_dir / "tokenizer")
    (token,) = tok.encode(text, allow_special=True)
    model = GPT(GPTConfig.from_preset("tiny", vocab_size=tok.vocab_size, block_size=64))
    with torch.no_grad():
        for p in model.h.parameters():
            p.zero_()
        model.ln_f.weight.zero_()
        model.ln_f.bias.copy_(torch.nn.functional.normalize(model.wte.weight[token], dim=0))
        model.wte.weight[token] *= 1000  # a logit of ~160 over ~0
    save_model(out, model, tok)
    return out


@pytest.fixture(scope="module")
def newline_run(run_dir, tmp_path_factory):
    return constant_run(run_dir, tmp_path_factory.mktemp("nl") / "run", "\n")


def test_generate_stop_as_the_readme_writes_it(newline_run, capsys):
    """`--stop "\\n\\n"` in a shell passes backslash-n: it means the newline, and the stop is reported."""
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    line = next(x for x in readme.splitlines() if x.startswith("gptlab generate --model runs/x"))
    argv = shlex.split(line.replace("[", "").replace("]", "").replace("runs/x", str(newline_run)))[1:]
    assert argv[argv.index("--stop") + 1] == "\\n\\n"
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert out == "\n" and err == "gptlab generate: stopped after 2 of 100 tokens at a stop string\n"
    assert main(["generate", "--model", str(newline_run), "--prompt", "x", "--max-new-tokens", "5",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr() == ("\n" * 5 + "\n", "")


def test_ppo_help_says_one_thing_per_setting(capsys):
    with pytest.raises(SystemExit):
        main(["ppo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--ptx-batch" not in text and "constant)" not in text.split("--min-lr")[0]
    assert "--batch-size INT micro batch per process (sequences, rows or prompts, by stage) (default: 8: the " \
           "pretraining (ptx) rows per update)" in text
    assert "--lr FLOAT peak learning rate (default: 1e-05)" in text
    assert "--min-lr FLOAT floor of the cosine decay (default: 1e-05: the learning rate stays constant)" in text


def test_special_tokens_are_not_text_unless_asked(run_dir, tmp_path, capsys):
    run = constant_run(run_dir, tmp_path / "eot", "<|endoftext|>")
    argv = ["generate", "--model", str(run), "--prompt", "x", "--max-new-tokens", "3", "--temperature", "0",
            "--ignore-eos"]
    assert main(argv) == 0
    assert capsys.readouterr() == ("\n", "")
    assert main([*argv, "--show-special-tokens"]) == 0
    assert capsys.readouterr() == ("<|endoftext|>" * 3 + "\n", "")
    assert main(argv[:-1]) == 0  # stopped at once by the end-of-text token, and says so
    assert capsys.readouterr() == ("\n", "gptlab generate: stopped after 0 of 3 tokens at the end-of-text token "
                                          "(--ignore-eos goes on)\n")
