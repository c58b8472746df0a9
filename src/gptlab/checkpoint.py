"""Saving and loading models: atomic writes, run directories, Hugging Face import/export.

What it holds:

- **Atomic writes** (``atomic_write_bytes/_text/_json``, ``atomic_save_safetensors``):
  write a temporary file in the target's directory, flush + fsync, then
  ``os.replace`` it over the target. A crash or an exception mid-write leaves
  the previous file untouched. The trainer reuses these for its checkpoints.
- **Run directories**, the unit users pass around::

      run/config.json        {"format_version": 1, "model": GPTConfig.to_dict(),
                              "tokenizer": "tokenizer" | null, "stage": "pretrain",
                              "weights": {"file", "sha256", "bytes"}, ...extra}
      run/model.safetensors  weights; a tied lm_head is stored once (as wte)
      run/tokenizer/         Tokenizer.save()

  ``config.json`` is written last, so a directory with a config always has the
  weights it describes; their sha256 is checked on every load.
- **Hugging Face import/export** for ``GPT2LMHeadModel`` (``model_type`` "gpt2")
  and ``OpenAIGPTLMHeadModel`` ("openai-gpt") directories. transformers is not
  needed for either direction: configs are plain JSON and weights safetensors
  (an HF directory with only ``pytorch_model.bin`` is read with
  ``torch.load(weights_only=True)``; nothing is ever unpickled otherwise).

How to run it::

    from gptlab.checkpoint import save_model, load_run, import_hf, export_hf
    model, tok = import_hf("path/to/hf-gpt2")      # or load_run("hf:path/to/hf-gpt2")
    save_model("runs/gpt2", model, tok)
    model, tok, cfg = load_run("runs/gpt2")
    export_hf("runs/gpt2", "exported/")            # GPT2LMHeadModel.from_pretrained("exported/")

    gptlab convert --from-hf DIR --out RUN_DIR
    gptlab convert --to-hf RUN_DIR --out DIR
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from .atomic import PathLike, atomic_write, atomic_write_bytes, atomic_write_json, atomic_write_text, sha256_file
from .config import GPTConfig
from .errors import CheckpointError, TokenizerError, UserError
from .model import GPT

__all__ = [
    "FORMAT_VERSION", "CONFIG_FILE", "WEIGHTS_FILE", "TOKENIZER_DIR",
    "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_save_safetensors",
    "sha256_file", "model_tensors", "save_model", "load_model", "load_run", "read_run_config",
    "import_hf", "export_hf", "hf_dir_from_spec", "prepare_out_dir",
]

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
# Keys of a run's config.json that save_model owns; ``extra`` may not override them.
_RESERVED = ("format_version", "model", "tokenizer", "stage", "weights")
_FIX_WEIGHTS = "re-run the conversion/training, or resume from an earlier checkpoint"

def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: PathLike,
                            metadata: dict[str, str] | None = None) -> str:
    """Atomically write ``tensors`` as a safetensors file; returns the file's sha256 (hex).

    Tensors are detached, moved to CPU and made contiguous. They must not share
    memory (safetensors refuses aliases): drop tied copies first, as
    ``model_tensors`` does. ``metadata`` (str -> str) defaults to
    ``{"format": "pt"}``, which transformers expects.
    """
    from safetensors.torch import save_file

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


# ============================================================== run directories
def _unwrap(model: torch.nn.Module) -> GPT:
    """The GPT inside a torch.compile / DDP / FSDP wrapper, so saved keys never carry their prefixes."""
    seen = 0
    while not isinstance(model, GPT) and seen < 4:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None:
            break
        model, seen = inner, seen + 1
    if not isinstance(model, GPT):
        raise TypeError(f"expected a gptlab GPT model, got {type(model).__name__}")
    return model


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict ready for safetensors: detached, and a tied ``lm_head.weight`` dropped.

    ``load_model`` re-ties it; the trainer can use this for its checkpoints too.
    """
    gpt = _unwrap(model)
    state = {k: v.detach() for k, v in gpt.state_dict().items()}
    if gpt.config.tie_embeddings or gpt.lm_head.weight is gpt.wte.weight:
        state.pop("lm_head.weight", None)
    return state


