"""`gptlab serve` under load: completion tokens/s one request at a time vs concurrent streaming clients,
time to first token, and a soak with many clients (failures, server memory).

    python benchmarks/bench_serve.py [--model RUN_DIR] [--requests 32 --concurrency 16 --max-tokens 64
                                     --rounds 3 --soak 60 --soak-clients 64] [--quick] [--out FILE]

The server is a real ``gptlab serve`` subprocess on 127.0.0.1 (``--port 0``: the ready line names the
port), driven over HTTP by httpx from this process, so client and server share the machine's cores.
Without ``--model`` it serves a random-initialised GPT (6 layers x 384 wide, context 256, a 4096-token
byte-level BPE) written to a temporary run directory: serving speed does not depend on what the weights
learned, only on when EOS comes, which is why generated tokens are counted from ``usage``.

Load: the same R ``/v1/completions`` requests (fixed prompts, ``max_tokens``, T = 0.8, seed = request
index, no stop strings), streamed with ``stream_options.include_usage``, sent first one at a time and
then by C concurrent clients; after 4 untimed warm-up requests, 3 rounds alternate the two phases and
tokens/s is the median over rounds. TTFT runs from sending a request to its first chunk with text;
TTFT and latency percentiles pool every request of every round.

Soak: S clients loop streamed requests for the duration (the server gets ``--max-queue`` above S, so
none is refused). A failure is a non-200, an error event in the stream, a missing usage chunk or
``[DONE]``, or an exception. The server's VmRSS is sampled every second. Afterwards ``/health``, one more
completion and ``/metrics`` (queue depth back to 0) must answer.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import math
import os
import platform
import random
import re
import resource
import statistics
import select
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
PROMPTS = ["The king said", "Once upon a time there was", "In the morning the", "She opened the door and",
           "The ship sailed from", "My dear friend,", "When the war was over,", "The old man looked at"]
WARMUP = 4
PR_SET_PDEATHSIG = 1
DEFAULT_MODEL = dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab=4096)


def random_run(out: Path, seed: int = 0) -> Path:
    """A run directory holding a random-initialised ``DEFAULT_MODEL`` and a BPE trained on pseudo-words."""
    import torch

    from gptlab import GPT, GPTConfig
    from gptlab.runs import save_model
    from gptlab.tokenizer import train_bpe

    rng = random.Random(seed)
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 8))) for _ in range(5000)]
    texts = [" ".join(rng.choices(words, k=12)) for _ in range(20000)] + PROMPTS * 100
    tok = train_bpe(iter(texts), DEFAULT_MODEL["vocab"])
    torch.manual_seed(seed)
    size = {k: v for k, v in DEFAULT_MODEL.items() if k != "vocab"}
    return save_model(out, GPT(GPTConfig(**size, vocab_size=tok.vocab_size, dropout=0.0)), tok)


def describe(run_dir: Path) -> dict[str, Any]:
    """The served model's size, from its config.json (weights: 12·d² per layer + embeddings, tied head)."""
    from gptlab.runs import read_run_config

    m = read_run_config(run_dir)["model"]
    size = {k: m[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")}
    d = m["n_embd"]
    size["params_M"] = round((m["n_layer"] * 12 * d * d + (m["vocab_size"] + m["block_size"]) * d) / 1e6, 1)
    return size


class Server:
    """``gptlab serve`` in a subprocess; a context manager, so the process never outlives the benchmark."""

    def __init__(self, run_dir: Path, *args: str, start_timeout: float = 120, memory_limit: int | None = None):
        """``memory_limit``: the server's address-space limit in bytes (RLIMIT_AS), so that a request asking
        for too much memory fails at once instead of pushing the machine into swap or the OOM killer."""
        self.argv = [sys.executable, "-c", "import sys; from gptlab.cli import main; sys.exit(main())",
                     "serve", "--model", str(run_dir), "--host", "127.0.0.1", "--port", "0", *args]
        self.start_timeout, self.memory_limit = start_timeout, memory_limit

    def _child(self) -> None:
        """In the server process before exec: die with the benchmark even if it is killed (Linux prctl)."""
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if self.memory_limit is not None:
            resource.setrlimit(resource.RLIMIT_AS, (self.memory_limit, self.memory_limit))

    def __enter__(self) -> Server:
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     preexec_fn=self._child)
        try:
            ready, _, _ = select.select([self.proc.stdout], [], [], self.start_timeout)
            line = self.proc.stdout.readline() if ready else ""
            found = re.search(r" at (http://\S+)/v1", line)
            if not found:
                raise RuntimeError(f"gptlab serve did not start: {line!r}\n{self.stderr()}")
        except BaseException:
            self.__exit__()
            raise
        self.url, self.pid = found.group(1), self.proc.pid
        return self

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read()[-4000:]

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        self.log.close()


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` from /proc (Linux), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


@dataclass
class Outcome:
    ok: bool
    tokens: int = 0
    ttft: float | None = None
    latency: float = 0.0
    error: str = ""


def body(i: int, max_tokens: int) -> dict[str, Any]:
    """Request ``i``: the same prompt and seed every run, so every phase does the same work."""
    return {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0.8, "seed": i}


async def stream_one(client: httpx.AsyncClient, request: dict[str, Any]) -> Outcome:
    """One streamed completion; parses the SSE itself so every way a stream can go wrong is seen."""
    t0 = time.perf_counter()
    ttft, tokens, done = None, None, False
    payload = {**request, "stream": True, "stream_options": {"include_usage": True}}
    try:
        async with client.stream("POST", "/v1/completions", json=payload) as r:
            if r.status_code != 200:
                await r.aread()
                return Outcome(False, latency=time.perf_counter() - t0, error=f"HTTP {r.status_code}: {r.text[:200]}")
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    return Outcome(False, latency=time.perf_counter() - t0,
                                   error=f"error event: {event['error'].get('message')}")
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                if ttft is None and any(c.get("text") for c in event.get("choices", [])):
                    ttft = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - counted as a failure
        return Outcome(False, latency=time.perf_counter() - t0, error=f"{type(e).__name__}: {e}")
    latency = time.perf_counter() - t0
    if not done or tokens is None:
        return Outcome(False, latency=latency, error="stream ended without " + ("[DONE]" if not done else "usage"))
    return Outcome(True, tokens, ttft, latency)


def pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (p99 of 32 samples is the largest: no interpolation past the data)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def client(url: str, connections: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(900, connect=30),
                             limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections))


async def send_all(c: httpx.AsyncClient, requests: list[dict[str, Any]],
                   concurrency: int) -> tuple[list[Outcome], float]:
    """Send ``requests`` through ``concurrency`` clients that each take the next one when free."""
    pending = list(reversed(requests))
    outcomes: list[Outcome] = []

    async def worker() -> None:
        while pending:
            outcomes.append(await stream_one(c, pending.pop()))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcomes, time.perf_counter() - t0


def summary(clients: int, runs: list[tuple[list[Outcome], float]]) -> dict[str, Any]:
    """Median tokens/s over the rounds; TTFT and latency percentiles over every request of every round."""
    outcomes = [o for run, _ in runs for o in run]
    good = [o for o in outcomes if o.ok]
    rates = [sum(o.tokens for o in run if o.ok) / wall for run, wall in runs]
    ttfts = [o.ttft for o in good if o.ttft is not None]
    lat = [o.latency for o in good]
    return {"clients": clients, "requests": len(outcomes), "failed": len(outcomes) - len(good),
            "completion_tokens": sum(o.tokens for o in good), "wall_s": sum(wall for _, wall in runs),
            "tokens_per_s": statistics.median(rates), "tokens_per_s_rounds": rates,
            "ttft_p50_s": pct(ttfts, 50), "ttft_p99_s": pct(ttfts, 99),
            "latency_p50_s": pct(lat, 50), "latency_p99_s": pct(lat, 99),
            "errors": sorted({o.error for o in outcomes if not o.ok})[:5]}


async def load(url: str, requests: list[dict[str, Any]], concurrency: int, rounds: int) -> dict[str, Any]:
    """Rounds alternate one client and ``concurrency`` clients, so drift in machine load hits both alike."""
    phases = {"sequential": 1, "concurrent": concurrency}
    runs: dict[str, list[tuple[list[Outcome], float]]] = {name: [] for name in phases}
    async with client(url, concurrency) as c:
        for r in requests[:WARMUP]:  # torch's first calls (new shapes) are slow: not timed
            await stream_one(c, r)
        for _ in range(rounds):
            for name, k in phases.items():
                runs[name].append(await send_all(c, requests, k))
    return {name: summary(k, runs[name]) for name, k in phases.items()}


async def soak(url: str, pid: int, seconds: float, clients: int, max_tokens: int) -> dict[str, Any]:
    """``clients`` streaming loops until ``seconds`` have passed (requests already sent are finished)."""
    outcomes: list[Outcome] = []
    rss: list[float] = []
    deadline = time.perf_counter() + seconds
    stop = asyncio.Event()

    async def sample() -> None:
        while not stop.is_set():
            rss.append(rss_mb(pid))
            try:
                await asyncio.wait_for(stop.wait(), 1)
            except asyncio.TimeoutError:
                pass

    async def loop(c: httpx.AsyncClient, k: int) -> None:
        i = k
        while time.perf_counter() < deadline:
            outcomes.append(await stream_one(c, body(i, max_tokens)))
            i += clients

    async with client(url, clients + 2) as c:
        sampler = asyncio.create_task(sample())
        t0 = time.perf_counter()
        await asyncio.gather(*(loop(c, k) for k in range(clients)))
        wall = time.perf_counter() - t0
        stop.set()
        await sampler
        health = await c.get("/health")
        final = await c.post("/v1/completions", json=body(0, max_tokens))
        final_ok = final.status_code == 200 and final.json().get("usage", {}).get("completion_tokens", 0) > 0
        metrics = (await c.get("/metrics")).text
    depth = re.search(r"^gptlab_queue_depth (\S+)$", metrics, re.M)
    good = [o for o in outcomes if o.ok]
    lat = [o.latency for o in good]
    return {"clients": clients, "seconds": seconds, "wall_s": wall, "completed": len(good),
            "failed": len(outcomes) - len(good), "completion_tokens": sum(o.tokens for o in good),
            "latency_p50_s": pct(lat, 50), "latency_p99_s": pct(lat, 99),
            "rss_mb": {"start": rss[0], "max": max(rss), "end": rss_mb(pid)}, "rss_samples": len(rss),
            "health_status": health.status_code, "final_completion_ok": final_ok,
            "queue_depth_after": float(depth.group(1)) if depth else None,
            "errors": sorted({o.error for o in outcomes if not o.ok})[:5]}


def fmt(x: float | None, unit: str = "s") -> str:
    return "–" if x is None else f"{x:.2f} {unit}"


def report(res: dict[str, Any]) -> None:
    m, a = res["model"], res["args"]
    print(f"\nmodel: {m['path']} ({m['n_layer']} layers x {m['n_embd']}, {m['n_head']} heads, context "
          f"{m['block_size']}, vocab {m['vocab_size']}, ~{m['params_M']}M params)")
    print(f"load: {a['requests']} streamed /v1/completions, max_tokens {a['max_tokens']}, T=0.8, seeds 0.., "
          f"{a['rounds']} round(s); tokens/s: median over rounds\n")
    print("| clients | requests | failed | completion tokens | wall (all rounds) | tokens/s | TTFT p50 | TTFT p99 | "
          "latency p50 | latency p99 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for p in (res["sequential"], res["concurrent"]):
        print(f"| {p['clients']} | {p['requests']} | {p['failed']} | {p['completion_tokens']} | {fmt(p['wall_s'])} | "
              f"{p['tokens_per_s']:.1f} | {fmt(p['ttft_p50_s'])} | {fmt(p['ttft_p99_s'])} | "
              f"{fmt(p['latency_p50_s'])} | {fmt(p['latency_p99_s'])} |")
    print(f"\n{res['concurrent']['clients']} clients / 1 client, tokens/s: **{res['ratio']:.2f}x** "
          "(target >= 4x with dynamic batching)")
    s = res.get("soak")
    if s:
        r = s["rss_mb"]
        print(f"\nsoak: {s['clients']} clients x {s['seconds']:.0f} s (wall {s['wall_s']:.0f} s): "
              f"{s['completed']} requests completed, {s['failed']} failed, {s['completion_tokens']} tokens; "
              f"latency p50 {fmt(s['latency_p50_s'])}, p99 {fmt(s['latency_p99_s'])}\n"
              f"server RSS: start {r['start']:.0f} MB, max {r['max']:.0f} MB, end {r['end']:.0f} MB; "
              f"after: /health {s['health_status']}, completion {'ok' if s['final_completion_ok'] else 'FAILED'}, "
              f"queue depth {s['queue_depth_after']}")
    for e in res["concurrent"]["errors"] + res["sequential"]["errors"] + (s["errors"] if s else []):
        print(f"  error: {e}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="run directory to serve (default: a random-initialised model)")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of both load phases (median tokens/s)")
    ap.add_argument("--soak", type=float, default=60, help="soak seconds (0: no soak)")
    ap.add_argument("--soak-clients", type=int, default=64)
    ap.add_argument("--quick", action="store_true",
                    help="8 requests, 4 clients, 16 tokens, 1 round, 10 s soak of 16 clients")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "bench_serve.json")
    args = ap.parse_args()
    if args.quick:
        args.requests, args.concurrency, args.max_tokens, args.rounds = 8, 4, 16, 1
        args.soak, args.soak_clients = 10, 16
    if args.concurrency < 2 or args.requests < 1 or args.rounds < 1:
        ap.error("--concurrency must be >= 2, --requests and --rounds >= 1")
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.model or random_run(Path(tmp) / "random-gpt")
        res: dict[str, Any] = {
            "model": {**describe(run_dir), "path": str(args.model or "random-init")},
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                        "python": platform.python_version()}}
        print(f"serving {res['model']}", flush=True)
        requests = [body(i, args.max_tokens) for i in range(args.requests)]
        with Server(run_dir, "--max-queue", str(max(128, 2 * args.soak_clients))) as server:
            res.update(asyncio.run(load(server.url, requests, args.concurrency, args.rounds)))
            base = res["sequential"]["tokens_per_s"]
            res["ratio"] = res["concurrent"]["tokens_per_s"] / base if base else 0.0
            if args.soak > 0:
                res["soak"] = asyncio.run(soak(server.url, server.pid, args.soak, args.soak_clients, args.max_tokens))
    report(res)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    s = res.get("soak")
    failed = res["sequential"]["failed"] + res["concurrent"]["failed"]
    if s:
        failed += s["failed"] + (s["health_status"] != 200) + (not s["final_completion_ok"])
        failed += s["queue_depth_after"] != 0
    return 1 if failed else 0

if __name__ == "__main__":
    sys.exit(main())
