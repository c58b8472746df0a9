"""What a run reports: ``metrics.jsonl`` line by line, ``loss.png``, and MFU against each GPU's peak FLOP/s."""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..atomic import atomic_write_bytes
from ..jsonsafe import parse_json
from ..errors import CheckpointError

__all__ = ["METRICS_FILE", "PLOT_FILE", "MetricsLog", "read_metrics", "plot_losses", "PEAK_FLOPS", "peak_flops"]

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


class MetricsLog:
    """``metrics.jsonl``: one JSON object per logged step, appended and flushed line by line."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.enabled = enabled
        self.records: list[dict[str, Any]] = read_metrics(path) if enabled and path.exists() else []

    @property
    def lines(self) -> int:
        return len(self.records)

    def truncate(self, n: int) -> int:
        """Keep the first ``n`` complete lines (drops lines a killed run wrote after its checkpoint);
        returns how many of those ``n`` are missing (the log was cut or deleted by hand)."""
        if not self.enabled:
            return 0
        kept = self.records[:n]
        atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode("utf-8"))
        self.records = kept
        return n - len(kept)

    def append(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
        self.records.append(record)


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The complete lines of a metrics.jsonl; a partial last line (a killed run's) is ignored, a bad complete
    line (the file was edited or damaged) is a ``CheckpointError`` naming it."""
    out = []
    with open(path, "rb") as fh:
        for n, line in enumerate(fh, 1):
            if not line.endswith(b"\n"):
                break
            try:
                record = parse_json(line)
            except ValueError as e:
                raise CheckpointError(f"{path}:{n}: {e}; the metrics log was damaged or edited: delete that line "
                                      f"and the ones after it to resume, or start a new run") from None
            if not isinstance(record, dict):
                raise CheckpointError(f"{path}:{n}: not a JSON object; delete that line and the ones after it")
            out.append(record)
    return out


def plot_losses(records: list[dict[str, Any]], path: str | os.PathLike[str], title: str = "",
                extra_keys: Sequence[str] = ()) -> None:
    """Write the train/val loss curve, and one panel per ``extra_keys`` metric, as a PNG (atomically).

    Agg backend, no pyplot global state. An extra key's ``val_`` twin, when
    logged, is drawn in the same panel; a key ending in ``*`` draws every metric
    it prefixes in one panel (``moe_load_*``: each expert's share of the tokens).
    """
    panels = 1 + len(extra_keys)
    fig = Figure(figsize=(7, 4.2 + 2.6 * (panels - 1)), dpi=110)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(panels, 1, i + 1) for i in range(panels)]

    def series(key: str) -> list[tuple[int, float]]:
        return [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]

    for ax, key in zip(axes, ["loss", *extra_keys]):
        if key.endswith("*"):
            prefix = key[:-1]
            names = sorted({k for r in records for k in r if k.startswith(prefix)},
                           key=lambda k: (len(k), k))  # moe_load_2 before moe_load_10
            for name in names:
                ax.plot(*zip(*series(name)), label=name[len(prefix):], linewidth=1.0)
            ax.set_ylabel(prefix.rstrip("_"))
            ax.grid(alpha=0.3)
            if names:
                ax.legend(ncol=min(len(names), 8), fontsize="small")
            continue
        train, val = series(key), series(f"val_{key}")
        if train:
            ax.plot(*zip(*train), label="train", linewidth=1.0, alpha=0.8)
        if val:
            ax.plot(*zip(*val), "o-", label="val", markersize=3)
        ax.set_ylabel(key if key != "loss" or extra_keys else "loss (nats/token)")
        ax.grid(alpha=0.3)
        if train or val:
            ax.legend()
    axes[-1].set_xlabel("step")
    if title:
        axes[0].set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(Path(path), buf.getvalue())


# Dense (no 2:4 sparsity) peak tensor-core throughput per GPU in FLOP/s, from
# NVIDIA's datasheets. "bf16" is the autocast rate (FP32 accumulate), "tf32"
# applies to fp32 training with TF32 matmuls enabled, "fp32" to true fp32.
# Matched in order against torch.cuda.get_device_name() (lower-cased); an
# unknown device has no MFU rather than a guessed one.
PEAK_FLOPS: list[tuple[str, str, dict[str, float]]] = [
    (r"h100.*pcie", "H100 PCIe", {"bf16": 756e12, "tf32": 378e12, "fp32": 51e12}),
    (r"h100.*nvl", "H100 NVL", {"bf16": 835e12, "tf32": 418e12, "fp32": 60e12}),
    (r"h100|gh200", "H100 SXM / GH200", {"bf16": 989e12, "tf32": 495e12, "fp32": 67e12}),
    (r"h200.*nvl", "H200 NVL", {"bf16": 835e12, "tf32": 418e12, "fp32": 60e12}),
    (r"h200", "H200 SXM", {"bf16": 989e12, "tf32": 495e12, "fp32": 67e12}),
    (r"a100", "A100", {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    (r"l40s", "L40S", {"bf16": 362e12, "tf32": 183e12, "fp32": 91.6e12}),
    (r"\bl4\b", "L4", {"bf16": 121e12, "tf32": 60e12, "fp32": 30.3e12}),
    (r"\ba10\b", "A10", {"bf16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12}),
    (r"rtx 4090", "RTX 4090", {"bf16": 165e12, "tf32": 82.6e12, "fp32": 82.6e12}),
    (r"rtx 3090", "RTX 3090", {"bf16": 71e12, "tf32": 35.6e12, "fp32": 35.6e12}),
    (r"v100", "V100", {"fp32": 15.7e12}),
]


def peak_flops(device_name: str, precision: str) -> float | None:
    """Peak FLOP/s of one GPU called ``device_name`` at ``precision`` (bf16/tf32/fp32), or None."""
    name = device_name.lower()
    for pattern, _, table in PEAK_FLOPS:
        if re.search(pattern, name):
            return table.get(precision)
    return None
