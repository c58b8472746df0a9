"""The GPT model: one file for GPT-1, GPT-2, GPT-3, the modern block family and GPT-4's mixture of experts.

The generations differ only through ``GPTConfig``: post- vs pre-LayerNorm
blocks, dense vs locally banded attention layers, the GELU variant; learned or
rotary positions, LayerNorm or RMSNorm, QK-norm, ReLU², tied or untied head,
soft-capped logits; a dense MLP or a mixture of experts (``MoE``). The KV
cache is an object passed into ``forward`` (see ``KVCache``), so the module
itself stays stateless and training code never sees inference buffers. The one
exception is training-time router statistics of MoE layers, which
``router_losses`` takes out after each training forward (the trainer does).

    model = GPT(GPTConfig.from_preset("tiny"))
    logits = model(idx)                  # (B, T, vocab)
    logits, loss = model(idx, targets)   # cross-entropy, ignore_index=-100

Attention masks: ``attention_mask`` is the single dense reference rule (causal,
optionally banded, optionally with padded keys); every fast path (SDPA's
``is_causal``, FlexAttention block masks on CUDA) is tested against it.

``GPT.trace`` runs the same forward and keeps every intermediate tensor (what the
3-D view draws): ``model.trace(idx).steps`` in the order they are computed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from .config import GPTConfig
from .errors import UserError
from .tokenizer import Tokenizer


# --------------------------------------------------------------------- masks
def attention_mask(q_start: int, q_len: int, k_len: int, window: int | None = None,
                   key_valid: torch.Tensor | None = None,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean mask of allowed (query, key) pairs; True means "may attend".

    Queries sit at cache positions ``q_start .. q_start + q_len - 1`` and keys at
    ``0 .. k_len - 1``. Query i sees key j when ``j <= i`` and, in a banded layer,
    ``i - window < j``. ``key_valid`` (B, k_len) marks real tokens (False at left
    padding); a padded query still sees itself so no softmax row is empty.
    Returns (q_len, k_len) or, with ``key_valid``, (B, 1, q_len, k_len).
    """
    i = torch.arange(q_start, q_start + q_len, device=device)[:, None]
    j = torch.arange(k_len, device=device)[None, :]
    allowed = j <= i
    if window is not None:
        allowed = allowed & (j > i - window)
    if key_valid is None:
        return allowed
    allowed = allowed[None] & key_valid[:, None, :]
    allowed = allowed | (j == i)[None]
    return allowed[:, None]


def _flex_band_block_mask(q_len: int, window: int, device: torch.device) -> BlockMask:
    def band(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return (kv_idx <= q_idx) & (kv_idx > q_idx - window)

    return create_block_mask(band, B=None, H=None, Q_LEN=q_len, KV_LEN=q_len, device=device)


_flex_cache: dict[tuple[int, int, str], Any] = {}
_flex_fn: Any = None


def flex_band_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """Banded causal attention through FlexAttention's block-sparse kernel (used on CUDA).

    Only blocks that intersect the band are computed, so a local layer costs
    O(T * window) instead of O(T^2).
    """
    global _flex_fn
    key = (q.shape[-2], window, str(q.device))
    if key not in _flex_cache:
        _flex_cache[key] = _flex_band_block_mask(q.shape[-2], window, q.device)
    if _flex_fn is None:
        _flex_fn = torch.compile(flex_attention) if q.is_cuda else flex_attention
    return _flex_fn(q, k, v, block_mask=_flex_cache[key])


# ------------------------------------------------------------------ rotary
Rope = tuple[torch.Tensor, torch.Tensor]


def rotary_angles(positions: torch.Tensor, head_dim: int, base: float) -> Rope:
    """(cos, sin) of the rotary angles ``position * base^(-2i/head_dim)`` for the ``head_dim / 2`` pairs,
    shaped to broadcast over (B, H, T, head_dim / 2): positions (T,) give (T, d/2), (B, T) give (B, 1, T, d/2)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq
    if angles.dim() == 3:
        angles = angles[:, None]
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Turn each pair (x[i], x[i + d/2]) of ``x`` (B, H, T, d) by its angle (the GPT-NeoX/Llama pairing)."""
    cos, sin = rope
    a, b = x.float().chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1).to(x.dtype)