def _build_model(config: GPTConfig, tensors: dict[str, torch.Tensor], source: str,
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
                              f"the weights do not belong to it: {_FIX_WEIGHTS}")
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor(s) {listing(unexpected)} for this config; "
                              f"the weights do not belong to it: {_FIX_WEIGHTS}")
    wrong = [f"{k} {tuple(tensors[k].shape)} (config wants {tuple(v.shape)})"
             for k, v in expected.items() if tuple(tensors[k].shape) != tuple(v.shape)]
    if wrong:
        raise CheckpointError(f"{source}: wrong shape for {listing(wrong)}; the weights do not match "
                              f"the model config: {_FIX_WEIGHTS}")
    state = dict(tensors)
    if config.tie_embeddings:
        state["lm_head.weight"] = state["wte.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.wte.weight  # assign=True replaced the shared Parameter; re-tie
    return model.to(device).eval()


def save_model(run_dir: PathLike, model: torch.nn.Module, tokenizer: Any = None, stage: str = "pretrain",
               extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (and ``tokenizer``) as a run directory; returns its Path.

    Order: tokenizer/, model.safetensors, then config.json (with the weights'
    sha256) last, each file replaced atomically. ``extra`` adds JSON-serialisable
    top-level keys to config.json (not the reserved ones: format_version, model,
    tokenizer, stage, weights).
    """
    gpt = _unwrap(model)
    run_dir = Path(run_dir)
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(_RESERVED))
    if clash:
        raise ValueError(f"save_model: extra may not set reserved key(s) {', '.join(clash)}")
    if run_dir.exists() and not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: exists and is not a directory; choose another output path")
    run_dir.mkdir(parents=True, exist_ok=True)
    tok_rel = None
    if tokenizer is not None:
        if tokenizer.vocab_size > gpt.config.vocab_size:
            raise CheckpointError(f"{run_dir}: tokenizer has {tokenizer.vocab_size} ids but the model's "
                                  f"vocab_size is {gpt.config.vocab_size}; build the model with "
                                  f"vocab_size >= the tokenizer's")
        tokenizer.save(run_dir / TOKENIZER_DIR)
        tok_rel = TOKENIZER_DIR
    weights = run_dir / WEIGHTS_FILE
    digest = atomic_save_safetensors(model_tensors(gpt), weights,
                                     metadata={"gptlab_format_version": str(FORMAT_VERSION)})
    config = {
        "format_version": FORMAT_VERSION,
        "model": gpt.config.to_dict(),
        "tokenizer": tok_rel,
        "stage": stage,
        "weights": {"file": WEIGHTS_FILE, "sha256": digest, "bytes": weights.stat().st_size},
        **extra,
    }
    atomic_write_json(run_dir / CONFIG_FILE, config)
    return run_dir


def hf_dir_from_spec(spec: PathLike) -> Path | None:
    """The directory of an ``"hf:DIR"`` spec, or of a plain path to a transformers directory; else None."""
    s = os.fspath(spec)
    if s.startswith("hf:"):
        return Path(s[3:]).expanduser()
    path = Path(s).expanduser()
    cfg = path / CONFIG_FILE
    if cfg.is_file():
        try:
            data = json.loads(cfg.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError, OSError):
            return None
        if isinstance(data, dict) and "model_type" in data and "model" not in data:
            return path
    return None


def _read_json_file(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; {what}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({str(e)[:80]}); the file is corrupted: "
                              f"{_FIX_WEIGHTS}") from None


def read_run_config(run_dir: PathLike) -> dict[str, Any]:
    """Parse and check a run directory's config.json (format version, model fields); returns the dict."""
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no such run directory; pass a directory written by "
                              f"gptlab train/convert, or hf:DIR for a Hugging Face directory")
    path = run_dir / CONFIG_FILE
    config = _read_json_file(path, "not a gptlab run directory (train or convert a model into it)")
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise CheckpointError(f"{path}: has no 'model' section; not a gptlab run config "
                              f"(for a Hugging Face directory pass hf:{run_dir})")
    version = config.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{path}: missing or invalid format_version; not a gptlab run config")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {version} was written by a newer gptlab "
                              f"(this one reads {FORMAT_VERSION}); upgrade gptlab")
    GPTConfig.from_dict(config["model"], source=str(path))  # unknown/mistyped fields -> ConfigError
    return config


