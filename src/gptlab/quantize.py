"""Reduced-precision weight paths for CPU decoding.

Decoding one token reads every weight once, so on a CPU its speed is bound by
memory bandwidth, not arithmetic. Storing the matmul weights in 8 bits cuts the
bytes read by 4x. ``quantize_int8`` swaps each ``nn.Linear`` (the LM head too)
for FBGEMM's dynamically quantised linear: int8 weights with one scale per
output channel, activations quantised per call. Embeddings, norms and MoE routers
stay in float32 (a router's choice between near-equal experts would flip on the
rounding, and it is a tiny matrix). The swap works on a copy; the original model
is untouched.

    fast = quantize_int8(model)     # inference only
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn as nn

from .errors import UserError
from .model import GPT, MoE

PRECISIONS = ("fp32", "int8")


class Int8DynamicLinear(nn.Module):
    """y = x W^T + b with W stored as per-channel int8 and packed for FBGEMM (x86 CPUs)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12).double()
        zero_points = torch.zeros(w.shape[0], dtype=torch.long)
        with warnings.catch_warnings():  # the quantized-tensor API is deprecated in favour of torchao
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch.quantize_per_channel(w, scales, zero_points, axis=0, dtype=torch.qint8)
        bias = linear.bias.detach().float() if linear.bias is not None else None
        self.packed = torch.ops.quantized.linear_prepack(qweight, bias)
        self.out_features = w.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.quantized.linear_dynamic(x.reshape(-1, shape[-1]).contiguous(), self.packed, True)
        return y.view(*shape[:-1], self.out_features)


def quantize_int8(model: GPT) -> GPT:
    """An inference-only copy of ``model`` whose linear layers run in int8 (see module docstring)."""
    if "fbgemm" not in torch.backends.quantized.supported_engines and \
            "x86" not in torch.backends.quantized.supported_engines:
        raise UserError("int8 decoding needs PyTorch's x86 quantized engine (FBGEMM): use --precision fp32")
    if next(model.parameters()).device.type != "cpu":
        raise UserError("int8 decoding is a CPU path: on a GPU use --precision fp32 (bf16 autocast)")
    fast = copy.deepcopy(model).eval()
    for module in list(fast.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and not (isinstance(module, MoE) and name == "router"):
                setattr(module, name, Int8DynamicLinear(child))
    return fast


def with_precision(model: GPT, precision: str) -> GPT:
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return quantize_int8(model) if precision == "int8" else model
