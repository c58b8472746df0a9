"""The 3-D view's data: one forward pass of a text (``GPT.trace``), sampled and capped into the JSON that the
``/visualize`` page and ``gptlab visualize`` draw.

    data = ModelView(model, tokenizer).view(ids)     # a JSON-ready dict, about 2 MB for GPT-2 small

What cannot be drawn element by element is sampled, and the data says how (``sampling``): the last
``positions`` tokens are drawn (the whole text goes through the model; attention to earlier keys is summed
in one column), ``columns`` evenly strided channels per tensor (a share of them per head), the most
probable vocabulary entries of the logits, and weight matrices strided the same way. Statistics and
histograms use every channel of the drawn tokens. Values travel as little-endian float16 in base64 (three
significant digits), which keeps GPT-2 small's view near 2 MB (1.3 MB gzipped) whatever the text's length.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn

from .config import Config, GPTConfig
from .errors import UserError
from .model import GPT, BlockKind, Trace, TraceStep
from .tokenizer import Tokenizer

__all__ = ["ViewConfig", "ModelView", "strided", "LABELS"]

F16_MAX = 65504.0
BINS = 24

LABELS = {
    "wte": "token embedding", "wpe": "position embedding", "embed": "embedding sum", "ln_1": "LayerNorm 1",
    "q": "queries", "k": "keys", "v": "values", "attn": "attention", "heads": "head outputs",
    "attn_out": "attention output", "resid_attn": "residual + attention", "ln_2": "LayerNorm 2", "fc": "MLP hidden",
    "act": "GELU", "mlp_out": "MLP output", "resid_mlp": "residual + MLP", "ln_f": "final LayerNorm",
    "logits": "logits", "router": "router probabilities", "gates": "expert gates",
}


def _label(name: str, config: GPTConfig) -> str:
    """A step's short label in the terms of the model's own norm and activation."""
    label = LABELS.get(name, name)
    if config.norm == "rmsnorm":
        label = label.replace("LayerNorm", "RMSNorm")
    return label.replace("GELU", "ReLU²") if config.activation == "relu2" else label


@dataclass
class ViewConfig(Config):
    """How much of a forward pass the 3-D view draws (the JSON's size follows from these)."""

    section: ClassVar[str] = "view"

    positions: int = 32
    """tokens drawn: the last N of the text (all of it goes through the model), 1..64"""
    columns: int = 64
    """channels drawn per tensor, evenly strided (a share per head; statistics use every channel), 8..256"""
    top: int = 10
    """most likely next tokens listed for each drawn position, 1..50"""

    def validate(self) -> None:
        for key, low, high in (("positions", 1, 64), ("columns", 8, 256), ("top", 1, 50)):
            value = getattr(self, key)
            self.need(isinstance(value, int) and low <= value <= high, f"{key}={value!r} must be in {low}..{high}")


# ------------------------------------------------------------------ encoding
def strided(n: int, cap: int) -> list[int]:
    """At most ``cap`` evenly strided indices of ``range(n)``, starting at 0."""
    return list(range(0, n, math.ceil(n / cap)))


def _pack(t: torch.Tensor) -> dict[str, Any]:
    """A tensor as base64 float16 (clamped to float16's range) with its shape, row-major."""
    array = t.detach().float().clamp(-F16_MAX, F16_MAX).cpu().numpy().astype("<f2")
    return {"shape": list(array.shape), "f16": base64.b64encode(array.tobytes()).decode("ascii")}


def _summary(t: torch.Tensor) -> dict[str, Any]:
    """Statistics and a histogram of every value of ``t``."""
    t = t.detach().float()
    lo, hi = float(t.min()), float(t.max())
    counts = torch.histc(t, BINS, lo, hi) if hi > lo else torch.tensor([float(t.numel())])
    return {"min": lo, "max": hi, "mean": float(t.mean()), "std": float(t.std(unbiased=False)),
            "hist": {"lo": lo, "hi": hi, "counts": [int(c) for c in counts.tolist()]}}


# ------------------------------------------------------------------ words
def _token(tok: Tokenizer, i: int) -> str:
    """A token's text; a model may have more rows than its tokenizer has ids (a vocabulary padded for speed)."""
    return tok.token_text(i) if i < tok.vocab_size else f"<unused id {i}>"


def _explain(step: TraceStep, block: BlockKind | None, tied: bool, config: GPTConfig) -> str:
    """One line on what ``step`` computes, in the terms of its block's kind and the model's options."""
    post = block is not None and block.norm == "post"
    rms = config.norm == "rmsnorm"
    norm = "RMSNorm" if rms else "LayerNorm"
    how = ("each token's vector over its root mean square, times a learned gain" if rms else
           "each token's vector minus its mean, over its standard deviation, times a learned gain plus a bias")
    qk = (" RMS-normalised per head (QK-norm)" if config.qk_norm else "") + (
        " and turned by its position (rotary)" if config.pos_embedding == "rotary" else "")
    top_k = f"{config.top_k} of {config.n_experts}"
    cap = config.logit_softcap
    band = f"the last {block.window} tokens only (a locally banded layer, GPT-3's sparse pattern)" \
        if block is not None and block.window is not None else "every token so far (causal mask)"
    lines = {
        "wte": "Token embedding: the row of the embedding table wte for each token id.",
        "wpe": "Position embedding: a learned vector for each position 0..context-1 (wpe).",
        "embed": "The residual stream begins: token embedding + position embedding." if config.pos_embedding ==
        "learned" else "The residual stream begins: the token embedding (positions enter as rotations of q and k).",
        "ln_1": f"{norm} after attention (GPT-1's post-LN): normalises stream + attention output into the new stream."
        if post else f"{norm} before attention: {how}.",
        "q": f"Queries: what each token looks for; the first third of c_attn's output, split into heads{qk}.",
        "k": f"Keys: what each token offers to a query; the second third of c_attn's output, split into heads{qk}.",
        "v": "Values: what each token passes on when attended to; the last third of c_attn's output, in heads.",
        "attn": f"Attention probabilities softmax(q·kᵀ/√d) over {band}; each row sums to 1.",
        "heads": "Each head's output: its attention probabilities times the values, a weighted mean of values.",
        "attn_out": "Attention's output: the heads side by side times the projection c_proj.",
        "resid_attn": "The stream plus attention's output, before LayerNorm (GPT-1)." if post
        else "The residual stream after adding attention's output.",
        "ln_2": f"{norm} after the MLP (post-LN): the block's output." if post else f"{norm} before the MLP.",
        "fc": "MLP hidden layer: the normalised stream times c_fc, four times wider.",
        "act": "ReLU²: the MLP's non-linearity, max(0, x) squared." if config.activation == "relu2"
        else "GELU: the MLP's non-linearity; negative inputs go to nearly zero.",
        "router": f"Router: softmax over the {config.n_experts} experts of the normalised stream times the router "
                  f"matrix; each token goes to its {config.top_k} most probable.",
        "gates": f"Gates: the weight of each expert's output for each token, zero for the experts it skipped "
                 f"({top_k} per token{', the probabilities renormalised' if config.top_k > 1 else ''}).",
        "mlp_out": f"Mixture output: the gated sum of the {top_k} chosen experts' MLPs." if block is not None
        and block.experts else "MLP output: the activations projected back to the stream's width by c_proj.",
        "resid_mlp": "The stream plus the MLP's output, before LayerNorm (GPT-1)." if post
        else "The residual stream after adding the MLP's output: the block's output.",
        "ln_f": f"Final {norm} (GPT-2/3) before the LM head.",
        "logits": "Logits: the last stream vector times "
                  + ("the token embedding table (the LM head is tied to wte)" if tied else "the LM head")
                  + (f", soft-capped to ±{cap:g} by {cap:g}·tanh(x/{cap:g})" if cap else "")
                  + "; softmax gives the next token.",
    }
    return lines.get(step.name, "")


# ------------------------------------------------------------------ view
def _weight(model: GPT, module: str, columns: int) -> dict[str, Any] | None:
    """A step's weight matrix sampled for drawing (rows are inputs, columns outputs: x @ W) with the statistics
    of the whole parameter; None for a module without one."""
    sub = model.get_submodule(module) if module else None
    if not isinstance(sub, (nn.Linear, nn.Embedding)):
        return None
    w = sub.weight.detach()
    param = next(n for n, p in model.named_parameters() if p is sub.weight)  # a tied LM head is wte.weight
    matrix = w.T if isinstance(sub, nn.Linear) else w  # (in, out); an embedding is one-hot @ table
    rows, cols = strided(matrix.shape[0], columns), strided(matrix.shape[1], columns)
    return {"id": f"{module}.weight", "param": param, "shape": list(matrix.shape), "rows": rows, "cols": cols,
            "data": _pack(matrix[rows][:, cols]), **_summary(w)}


def _step(step: TraceStep, trace: Trace, T: int, cfg: ViewConfig, tok: Tokenizer) -> dict[str, Any]:
    """The drawn sample of one step; ``shape`` is the real tensor's over all T positions."""
    v = step.value.float()
    extra: dict[str, Any] = {}
    if step.kind == "attention":  # (H, P, T) -> keys at the drawn positions, earlier ones summed in front
        drawn = v[:, :, trace.rows[0]:trace.rows[-1] + 1]
        if trace.rows[0] > 0:
            drawn = torch.cat([v[:, :, :trace.rows[0]].sum(-1, keepdim=True), drawn], -1)
        data, shape, cols = drawn, [v.shape[0], T, T], None
        extra["earlier"] = trace.rows[0]
    elif step.kind == "heads":  # (H, P, head_dim)
        cols = strided(v.shape[-1], max(4, cfg.columns // v.shape[0]))
        data, shape = v[:, :, cols], [v.shape[0], T, v.shape[-1]]
    elif step.name == "logits":  # the vocabulary entries most probable at some drawn position
        best = torch.softmax(v, -1).amax(0)
        cols = torch.topk(best, min(cfg.columns, best.numel())).indices.tolist()
        data, shape = v[:, cols], [T, v.shape[-1]]
        extra["col_labels"] = [_token(tok, i) for i in cols]
    else:  # (P, width)
        cols = strided(v.shape[-1], cfg.columns)
        data, shape = v[:, cols], [T, v.shape[-1]]
    return {"name": step.name, "kind": step.kind, "branch": step.branch, "layer": step.layer, "module": step.module,
            "shape": shape, "cols": cols, "data": _pack(data), **_summary(v), **extra}


def _next_tokens(logits: torch.Tensor, top: int, tok: Tokenizer) -> list[list[dict[str, Any]]]:
    """The most likely next tokens at each drawn position, as ``/explore`` lists them for the last."""
    probs = torch.softmax(logits.float(), -1)
    best = torch.topk(probs, min(top, probs.shape[-1]))
    return [[{"id": i, "token": _token(tok, i), "prob": round(p, 6)} for i, p in zip(ids, ps)]
            for ids, ps in zip(best.indices.tolist(), best.values.tolist())]


class ModelView:
    """The 3-D view of one model: ``view(ids)`` is the JSON drawn for a text. The weights do not depend on
    the text, so each is sampled and summarised once (GPT-2 small's take seconds) and kept here."""

    def __init__(self, model: GPT, tok: Tokenizer, config: ViewConfig | None = None, name: str = "model"):
        self.model, self.tok, self.config, self.name = model, tok, config or ViewConfig(), name
        self.weights: dict[str, dict[str, Any] | None] = {}  # module -> its sampled weight, or None

    def weight(self, module: str) -> dict[str, Any] | None:
        if module not in self.weights:
            self.weights[module] = _weight(self.model, module, self.config.columns)
        return self.weights[module]

    def view(self, ids: list[int], truncated: int = 0) -> dict[str, Any]:
        """The model's shape, the tokens, each block's kind, every step of the forward pass of ``ids`` (already
        cut to the context: ``truncated`` tokens were left out before them) sampled, and the weights the steps
        use."""
        model, tok, cfg = self.model, self.tok, self.config
        if not ids:
            raise UserError("type some text first: the view draws the forward pass of its tokens")
        T = len(ids)
        rows = list(range(max(0, T - cfg.positions), T))
        trace = model.trace(torch.tensor([ids], device=next(model.parameters()).device), rows)
        tied = model.lm_head.weight is model.wte.weight
        kinds = {b.layer: b for b in trace.blocks}
        steps, weights = [], {}
        for step in trace.steps:
            weight = self.weight(step.module)
            if weight is not None:
                weights[weight["id"]] = weight
            block = kinds.get(step.layer) if step.layer is not None else None
            label = _label(step.name, model.config)
            steps.append({"id": step.name if block is None else f"{block.layer}.{step.name}",
                          "label": label if block is None else f"block {block.layer} · {label}",
                          "explain": _explain(step, block, tied, model.config), "weight": weight and weight["id"],
                          **_step(step, trace, T, cfg, tok)})
        c = model.config
        channels = strided(c.n_embd, cfg.columns)
        return {
            "model": {"name": self.name, "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd,
                      "block_size": c.block_size, "vocab_size": c.vocab_size, "norm_position": c.norm_position,
                      "attention_pattern": c.attention_pattern, "attn_window": c.attn_window, "tied": tied,
                      "pos_embedding": c.pos_embedding, "norm": c.norm, "qk_norm": c.qk_norm,
                      "activation": c.activation, "logit_softcap": c.logit_softcap, "ffn": c.ffn,
                      "n_experts": c.n_experts if c.ffn == "moe" else 0, "top_k": c.top_k if c.ffn == "moe" else 0,
                      "params": model.num_params(), "active_params": model.num_params(active=True)},
            "text": tok.decode(ids), "truncated": truncated, "ids": ids, "tokens": [_token(tok, i) for i in ids],
            "rows": rows,
            "blocks": [{"layer": b.layer, "norm": b.norm, "window": b.window, "experts": b.experts}
                       for b in trace.blocks],
            "steps": steps, "weights": weights,
            "next": _next_tokens(trace.step("logits").value, cfg.top, tok),
            "sampling": {"positions": len(rows), "tokens": T, "channels": len(channels), "width": c.n_embd,
                         "stride": channels[1] - channels[0] if len(channels) > 1 else 1},
        }
