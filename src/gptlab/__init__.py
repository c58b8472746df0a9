"""gptlab: the GPT lineage (GPT-1 → GPT-2 → GPT-3 → InstructGPT → ChatGPT) as one hackable tool."""

from .config import PRESETS, GPTConfig
from .errors import UserError
from .model import GPT, KVCache

__all__ = ["GPT", "GPTConfig", "KVCache", "PRESETS", "UserError"]
__version__ = "0.1.0"
