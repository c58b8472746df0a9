"""Hugging Face import and export: transformers ``GPT2LMHeadModel`` ("gpt2") and ``OpenAIGPTLMHeadModel`` ("openai-gpt").

transformers is not needed in either direction: configs are plain JSON and
weights safetensors (a directory with only ``pytorch_model.bin`` is read with
``torch.load(weights_only=True)``; nothing is ever unpickled otherwise).
gptlab's parameter names follow GPT-2's, so conversion is a transpose of the
Conv1D weights, not a renaming table per architecture.

    model, tokenizer = import_hf("path/to/hf-gpt2")   # or runs.load_run("hf:path/to/hf-gpt2")
    export_hf(model, "exported/", tokenizer)          # GPT2LMHeadModel.from_pretrained("exported/")
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file

from .atomic import PathLike, atomic_write_json, atomic_write_text, sha256_file
from .config import GPTConfig
from .errors import CheckpointError, TokenizerError, UserError
from .jsonsafe import parse_json
from .model import GPT, rebuilt
from .tokenizer import EOS, BPETokenizer, TiktokenTokenizer, Tokenizer, is_gpt1, load_tokenizer, save_gpt2_pair
from .weights import FIX_WEIGHTS, atomic_save_safetensors, build_model, unwrap

__all__ = ["hf_dir_from_spec", "import_hf", "export_hf", "HFHead", "read_json_file", "hf_weights_sha256"]

HF_CONFIG = "config.json"


def hf_dir_from_spec(spec: PathLike) -> Path | None:
    """The directory of an ``"hf:DIR"`` spec, or of a plain path to a transformers directory; else None."""
    s = os.fspath(spec)
    if s.startswith("hf:"):
        return Path(s[3:]).expanduser()
    path = Path(s).expanduser()
    cfg = path / HF_CONFIG
    if cfg.is_file():
        try:
            data = json.loads(cfg.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError, OSError):
            return None
        if isinstance(data, dict) and "model_type" in data and "model" not in data:
            return path
    return None


def read_json_file(path: Path, what: str) -> Any:
    try:
        return parse_json(path.read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; {what}") from None
    except ValueError as e:  # BadJSON, bad UTF-8 included
        raise CheckpointError(f"{path}: {str(e)[:120]}; the file is corrupted: {FIX_WEIGHTS}") from None


# HF's Conv1D stores (in, out), the transpose of nn.Linear's (out, in).
_CONV1D = re.compile(r"^h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
# Causal-mask buffers older transformers versions saved; not weights.
_HF_IGNORE = re.compile(r"^(h\.\d+\.attn\.(bias|masked_bias)|position_ids)$")
_GPT2_ACT: dict[str, Literal["gelu", "gelu_tanh"]] = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                                                      "gelu": "gelu"}
_SUPPORTED = ("gpt2", "openai-gpt")


def _hf_int(hf: dict[str, Any], where: str, *keys: str) -> int:
    for key in keys:
        value = hf.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    raise CheckpointError(f"{where}: missing integer field {' / '.join(keys)}; not a complete "
                          f"transformers config")


def _hf_float(hf: dict[str, Any], where: str, key: str, default: float) -> float:
    value = hf.get(key, default)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise CheckpointError(f"{where}: field {key}={value!r} should be a number")
    return float(value)


def _config_from_hf(hf: dict[str, Any], where: str) -> GPTConfig:
    """Map a transformers gpt2 / openai-gpt config.json onto GPTConfig."""
    model_type = hf.get("model_type")
    if model_type not in _SUPPORTED:
        raise UserError(f"{where}: model_type {model_type!r} is not supported; gptlab imports only "
                        f"gpt2 (GPT2LMHeadModel) and openai-gpt (OpenAIGPTLMHeadModel) directories")
    n_embd = _hf_int(hf, where, "n_embd")
    common: dict[str, Any] = dict(
        n_layer=_hf_int(hf, where, "n_layer"), n_head=_hf_int(hf, where, "n_head"), n_embd=n_embd,
        block_size=_hf_int(hf, where, "n_positions", "n_ctx"), vocab_size=_hf_int(hf, where, "vocab_size"),
        layer_norm_eps=_hf_float(hf, where, "layer_norm_epsilon", 1e-5),
        dropout=_hf_float(hf, where, "resid_pdrop", 0.1), bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )
    if model_type == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in _GPT2_ACT:
            raise UserError(f"{where}: activation_function {act!r} is not supported; gptlab has "
                            f"{', '.join(_GPT2_ACT)}")
        if hf.get("n_inner") not in (None, 4 * n_embd):
            raise UserError(f"{where}: n_inner={hf['n_inner']} is not supported; gptlab's MLP is "
                            f"4 * n_embd = {4 * n_embd} wide")
        for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                        ("add_cross_attention", False)):
            if bool(hf.get(key, ok)) != ok:
                raise UserError(f"{where}: {key}={hf[key]} is not supported by gptlab's attention")
        return GPTConfig(**common, norm_position="pre", activation=_GPT2_ACT[act],
                         scale_residual_init=True, name="hf:gpt2")
    afn = hf.get("afn", "gelu")
    if afn != "gelu":  # transformers' openai-gpt "gelu" is the tanh approximation (gelu_new)
        raise UserError(f"{where}: afn {afn!r} is not supported; gptlab imports openai-gpt with afn 'gelu'")
    return GPTConfig(**common, norm_position="post", activation="gelu_tanh",
                     scale_residual_init=False, name="hf:openai-gpt")


def _weight_files(hf_dir: Path) -> tuple[list[Path], str]:
    """The weight files of an HF directory and their kind: model.safetensors (or its shards), else
    pytorch_model.bin (or shards)."""
    def shards(index_name: str) -> list[Path]:
        index = read_json_file(hf_dir / index_name, "")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{hf_dir / index_name}: has no weight_map; re-save the model")
        return [hf_dir / f for f in sorted(set(weight_map.values()))]

    if (hf_dir / "model.safetensors").is_file():
        files, kind = [hf_dir / "model.safetensors"], "safetensors"
    elif (hf_dir / "model.safetensors.index.json").is_file():
        files, kind = shards("model.safetensors.index.json"), "safetensors"
    elif (hf_dir / "pytorch_model.bin").is_file():
        files, kind = [hf_dir / "pytorch_model.bin"], "bin"
    elif (hf_dir / "pytorch_model.bin.index.json").is_file():
        files, kind = shards("pytorch_model.bin.index.json"), "bin"
    else:
        raise CheckpointError(f"{hf_dir}: no model.safetensors or pytorch_model.bin; save the model "
                              f"with save_pretrained() into this directory")
    return files, kind


def hf_weights_sha256(hf_dir: PathLike) -> str:
    """The sha256 of an HF directory's weights: of its one weight file, or of its shards' digests in order."""
    files, _ = _weight_files(Path(hf_dir))
    if len(files) == 1:
        return sha256_file(files[0])
    return hashlib.sha256("".join(sha256_file(f) for f in files).encode("ascii")).hexdigest()


def _read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF directory (``_weight_files``)."""
    files, kind = _weight_files(hf_dir)
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f}: weight shard missing; copy the whole model directory")
        if kind == "safetensors":
            try:
                part = load_file(str(f))
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"{f}: unreadable safetensors file ({str(e).splitlines()[0][:100]}); "
                                      f"re-download or re-save the model") from None
        else:
            try:  # weights_only: tensors and plain containers only, never arbitrary objects
                part = torch.load(f, map_location="cpu", weights_only=True)
            except Exception as e:  # UnpicklingError, RuntimeError (truncated zip), EOFError
                raise CheckpointError(f"{f}: not a loadable weights-only state dict "
                                      f"({str(e).splitlines()[0][:100]}); re-save it with "
                                      f"save_pretrained(safe_serialization=True)") from None
            if not isinstance(part, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                     for k, v in part.items()):
                raise CheckpointError(f"{f}: not a state dict of tensors; re-save it with save_pretrained()")
        tensors.update(part)
    return tensors


