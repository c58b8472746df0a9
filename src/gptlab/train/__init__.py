"""The shared training machinery: one loop (``loop``) that every stage runs on, and its parts.

    config.py       TrainConfig, run-config files, ``resolve`` (defaults < file < saved run < flags)
    loop.py         Trainer.fit and the Stage contract
    optim.py        AdamW with decay on matrices only, or Muon for the blocks' matrices + AdamW; warmup + cosine
    dist.py         device, torchrun's process group, FSDP sharding
    checkpoints.py  atomic checkpoints, exact resume state
    metrics.py      metrics.jsonl, loss.png, peak FLOP/s for MFU
"""

from .config import TrainConfig
from .loop import Stage, Trainer, TrainResult

__all__ = ["TrainConfig", "Stage", "Trainer", "TrainResult"]
