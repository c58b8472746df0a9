"""GPTConfig and the presets of every GPT generation.

One dataclass describes GPT-1, GPT-2 and GPT-3; the differences are fields, not
subclasses:

- ``norm_position``: ``"post"`` (GPT-1: LayerNorm after each residual add, no
  final LayerNorm) or ``"pre"`` (GPT-2/3: LayerNorm before each sub-layer plus
  a final LayerNorm).
- ``attention_pattern``: a short string tiled over the layers, ``"D"`` for a
  dense causal layer and ``"L"`` for a locally banded one (GPT-3 alternates:
  ``"DL"``). In a local layer position i attends to j only when
  ``i - attn_window < j <= i``.
- ``activation``: ``"gelu_tanh"`` (the tanh approximation that both OpenAI's
  GPT-1 and GPT-2 code use) or ``"gelu"`` (exact erf form).

The modern block family (what the GPT-2 speedruns of modded-nanogpt and
nanochat train with) is more values of the same fields, each independent and
off by default, so the faithful presets stay bit for bit: ``pos_embedding``
rotary (no learned positions), ``norm`` rmsnorm, ``qk_norm``, ``activation``
relu2 (ReLU squared), ``tie_embeddings`` off, ``bias`` off, ``logit_softcap``
and ``zero_init_proj``. The ``modern-*`` presets switch them all on.

GPT-4's row of the lineage is the mixture of experts: ``ffn="moe"`` replaces
the MLP of every ``moe_every``-th block by ``n_experts`` MLPs and a router that
sends each token to ``top_k`` of them (Switch Transformer for k = 1, GShard for
k >= 2), dropless unless ``capacity_factor`` caps an expert's tokens. The
router's load-balancing loss and z-loss join the training loss with the
weights ``router_aux_coef`` and ``router_z_coef``.

GPT-3 (Table 2.1 of "Language Models are Few-Shot Learners") is internally
inconsistent in two rows, where n_heads * d_head != d_model:

- GPT-3 XL lists d_model 2048, 24 heads, d_head 128. We keep d_model 2048 and
  d_head 128, so 16 heads (2048 / 24 is not an integer, so d_model and n_heads
  cannot both be kept).
- GPT-3 13B lists d_model 5140, 40 heads, d_head 128. We keep 40 heads and
  d_head 128, so d_model 5120 (5140 is not divisible by 40).

Both choices keep the parameter count within 2% of the nominal size (the
tests check every preset). The paper does not give the local band's width; we
use 256 tokens (an eighth of the 2048 context), configurable via
``attn_window``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Mapping, TypeVar, Union

from .errors import ConfigError

__all__ = ["Config", "GPTConfig", "PRESETS", "NOMINAL_PARAMS", "ACTIVATIONS"]

ACTIVATIONS = ("gelu", "gelu_tanh", "relu2")
C = TypeVar("C", bound="Config")


class Config:
    """Base of every configuration dataclass (model, training, each stage's settings).

    One rule for building any of them from a mapping (a YAML section, a run's
    config.json, command-line flags): unknown keys and wrong types are a
    ``ConfigError`` naming the source and the field; ``validate`` checks the
    values. ``section`` names the config in files and messages ("model", "train",
    "ppo", ...). Fields are documented by a string literal under each field (the
    CLI shows it as the flag's help).
    """

    section: ClassVar[str] = "config"
    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]  # every Config is a dataclass

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # NaN and infinities pass every comparison check below unseen
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"field {f.name}={value!r} must be a finite number")
        self.validate()

    def validate(self) -> None:
        """Raise ``ConfigError`` when values contradict each other or are out of range (with ``need``)."""

    @staticmethod
    def need(cond: bool, msg: str) -> None:
        """A ``ConfigError`` saying ``msg`` unless ``cond`` holds."""
        if not cond:
            raise ConfigError(msg)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self: C, **changes: Any) -> C:
        return type(self).from_dict({**self.to_dict(), **changes})

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any], source: str | None = None) -> C:
        """Build from a mapping, naming ``source`` and the key on an unknown key, a wrong type or a bad value."""
        source = source or f"{cls.section} config"
        values = cls.typed_fields(data, source)
        try:
            return cls(**values)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    @classmethod
    def typed_fields(cls, data: Mapping[str, Any], source: str) -> dict[str, Any]:
        """``data``'s fields checked against their types (no cross-field checks: ``data`` may be partial)."""
        cls.check_keys(data, source)
        hints = field_types(cls)
        return {key: _typed(key, value, hints[key], source) for key, value in data.items()}

    @classmethod
    def check_keys(cls, data: Mapping[str, Any], source: str, extra: tuple[str, ...] = ()) -> None:
        """A ``ConfigError`` naming ``source`` for keys that are not fields (nor one of ``extra``)."""
        known = [*field_types(cls), *extra]
        unknown = sorted(set(map(str, data)) - set(known))
        if unknown:
            raise ConfigError(f"{source}: unknown {cls.section} field(s) {', '.join(unknown)}; "
                              f"known fields: {', '.join(known)}")


def field_types(cls: type) -> dict[str, Any]:
    """The resolved type of each dataclass field of ``cls``, in declaration order."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def type_name(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(hint))
    return "None" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _typed(key: str, value: Any, hint: Any, source: str) -> Any:
    """``value`` checked against the field type ``hint`` (ints widen to float; "1e-3" from YAML is a float)."""
    origin = typing.get_origin(hint)
    options = typing.get_args(hint) if origin in (Union, types.UnionType) else (hint,)
    for option in options:
        if option is type(None) and value is None:
            return None
        if typing.get_origin(option) is Literal and value in typing.get_args(option) and isinstance(value, str):
            return value
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                number = float(value)  # PyYAML reads 1e-3 (no dot) as a string
            except ValueError:
                continue
            if not math.isfinite(number):
                raise ConfigError(f"{source}: field {key}={value!r} must be a finite number")
            return number
        if option is str and isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate: from JSON/YAML escapes or undecodable argv bytes
                raise ConfigError(f"{source}: field {key}={value!r} is not valid UTF-8 text") from None
            return value
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:60] + f"... ({type(value).__name__})"
    raise ConfigError(f"{source}: field {key}={shown} should be of type {type_name(hint)}")


@dataclass
class GPTConfig(Config):
    """The shape of a GPT of any generation."""

    section: ClassVar[str] = "model"

    n_layer: int = 12
    """transformer blocks"""
    n_head: int = 12
    """attention heads per block (must divide n_embd)"""
    n_embd: int = 768
    """width of the residual stream"""
    block_size: int = 1024
    """context length (rows of the learned position table)"""
    vocab_size: int = 50257
    """rows of the token embedding"""
    norm_position: Literal["pre", "post"] = "pre"
    """where LayerNorm sits: post (GPT-1) or pre with a final LayerNorm (GPT-2/3)"""
    attention_pattern: str = "D"
    """layer kinds tiled over the blocks: D dense, L locally banded (GPT-3: DL)"""
    attn_window: int = 256
    """width of the band of an L layer, in tokens"""
    activation: Literal["gelu", "gelu_tanh", "relu2"] = "gelu_tanh"
    """MLP activation: gelu_tanh (OpenAI's GPT-1/2 code), exact gelu, or relu2 (ReLU squared)"""
    dropout: float = 0.0
    """dropout probability of embeddings, attention and residual branches"""
    bias: bool = True
    """biases in linear layers and LayerNorms"""
    tie_embeddings: bool = True
    """share the token embedding with the LM head"""
    layer_norm_eps: float = 1e-5
    """LayerNorm epsilon"""
    scale_residual_init: bool = True
    """GPT-2 init: residual output projections get std 0.02 / sqrt(2 * n_layer)"""
    pos_embedding: Literal["learned", "rotary"] = "learned"
    """positions: a learned table added to the embeddings (GPT-1/2/3) or rotary (RoPE) on queries and keys"""
    rope_base: float = 10000.0
    """rotary base: pair i of a head turns by position * rope_base^(-2i/head_dim)"""
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    """normalisation layers: LayerNorm or RMSNorm (no mean subtraction, no bias)"""
    qk_norm: bool = False
    """RMSNorm each head's queries and keys before the scores (bounds the logits of attention)"""
    logit_softcap: float = 0.0
    """cap the LM logits smoothly: c * tanh(logits / c) (0: off)"""
    zero_init_proj: bool = False
    """start every residual output projection at zero, so each block begins as the identity"""
    ffn: Literal["dense", "moe"] = "dense"
    """feed-forward: one dense MLP, or a mixture of experts (moe)"""
    n_experts: int = 8
    """MLPs in an MoE layer"""
    top_k: int = 2
    """experts each token goes to (1: Switch Transformer, 2: GShard)"""
    moe_every: int = 1
    """blocks 0-based index i with (i + 1) % moe_every == 0 are MoE (1: all, 2: every second)"""
    capacity_factor: float = 0.0
    """tokens an expert takes: capacity_factor * top_k * tokens / n_experts, the rest dropped (0: dropless)"""
    router_aux_coef: float = 0.01
    """weight of the Switch load-balancing loss in the training loss"""
    router_z_coef: float = 0.001
    """weight of the router z-loss (mean squared logsumexp of the router logits)"""
    name: str = field(default="custom", compare=False)
    """the preset or a label of this shape"""

    def validate(self) -> None:
        for key in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "attn_window", "n_experts", "top_k",
                    "moe_every"):
            value = getattr(self, key)
            self.need(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                      f"config field {key}={value!r} must be a positive integer")
        self.need(self.n_embd % self.n_head == 0,
                  f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}: "
                  f"choose n_head among the divisors of n_embd")
        self.need(self.norm_position in ("pre", "post"),
                  f"norm_position={self.norm_position!r} must be 'pre' (GPT-2/3) or 'post' (GPT-1)")
        self.need(isinstance(self.attention_pattern, str) and len(self.attention_pattern) > 0
                  and set(self.attention_pattern) <= {"D", "L"},
                  f"attention_pattern={self.attention_pattern!r} must be a string of 'D' (dense) "
                  f"and 'L' (local band), e.g. 'DL'")
        if "L" in self.attention_pattern:
            self.need(self.attn_window < self.block_size,
                      f"attn_window={self.attn_window} must be smaller than block_size={self.block_size}: "
                      f"lower attn_window (--attn-window), or use attention_pattern='D' (a band as wide as the "
                      f"context is dense attention)")
        self.need(self.activation in ACTIVATIONS,
                  f"activation={self.activation!r} must be one of {', '.join(ACTIVATIONS)}")
        self.need(isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0,
                  f"dropout={self.dropout!r} must be in [0, 1)")
        self.need(0 < self.layer_norm_eps < 1, f"layer_norm_eps={self.layer_norm_eps!r} must be in (0, 1)")
        self.need(self.pos_embedding in ("learned", "rotary"),
                  f"pos_embedding={self.pos_embedding!r} must be 'learned' or 'rotary'")
        self.need(self.pos_embedding != "rotary" or self.head_dim % 2 == 0,
                  f"rotary positions turn pairs of channels: head_dim={self.head_dim} (n_embd / n_head) must be even")
        self.need(self.rope_base > 1, f"rope_base={self.rope_base!r} must be > 1")
        self.need(self.norm in ("layernorm", "rmsnorm"), f"norm={self.norm!r} must be 'layernorm' or 'rmsnorm'")
        self.need(self.logit_softcap >= 0, f"logit_softcap={self.logit_softcap!r} must be >= 0 (0: off)")
        self.need(self.ffn in ("dense", "moe"), f"ffn={self.ffn!r} must be 'dense' or 'moe'")
        self.need(self.top_k <= self.n_experts,
                  f"top_k={self.top_k} exceeds n_experts={self.n_experts}: lower --top-k or raise --n-experts")
        self.need(self.ffn == "dense" or self.moe_every <= self.n_layer,
                  f"moe_every={self.moe_every} leaves no MoE block among n_layer={self.n_layer}")
        self.need(self.capacity_factor >= 0, f"capacity_factor={self.capacity_factor!r} must be >= 0 (0: dropless)")
        self.need(self.router_aux_coef >= 0 and self.router_z_coef >= 0,
                  f"router_aux_coef={self.router_aux_coef!r} and router_z_coef={self.router_z_coef!r} must be >= 0")

    # ------------------------------------------------------------ derived
    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def is_moe(self, layer: int) -> bool:
        """Whether block ``layer`` has a mixture of experts as its feed-forward."""
        return self.ffn == "moe" and (layer + 1) % self.moe_every == 0

    def is_local(self, layer: int) -> bool:
        """Whether layer ``layer`` uses the locally banded attention."""
        pattern = self.attention_pattern
        return pattern[layer % len(pattern)] == "L"

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "GPTConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; run `gptlab presets` to list them "
                              f"({', '.join(PRESETS)})")
        return cls.from_dict({**PRESETS[name], "name": name, **overrides}, source=f"preset {name}")