def _weights_from_hf(tensors: dict[str, torch.Tensor], config: GPTConfig, model_type: str) -> dict[str, torch.Tensor]:
    """Rename HF keys to ours and transpose Conv1D weights; drops mask buffers and a tied lm_head."""
    rename = {"tokens_embed.weight": "wte.weight", "positions_embed.weight": "wpe.weight"} \
        if model_type == "openai-gpt" else {}
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        name = key[len("transformer."):] if key.startswith("transformer.") else key
        name = rename.get(name, name)
        if _HF_IGNORE.match(name):
            continue
        if name == "lm_head.weight" and config.tie_embeddings:
            continue
        if _CONV1D.match(name):
            value = value.t()
        out[name] = value.contiguous()
    return out


def import_hf(hf_dir: PathLike, dtype: torch.dtype | None = torch.float32,
              with_tokenizer: bool = True) -> tuple[GPT, Tokenizer | None]:
    """(model, tokenizer or None) from a transformers GPT-2 or OpenAI-GPT directory (``DIR`` or ``hf:DIR``).

    ``dtype`` converts the weights (default float32; None keeps the stored
    dtype). The tokenizer comes from the directory's tokenizer.json or
    vocab.json+merges.txt when gptlab can use it (a warning says when not).
    """
    spec = os.fspath(hf_dir)
    hf_dir = Path(spec[3:] if spec.startswith("hf:") else spec).expanduser()
    if not hf_dir.is_dir():
        raise CheckpointError(f"{hf_dir}: no such directory; pass a directory written by "
                              f"transformers' save_pretrained()")
    where = str(hf_dir / HF_CONFIG)
    hf = read_json_file(hf_dir / HF_CONFIG, "not a transformers model directory")
    if not isinstance(hf, dict):
        raise CheckpointError(f"{where}: expected a JSON object")
    config = _config_from_hf(hf, where)
    tensors = _weights_from_hf(_read_hf_weights(hf_dir), config, hf["model_type"])
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    model = build_model(config, tensors, str(hf_dir))
    tokenizer = None
    if with_tokenizer and any((hf_dir / f).is_file() for f in ("tokenizer.json", "vocab.json", "encoder.json")):
        try:
            tokenizer = load_tokenizer(hf_dir)
        except TokenizerError as e:  # a vocabulary gptlab cannot read: keep the model, say why
            warnings.warn(f"{hf_dir}: tokenizer not usable by gptlab ({e}); imported the model "
                          f"without a tokenizer", stacklevel=2)
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        model = _grown(model, tokenizer.vocab_size)
    return model, tokenizer


