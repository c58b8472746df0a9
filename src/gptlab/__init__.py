"""gptlab: the GPT lineage (GPT-1 → GPT-2 → GPT-3 → InstructGPT → ChatGPT) as one hackable tool.

Names are imported on first use, so processes that only tokenize (the workers of
``gptlab prepare``) never pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "GPT": "model", "KVCache": "model", "GPTConfig": "config", "PRESETS": "config", "UserError": "errors",
    "Engine": "engine", "SamplingParams": "engine", "load_tokenizer": "tokenizer", "train_bpe": "tokenizer",
    "TokenData": "data", "prepare": "data", "TrainConfig": "train.config", "Trainer": "train.loop",
    "load_model": "runs", "load_run": "runs", "save_model": "runs",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gptlab' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