def _gpt1(**kw: Any) -> dict[str, Any]:
    base = dict(norm_position="post", block_size=512, vocab_size=40478,
                scale_residual_init=False)
    return {**base, **kw}


def _gpt2(n_layer: int, n_embd: int, n_head: int) -> dict[str, Any]:
    return dict(n_layer=n_layer, n_embd=n_embd, n_head=n_head, block_size=1024, vocab_size=50257)


def _gpt3(n_layer: int, n_embd: int, n_head: int) -> dict[str, Any]:
    return dict(n_layer=n_layer, n_embd=n_embd, n_head=n_head, block_size=2048, vocab_size=50257,
                attention_pattern="DL", attn_window=256)


# The modern block family: every option of the speedruns that transfers, on GPT-2's layout.
MODERN: dict[str, Any] = dict(pos_embedding="rotary", norm="rmsnorm", qk_norm=True, activation="relu2",
                              tie_embeddings=False, bias=False, logit_softcap=15.0, zero_init_proj=True,
                              scale_residual_init=False)

PRESETS: dict[str, dict[str, Any]] = {
    "gpt1": _gpt1(n_layer=12, n_embd=768, n_head=12),
    "gpt2": _gpt2(12, 768, 12),
    "gpt2-medium": _gpt2(24, 1024, 16),
    "gpt2-large": _gpt2(36, 1280, 20),
    "gpt2-xl": _gpt2(48, 1600, 25),
    # Table 2.1 of the GPT-3 paper (see the module docstring for XL and 13B).
    "gpt3-small": _gpt3(12, 768, 12),
    "gpt3-medium": _gpt3(24, 1024, 16),
    "gpt3-large": _gpt3(24, 1536, 16),
    "gpt3-xl": _gpt3(24, 2048, 16),
    "gpt3-2.7b": _gpt3(32, 2560, 32),
    "gpt3-6.7b": _gpt3(32, 4096, 32),
    "gpt3-13b": _gpt3(40, 5120, 40),
    "gpt3-175b": _gpt3(96, 12288, 96),
    # Small CPU presets for tests, demos and laptops.
    "tiny": dict(n_layer=4, n_embd=128, n_head=4, block_size=256, vocab_size=2048),
    "tiny-gpt1": _gpt1(n_layer=4, n_embd=128, n_head=4, block_size=256, vocab_size=2048),
    "tiny-gpt3": dict(n_layer=4, n_embd=128, n_head=4, block_size=256, vocab_size=2048,
                      attention_pattern="DL", attn_window=32),
    "small": dict(n_layer=6, n_embd=384, n_head=6, block_size=256, vocab_size=8192),
    "modern-tiny": dict(n_layer=4, n_embd=128, n_head=4, block_size=256, vocab_size=2048, **MODERN),
    "modern-small": dict(n_layer=6, n_embd=384, n_head=6, block_size=256, vocab_size=8192, **MODERN),
    "modern-gpt2": dict(_gpt2(12, 768, 12), **MODERN),
    "modern-gpt2-medium": dict(_gpt2(24, 1024, 16), **MODERN),
    # GPT-4's row: a mixture of experts (8 experts, 2 per token) on the tiny and modern-tiny shapes.
    "tiny-moe": dict(n_layer=4, n_embd=128, n_head=4, block_size=256, vocab_size=2048, ffn="moe",
                     n_experts=8, top_k=2),
    "modern-tiny-moe": dict(n_layer=4, n_embd=128, n_head=4, block_size=256, vocab_size=2048, **MODERN,
                            ffn="moe", n_experts=8, top_k=2),
}

# Nominal sizes the presets must match within 2%.
NOMINAL_PARAMS: dict[str, int] = {
    "gpt3-small": 125_000_000, "gpt3-medium": 350_000_000, "gpt3-large": 760_000_000,
    "gpt3-xl": 1_300_000_000, "gpt3-2.7b": 2_700_000_000, "gpt3-6.7b": 6_700_000_000,
    "gpt3-13b": 13_000_000_000, "gpt3-175b": 175_000_000_000,
}
