"""End-to-end CLI: the commands and output formats other issues and users rely on, and one-line errors."""

from __future__ import annotations

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
    assert rows["gpt2"] == ["12", "768", "12", "1024", "50257", "124439808"]
    assert rows["gpt1"] == ["12", "768", "12", "512", "40478", "116534784"]
    assert int(rows["gpt3-175b"][-1]) > 170e9


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
    (["generate", "--model", "{run}", "--prompt", "x " * 200, "--max-new-tokens", "4"], "context"),
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