@torch.no_grad()
def _grown(model: GPT, vocab_size: int) -> GPT:
    """``model`` with zero embedding rows for the ids its tokenizer adds (GPT-1's ``<|endoftext|>``): zero,
    not random, so that every import of a directory is the same model."""
    old = model.config.vocab_size
    grown = rebuilt(model, vocab_size=vocab_size).eval()
    grown.wte.weight[old:] = 0
    if not grown.config.tie_embeddings:
        grown.lm_head.weight[old:] = 0
    return grown


def _hf_tensors(model: GPT, model_type: str) -> dict[str, torch.Tensor]:
    """Our weights under HF names and layout; a model without biases gets explicit zero biases."""
    cfg = model.config
    emb = ("tokens_embed", "positions_embed") if model_type == "openai-gpt" else ("wte", "wpe")
    state = {k: v.detach() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {
        f"transformer.{emb[0]}.weight": state["wte.weight"],
        f"transformer.{emb[1]}.weight": state["wpe.weight"],
    }
    norms = [f"h.{i}.{n}" for i in range(cfg.n_layer) for n in ("ln_1", "ln_2")]
    if model.ln_f is not None:
        norms.append("ln_f")
    linears = [f"h.{i}.{n}" for i in range(cfg.n_layer)
               for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    for name in norms:
        w = state[f"{name}.weight"]
        out[f"transformer.{name}.weight"] = w
        out[f"transformer.{name}.bias"] = state.get(f"{name}.bias", torch.zeros_like(w))
    for name in linears:
        w = state[f"{name}.weight"]  # (out, in)
        out[f"transformer.{name}.weight"] = w.t().contiguous()  # Conv1D: (in, out)
        out[f"transformer.{name}.bias"] = state.get(f"{name}.bias", w.new_zeros(w.shape[0]))
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    return out


def _export_tokenizer(tokenizer: Tokenizer, out_dir: Path, block_size: int) -> list[str]:
    """Write transformers-readable tokenizer files when the tokenizer can produce them; returns their names."""
    eos: str | None = EOS if EOS in tokenizer.special_tokens else None
    written: list[str] = []
    if isinstance(tokenizer, BPETokenizer) and is_gpt1(tokenizer):  # OpenAIGPTTokenizer reads tokenizer.json
        atomic_write_text(out_dir / "tokenizer.json", tokenizer.hf_tokenizer.to_str())
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            for name in tokenizer.hf_tokenizer.model.save(tmp):  # vocab.json + merges.txt, for older readers
                os.replace(name, out_dir / Path(name).name)
        atomic_write_json(out_dir / "tokenizer_config.json", {
            "tokenizer_class": "OpenAIGPTTokenizer", "model_max_length": block_size, "unk_token": "<unk>",
            "eos_token": tokenizer.eos_token})
        return ["tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json"]
    if isinstance(tokenizer, BPETokenizer) and tokenizer.byte_level:
        atomic_write_text(out_dir / "tokenizer.json", tokenizer.hf_tokenizer.to_str())
        eos = tokenizer.eos_token
        written.append("tokenizer.json")
    elif isinstance(tokenizer, TiktokenTokenizer):
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            enc, bpe = save_gpt2_pair(tokenizer.ranks, tmp, tokenizer.special_tokens)
            os.replace(enc, out_dir / "vocab.json")
            os.replace(bpe, out_dir / "merges.txt")
        written += ["vocab.json", "merges.txt"]
    else:
        return []
    tok_config: dict[str, Any] = {"model_max_length": block_size, "add_prefix_space": False}
    if eos is not None:
        tok_config.update(bos_token=eos, eos_token=eos, unk_token=eos)
    if "tokenizer.json" not in written:
        tok_config["tokenizer_class"] = "GPT2Tokenizer"
    atomic_write_json(out_dir / "tokenizer_config.json", tok_config)
    return written + ["tokenizer_config.json"]


@dataclass(frozen=True)
class HFHead:
    """A stage's linear head on the final hidden states, to export with the transformers class that applies it.

    ``kind`` "sequence": ``*ForSequenceClassification``, the head at each row's last token that is not
    ``pad_id`` (transformers' pooling). Its ``score`` layer has no bias, so the head's bias (times
    ``bias_share``) is folded into the last LayerNorm's bias through the pseudo-inverse of the head's weight:
    W(β + W⁺b) = Wβ + b exactly for a weight of full row rank; that LayerNorm's output feeds only the head
    there. ``bias_share`` 0.5 serves GPT-1's similarity head, which adds the two orders' hidden states: the
    two orders' logits then add up to it. ``kind`` "choice": ``*DoubleHeadsModel``, the head (with its bias)
    at ``mc_token_ids`` of each choice.
    """

    linear: nn.Linear
    kind: Literal["sequence", "choice"]
    pad_id: int | None = None
    labels: tuple[str, ...] | None = None
    regression: bool = False
    bias_share: float = 1.0


_HEAD_ARCH = {("gpt2", None): "GPT2LMHeadModel", ("openai-gpt", None): "OpenAIGPTLMHeadModel",
              ("gpt2", "sequence"): "GPT2ForSequenceClassification",
              ("openai-gpt", "sequence"): "OpenAIGPTForSequenceClassification",
              ("gpt2", "choice"): "GPT2DoubleHeadsModel", ("openai-gpt", "choice"): "OpenAIGPTDoubleHeadsModel"}


@torch.no_grad()
def _with_head(tensors: dict[str, torch.Tensor], model: GPT, head: HFHead) -> dict[str, Any]:
    """Add ``head``'s tensors to the exported ``tensors``; returns its config.json fields."""
    weight, bias = head.linear.weight.detach().cpu(), head.linear.bias
    b = bias.detach().cpu() if bias is not None else torch.zeros(weight.shape[0])
    if head.kind == "choice":
        tensors["multiple_choice_head.summary.weight"], tensors["multiple_choice_head.summary.bias"] = weight, b
        return {"num_labels": 1, "summary_type": "cls_index", "summary_use_proj": True, "summary_activation": None,
                "summary_proj_to_labels": True, "summary_first_dropout": 0.0}
    tensors.pop("lm_head.weight", None)
    tensors["score.weight"] = weight
    norm = "ln_f" if model.ln_f is not None else f"h.{model.config.n_layer - 1}.ln_2"
    key = f"transformer.{norm}.bias"
    target = b.double() * head.bias_share
    delta = torch.linalg.pinv(weight.double()) @ target
    if not torch.allclose(weight.double() @ delta, target, atol=1e-6, rtol=1e-6):
        raise UserError(f"cannot export the head: its weight has rank below its {weight.shape[0]} outputs, so "
                        f"transformers' bias-free score layer cannot reproduce its bias")
    tensors[key] = (tensors[key].double() + delta).to(tensors[key].dtype)
    labels = list(head.labels) if head.labels else [f"LABEL_{i}" for i in range(weight.shape[0])]
    return {"num_labels": weight.shape[0], "id2label": dict(enumerate(labels)),
            "label2id": {name: i for i, name in enumerate(labels)}, "pad_token_id": head.pad_id,
            "problem_type": "regression" if head.regression else "single_label_classification"}


def export_hf(model: nn.Module, out_dir: PathLike, tokenizer: Tokenizer | None = None,
              head: HFHead | None = None) -> Path:
    """Write a transformers directory that ``from_pretrained`` loads: GPT-2 for pre-LN models, OpenAI-GPT for post-LN.

    With ``tokenizer``, its files go along when transformers can read them; with ``head``, the class
    that applies it (``HFHead``) instead of the LM head model.
    Banded-attention (GPT-3 style) models and the modern block family (rotary, RMSNorm,
    QK-norm, ReLU², soft-capped logits, MoE) have no transformers equivalent here and
    raise UserError, as does a post-LN model with exact GELU (transformers'
    openai-gpt only computes the tanh approximation). Untied heads export. Models without biases are
    written with zero biases. Returns ``out_dir``.
    """
    model = unwrap(model)
    cfg = model.config
    if any(cfg.is_local(i) for i in range(cfg.n_layer)):
        raise UserError(f"cannot export attention_pattern={cfg.attention_pattern!r}: transformers has no "
                        f"GPT-2 with locally banded attention layers (only dense models export)")
    modern = {"pos_embedding": "rotary", "norm": "rmsnorm", "qk_norm": True, "activation": "relu2", "ffn": "moe"}
    unmatched = [f"{k}={getattr(cfg, k)!r}" for k, v in modern.items() if getattr(cfg, k) == v]
    unmatched += [f"logit_softcap={cfg.logit_softcap}"] if cfg.logit_softcap else []
    if unmatched:
        raise UserError(f"cannot export a model with {', '.join(unmatched)}: transformers' GPT-2 and OpenAI-GPT "
                        f"have learned positions, LayerNorm, GELU, plain logits and a dense MLP, so no class of "
                        f"theirs computes this model; keep it as a gptlab run directory")
    if cfg.norm_position == "pre":
        model_type = "gpt2"
        hf: dict[str, Any] = {
            "activation_function": "gelu_new" if cfg.activation == "gelu_tanh" else "gelu",
            "n_inner": None, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False, "add_cross_attention": False, "n_ctx": cfg.block_size,
        }
    else:
        if cfg.activation != "gelu_tanh":
            raise UserError(f"cannot export a post-LN model with activation={cfg.activation!r}: "
                            f"transformers' openai-gpt computes GELU with the tanh approximation, so its "
                            f"outputs would differ; train with activation='gelu_tanh' to export")
        model_type = "openai-gpt"
        hf = {"afn": "gelu"}
    tensors = _hf_tensors(model, model_type)
    if head is not None:
        hf.update(_with_head(tensors, model, head))
    eos_id = tokenizer.eos_id if tokenizer is not None else None
    dtype = str(model.wte.weight.dtype).removeprefix("torch.")
    hf = {
        "architectures": [_HEAD_ARCH[model_type, head.kind if head is not None else None]], "model_type": model_type,
        "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd,
        "n_positions": cfg.block_size, "vocab_size": cfg.vocab_size,
        "layer_norm_epsilon": cfg.layer_norm_eps,
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
        "initializer_range": 0.02, "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": None, "dtype": dtype, **hf,
    }
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(tensors, out / "model.safetensors")
    if tokenizer is not None:
        _export_tokenizer(tokenizer, out, cfg.block_size)
    atomic_write_json(out / HF_CONFIG, hf)
    return out