class Context(NamedTuple):
    """What every block of one forward shares: the masks of each attention kind and the rotary angles."""

    masks: dict[str, Any]
    rope: Rope | None


def make_norm(config: GPTConfig, dim: int) -> nn.Module:
    """The config's normalisation over ``dim`` channels: LayerNorm (GPT-1/2/3) or RMSNorm."""
    if config.norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=config.layer_norm_eps)
    return nn.LayerNorm(dim, eps=config.layer_norm_eps, bias=config.bias)


# -------------------------------------------------------------------- cache
class KVCache:
    """Preallocated keys and values for all layers: (n_layer, B, n_head, max_len, head_dim).

    Written in place during decoding, never re-allocated. ``length`` is the number
    of filled positions (shared by the batch; prompts of different lengths are
    left-padded and ``valid`` is False at the padding).
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        max_len = max_len or config.block_size
        shape = (config.n_layer, batch_size, config.n_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.valid = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
        self.padded = False
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def set_padding(self, valid: torch.Tensor) -> None:
        """Mark which of the first ``valid.shape[1]`` positions hold real tokens."""
        self.valid[:, : valid.shape[1]] = valid
        self.padded = bool((~valid).any())

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = k.shape[2]
        self.k[layer, :, :, self.length : self.length + t] = k
        self.v[layer, :, :, self.length : self.length + t] = v
        end = self.length + t
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, t: int) -> None:
        self.length += t


# -------------------------------------------------------------------- trace
Branch = Literal["input", "stream", "attn", "mlp", "output"]
StepKind = Literal["vector", "heads", "attention"]


@dataclass
class TraceStep:
    """One tensor of a traced forward pass, at the kept positions."""

    name: str
    """what it is: wte, wpe (learned positions only), embed, ln_1, q, k, v, attn, heads, attn_out, resid_attn,
    ln_2, fc, act (dense MLP) or router, gates (MoE), mlp_out, resid_mlp, ln_f, logits"""
    kind: StepKind
    """its shape: vector (P, width), heads (n_head, P, head_dim), attention (n_head, P, T)"""
    branch: Branch
    """where it sits: the input embeddings, the residual stream, a block's attention or MLP branch, the output"""
    module: str
    """the sub-module that computed it (``h.0.attn.c_proj``): its weights are the step's weights"""
    value: torch.Tensor
    layer: int | None = None


@dataclass
class BlockKind:
    """What a block is, for a reader of its steps: where its norms sit and what its attention sees."""

    layer: int
    norm: Literal["pre", "post"]
    window: int | None
    """the band of a locally banded layer; None for dense attention"""
    experts: int = 0
    """MLPs of an MoE feed-forward (its router and gates steps say which each token went to); 0 when dense"""


@dataclass
class Trace:
    rows: list[int]
    """the positions whose rows the steps keep, in order"""
    blocks: list[BlockKind]
    steps: list[TraceStep]
    """every intermediate tensor, in the order the forward pass computes them"""

    def step(self, name: str, layer: int | None = None) -> TraceStep:
        return next(s for s in self.steps if s.name == name and s.layer == layer)


@contextmanager
def _outputs(root: nn.Module, names: Sequence[str]) -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The (first input, output) of each named sub-module of ``root`` while it runs inside the block."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            seen[name] = (args[0], output)
        return hook

    handles = [root.get_submodule(name).register_forward_hook(keep(name)) for name in names]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