def _load_run_weights(run_dir: Path, config: dict[str, Any], device: str | torch.device) -> GPT:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    model_cfg = GPTConfig.from_dict(config["model"], source=str(run_dir / CONFIG_FILE))
    info = config.get("weights") if isinstance(config.get("weights"), dict) else {}
    name = info.get("file", WEIGHTS_FILE)
    if not isinstance(name, str) or Path(name).name != name:
        raise CheckpointError(f"{run_dir / CONFIG_FILE}: weights.file must be a file name inside the run "
                              f"directory, got {name!r}")
    path = run_dir / name
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; the run directory is incomplete: {_FIX_WEIGHTS}")
    size = info.get("bytes")
    if isinstance(size, int) and path.stat().st_size != size:
        raise CheckpointError(f"{path}: is {path.stat().st_size} bytes, config.json says {size} "
                              f"(truncated or replaced): {_FIX_WEIGHTS}")
    digest = info.get("sha256")
    if isinstance(digest, str) and sha256_file(path) != digest:
        raise CheckpointError(f"{path}: sha256 does not match config.json (corrupted or modified "
                              f"after saving): {_FIX_WEIGHTS}")
    try:
        tensors = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors file ({str(e).splitlines()[0][:100]}): "
                              f"{_FIX_WEIGHTS}") from None
    return _build_model(model_cfg, tensors, str(path), device)


def load_model(spec: PathLike, device: str | torch.device = "cpu") -> GPT:
    """Load a model from a run directory or ``"hf:DIR"`` (eval mode, weights' stored dtype)."""
    hf_dir = hf_dir_from_spec(spec)
    if hf_dir is not None:
        model, _ = _import_hf(hf_dir, with_tokenizer=False)
        return model.to(device)
    run_dir = Path(spec).expanduser()
    return _load_run_weights(run_dir, read_run_config(run_dir), device)


def load_run(spec: PathLike, device: str | torch.device = "cpu") -> tuple[GPT, Any, dict[str, Any]]:
    """(model, tokenizer or None, config dict) from a run directory or ``"hf:DIR"``.

    For an HF directory the config dict is synthesised in the run-config layout
    (``format_version``, ``model``, ``tokenizer`` None, ``stage``, ``source``).
    """
    hf_dir = hf_dir_from_spec(spec)
    if hf_dir is not None:
        model, tokenizer = _import_hf(hf_dir, with_tokenizer=True)
        config = {"format_version": FORMAT_VERSION, "model": model.config.to_dict(), "tokenizer": None,
                  "stage": "pretrain", "source": f"hf:{hf_dir}"}
        return model.to(device), tokenizer, config
    run_dir = Path(spec).expanduser()
    config = read_run_config(run_dir)
    tokenizer = None
    rel = config.get("tokenizer")
    if rel is not None:
        if not isinstance(rel, str):
            raise CheckpointError(f"{run_dir / CONFIG_FILE}: 'tokenizer' must be a directory name or null")
        tok_dir = run_dir / rel
        if not tok_dir.is_dir():
            raise CheckpointError(f"{tok_dir}: tokenizer directory named by config.json is missing; "
                                  f"copy the whole run directory")
        from .tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tok_dir)
    model = _load_run_weights(run_dir, config, device)
    if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
        raise CheckpointError(f"{run_dir}: tokenizer has {tokenizer.vocab_size} ids but the model's "
                              f"vocab_size is {model.config.vocab_size}; the tokenizer does not belong "
                              f"to this model")
    return model, tokenizer, config


