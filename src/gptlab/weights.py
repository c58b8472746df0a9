"""Model weights as safetensors: written atomically with their sha256, read back into a GPT with shape checks.

Nothing is ever unpickled here: weights are safetensors, and a tied ``lm_head``
is stored once (as ``wte``) and re-tied on load.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from safetensors.torch import save_file

from .atomic import PathLike, atomic_write, sha256_file
from .config import GPTConfig
from .errors import CheckpointError
from .model import GPT

__all__ = ["atomic_save_safetensors", "unwrap", "model_tensors", "build_model", "FIX_WEIGHTS"]

FIX_WEIGHTS = "re-run the conversion/training, or resume from an earlier checkpoint"


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: PathLike,
                            metadata: dict[str, str] | None = None) -> str:
    """Atomically write ``tensors`` as a safetensors file; returns the file's sha256 (hex).

    Tensors are detached, moved to CPU and made contiguous. They must not share
    memory (safetensors refuses aliases): drop tied copies first, as
    ``model_tensors`` does. ``metadata`` (str -> str) defaults to
    ``{"format": "pt"}``, which transformers expects.
    """
    meta = {"format": "pt", **(metadata or {})}
    bad = [k for k, v in meta.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise TypeError(f"safetensors metadata must map str to str; bad key(s): {bad}")
    flat = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    digest: list[str] = []

    def write(tmp: str) -> None:
        save_file(flat, tmp, metadata=meta)
        digest.append(sha256_file(tmp))

    atomic_write(path, write)
    return digest[0]


def unwrap(model: nn.Module) -> GPT:
    """The GPT inside a torch.compile / DDP wrapper, so saved keys never carry their prefixes."""
    seen = 0
    while not isinstance(model, GPT) and seen < 4:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            break
        model, seen = inner, seen + 1
    if not isinstance(model, GPT):
        raise TypeError(f"expected a gptlab GPT model, got {type(model).__name__}")
    return model


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict ready for safetensors: detached, a tied ``lm_head.weight`` dropped, and LoRA
    adapters (``*.lora.*``, saved apart by ``runs.save_model``) left out."""
    gpt = unwrap(model)
    state = {k: v.detach() for k, v in gpt.state_dict().items() if ".lora." not in k}
    if gpt.config.tie_embeddings or gpt.lm_head.weight is gpt.wte.weight:
        state.pop("lm_head.weight", None)
    return state


def build_model(config: GPTConfig, tensors: dict[str, torch.Tensor], source: str,
                device: str | torch.device = "cpu") -> GPT:
    """A GPT with exactly ``tensors`` as its weights (no random init: built on the meta device)."""
    with torch.device("meta"):
        model = GPT(config)
    expected = dict(model.state_dict())
    if config.tie_embeddings:
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))

    def listing(keys: list[str]) -> str:
        return ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")

    if missing:
        raise CheckpointError(f"{source}: missing tensor(s) {listing(missing)} for this config; "
                              f"the weights do not belong to it: {FIX_WEIGHTS}")
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor(s) {listing(unexpected)} for this config; "
                              f"the weights do not belong to it: {FIX_WEIGHTS}")
    wrong = [f"{k} {tuple(tensors[k].shape)} (config wants {tuple(v.shape)})"
             for k, v in expected.items() if tuple(tensors[k].shape) != tuple(v.shape)]
    if wrong:
        raise CheckpointError(f"{source}: wrong shape for {listing(wrong)}; the weights do not match "
                              f"the model config: {FIX_WEIGHTS}")
    state = dict(tensors)
    if config.tie_embeddings:
        state["lm_head.weight"] = state["wte.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.wte.weight  # assign=True replaced the shared Parameter; re-tie
    return model.to(device).eval()