# ------------------------------------------------------------------- layers
class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head = config.n_head
        self.window = config.attn_window if config.is_local(layer) else None
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.q_norm = nn.RMSNorm(config.head_dim, eps=config.layer_norm_eps) if config.qk_norm else None
        self.k_norm = nn.RMSNorm(config.head_dim, eps=config.layer_norm_eps) if config.qk_norm else None
        self.attn_dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def heads(self, x: torch.Tensor, rope: Rope | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values of ``x`` (B, T, C), each (B, H, T, head_dim), QK-normed and turned by
        ``rope`` when the config has them: shared by ``forward`` and ``weights`` so the weights shown are those
        of the projections the model runs."""
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.c_attn(x).split(C, dim=2))
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        return q, k, v

    def weights(self, x: torch.Tensor, queries: int | None = None, rope: Rope | None = None) -> torch.Tensor:
        """Attention probabilities (B, H, Tq, T) of the last ``queries`` positions (all when None) of ``x``
        at positions 0..T-1 (``rope``: their rotary angles, when the model has them).

        An explicit softmax under ``attention_mask`` (causal, banded in a local layer): SDPA never
        materialises these, so they are recomputed from the same q and k.
        """
        T = x.shape[1]
        q, k, _ = self.heads(x, rope)
        tq = T if queries is None else min(queries, T)
        scores = (q[:, :, T - tq:].float() @ k.float().transpose(-2, -1)) / math.sqrt(q.shape[-1])
        allowed = attention_mask(T - tq, tq, T, self.window, device=x.device)
        return scores.masked_fill(~allowed, float("-inf")).softmax(-1)

    def forward(self, x: torch.Tensor, cache: KVCache | None, ctx: Context) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.heads(x, ctx.rope)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        kind = "L" if self.window is not None else "D"
        mask = ctx.masks[kind]
        p = self.attn_dropout if self.training else 0.0
        if mask == "flex" and self.window is not None:  # "flex": set for local layers only
            y = flex_band_attention(q, k, v, self.window)
        elif mask == "causal":
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:  # a boolean mask, or None when every key is visible (one-token decode step)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.activation = config.activation
        self.dropout = nn.Dropout(config.dropout)

    def act(self, h: torch.Tensor) -> torch.Tensor:
        if self.activation == "relu2":
            return F.relu(h).square()
        return F.gelu(h, approximate="tanh" if self.activation == "gelu_tanh" else "none")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


@dataclass
class Routing:
    """Where an MoE layer sends N tokens: each token's ``top_k`` experts, their gates and whether each
    assignment fits in its expert's capacity."""

    logits: torch.Tensor
    """(N, n_experts) router logits, float32"""
    probs: torch.Tensor
    """(N, n_experts) softmax of the logits"""
    experts: torch.Tensor
    """(N, top_k) the chosen experts, most probable first"""
    gates: torch.Tensor
    """(N, top_k) the weights of their outputs: the probabilities, renormalised over the k when k > 1"""
    kept: torch.Tensor
    """(N, top_k) False where the expert was full (never with dropless routing)"""


@dataclass
class RouterRecord:
    """One MoE layer's training forward: its losses (with gradients) and its load (detached)."""

    balance: torch.Tensor
    z: torch.Tensor
    load: torch.Tensor
    """(n_experts,) fraction of the token assignments each expert computed"""
    dropped: torch.Tensor


class MoE(nn.Module):
    """A mixture of ``n_experts`` MLPs; a linear router sends each token to ``top_k`` of them.

    Gates are the router's softmax probabilities of the chosen experts: the probability itself for
    k = 1 (Switch Transformer, so the router learns from the loss), renormalised over the k chosen
    otherwise (GShard). Dropless by default; with ``capacity_factor`` c, in training, an expert takes
    at most ceil(c * k * T / E) of a sequence's T tokens' assignments, first choices before second ones
    and earlier tokens first, and a dropped assignment contributes nothing (the residual stream carries
    the token). Capacity and the load-balancing loss are per sequence (DeepSeek-V3's sequence-wise
    balance), so a row's routing never depends on the rows beside it: N processes train as one, and
    evaluation and decoding (dropless) give a row the same output alone or in a batch.

    Each expert runs on its tokens only, one after another: the plain loop that expert parallelism
    would spread over devices (see docs/ARCHITECTURE.md). An expert that receives no tokens still runs
    on an empty batch, so every parameter takes part in the graph (DDP expects that).
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.top_k, self.capacity_factor = config.top_k, config.capacity_factor
        self.router = nn.Linear(config.n_embd, config.n_experts, bias=False)
        self.experts = nn.ModuleList(MLP(config) for _ in range(config.n_experts))
        self.records: list[RouterRecord] = []

    @property
    def n_experts(self) -> int:
        return len(self.experts)

    def route(self, x: torch.Tensor) -> Routing:
        """The routing of the B sequences ``x`` (B, T, C), flattened to N = B * T tokens."""
        B, T, _ = x.shape
        logits = self.router(x.reshape(B * T, -1)).float()
        probs = logits.softmax(-1)
        top, experts = probs.topk(self.top_k, dim=-1)
        gates = top / top.sum(-1, keepdim=True) if self.top_k > 1 else top
        kept = torch.ones_like(experts, dtype=torch.bool)
        if self.capacity_factor > 0 and self.training:
            capacity = math.ceil(self.capacity_factor * self.top_k * T / self.n_experts)
            order = F.one_hot(experts.view(B, T, self.top_k).transpose(1, 2), self.n_experts)  # (B, k, T, E)
            order = order.reshape(B, self.top_k * T, -1)  # a row's first choices, then its second ones
            rank = (order.cumsum(1) * order).sum(-1)  # 1-based arrival at its expert
            kept = (rank <= capacity).view(B, self.top_k, T).transpose(1, 2).reshape(B * T, self.top_k)
        return Routing(logits, probs, experts, gates, kept)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        r = self.route(flat.view(-1, shape[-2], shape[-1]))
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where((r.experts == e) & r.kept)
            y = expert(flat[token]) * r.gates[token, slot, None].to(flat.dtype)
            out = out.index_add(0, token, y.to(out.dtype))
        if self.training and torch.is_grad_enabled():
            self.records.append(self._record(r, shape[-2]))
        return out.view(shape)

    def _record(self, r: Routing, T: int) -> RouterRecord:
        """The Switch load-balancing loss E * sum_e f_e * P_e of each sequence, averaged (f_e: the fraction of
        its assignments routed to e, P_e: its mean router probability of e; 1 when balanced), and the z-loss
        mean(logsumexp(logits)^2)."""
        n, E = r.probs.shape
        routed = F.one_hot(r.experts.view(-1, T * self.top_k), E).float().mean(1)  # (B, E)
        balance = E * (routed * r.probs.view(-1, T, E).mean(1)).sum(-1).mean()
        z = torch.logsumexp(r.logits, dim=-1).square().mean()
        load = torch.bincount(r.experts[r.kept], minlength=E).float() / (n * self.top_k)
        return RouterRecord(balance, z, load, 1.0 - r.kept.float().mean())


def hidden_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The 2-D weights inside the transformer blocks of ``model`` (a GPT or any wrapper of GPTs): what Muon
    orthogonalises. Embeddings, the LM head, task heads, norms, biases and routers are the rest (AdamW's)."""
    return [p for m in model.modules() if isinstance(m, Block) for p in m.hidden_matrices()]


@dataclass
class RouterLosses:
    loss: torch.Tensor
    """router_aux_coef * balance + router_z_coef * z, averaged over the MoE layers' forwards: add to the loss"""
    metrics: dict[str, torch.Tensor]
    """moe_balance, moe_z, moe_dropped and moe_load_<e> (expert e's share of the assignments)"""


def router_losses(model: nn.Module) -> RouterLosses | None:
    """Take the router records of every MoE layer in ``model`` (a GPT or a wrapper of any) since the last
    call; None when it has no MoE layer or ran no training forward since."""
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    records = [r for m in layers for r in m.records]
    for m in layers:
        m.records = []
    if not records:
        return None
    gpts = [m for m in model.modules() if isinstance(m, GPT)]
    cfg = gpts[0].config
    balance = torch.stack([r.balance for r in records]).mean()
    z = torch.stack([r.z for r in records]).mean()
    load = torch.stack([r.load for r in records]).mean(0)
    metrics = {"moe_balance": balance.detach(), "moe_z": z.detach(),
               "moe_dropped": torch.stack([r.dropped for r in records]).mean()}
    metrics.update({f"moe_load_{e}": v for e, v in enumerate(load)})
    return RouterLosses(cfg.router_aux_coef * balance + cfg.router_z_coef * z, metrics)


class Block(nn.Module):
    """One transformer block; the only branch between GPT-1 and GPT-2/3 is where the norms sit."""

    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp: MLP | MoE = MoE(config) if config.is_moe(layer) else MLP(config)

    def attn_input(self, x: torch.Tensor) -> torch.Tensor:
        """What attention reads from the residual stream ``x``: ``ln_1(x)`` in GPT-2/3, ``x`` itself in GPT-1."""
        return self.ln_1(x) if self.pre_norm else x

    def hidden_matrices(self) -> list[nn.Parameter]:
        """The block's 2-D weights that Muon orthogonalises: attention and MLP/expert matrices, not routers."""
        router = self.mlp.router.weight if isinstance(self.mlp, MoE) else None
        return [p for p in self.parameters() if p.dim() == 2 and p is not router]

    def forward(self, x: torch.Tensor, cache: KVCache | None, ctx: Context) -> torch.Tensor:
        if self.pre_norm:  # GPT-2/3
            x = x + self.attn(self.attn_input(x), cache, ctx)
            return x + self.mlp(self.ln_2(x))
        x = self.ln_1(x + self.attn(self.attn_input(x), cache, ctx))  # GPT-1
        return self.ln_2(x + self.mlp(x))


# -------------------------------------------------------------------- model
class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.pos_embedding == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        pre = config.norm_position == "pre"
        self.ln_f = make_norm(config, config.n_embd) if pre else None
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, 0.02) weights, zero biases; GPT-2 scales residual projections by 1/sqrt(2 * n_layer);
        ``zero_init_proj`` zeroes them (each block starts as the identity)."""
        cfg = self.config
        if self.wte.weight.is_meta:  # shapes only (parameter counts, loading with assign=True)
            return
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.RMSNorm) and module.weight is not None:
                nn.init.ones_(module.weight)
        if cfg.scale_residual_init or cfg.zero_init_proj:
            std = 0.0 if cfg.zero_init_proj else 0.02 / math.sqrt(2 * cfg.n_layer)
            for proj in self._residual_projections():
                nn.init.normal_(proj, mean=0.0, std=std)  # std 0: zeros

    def _residual_projections(self) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        for block in self.h:
            assert isinstance(block, Block)  # nn.ModuleList yields nn.Module
            mlps = list(block.mlp.experts) if isinstance(block.mlp, MoE) else [block.mlp]
            out += [block.attn.c_proj.weight, *(m.c_proj.weight for m in mlps if isinstance(m, MLP))]
        return out

    # ---------------------------------------------------------------- sizes
    def num_params(self, non_embedding: bool = False, active: bool = False) -> int:
        """Parameter count, tied weights once; ``non_embedding`` drops token and position tables;
        ``active`` counts only the ``top_k`` experts a token runs through in each MoE layer."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wte.weight.numel() + (self.wpe.weight.numel() if self.wpe is not None else 0)
        if active:
            for block in self.h:
                if isinstance(block, Block) and isinstance(block.mlp, MoE):
                    per_expert = sum(p.numel() for p in block.mlp.experts[0].parameters())
                    n -= (block.mlp.n_experts - block.mlp.top_k) * per_expert
        return n

    def shard_units(self) -> list[nn.Module]:
        """The blocks, which FSDP shards one by one (the embeddings and head go with the root)."""
        return list(self.h)

    def empty_copy(self) -> "GPT":
        """A new GPT of this config on the CPU (the trainer loads a full state dict into it after FSDP)."""
        return GPT(self.config)

    @staticmethod
    def count_params(config: GPTConfig, active: bool = False) -> int:
        """Parameter count of a config without allocating it (meta device): instant even for 175B;
        ``active``: per token, with only ``top_k`` experts of each MoE layer."""
        with torch.device("meta"):
            return GPT(config).num_params(active=active)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward) for MFU.

        6 * N for the weight matmuls (N = active non-embedding parameters, so an MoE layer counts the
        ``top_k`` experts a token runs through, plus the LM head, which is a matmul even when tied) plus
        12 * n_layer * d * T_eff for attention scores and values, where T_eff is the context a query sees
        (seq_len for dense layers, the window for banded ones).
        """
        cfg = self.config
        T = seq_len or cfg.block_size
        n = self.num_params(non_embedding=True, active=True)
        if cfg.tie_embeddings:  # the tied head is a matmul too, but num_params counted it as wte
            n += cfg.vocab_size * cfg.n_embd
        attn = sum(12 * cfg.n_embd * (min(T, cfg.attn_window) if cfg.is_local(i) else T)
                   for i in range(cfg.n_layer))
        return 6.0 * n + attn

    # -------------------------------------------------------------- forward
    def _context(self, T: int, cache: KVCache | None, valid: torch.Tensor | None,
                 positions: torch.Tensor) -> Context:
        cfg = self.config
        device = positions.device
        start = cache.length if cache is not None else 0
        k_len = start + T
        if cache is not None and valid is None and cache.padded:
            valid = cache.valid[:, :k_len]
        masks: dict[str, Any] = {}
        for kind in set(cfg.attention_pattern):
            window = cfg.attn_window if kind == "L" else None
            if valid is None and start == 0:
                if window is None:
                    masks[kind] = "causal"
                    continue
                # FlexAttention has no dropout: fall back to the masked SDPA when it is on.
                if device.type == "cuda" and cache is None and not (self.training and cfg.dropout > 0):
                    masks[kind] = "flex"
                    continue
            if valid is None and T == 1 and (window is None or k_len <= window):
                masks[kind] = None  # one new token that sees the whole cache
                continue
            masks[kind] = attention_mask(start, T, k_len, window, valid, device=device)
        rope = rotary_angles(positions, cfg.head_dim, cfg.rope_base) if cfg.pos_embedding == "rotary" else None
        return Context(masks, rope)

    def _embed(self, idx: torch.Tensor, positions: torch.Tensor, token_embeds: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the token embeddings (``token_embeds`` when given), the learned position embeddings or None with
        rotary positions)."""
        tok = self.wte(idx) if token_embeds is None else token_embeds
        return tok, self.wpe(positions) if self.wpe is not None else None

    def _input(self, idx: torch.Tensor, positions: torch.Tensor,
               token_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """The blocks' input; ``token_embeds`` (B, T, n_embd) stands in for ``wte(idx)`` (an image's positions)."""
        tok, pos = self._embed(idx, positions, token_embeds)
        return self.drop(tok if pos is None else tok + pos)

    def _check_length(self, length: int) -> None:
        if length > self.config.block_size:  # left padding only lowers positions, so this bounds them too
            raise UserError(f"sequence of {length} tokens exceeds the model's context of "
                            f"{self.config.block_size}: shorten the prompt or lower max tokens")

    def hidden_states(self, idx: torch.Tensor, *, cache: KVCache | None = None,
                      valid: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                      token_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states (B, T, n_embd), after ``ln_f`` for pre-LN models; heads read these.

        ``valid`` (B, T) marks real tokens when rows are left-padded (without a
        cache); ``positions`` (B, T) overrides the default 0..T-1 positions;
        ``token_embeds`` (B, T, n_embd) replaces ``wte(idx)`` (an image's encoded
        patches stand where its ``<|image|>`` tokens are: vision.py).
        """
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        self._check_length(start + T)
        if positions is None:
            positions = torch.arange(start, start + T, device=idx.device)
        x = self._input(idx, positions, token_embeds)
        ctx = self._context(T, cache, valid, positions)
        for block in self.h:
            x = block(x, cache, ctx)
        if cache is not None:
            cache.advance(T)
        return self.ln_f(x) if self.ln_f is not None else x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head on final hidden states, soft-capped to (-c, c) when ``logit_softcap`` c is set:
        the one place every caller (forward, the engine, the stages' heads) turns states into logits."""
        logits = self.lm_head(hidden)
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits / cap) if cap > 0 else logits

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                cache: KVCache | None = None, valid: torch.Tensor | None = None,
                positions: torch.Tensor | None = None,
                token_embeds: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, T, vocab); with ``targets`` also the mean cross-entropy (ignore_index=-100)."""
        logits = self.logits(self.hidden_states(idx, cache=cache, valid=valid, positions=positions,
                                                token_embeds=token_embeds))
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    @torch.no_grad()
    def attention_weights(self, idx: torch.Tensor, queries: int | None = None) -> torch.Tensor:
        """Attention probabilities (B, n_layer, n_head, Tq, T) of the last ``queries`` positions of ``idx``
        (all T when None); rows sum to 1 and are zero on masked keys.

        Runs the blocks themselves for the residual stream and asks each attention module for the
        weights of its own input, so post-LN (GPT-1) and banded layers are shown as they compute.
        ``queries=1`` keeps the cost at O(T) per head for the explorer's last-token view.
        """
        T = idx.shape[1]
        self._check_length(T)
        positions = torch.arange(T, device=idx.device)
        x = self._input(idx, positions)
        ctx = self._context(T, None, None, positions)
        layers = []
        for block in self.h:
            assert isinstance(block, Block)  # nn.ModuleList yields nn.Module
            layers.append(block.attn.weights(block.attn_input(x), queries, ctx.rope))
            x = block(x, None, ctx)
        return torch.stack(layers, dim=1)

    @torch.no_grad()
    def trace(self, idx: torch.Tensor, rows: Sequence[int] | None = None) -> Trace:
        """The forward pass of one sequence ``idx`` (1, T) with every intermediate tensor, at positions ``rows``
        (all when None): embeddings, the residual stream, each norm's output, q/k/v, the attention
        probabilities (rows over all T keys), the heads' outputs, the MLP's hidden layer and activation (or an
        MoE layer's router probabilities and gates), the logits.

        Each block runs itself (its output is the model's) while hooks on its own sub-modules (norms,
        attention, MLP) read what they compute; only q/k/v and the probabilities come from the attention
        module's ``heads``/``weights``, which SDPA never materialises. For a model in eval mode: dropout
        applies as in ``forward``.
        """
        B, T = idx.shape
        if B != 1:
            raise ValueError(f"trace takes one sequence (1, T), got a batch of {B}")
        self._check_length(T)
        keep = torch.arange(T, device=idx.device) if rows is None else torch.tensor(list(rows), device=idx.device)
        if keep.numel() == 0 or int(keep.min()) < 0 or int(keep.max()) >= T:
            raise ValueError(f"rows must be positions 0..{T - 1}, got {list(keep.tolist())}")
        positions = torch.arange(T, device=idx.device)
        tok, pos = self._embed(idx, positions)
        x = self.drop(tok if pos is None else tok + pos)
        steps = [TraceStep("wte", "vector", "input", "wte", tok[0, keep])]
        if pos is not None:
            steps.append(TraceStep("wpe", "vector", "input", "wpe", pos[keep]))
        steps.append(TraceStep("embed", "vector", "stream", "", x[0, keep]))
        blocks = []
        ctx = self._context(T, None, None, positions)
        for layer, block in enumerate(self.h):
            assert isinstance(block, Block)  # nn.ModuleList yields nn.Module
            x, block_steps = self._trace_block(block, x, keep, ctx)
            steps += block_steps
            experts = block.mlp.n_experts if isinstance(block.mlp, MoE) else 0
            blocks.append(BlockKind(layer, "pre" if block.pre_norm else "post", block.attn.window, experts))
        if self.ln_f is not None:
            x = self.ln_f(x)
            steps.append(TraceStep("ln_f", "vector", "stream", "ln_f", x[0, keep]))
        steps.append(TraceStep("logits", "vector", "output", "lm_head", self.logits(x[0, keep])))
        return Trace([int(r) for r in keep.tolist()], blocks, steps)

    @staticmethod
    def _trace_block(block: "Block", x: torch.Tensor, keep: torch.Tensor,
                     ctx: Context) -> tuple[torch.Tensor, list[TraceStep]]:
        """The block's output for the stream ``x`` and its steps in the order it computes them."""
        layer, attn = block.attn.layer, block.attn
        attn_in = block.attn_input(x)
        q, k, v = attn.heads(attn_in, ctx.rope)
        first = int(keep.min())  # softmax rows from the first kept query on only: O(P * T), not O(T^2)
        probs = F.pad(attn.weights(attn_in, x.shape[1] - first, ctx.rope), (0, 0, first, 0))
        moe = block.mlp if isinstance(block.mlp, MoE) else None
        ffn = () if moe is not None else ("mlp.c_fc", "mlp.c_proj")
        with _outputs(block, ("ln_1", "attn", "attn.c_proj", "ln_2", "mlp", *ffn)) as seen:
            out = block(x, None, ctx)

        def step(name: str, branch: Branch, module: str, value: torch.Tensor) -> TraceStep:
            heads = value.dim() == 4  # (1, H, T, d): the kept rows of every head
            value = value[0][:, keep] if heads else value[0, keep]
            kind: StepKind = ("attention" if name == "attn" else "heads") if heads else "vector"
            return TraceStep(name, kind, branch, f"h.{layer}.{module}".rstrip("."), value, layer)

        n_head = attn.n_head
        concat = seen["attn.c_proj"][0]  # (1, T, C): the heads' outputs side by side
        heads_out = concat.view(*concat.shape[:2], n_head, -1).transpose(1, 2)
        attention = [step("q", "attn", "attn.c_attn", q), step("k", "attn", "attn.c_attn", k),
                     step("v", "attn", "attn.c_attn", v), step("attn", "attn", "attn", probs),
                     step("heads", "attn", "attn", heads_out), step("attn_out", "attn", "attn.c_proj", seen["attn"][1])]
        if moe is not None:  # the router's probabilities, then each token's gates (zero where it did not go)
            r = moe.route(seen["mlp"][0])
            gates = torch.zeros_like(r.probs).scatter(1, r.experts, r.gates * r.kept)
            mlp = [step("router", "mlp", "mlp.router", r.probs[None]), step("gates", "mlp", "mlp", gates[None])]
        else:
            mlp = [step("fc", "mlp", "mlp.c_fc", seen["mlp.c_fc"][1]),
                   step("act", "mlp", "mlp", seen["mlp.c_proj"][0])]
        mlp.append(step("mlp_out", "mlp", "mlp.c_proj" if moe is None else "mlp", seen["mlp"][1]))
        if block.pre_norm:  # GPT-2/3: each branch starts with its norm; the sums are the stream
            return out, [step("ln_1", "attn", "ln_1", seen["ln_1"][1]), *attention,
                         step("resid_attn", "stream", "", seen["ln_2"][0]),
                         step("ln_2", "mlp", "ln_2", seen["ln_2"][1]), *mlp, step("resid_mlp", "stream", "", out)]
        return out, [*attention, step("resid_attn", "stream", "", seen["ln_1"][0]),  # GPT-1: norms on the stream
                     step("ln_1", "stream", "ln_1", seen["ln_1"][1]), *mlp,
                     step("resid_mlp", "stream", "", seen["ln_2"][0]), step("ln_2", "stream", "ln_2", out)]


def with_tokens(gpt: GPT, tokenizer: Tokenizer, tokens: list[str], dropout: float | None = None) -> GPT:
    """Add special ``tokens`` to ``tokenizer``; return ``gpt`` with embedding rows for every id (``rebuilt``).

    GPT-1's delimiter tokens and the chat format's role tokens come in this way.
    """
    vocab = max(max(tokenizer.add_special_tokens(tokens)) + 1, gpt.config.vocab_size)
    return rebuilt(gpt, vocab_size=vocab, dropout=dropout)


def rebuilt(gpt: GPT, *, vocab_size: int | None = None, dropout: float | None = None,
            block_size: int | None = None) -> GPT:
    """``gpt`` with a larger vocabulary, another dropout and/or a shorter context, holding the same weights.

    New ids grow ``wte`` (and the tied ``lm_head``) with N(0, 0.02) rows drawn
    from torch's global generator, which train with everything else. A shorter
    ``block_size`` keeps the first rows of ``wpe`` (nanoGPT's ``crop_block_size``),
    so the model computes exactly what it did on sequences that fit. Returns
    ``gpt`` itself when nothing changes, else a new GPT.
    """
    vocab = gpt.config.vocab_size if vocab_size is None else vocab_size
    dropout = gpt.config.dropout if dropout is None else dropout
    block = gpt.config.block_size if block_size is None else block_size
    if (vocab, dropout, block) == (gpt.config.vocab_size, gpt.config.dropout, gpt.config.block_size):
        return gpt
    if vocab < gpt.config.vocab_size:
        raise ValueError(f"vocab_size {vocab} < the model's {gpt.config.vocab_size}: a vocabulary only grows")
    if block > gpt.config.block_size:
        raise ValueError(f"block_size {block} > the model's {gpt.config.block_size}: a context only shrinks")
    cfg = GPTConfig.from_dict({**gpt.config.to_dict(), "vocab_size": vocab, "dropout": dropout, "block_size": block})
    state = {k: v.detach() for k, v in gpt.state_dict().items()}
    if "wpe.weight" in state:  # rotary models have no position table to crop
        state["wpe.weight"] = state["wpe.weight"][:block]
    for key in ("wte.weight",) if cfg.tie_embeddings else ("wte.weight", "lm_head.weight"):
        old = state[key]
        new_rows = torch.randn(vocab - old.shape[0], old.shape[1], dtype=old.dtype) * 0.02
        state[key] = torch.cat([old, new_rows.to(old.device)])
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["wte.weight"]
    with torch.device("meta"):
        grown = GPT(cfg)
    grown.load_state_dict(state, assign=True)
    if cfg.tie_embeddings:
        grown.lm_head.weight = grown.wte.weight  # assign=True gave each name its own Parameter
    return grown.train(gpt.training)