# ============================================================== Hugging Face
# HF's Conv1D stores (in, out), the transpose of nn.Linear's (out, in).
_CONV1D = re.compile(r"^h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
# Causal-mask buffers older transformers versions saved; not weights.
_HF_IGNORE = re.compile(r"^(h\.\d+\.attn\.(bias|masked_bias)|position_ids)$")
_GPT2_ACT = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
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
    common = dict(
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


def _read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF directory: model.safetensors (or its shards), else pytorch_model.bin (or shards)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    def shards(index_name: str) -> list[Path]:
        index = _read_json_file(hf_dir / index_name, "")
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


def _import_hf(hf_dir: PathLike, with_tokenizer: bool = True,
               dtype: torch.dtype | None = torch.float32) -> tuple[GPT, Any]:
    hf_dir = Path(hf_dir).expanduser()
    if not hf_dir.is_dir():
        raise CheckpointError(f"{hf_dir}: no such directory; pass a directory written by "
                              f"transformers' save_pretrained()")
    where = str(hf_dir / CONFIG_FILE)
    hf = _read_json_file(hf_dir / CONFIG_FILE, "not a transformers model directory")
    if not isinstance(hf, dict):
        raise CheckpointError(f"{where}: expected a JSON object")
    config = _config_from_hf(hf, where)
    tensors = _weights_from_hf(_read_hf_weights(hf_dir), config, hf["model_type"])
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    model = _build_model(config, tensors, str(hf_dir))
    tokenizer = None
    if with_tokenizer and any((hf_dir / f).is_file() for f in ("tokenizer.json", "vocab.json", "encoder.json")):
        from .tokenizer import load_tokenizer

        try:
            tokenizer = load_tokenizer(hf_dir)
        except TokenizerError as e:  # e.g. openai-gpt's non-byte-level BPE: keep the model, say why
            warnings.warn(f"{hf_dir}: tokenizer not usable by gptlab ({e}); imported the model "
                          f"without a tokenizer", stacklevel=3)
    return model, tokenizer


def import_hf(hf_dir: PathLike, dtype: torch.dtype | None = torch.float32) -> tuple[GPT, Any]:
    """(model, tokenizer or None) from a transformers GPT-2 or OpenAI-GPT directory.

    ``dtype`` converts the weights (default float32; None keeps the stored
    dtype). The tokenizer comes from the directory's tokenizer.json or
    vocab.json+merges.txt when gptlab can use it (a warning says when not).
    """
    spec = os.fspath(hf_dir)
    return _import_hf(spec[3:] if spec.startswith("hf:") else spec, with_tokenizer=True, dtype=dtype)


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


def _export_tokenizer(tokenizer: Any, out_dir: Path, block_size: int) -> list[str]:
    """Write transformers-readable tokenizer files when the tokenizer can produce them; returns their names."""
    from . import tokenizer as tk

    eos = tk.EOS if tk.EOS in tokenizer.special_tokens else None
    written: list[str] = []
    if isinstance(tokenizer, tk.BPETokenizer) and getattr(tokenizer, "_byte_level", False):
        atomic_write_text(out_dir / "tokenizer.json", tokenizer.hf_tokenizer.to_str())
        eos = getattr(tokenizer, "_eos_token", eos)
        written.append("tokenizer.json")
    elif isinstance(tokenizer, tk.TiktokenTokenizer):
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            enc, bpe = tk.save_gpt2_pair(tokenizer.ranks, tmp, tokenizer.special_tokens)
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


def export_hf(run_or_model: PathLike | torch.nn.Module, out_dir: PathLike, tokenizer: Any = None) -> Path:
    """Write a transformers directory that ``from_pretrained`` loads: GPT-2 for pre-LN models, OpenAI-GPT for post-LN.

    ``run_or_model`` is a run directory / ``hf:DIR`` spec or a GPT (then pass
    ``tokenizer`` to export one). Banded-attention (GPT-3 style) models have no
    transformers equivalent and raise UserError, as does a post-LN model with
    exact GELU (transformers' openai-gpt only computes the tanh approximation).
    Models without biases are written with zero biases. Returns ``out_dir``.
    """
    if isinstance(run_or_model, torch.nn.Module):
        model = _unwrap(run_or_model)
    else:
        model, tok, _ = load_run(run_or_model)
        tokenizer = tokenizer if tokenizer is not None else tok
    cfg = model.config
    if any(cfg.is_local(i) for i in range(cfg.n_layer)):
        raise UserError(f"cannot export attention_pattern={cfg.attention_pattern!r}: transformers has no "
                        f"GPT-2 with locally banded attention layers (only dense models export)")
    if cfg.norm_position == "pre":
        model_type, arch = "gpt2", "GPT2LMHeadModel"
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
        model_type, arch = "openai-gpt", "OpenAIGPTLMHeadModel"
        hf = {"afn": "gelu"}
    eos_id = tokenizer.eos_id if tokenizer is not None else None
    dtype = str(model.wte.weight.dtype).removeprefix("torch.")
    hf = {
        "architectures": [arch], "model_type": model_type,
        "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd,
        "n_positions": cfg.block_size, "vocab_size": cfg.vocab_size,
        "layer_norm_epsilon": cfg.layer_norm_eps,
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
        "initializer_range": 0.02, "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": None,
        "dtype": dtype, **hf,
    }
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(_hf_tensors(model, model_type), out / "model.safetensors")
    if tokenizer is not None:
        _export_tokenizer(tokenizer, out, cfg.block_size)
    atomic_write_json(out / CONFIG_FILE, hf)
    return out


# ============================================================== CLI helpers
def prepare_out_dir(path: PathLike, force: bool = False) -> Path:
    """Check an output directory: absent or empty is fine; non-empty needs ``force`` (files are overwritten, others kept)."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"{out}: directory exists and is not empty; choose another --out or pass --force "
                        f"to overwrite")
    return out
