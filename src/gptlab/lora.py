"""LoRA: low-rank adapters on a GPT's linear layers, trained while the model itself stays frozen.

    gpt = add_lora(gpt, LoRAConfig(lora_rank=8))   # adapters on c_attn, c_proj, c_fc; every other weight frozen
    with adapters_disabled(gpt): ...                # the model without them (PPO's reference, no second copy)
    merge_lora(gpt)                                 # W += (α/r)·B·A, adapters removed: a plain GPT again

An adapted layer ``y = W x + b`` computes ``y + (α/r)·B(A(dropout(x)))``. The adapter is a submodule of
the layer, added by a forward hook from outside the model file, so ``model.py`` knows nothing of LoRA and
every path that reads a plain GPT keeps working on a merged one. A is Kaiming-uniform and B zero (peft's
initialisation), so training starts exactly at the model it adapts.

On disk (``runs.save_model``) a run with adapters holds its frozen base in ``model.safetensors`` and,
beside it, ``adapter_config.json`` + ``adapter_model.safetensors`` as the ``peft`` library writes them:
tensors named after the transformers model ``gptlab convert --to-hf`` exports
(``base_model.model.transformer.h.N.attn.c_attn.lora_A.weight``), with ``fan_in_fan_out`` because
transformers' GPT-2 and OpenAI-GPT layers are Conv1D. The run directory itself is therefore a peft
adapter directory: ``PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(export), run_dir)``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

import torch
import torch.nn as nn

from .config import Config
from .errors import CheckpointError
from .model import GPT

__all__ = ["LoRAConfig", "LoRAAdapter", "add_lora", "adapters", "adapters_disabled", "merge_lora", "has_lora",
           "adapter_tensors", "load_adapter_tensors", "peft_config", "ADAPTER_FILE", "ADAPTER_CONFIG",
           "ADAPTABLE"]

ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTABLE = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # a block's linear layers
_PEFT_PREFIX = "base_model.model.transformer."


def _matches(name: str, target: str) -> bool:
    """peft's rule: a target names a module by its full name or by a suffix of whole dotted parts."""
    return name == target or name.endswith("." + target)


@dataclass
class LoRAConfig(Config):
    """Low-rank adaptation (LoRA, Hu et al. 2021): what is adapted and how strongly."""

    section: ClassVar[str] = "lora"

    lora_rank: int = 0
    """rank r of the adapters (0: no adapters, every weight trains)"""
    lora_alpha: float | None = None
    """α: the adapters' update is scaled by α / r (default: 2·r)"""
    lora_dropout: float = 0.0
    """dropout on the adapters' input"""
    lora_targets: str = "c_attn,c_proj,c_fc"
    """comma-separated layers to adapt in every block, by (a suffix of) their names: attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj"""

    def validate(self) -> None:
        self.need(self.lora_rank >= 0, f"lora_rank={self.lora_rank} must be >= 0")
        self.need(self.lora_alpha is None or self.lora_alpha > 0, f"lora_alpha={self.lora_alpha} must be > 0")
        self.need(0 <= self.lora_dropout < 1, f"lora_dropout={self.lora_dropout} must be in [0, 1)")
        for target in self.targets:
            self.need(any(_matches(name, target) for name in ADAPTABLE),
                      f"lora_targets: {target!r} names none of {', '.join(ADAPTABLE)} (or their last part)")

    @property
    def targets(self) -> list[str]:
        return [t.strip() for t in self.lora_targets.split(",") if t.strip()]

    @property
    def alpha(self) -> float:
        return self.lora_alpha if self.lora_alpha is not None else 2.0 * self.lora_rank

    @property
    def enabled(self) -> bool:
        return self.lora_rank > 0

    def record(self) -> dict[str, Any]:
        """The run config's ``lora`` section: present only when there are adapters."""
        return {self.section: self.to_dict()} if self.enabled else {}


class LoRAAdapter(nn.Module):
    """The low-rank update of one linear layer: (α/r)·B(A(dropout(x))); ``enabled`` off gives zero."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.lora_A = nn.Linear(in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout)
        self.scaling = alpha / rank
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    def delta(self) -> torch.Tensor:
        """The update of the layer's weight (out, in)."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling


def _apply(layer: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
    adapter = layer.get_submodule("lora")
    assert isinstance(adapter, LoRAAdapter)
    return out + adapter(args[0]) if adapter.enabled else out


def add_lora(gpt: GPT, cfg: LoRAConfig) -> GPT:
    """``gpt`` with adapters on ``cfg``'s targets in every block and all its own weights frozen (``gpt`` itself,
    untouched when ``cfg.lora_rank`` is 0). Heads that wrap it afterwards still train."""
    if not cfg.enabled:
        return gpt
    gpt.requires_grad_(False)
    device, dtype = gpt.wte.weight.device, gpt.wte.weight.dtype
    for name, module in gpt.named_modules():
        if isinstance(module, nn.Linear) and name.startswith("h.") and any(_matches(name, t) for t in cfg.targets):
            module.lora = LoRAAdapter(module.in_features, module.out_features, cfg.lora_rank, cfg.alpha,
                                      cfg.lora_dropout).to(device=device, dtype=dtype)
            module.register_forward_hook(_apply)
    return gpt


def adapters(gpt: nn.Module) -> dict[str, LoRAAdapter]:
    """The adapters of ``gpt`` by the name of the layer they adapt (``h.0.attn.c_attn``)."""
    return {name.removesuffix(".lora"): m for name, m in gpt.named_modules() if isinstance(m, LoRAAdapter)}


def has_lora(gpt: nn.Module) -> bool:
    return bool(adapters(gpt))


@contextlib.contextmanager
def adapters_disabled(gpt: nn.Module) -> Iterator[None]:
    """Inside, ``gpt`` computes its base model's outputs (the adapters add nothing)."""
    found = adapters(gpt).values()
    for adapter in found:
        adapter.enabled = False
    try:
        yield
    finally:
        for adapter in found:
            adapter.enabled = True


@torch.no_grad()
def merge_lora(gpt: GPT) -> GPT:
    """Fold every adapter into its layer's weight and remove it (with its hook): a plain GPT computing the same."""
    for name, adapter in adapters(gpt).items():
        layer = gpt.get_submodule(name)
        assert isinstance(layer, nn.Linear)
        layer.weight += adapter.delta().to(layer.weight.dtype)
        del layer.lora
        for key in [k for k, hook in layer._forward_hooks.items() if hook is _apply]:
            del layer._forward_hooks[key]
    return gpt


def adapter_tensors(gpt: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' weights under peft's names for the exported transformers model."""
    out = {}
    for name, adapter in adapters(gpt).items():
        out[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = adapter.lora_A.weight.detach()
        out[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = adapter.lora_B.weight.detach()
    return out


def load_adapter_tensors(gpt: GPT, cfg: LoRAConfig, tensors: dict[str, torch.Tensor], source: str) -> GPT:
    """``gpt`` with ``cfg``'s adapters holding ``tensors`` (``adapter_tensors``' names), checked key by key."""
    add_lora(gpt, cfg)
    expected = {k: v.shape for k, v in adapter_tensors(gpt).items()}
    if set(expected) != set(tensors):
        missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise CheckpointError(f"{source}: adapter tensors do not match the run's lora settings (missing "
                              f"{missing[:2]}, unexpected {unexpected[:2]}); copy the whole run directory")
    for name, adapter in adapters(gpt).items():
        for part in ("lora_A", "lora_B"):
            value = tensors[f"{_PEFT_PREFIX}{name}.{part}.weight"]
            weight = getattr(adapter, part).weight
            if value.shape != weight.shape:
                raise CheckpointError(f"{source}: {name}.{part} is {tuple(value.shape)}, the run's lora settings "
                                      f"make it {tuple(weight.shape)}; copy the whole run directory")
            weight.data.copy_(value)
    return gpt


def peft_config(cfg: LoRAConfig, gpt: GPT) -> dict[str, Any]:
    """adapter_config.json as peft reads it: LoRA on the exported model's Conv1D layers."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.lora_rank, "lora_alpha": cfg.alpha,
            "lora_dropout": cfg.lora_dropout, "target_modules": sorted(adapters(gpt)), "fan_in_fan_out": True,
            "bias": "none", "modules_to_save": None, "init_lora_weights": True, "use_rslora": False,
            "use_dora": False, "inference_mode": True, "base_model_name_or_path": None, "revision": None}
