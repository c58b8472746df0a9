"""Nothing corrupt passes silently and no bad input ends in a traceback: data directories (meta.json as a
schema, shards by sha256 and vocabulary), tokenizer checksums, non-finite and non-UTF-8 configs, resume
errors, a failed first step, temporaries of killed writers, and the final save as one atomic switch (the
process really killed at every point of it). Then a fuzz over every file a run and a data directory hold.

Real tiny runs on a character corpus, driven through the CLI in this process; kills are real SIGKILLs.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gptlab.atomic import sha256_file
from gptlab.cli import main
from gptlab.tokenizer import CharTokenizer
from gptlab.train.checkpoints import checkpoint_dirs

ROOT = Path(__file__).resolve().parents[1]
TINY = "model: {n_layer: 1, n_head: 2, n_embd: 16, block_size: 16}\n"
PROGRESS = re.compile(r"^[\w -]+: +\d+%\|")  # a tqdm bar (what a long job shows before it fails)
STEPS = ["--batch-size", "2", "--eval-every", "3", "--eval-batches", "1", "--sample-tokens", "0",
         "--checkpoint-every", "3"]


def corpus(n_lines: int = 3000, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = "the king a fool my lord the queen speaks sleeps loves fears crown horse letter sea ring".split()
    return "".join(" ".join(rng.choice(words) for _ in range(8)) + ".\n" for _ in range(n_lines))


def cli(*argv: str | Path) -> tuple[int, str, str]:
    """``gptlab ARGV`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:  # argparse
            code = e.code
    return code, out.getvalue(), err.getvalue()


def fails(*argv: str | Path, needles: tuple[str, ...] = ()) -> str:
    """Run a command that must fail as the README promises: exit 2, one line on stderr naming ``needles``."""
    code, _, err = cli(*argv)
    assert code == 2, err
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip() and not PROGRESS.match(line)]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert all(n in lines[0] for n in needles), (needles, err)
    return lines[0]


def files(directory: Path) -> set[Path]:
    return {p for p in directory.rglob("*") if p.is_file()}


def train(data: Path, out: Path, config: Path, *extra: str | Path) -> tuple[int, str, str]:
    return cli("train", "--data", data, "--out", out, "--config", config, *STEPS, *extra)


def dead_pid() -> int:
    """The pid of a process that has exited (what a kill -9 leaves a temporary name pointing at)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """``data/`` (char tokenizer) and ``run/`` (6 steps, checkpoints at 3 and 6), never modified: tests copy."""
    root = tmp_path_factory.mktemp("integrity")
    (root / "c.txt").write_text(corpus(), encoding="utf-8")
    (root / "tiny.yaml").write_text(TINY, encoding="utf-8")
    assert cli("prepare", "--input", root / "c.txt", "--tokenizer", "char", "--out", root / "data")[0] == 0
    code, _, err = train(root / "data", root / "run", root / "tiny.yaml", "--max-steps", "6")
    assert code == 0, err
    return root


@pytest.fixture
def data(base, tmp_path) -> Path:
    shutil.copytree(base / "data", tmp_path / "data")
    return tmp_path / "data"


@pytest.fixture
def run(base, tmp_path) -> Path:
    shutil.copytree(base / "run", tmp_path / "run")
    return tmp_path / "run"


def edit_json(path: Path, change) -> None:
    obj = json.loads(path.read_text(encoding="utf-8"))
    change(obj)
    path.write_text(json.dumps(obj), encoding="utf-8")


# ------------------------------------------------------------------ data directories
@pytest.mark.parametrize("change,field", [
    (lambda m: m.pop("splits"), "field splits must hold a 'train' split"),
    (lambda m: m.update(dtype="float64"), "field dtype must be 'uint16' or 'uint32'"),
    (lambda m: m["splits"]["train"].update(shards=None), "field splits.train.shards must be a list"),
    (lambda m: m.update(vocab_size=1000), "vocab_size 1000 and eos_id 25 are not the tokenizer's (35, 25)"),
    (lambda m: m.update(vocab_size=20), "field eos_id must be a token id below vocab_size"),
    (lambda m: m.update(vocab_size="34"), "field vocab_size must be a positive integer"),
    (lambda m: m["splits"]["train"]["shards"][0].update(file="../../../../etc/passwd"),
     "field splits.train.shards[0].file must be a file name inside the data directory"),
    (lambda m: m["splits"]["val"]["shards"][0].update(file="/etc/passwd"), "splits.val.shards[0].file"),
    (lambda m: m["splits"]["val"]["shards"][0].update(tokens=1), "field splits.val.tokens is not the sum"),
    (lambda m: m.update(tokenizer_dir=".."), "field tokenizer_dir must be a directory name inside"),
])
def test_meta_json_is_checked_as_a_schema(base, data, tmp_path, change, field):
    edit_json(data / "meta.json", change)
    for argv in (["train", "--data", data, "--out", tmp_path / "out", "--config", base / "tiny.yaml"],
                 ["eval", "ppl", "--model", base / "run", "--data", data]):
        fails(*argv, needles=(str(data / "meta.json"), field, "re-run gptlab prepare"))
    assert not (tmp_path / "out").exists()


def test_shards_are_verified_by_sha256_and_vocabulary_once_per_change(base, data, tmp_path):
    shard = data / "train-00000.bin"
    good = np.fromfile(shard, dtype=np.uint16)
    cache = data / ".verified.json"
    assert json.loads(cache.read_text())["train-00000.bin"][2] == json.loads(
        (data / "meta.json").read_text())["splits"]["train"]["shards"][0]["sha256"]  # the first train verified

    flipped = good.copy()
    flipped[100] = (good[100] + 1) % 25  # still a valid id: only the sha256 can tell
    flipped.tofile(shard)
    fails("train", "--data", data, "--out", tmp_path / "a", "--config", base / "tiny.yaml",
          needles=(str(shard), "sha256 does not match meta.json", "re-run gptlab prepare"))
    assert not (tmp_path / "a").exists()
    fails("eval", "ppl", "--model", base / "run", "--data", data, needles=(str(shard), "sha256"))
    # --no-verify is the escape for corpora too large to read twice: the user's choice, it trains
    assert train(data, tmp_path / "b", base / "tiny.yaml", "--max-steps", "1", "--no-verify")[0] == 0

    beyond = good.copy()
    beyond[1234] = 60000
    beyond.tofile(shard)
    fails("train", "--data", data, "--out", tmp_path / "c", "--config", base / "tiny.yaml",
          needles=(str(shard), "token id 60000 at offset 1234 is not below vocab_size 35"))

    # the cache: a shard checked at its size and mtime is not read again, any change is
    good.tofile(shard)
    assert train(data, tmp_path / "d", base / "tiny.yaml", "--max-steps", "1")[0] == 0
    stamp = shard.stat()
    flipped.tofile(shard)
    os.utime(shard, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # same size, same mtime: trusted (documented)
    assert train(data, tmp_path / "e", base / "tiny.yaml", "--max-steps", "1")[0] == 0
    os.utime(shard, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 1))
    fails("train", "--data", data, "--out", tmp_path / "f", "--config", base / "tiny.yaml", needles=("sha256",))


def test_ids_beyond_the_vocabulary_are_named_even_unverified_and_the_run_can_start_again(base, data, tmp_path):
    """With --no-verify every window read is still checked; the run that failed at its first step
    leaves no state that makes the same command refuse the directory."""
    shard = data / "train-00000.bin"
    ids = np.fromfile(shard, dtype=np.uint16)
    ids[5::10] = 999  # any training window holds one
    ids.tofile(shard)
    argv = ("train", "--data", data, "--out", tmp_path / "out", "--config", base / "tiny.yaml", *STEPS,
            "--max-steps", "2", "--no-verify")
    first = fails(*argv, needles=(str(shard), "token id 999 at offset", "not below vocab_size 35"))
    assert not (tmp_path / "out" / "model.safetensors").exists() and not (tmp_path / "out" / "checkpoints").exists()
    assert fails(*argv) == first  # the same error again, not "already holds a run"
    val = data / "val-00000.bin"
    ids = np.fromfile(val, dtype=np.uint16)
    ids[7] = 4000
    ids.tofile(val)
    fails("eval", "ppl", "--model", base / "run", "--data", data, "--no-verify",
          needles=(str(val), "token id 4000 at offset 7"))


def test_edited_tokenizer_files_are_caught_in_runs_and_data_directories(base, run, data, tmp_path):
    for directory in (run / "tokenizer", data / "tokenizer"):
        vocab = directory / "vocab.json"
        chars = json.loads(vocab.read_text(encoding="utf-8"))
        chars[3], chars[4] = chars[4], chars[3]  # a valid vocabulary of the same size: wrong text, silently
        vocab.write_text(json.dumps(chars), encoding="utf-8")
    fails("generate", "--model", run, "--prompt", "the", "--max-new-tokens", "3",
          needles=(str(run / "tokenizer" / "vocab.json"), "does not match the sha256 recorded in",
                   str(run / "config.json")))
    fails("train", "--data", data, "--out", tmp_path / "out", "--config", base / "tiny.yaml",
          needles=(str(data / "tokenizer" / "vocab.json"), str(data / "meta.json")))
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ configs
@pytest.mark.parametrize("text,needle", [
    (TINY.replace("}", ", dropout: .nan}"), "dropout=nan must be a finite number"),
    (TINY.replace("}", ", layer_norm_eps: .inf}"), "layer_norm_eps=inf must be a finite number"),
    (TINY.replace("}", ", layer_norm_eps: 2.0}"), "layer_norm_eps"),
    (TINY + "train: {lr: .nan}\n", "lr=nan must be a finite number"),
    (TINY + "train: {min_lr: -.inf}\n", "min_lr=-inf must be a finite number"),
    (TINY + 'train: {sample_prompt: "\\ud800"}\n', "train.sample_prompt is not valid Unicode"),
    (TINY.encode() + b"# caf\xe9\n", "not UTF-8 text (bad byte at offset"),
    ("model: " + "[" * 100_000 + "\n", "nested too deeply"),
    ("train: {lr: 1e-3}\n", "no model: section"),
    ("a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n" + TINY,  # billion laughs
     "cannot parse: line 2: an alias (*a)"),
    (TINY + "train: {lr: [" + ", ".join(map(str, range(100_000))) + "]}\n", "lr=[0, 1, 2"),
])
def test_bad_config_files_are_one_line_and_leave_nothing(base, tmp_path, text, needle):
    config = tmp_path / "bad.yaml"
    (config.write_bytes if isinstance(text, bytes) else config.write_text)(text)
    line = fails("train", "--data", base / "data", "--out", tmp_path / "out", "--config", config, needles=(needle,))
    assert line.count("bad.yaml") <= 1 and len(line) < 400, line
    assert not (tmp_path / "out").exists()


def test_flags_that_are_not_text_are_named_as_flags(base, tmp_path):
    fails("train", "--data", base / "data", "--out", tmp_path / "out", "--config", base / "tiny.yaml",
          "--sample-prompt", "\udcff",  # what Python makes of an undecodable byte in argv
          needles=("the given train settings: field sample_prompt", "not valid UTF-8"))
    assert not (tmp_path / "out").exists()
    fails("finetune", "--model", base / "run", needles=("required: --train, --val, --out", "--help"))
    config = tmp_path / "with-train.yaml"
    config.write_text(TINY + "train: {lr: 1.0e-3}\n")
    fails("train", "--data", base / "data", "--out", tmp_path / "out", "--config", config, "--max-steps", "0",
          needles=("the given train settings: max_steps=0 must be >= 1",))
    config.write_text(TINY + "train: {max_steps: 0}\n")
    fails("train", "--data", base / "data", "--out", tmp_path / "out", "--config", config, "--lr", "1e-3",
          needles=(f"{config}: train: max_steps=0 must be >= 1",))
    fails("eval", "ppl", "--model", base / "run", "--data", base / "data", "--max-batches", "-1",
          needles=("max_batches=-1 must be >= 1",))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value,needle", [
    ("NaN", "not valid JSON (NaN is not a number JSON allows)"),
    ("1e400", "1e400 is beyond the range of a float"),
    ("3.0", "layer_norm_eps"),
    ("-1e-5", "layer_norm_eps"),
])
def test_a_run_config_with_impossible_model_values_does_not_load(run, value, needle):
    config = run / "config.json"
    text = config.read_text(encoding="utf-8")
    assert '"layer_norm_eps": 1e-05' in text
    config.write_text(text.replace('"layer_norm_eps": 1e-05', f'"layer_norm_eps": {value}'), encoding="utf-8")
    fails("generate", "--model", run, "--prompt", "the", needles=(str(config), needle))


# ------------------------------------------------------------------ JSON lines
@pytest.mark.parametrize("line,needle", [
    ("[" * 100_000, ":1: JSON nested too deeply to read"),
    ('{"text": "the \\ud800 king", "label": "a"}', ":1: field text is not valid Unicode"),
    ('{"text": "the king", "label": 1e999}', ":1: not valid JSON (1e999 is beyond"),
])
def test_bad_json_lines_in_task_files(base, tmp_path, line, needle):
    rows = tmp_path / "task.jsonl"
    rows.write_text(line + "\n" + json.dumps({"text": "a fool", "label": "b"}) + "\n", encoding="utf-8")
    fails("tasks", "check", rows, needles=(str(rows) + needle,))
    fails("finetune", "--model", base / "run", "--train", rows, "--val", rows, "--out", tmp_path / "out",
          needles=(str(rows) + needle,))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command,rows", [
    ("sft", [{"prompt": "the king", "response": "a fool"}, {"prompt": "my lord", "response": "the Sea"}]),
    ("sft", [{"prompt": "the king", "response": "a fool"},
             {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "<|end|>"}]}]),
    ("rm", [{"prompt": "the king", "responses": ["a fool", "the sea"], "ranking": [0, 1]},
            {"prompt": "my lord", "responses": ["a Fool", "the sea"], "ranking": [1, 0]}]),
])
def test_alignment_data_tokenization_errors_name_file_and_line(strict_run, tmp_path, command, rows):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    fails(command, "--model", strict_run, "--data", path, "--out", tmp_path / "out", "--max-steps", "1",
          needles=(f"{path}:2: character",))


@pytest.fixture(scope="module")
def strict_run(base, tmp_path_factory) -> Path:
    """A run whose char vocabulary has no <|unk|> (prepare's char mode has one): a character it lacks is an
    error, not a token."""
    root = tmp_path_factory.mktemp("strict")
    CharTokenizer.from_text(corpus()).save(root / "tok")
    assert cli("prepare", "--input", base / "c.txt", "--tokenizer", root / "tok", "--out", root / "data")[0] == 0
    code, _, err = train(root / "data", root / "run", base / "tiny.yaml", "--max-steps", "1")
    assert code == 0, err
    return root / "run"


# ------------------------------------------------------------------ resume
class _Touch:
    """A pickle that would create a file when unpickled, if anything ever unpickled it unsafely."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def _reseal(ckpt: Path, name: str) -> None:
    """Update the manifest as if ``name`` had been written so: only its content is wrong."""
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"][name] = {"sha256": sha256_file(ckpt / name), "bytes": (ckpt / name).stat().st_size}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


RESUME = ("--resume", "--max-steps", "7")


def test_resume_errors_are_one_line(base, run, tmp_path):
    def resume(*needles: str) -> str:
        return fails("train", "--data", base / "data", "--out", run, "--config", base / "tiny.yaml", *STEPS,
                     *RESUME, needles=needles)

    metrics = run / "metrics.jsonl"
    good = metrics.read_bytes()
    lines = good.splitlines(keepends=True)
    metrics.write_bytes(lines[0] + lines[1][:5] + b"\xff\xfe" + lines[1][5:] + b"".join(lines[2:]))
    resume(f"{metrics}:2", "invalid start byte", "delete that line")
    metrics.write_bytes(good)

    ckpt = checkpoint_dirs(run)[-1]
    marker = tmp_path / "pwned"
    for name in ("optimizer.pt", "rng.pt"):
        saved = (ckpt / name).read_bytes()
        torch.save({"state": _Touch(marker)}, ckpt / name)
        _reseal(ckpt, name)
        resume(f"cannot read checkpoint {ckpt}", "delete it")
        assert not marker.exists()  # refused, never executed
        (ckpt / name).write_bytes(saved)
        _reseal(ckpt, name)

    edit_json(ckpt / "trainer_state.json", lambda s: s.update(step="6"))
    _reseal(ckpt, "trainer_state.json")
    resume(f"checkpoint {ckpt}", "trainer_state.json", "edited by hand")


def test_a_resume_reports_a_cut_metrics_log_and_goes_on(base, run):
    metrics = run / "metrics.jsonl"
    metrics.write_bytes(b"".join(metrics.read_bytes().splitlines(keepends=True)[:2]))
    code, out, err = train(base / "data", run, base / "tiny.yaml", *RESUME)
    assert code == 0, err
    assert f"warning: {metrics} lacks 4 of the 6 lines the checkpoint recorded" in out + err
    assert [json.loads(x)["step"] for x in metrics.read_text().splitlines()] == [1, 2, 7]


def test_an_extended_run_records_its_new_length(base, run):
    """--resume --max-steps 9 then --resume alone: the run is complete at 9, not at "step 9/6"."""
    assert train(base / "data", run, base / "tiny.yaml", "--resume", "--max-steps", "9")[0] == 0
    assert json.loads((run / "config.json").read_text())["train"]["max_steps"] == 9
    before = files(run)
    code, out, err = train(base / "data", run, base / "tiny.yaml", "--resume")
    assert code == 0, err
    assert "9/6" not in out + err and files(run) == before


# ------------------------------------------------------------------ killed writers
def _wait(cond, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    import time

    end = time.time() + timeout
    while not cond():
        assert proc.poll() is None, f"exited before {what}: {proc.communicate()[1][-2000:]}"
        assert time.time() < end, f"timed out waiting for {what}"
        time.sleep(0.005)


def test_a_killed_prepare_leaves_nothing_the_next_one_keeps(tmp_path):
    (tmp_path / "big.txt").write_text(corpus(150_000, seed=1), encoding="utf-8")
    cmd = [sys.executable, "-m", "gptlab.cli", "prepare", "--input", str(tmp_path / "big.txt"), "--tokenizer",
           "char", "--out", str(tmp_path / "data")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait(lambda: any(tmp_path.glob(".data.*.prepare.tmp/train-*.bin")), proc, "the first shard")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [p.name for p in tmp_path.glob(".data.*.tmp")] and not (tmp_path / "data").exists()
    assert cli("prepare", "--input", tmp_path / "big.txt", "--tokenizer", "char", "--out", tmp_path / "data",
               "--workers", "1")[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.txt", "data"]


def test_temporaries_of_dead_writers_are_removed_and_live_ones_kept(base, run):
    pid, live = dead_pid(), os.getpid()
    stale = [run / f".model.safetensors.{pid}.k2j_x1.tmp", run / f".config.json.{pid}.ab3.tmp",
             run / f".metrics.jsonl.{pid}.zz9.tmp", run / "checkpoints" / f".step-00000009.{pid}.ckpt.tmp"]
    for path in stale[:3]:
        path.write_text("partial")
    stale[3].mkdir()
    (stale[3] / "model.safetensors").write_text("partial")
    (run / f".model.safetensors.{pid}.q1.tmp.keep").write_text("not ours")  # not a temporary name
    live_tmp = run / f".config.json.{live}.cd4.tmp"
    live_tmp.write_text("a writer of this process")
    assert train(base / "data", run, base / "tiny.yaml", *RESUME)[0] == 0
    assert not any(p.exists() for p in stale)
    assert live_tmp.exists() and (run / f".model.safetensors.{pid}.q1.tmp.keep").exists()


_KILL_IN_SAVE = textwrap.dedent("""
    import os, signal, sys, torch
    from gptlab import GPT, GPTConfig
    from gptlab import runs
    from gptlab.tokenizer import load_tokenizer

    run, kill_at = sys.argv[1], int(sys.argv[2])
    events = 0

    def killing(fn):
        def wrapped(*args, **kwargs):
            global events
            events += 1
            if events == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)
        return wrapped

    for name in ("replace", "link", "unlink", "rename"):  # every step that changes what a reader sees
        setattr(os, name, killing(getattr(os, name)))
    runs.atomic_save_safetensors = killing(runs.atomic_save_safetensors)
    runs.atomic_write_json = killing(runs.atomic_write_json)
    torch.manual_seed(1)
    config = GPTConfig.from_dict(runs.read_run_config(run)["model"])
    runs.save_model(run, GPT(config), load_tokenizer(os.path.join(run, "tokenizer")))
    print("events", events)
""")


def test_the_final_save_is_one_atomic_switch_wherever_it_is_killed(base, run, tmp_path):
    """save_model over a saved run, SIGKILLed before each file-system step in turn: a reader always loads the
    old weights or the new ones, whole; the next save removes what the killed one left."""
    from gptlab import GPT, GPTConfig
    from gptlab.runs import load_run, read_run_config, save_model
    from gptlab.tokenizer import load_tokenizer

    old = load_file(str(run / "model.safetensors"))
    torch.manual_seed(1)
    new = {k: v for k, v in GPT(GPTConfig.from_dict(read_run_config(run)["model"])).state_dict().items()
           if k in old}
    assert any(not torch.equal(old[k], new[k]) for k in old)
    shutil.rmtree(run / "checkpoints")
    pristine = tmp_path / "pristine"
    shutil.copytree(run, pristine)
    seen, kill_at = set(), 1
    while True:
        shutil.rmtree(run)
        shutil.copytree(pristine, run)
        proc = subprocess.run([sys.executable, "-c", _KILL_IN_SAVE, str(run), str(kill_at)], cwd=ROOT,
                              capture_output=True, text=True)
        model, _, _ = load_run(run)  # never "sha256 does not match": old or new, whole
        state = model.state_dict()
        is_old, is_new = (all(torch.equal(state[k], v[k]) for k in old) for v in (old, new))
        assert is_old or is_new, kill_at
        seen.add("old" if is_old else "new")
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        save_model(run, model, load_tokenizer(run / "tokenizer"))  # the next writer cleans up
        assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in pristine.iterdir()), kill_at
        kill_at += 1
    assert seen == {"old", "new"} and kill_at > 10  # every step (11 today) was a kill point


# ------------------------------------------------------------------ fuzz
def _damage(path: Path, kind: str) -> None:
    """Cut the file at a random point or flip one random bit (seeded by the file's name: reproducible)."""
    rng = random.Random(f"{path.name}:{kind}")
    blob = bytearray(path.read_bytes())
    if kind == "cut":
        del blob[rng.randrange(len(blob)):]
    else:
        blob[rng.randrange(len(blob))] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(blob))


def _run_files() -> list[str]:
    names = ["config.json", "model.safetensors", "tokenizer/vocab.json", "tokenizer/tokenizer_config.json",
             "metrics.jsonl", "loss.png"]
    return names + [f"checkpoints/step-{s:08d}/{f}" for s in (3, 6) for f in
                    ("manifest.json", "model.safetensors", "optimizer.pt", "rng.pt", "trainer_state.json")]


# Files a checksum covers for the command that reads them: damage there must never pass.
_SEALED = {"model.safetensors", "tokenizer/vocab.json", "tokenizer/tokenizer_config.json",
           *(f"checkpoints/step-00000006/{f}" for f in ("model.safetensors", "optimizer.pt", "rng.pt",
                                                        "trainer_state.json")),
           "train-00000.bin", "val-00000.bin"}


def _check_outcome(directory: Path, before: set[Path], sealed: bool, argv: list) -> None:
    code, out, err = cli(*argv)
    left = [p for p in files(directory) if p.name.endswith(".tmp")]
    assert not left, left
    if code == 0:
        assert not sealed, f"damage to a checksummed file passed: {argv}"
        return
    assert code == 2, err
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip() and not PROGRESS.match(line)]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert files(directory) == before  # a refused command writes nothing


@pytest.mark.parametrize("kind", ["cut", "flip"])
@pytest.mark.parametrize("name", _run_files())
def test_fuzz_damaged_run_files(base, run, name, kind):
    _damage(run / name, kind)
    if name.startswith("checkpoints/") or name == "metrics.jsonl":
        argv = ["train", "--data", base / "data", "--out", run, "--config", base / "tiny.yaml", *STEPS, *RESUME]
    else:
        argv = ["generate", "--model", run, "--prompt", "the", "--max-new-tokens", "3", "--temperature", "0"]
    before = files(run)
    _check_outcome(run, before, name in _SEALED, argv)


@pytest.mark.parametrize("kind", ["cut", "flip"])
@pytest.mark.parametrize("name", ["meta.json", ".verified.json", "tokenizer/vocab.json",
                                  "tokenizer/tokenizer_config.json", "train-00000.bin", "val-00000.bin"])
def test_fuzz_damaged_data_files(base, data, name, kind):
    _damage(data / name, kind)
    argv = ["eval", "ppl", "--model", base / "run", "--data", data, "--max-batches", "1"]
    if name == ".verified.json":  # a damaged cache costs one more check of the shards, then it is whole again
        assert cli(*argv)[0] == 0 and json.loads((data / name).read_text())
        return
    _check_outcome(data, files(data), name in _SEALED, argv)


_INPUTS = {
    "config.yaml": (TINY + "train: {max_steps: 1, batch_size: 2, eval_every: 0, sample_tokens: 0, lr: 1.0e-3}\n",
                    ["train", "--data", "{base}/data", "--out", "{tmp}/out", "--config", "{file}"]),
    "task.jsonl": ("".join(json.dumps({"text": t, "label": x}) + "\n" for t, x in [("the king", "a"), ("a fool", "b")] * 6),
                   ["finetune", "--model", "{base}/run", "--train", "{file}", "--val", "{file}", "--out", "{tmp}/out",
                    "--max-steps", "1", "--batch-size", "2", "--eval-every", "0"]),
    "sft.jsonl": ("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in [("the king", "a fool"),
                                                                                      ("my lord", "the sea")] * 4),
                  ["sft", "--model", "{base}/run", "--data", "{file}", "--out", "{tmp}/out", "--max-steps", "1",
                   "--batch-size", "2", "--eval-every", "0", "--sample-tokens", "0", "--val-fraction", "0"]),
    "text.jsonl": ("".join(json.dumps({"text": t}) + "\n" for t in ["the king speaks", "a fool sleeps"] * 20),
                   ["prepare", "--input", "{file}", "--tokenizer", "char", "--out", "{tmp}/out"]),
}


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("name", list(_INPUTS))
def test_fuzz_malformed_configs_and_json_lines(base, tmp_path, name, seed):
    """Random cuts, bit flips, deep nesting and escaped surrogates in the files users write by hand."""
    content, argv = _INPUTS[name]
    path = tmp_path / "in" / name
    path.parent.mkdir()
    path.write_text(content, encoding="utf-8")
    rng = random.Random(f"{name}:{seed}")
    if seed < 2:
        for _ in range(seed + 1):
            _damage(path, rng.choice(["cut", "flip"]))
    elif seed == 2:
        path.write_text("[" * 100_000 + "\n" + content if name.endswith("jsonl") else "train: " + "[" * 100_000)
    else:
        path.write_text(content.replace("the", "\\ud800the", 1) if name.endswith("jsonl")
                        else content.replace("}\ntrain", ", activation: \"\\ud800\"}\ntrain"), encoding="utf-8")
    argv = [a.replace("{base}", str(base)).replace("{tmp}", str(tmp_path)).replace("{file}", str(path)) for a in argv]
    _check_outcome(tmp_path, files(tmp_path), False, argv)


@pytest.mark.parametrize("argv,needle", [
    (["tokenizer", "train", "--input", "{base}/c.txt", "--vocab-size", "300", "--out", "{tmp}/a-file"],
     "{tmp}/a-file: File exists"),
    (["visualize", "--model", "{base}/run", "--text", "the king", "--out", "{tmp}/a-dir"], "{tmp}/a-dir: Is a directory"),
    (["train", "--data", "{base}/data", "--out", "{tmp}/a-file", "--config", "{base}/tiny.yaml"], "{tmp}/a-file"),
    (["eval", "icl", "--model", "{base}/run", "--task", "{tmp}/mc.jsonl", "--shots", "0", "--out",
      "{tmp}/a-file/sub"], "{tmp}/a-file/sub: Not a directory"),
])
def test_outputs_the_system_refuses_are_one_line(base, tmp_path, argv, needle):
    (tmp_path / "a-file").write_text("keep me")
    (tmp_path / "a-dir").mkdir()
    (tmp_path / "mc.jsonl").write_text(json.dumps({"context": "the", "choices": ["king", "sea"], "label": 0}) + "\n")
    before = files(tmp_path)
    fill = lambda a: a.replace("{base}", str(base)).replace("{tmp}", str(tmp_path))  # noqa: E731
    fails(*map(fill, argv), needles=(fill(needle), "check the path"))
    assert files(tmp_path) == before and (tmp_path / "a-file").read_text() == "keep me"
