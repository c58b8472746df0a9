"""Tokenizers behind one small interface, so data prep, training and inference never care which is in use.

Three back ends cover the GPT lineage: the real GPT-2 vocabulary through `tiktoken`
(the fastest encoder, and the one the pretrained weights need), byte-level BPE
trained on your own text through Hugging Face `tokenizers` (also wraps any HF
`tokenizer.json` or GPT-2 style vocab/merges pair, and GPT-1's lower-cased `</w>`
BPE through `load_gpt1_pair`), and a character vocabulary for the nanoGPT-style
Shakespeare demo. GPT2-Chinese's modes come beside them: a
word vocabulary on jieba's segmentation and BERT's WordPiece `vocab.txt`; the char
and word vocabularies trained here encode what they cannot spell as `<|unk|>`. Image GPT's
palette is one more (one token per pixel colour, written ``#rrggbb`` as text).

Every tokenizer saves to a self-contained directory (`tokenizer_config.json`
plus its vocabulary files), so a run directory can always re-create the exact
ids it was trained on without a network.  Special tokens such as `<|endoftext|>`
are only recognised in text when the caller asks (`allow_special=True`): user
data that happens to contain them is encoded as ordinary text.

The GPT-2 ranks <-> encoder.json/vocab.bpe converters exist so the two BPE
implementations can check each other (tests) and so GPT-2 vocabularies from
either OpenAI or Hugging Face naming can be used.
"""

from __future__ import annotations

import abc
import base64
import binascii
import codecs
import functools
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jieba
import numpy as np
import tiktoken
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from .atomic import atomic_write_bytes, sha256_file
from .errors import TokenizerError
from .jsonsafe import parse_json

__all__ = [
    "EOS", "PAD", "START", "DELIM", "EXTRACT", "SYSTEM", "USER", "ASSISTANT", "END_OF_TURN",
    "SPECIAL_TOKENS", "GPT2_PATTERN", "Tokenizer", "BPETokenizer", "TiktokenTokenizer",
    "CharTokenizer", "PaletteTokenizer", "WordTokenizer", "WordPieceTokenizer", "UNK", "UNK_SPECIAL_TOKENS", "BERT_SPECIAL_TOKENS",
    "TOKENIZER_MODES", "segment", "train_tokenizer", "readable_tokens", "train_bpe", "train_tokenizer_files",
    "load_tokenizer", "load_ranks", "save_ranks", "load_gpt2_pair", "save_gpt2_pair", "load_gpt1_pair", "is_gpt1_pair",
    "is_gpt1", "tokenizer_difference", "check_tokenizers_match",
    "tokenizer_digest", "load_checked_tokenizer",
]

EOS = "<|endoftext|>"
PAD = "<|pad|>"
START = "<|start|>"  # GPT-1 fine-tuning: start of an input
DELIM = "<|delim|>"  # GPT-1 fine-tuning: between the parts of an input
EXTRACT = "<|extract|>"  # GPT-1 fine-tuning: the position the classifier head reads
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END_OF_TURN = "<|end|>"
SPECIAL_TOKENS: list[str] = [EOS, PAD, START, DELIM, EXTRACT, SYSTEM, USER, ASSISTANT, END_OF_TURN]
UNK = "<|unk|>"  # what a char or word vocabulary encodes an unseen character as
# The special tokens of the char and word vocabularies gptlab trains: the shared ones, then <|unk|>.
UNK_SPECIAL_TOKENS: list[str] = [*SPECIAL_TOKENS, UNK]

# GPT-2's pre-tokenization regex in the possessive form tiktoken uses: the same splits as OpenAI's
# encoder.py / HF's ByteLevel `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
# (the tests check that against HF's implementation), about 10% faster because it never backtracks.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""

TOKENIZER_CONFIG = "tokenizer_config.json"
_FORMAT_VERSION = 1
_GPT2_ENV = "GPTLAB_GPT2_TIKTOKEN"
_GPT2_HINT = (
    "pass a path to gpt2.tiktoken (e.g. from `pip download --no-deps --no-binary :all: "
    "openai-whisper==20250625`, file whisper/assets/gpt2.tiktoken) or set " + _GPT2_ENV
)


# --------------------------------------------------------------------------- helpers


def _gpt2_byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (used in encoder.json / vocab.bpe / HF ByteLevel)."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in keep}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


_BYTE_TO_CHAR = _gpt2_byte_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}


def _bytes_to_gpt2_str(token: bytes) -> str:
    return "".join(_BYTE_TO_CHAR[b] for b in token)


def _gpt2_str_to_bytes(token: str) -> bytes | None:
    """Inverse of `_bytes_to_gpt2_str`; None when `token` holds a character outside the byte alphabet."""
    try:
        return bytes(_CHAR_TO_BYTE[c] for c in token)
    except KeyError:
        return None


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def _read_json(path: Path) -> Any:
    try:
        return parse_json(path.read_bytes())
    except FileNotFoundError:
        raise TokenizerError(f"{path}: file not found; save the tokenizer again or point at the right directory") from None
    except ValueError as e:  # BadJSON, bad UTF-8 included
        raise TokenizerError(f"{path}: {e}; re-save or re-download this file") from None


def _as_ids(ids: Any) -> Sequence[int]:
    """Accept lists, tuples, numpy arrays and torch tensors of ids."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    return ids


def _bad_id(ids: Iterable[int], vocab_size: int, valid: Any = None) -> TokenizerError:
    for i in ids:
        if not isinstance(i, int) or i < 0 or i >= vocab_size or (valid is not None and not valid(i)):
            return TokenizerError(
                f"token id {i!r} is not in the vocabulary (ids 0..{vocab_size - 1}); "
                "mask logits beyond tokenizer.vocab_size or re-encode with this tokenizer"
            )
    return TokenizerError("token ids could not be decoded; re-encode the text with this tokenizer")


def _check_special_names(tokens: Sequence[str]) -> list[str]:
    if isinstance(tokens, str):
        raise TokenizerError(f"add_special_tokens takes a list of strings, got the string {tokens!r}; wrap it in a list")
    out = []
    for t in tokens:
        if not isinstance(t, str) or not t:
            raise TokenizerError(f"special token {t!r} must be a non-empty string, e.g. {START!r}")
        if t not in out:
            out.append(t)
    return out


def _validated_specials(specials: Any, where: str) -> dict[str, int]:
    if not isinstance(specials, dict) or not all(
        isinstance(k, str) and k and isinstance(v, int) and not isinstance(v, bool) and v >= 0
        for k, v in specials.items()
    ):
        raise TokenizerError(f"{where}: 'special_tokens' must map token strings to non-negative integer ids")
    if len(set(specials.values())) != len(specials):
        raise TokenizerError(f"{where}: 'special_tokens' gives two tokens the same id; fix or re-save the tokenizer")
    return dict(specials)


# --------------------------------------------------------------------------- interface


class Tokenizer(abc.ABC):
    """What the rest of gptlab relies on; see the module docstring for the implementations."""

    kind: str = ""
    spec: str = ""

    @abc.abstractmethod
    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Text -> ids. Special-token strings in `text` are parsed only when `allow_special` is True."""

    def encode_batch(self, texts: list[str], *, allow_special: bool = False) -> list[list[int]]:
        """Encode many texts (multithreaded where the back end supports it)."""
        return [self.encode(t, allow_special=allow_special) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text; bytes that are not valid UTF-8 (a split multi-byte character) become U+FFFD."""
        ids = _as_ids(ids)
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")

    def decode_text(self, ids: Sequence[int]) -> str:
        """What people read of generated ids: ``decode`` without special tokens (``<|end|>`` is not text),
        an unknown character's ``<|unk|>`` kept, since it stands for text."""
        special = set(self.special_tokens.values()) - {self.unk_id}
        return self.decode([i for i in _as_ids(ids) if i not in special])

    @property
    def unk_id(self) -> int | None:
        """The id text the vocabulary cannot spell becomes (byte-level vocabularies spell everything: None)."""
        return None

    @abc.abstractmethod
    def token_bytes(self, id: int) -> bytes:
        """The raw bytes of one token (special tokens: their UTF-8 string), for streaming decode."""

    def token_text(self, id: int) -> str:
        """One token as a person reads it: its text, or ``bytes:\\x..`` for part of a multi-byte character."""
        raw = self.token_bytes(id)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (max id + 1)."""

    @property
    @abc.abstractmethod
    def special_tokens(self) -> dict[str, int]:
        """The special tokens this vocabulary has, string -> id."""

    @property
    def eos_id(self) -> int:
        return self.special_tokens[EOS]

    @property
    def pad_id(self) -> int | None:
        return self.special_tokens.get(PAD)

    @abc.abstractmethod
    def add_special_tokens(self, tokens: list[str]) -> list[int]:
        """Add the tokens not yet present with ids after the current vocab; return the ids of all of them."""

    @abc.abstractmethod
    def _save_files(self, directory: Path) -> dict[str, Any]:
        """Write the vocabulary files; return the kind-specific config fields."""

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write a self-contained tokenizer directory (vocabulary files + tokenizer_config.json)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        extra = self._save_files(directory)
        config = {
            "kind": self.kind,
            "spec": self.spec,
            "format_version": _FORMAT_VERSION,
            "vocab_size": self.vocab_size,
            "special_tokens": self.special_tokens,
            **extra,
        }
        # The config goes last: a directory with a config always has the files it names.
        _write_json(directory / TOKENIZER_CONFIG, config)
        return directory

    def __repr__(self) -> str:
        return f"{type(self).__name__}(spec={self.spec!r}, vocab_size={self.vocab_size})"


def readable_tokens(tok: Tokenizer, ids: Sequence[int]) -> list[tuple[str, bool]]:
    """Each token of ``ids`` as a person reads it in context, and whether it holds only part of a character.

    A byte-level vocabulary splits many CJK characters and emoji across tokens; each such token shows the
    whole character(s) its bytes belong to (so ``床`` cut in two shows as ``床`` twice, marked as parts),
    where decoding it alone would show U+FFFD. Bytes that never complete a character show as ``\\xNN``.
    """
    raw = [tok.token_bytes(i) for i in ids]
    text = b"".join(raw).decode("utf-8", errors="surrogateescape")  # a stray byte becomes one lone surrogate
    spans: list[tuple[int, int, str, bool]] = []  # (first byte, end byte, readable character, a stray byte)
    at = 0
    for ch in text:
        size = len(ch.encode("utf-8", errors="surrogateescape"))
        stray = 0xDC80 <= ord(ch) <= 0xDCFF
        spans.append((at, at + size, f"\\x{ord(ch) - 0xDC00:02x}" if stray else ch, stray))
        at += size
    out: list[tuple[str, bool]] = []
    start, k = 0, 0
    for token in raw:
        end = start + len(token)
        while k < len(spans) and spans[k][1] <= start:
            k += 1
        j, shown, partial = k, [], False
        while j < len(spans) and spans[j][0] < end:
            first, last, ch, stray = spans[j]
            partial = partial or stray or first < start or last > end
            shown.append(ch)
            j += 1
        out.append(("".join(shown), partial))
        start = end
    return out


# --------------------------------------------------------------------------- tiktoken (GPT-2)


def load_ranks(path: str | os.PathLike[str]) -> dict[bytes, int]:
    """Parse a tiktoken ranks file (`base64(token) rank` per line), validating every line."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TokenizerError(f"{path}: ranks file not found; {_GPT2_HINT}") from None
    except IsADirectoryError:
        raise TokenizerError(f"{path}: is a directory, expected a .tiktoken ranks file; {_GPT2_HINT}") from None
    ranks: dict[bytes, int] = {}
    seen_ranks: set[int] = set()
    fix = "regenerate the file or use the genuine gpt2.tiktoken"
    for lineno, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        shown = line[:60].decode("utf-8", errors="replace")
        if len(parts) != 2:
            raise TokenizerError(f"{path} line {lineno}: expected '<base64 token> <rank>', got {shown!r}; {fix}")
        try:
            token = base64.b64decode(parts[0], validate=True)
        except (binascii.Error, ValueError):
            raise TokenizerError(f"{path} line {lineno}: {parts[0][:40].decode('ascii', 'replace')!r} is not base64; {fix}") from None
        try:
            rank = int(parts[1])
        except ValueError:
            rank = -1
        if rank < 0 or not parts[1].isdigit():
            raise TokenizerError(f"{path} line {lineno}: rank {parts[1][:20].decode('ascii', 'replace')!r} is not a non-negative integer; {fix}")
        if not token:
            raise TokenizerError(f"{path} line {lineno}: empty token; {fix}")
        if token in ranks:
            raise TokenizerError(f"{path} line {lineno}: token {token!r} appears twice; {fix}")
        if rank in seen_ranks:
            raise TokenizerError(f"{path} line {lineno}: rank {rank} appears twice; {fix}")
        ranks[token] = rank
        seen_ranks.add(rank)
    if not ranks:
        raise TokenizerError(f"{path}: ranks file is empty; {_GPT2_HINT}")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerError(
            f"{path}: {len(missing)} single-byte tokens are missing (e.g. {bytes([missing[0]])!r}), "
            f"so not every text can be encoded; {fix}"
        )
    return ranks


def save_ranks(ranks: dict[bytes, int], path: str | os.PathLike[str]) -> Path:
    """Write `ranks` as a tiktoken ranks file, in rank order (atomic)."""
    path = Path(path)
    lines = [base64.b64encode(tok) + b" " + str(rank).encode() for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])]
    atomic_write_bytes(path, b"\n".join(lines) + b"\n")
    return path


def _is_gpt2(ranks: dict[bytes, int]) -> bool:
    return len(ranks) == 50256 and ranks.get(b"Hello") == 15496 and ranks.get(b" world") == 995


class TiktokenTokenizer(Tokenizer):
    """A mergeable-ranks BPE (the real GPT-2 vocabulary) encoded by `tiktoken`."""

    kind = "tiktoken"

    def __init__(
        self,
        ranks: dict[bytes, int],
        special_tokens: dict[str, int] | None = None,
        *,
        name: str | None = None,
        pat_str: str = GPT2_PATTERN,
    ) -> None:
        if not ranks:
            raise TokenizerError("ranks are empty; load a genuine ranks file such as gpt2.tiktoken")
        n = max(ranks.values()) + 1
        if special_tokens is None:
            special_tokens = {EOS: n}
        special_tokens = _validated_specials(special_tokens, "TiktokenTokenizer")
        clash = [t for t, i in special_tokens.items() if i < n]
        if clash:
            raise TokenizerError(f"special token {clash[0]!r} has id {special_tokens[clash[0]]}, inside the BPE ranks (0..{n - 1}); give it an id >= {n}")
        if EOS not in special_tokens:
            raise TokenizerError(f"special_tokens must include {EOS!r}; add it with id {max([n - 1, *special_tokens.values()]) + 1}")
        self._ranks = ranks
        self._special = dict(sorted(special_tokens.items(), key=lambda kv: kv[1]))
        self.name = name or ("gpt2" if _is_gpt2(ranks) else "bpe")
        self.pat_str = pat_str
        self.spec = self.name
        self._special_bytes = {i: t.encode("utf-8") for t, i in self._special.items()}
        self._enc = tiktoken.Encoding(
            name=self.name, pat_str=pat_str, mergeable_ranks=ranks, special_tokens=self._special
        )

    @classmethod
    def from_file(
        cls, path: str | os.PathLike[str], *, special_tokens: dict[str, int] | None = None, name: str | None = None
    ) -> TiktokenTokenizer:
        ranks = load_ranks(path)
        return cls(ranks, special_tokens, name=name or ("gpt2" if _is_gpt2(ranks) else Path(path).stem))

    @classmethod
    def from_encoding(cls, enc: Any) -> TiktokenTokenizer:
        """Wrap a `tiktoken.Encoding` (e.g. `tiktoken.get_encoding("gpt2")`) using only its public API."""
        ranks = {b: enc.encode_single_token(b) for b in enc.token_byte_values()}
        specials = {t: enc.encode_single_token(t) for t in enc.special_tokens_set}
        return cls(ranks, specials, name=enc.name, pat_str=getattr(enc, "_pat_str", GPT2_PATTERN))

    @property
    def encoding(self) -> Any:
        """The underlying `tiktoken.Encoding`."""
        return self._enc

    @property
    def ranks(self) -> dict[bytes, int]:
        return self._ranks

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        if allow_special:
            return self._enc.encode(text, allowed_special="all")
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str], *, allow_special: bool = False) -> list[list[int]]:
        threads = max(1, min(8, os.cpu_count() or 1))
        if allow_special:
            return self._enc.encode_batch(texts, allowed_special="all", num_threads=threads)
        return self._enc.encode_ordinary_batch(texts, num_threads=threads)

    def decode(self, ids: Sequence[int]) -> str:
        ids = _as_ids(ids)
        try:
            return self._enc.decode(ids, errors="replace")
        except (KeyError, OverflowError, TypeError):
            raise _bad_id(ids, self.vocab_size, self._is_token) from None

    def _is_token(self, id: int) -> bool:
        try:
            self._enc.decode_single_token_bytes(id)
            return True
        except (KeyError, OverflowError, TypeError):
            return False

    def token_bytes(self, id: int) -> bytes:
        special = self._special_bytes.get(id)
        if special is not None:
            return special
        try:
            return self._enc.decode_single_token_bytes(id)
        except (KeyError, OverflowError, TypeError):
            raise _bad_id([id], self.vocab_size) from None

    @property
    def vocab_size(self) -> int:
        return self._enc.n_vocab

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special)

    def add_special_tokens(self, tokens: list[str]) -> list[int]:
        tokens = _check_special_names(tokens)
        new = [t for t in tokens if t not in self._special]
        if new:
            next_id = self.vocab_size
            for t in new:
                self._special[t] = next_id
                self._special_bytes[next_id] = t.encode("utf-8")
                next_id += 1
            self._enc = tiktoken.Encoding(
                name=self.name, pat_str=self.pat_str, mergeable_ranks=self._ranks, special_tokens=self._special
            )
        return [self._special[t] for t in tokens]

    def _save_files(self, directory: Path) -> dict[str, Any]:
        fname = re.sub(r"[^A-Za-z0-9_.-]", "_", self.name) + ".tiktoken"
        save_ranks(self._ranks, directory / fname)
        return {"name": self.name, "ranks_file": fname, "pat_str": self.pat_str}


# --------------------------------------------------------------------------- GPT-2 encoder.json / vocab.bpe pairs


def _pair_paths(dir_or_files: Any) -> tuple[Path, Path]:
    """(vocab, merges) from a directory (OpenAI or HF naming) or an explicit pair of files."""
    if isinstance(dir_or_files, (list, tuple)):
        if len(dir_or_files) != 2:
            raise TokenizerError("pass (encoder.json, vocab.bpe) or (vocab.json, merges.txt) as two paths, or their directory")
        return Path(dir_or_files[0]), Path(dir_or_files[1])
    d = Path(dir_or_files)
    for vocab, merges in (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt")):
        if (d / vocab).is_file() and (d / merges).is_file():
            return d / vocab, d / merges
    raise TokenizerError(f"{d}: no encoder.json+vocab.bpe or vocab.json+merges.txt pair found; point at a GPT-2 vocabulary directory")


def _read_gpt2_pair(vocab_path: Path, merges_path: Path) -> tuple[dict[str, int], list[tuple[str, str]], dict[str, int]]:
    """Parse and cross-check a GPT-2 pair. Returns (vocab, merges, special tokens = vocab entries no merge builds)."""
    vocab = _read_json(vocab_path)
    if not isinstance(vocab, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0 for k, v in vocab.items()
    ):
        raise TokenizerError(f"{vocab_path}: expected a JSON object mapping token strings to non-negative integer ids")
    try:
        lines = merges_path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise TokenizerError(f"{merges_path}: merges file not found; it must sit next to {vocab_path.name}") from None
    except UnicodeDecodeError:
        raise TokenizerError(f"{merges_path}: not UTF-8 text; re-download the GPT-2 merges file") from None
    merges: list[tuple[str, str]] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip() or (lineno == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise TokenizerError(f"{merges_path} line {lineno}: expected two tokens separated by one space, got {line[:60]!r}")
        a, b = parts
        for t in (a, b, a + b):
            if t not in vocab:
                raise TokenizerError(f"{merges_path} line {lineno}: {t!r} is not in {vocab_path.name}; the two files do not belong together")
        merges.append((a, b))
    byte_chars = set(_CHAR_TO_BYTE)
    missing = [c for c in byte_chars if c not in vocab]
    if missing:
        raise TokenizerError(f"{vocab_path}: {len(missing)} of the 256 byte tokens are missing (e.g. {missing[0]!r}); not a GPT-2 byte-level vocabulary")
    built = byte_chars | {a + b for a, b in merges}
    specials = {t: i for t, i in vocab.items() if t not in built}
    return vocab, merges, specials


def load_gpt2_pair(dir_or_files: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> dict[bytes, int]:
    """Ranks from a GPT-2 `encoder.json`+`vocab.bpe` (or HF `vocab.json`+`merges.txt`) pair.

    Tokens no merge builds (such as `<|endoftext|>`) are special, not ranks, and are left out.
    """
    vocab_path, merges_path = _pair_paths(dir_or_files)
    vocab, merges, _ = _read_gpt2_pair(vocab_path, merges_path)
    ranks: dict[bytes, int] = {}
    for c, byte in _CHAR_TO_BYTE.items():
        ranks[bytes([byte])] = vocab[c]
    last = -1
    for lineno, (a, b) in enumerate(merges, start=1):
        token = a + b
        tb = _gpt2_str_to_bytes(token)
        assert tb is not None  # a merge of byte-alphabet tokens
        if tb in ranks:
            continue  # a second merge building the same token: tiktoken's rank rule already covers it
        rank = vocab[token]
        if rank <= last:
            raise TokenizerError(
                f"{merges_path}: merge {lineno} ({a!r} {b!r}) has id {rank} but an earlier merge has id {last}; "
                "ranks need ids in merge order, load this pair as a BPE tokenizer instead"
            )
        last = rank
        ranks[tb] = rank
    return ranks


def _bpe_split(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """Run rank-based BPE on `token` using only merges whose result ranks below `max_rank`."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best, best_rank = -1, max_rank
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best, best_rank = i, r
        if best < 0:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    return parts


def save_gpt2_pair(
    ranks: dict[bytes, int], directory: str | os.PathLike[str], special_tokens: dict[str, int] | None = None
) -> tuple[Path, Path]:
    """Write `ranks` as OpenAI's `encoder.json` + `vocab.bpe` (special tokens default to {EOS: max rank + 1}).

    The merge that builds each multi-byte token is recovered by running BPE on its
    bytes with only lower-ranked merges: the two parts left are the merge.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if special_tokens is None:
        special_tokens = {EOS: max(ranks.values()) + 1}
    merges: list[str] = []
    ordered = sorted(ranks.items(), key=lambda kv: kv[1])
    for token, rank in ordered:
        if len(token) == 1:
            continue
        parts = _bpe_split(ranks, token, rank)
        if len(parts) != 2:
            raise TokenizerError(f"ranks: token {token!r} (rank {rank}) cannot be built by one merge of lower-ranked tokens; not a BPE vocabulary")
        merges.append(_bytes_to_gpt2_str(parts[0]) + " " + _bytes_to_gpt2_str(parts[1]))
    encoder = {_bytes_to_gpt2_str(t): r for t, r in ordered}
    for t, i in special_tokens.items():
        encoder[t] = i
    enc_path, bpe_path = directory / "encoder.json", directory / "vocab.bpe"
    atomic_write_bytes(enc_path, json.dumps(encoder, ensure_ascii=False).encode("utf-8"))
    atomic_write_bytes(bpe_path, ("#version: 0.2\n" + "\n".join(merges) + "\n").encode("utf-8"))
    return enc_path, bpe_path


# --------------------------------------------------------------------------- Hugging Face byte-level BPE


def _bytelevel_tokenizer(model: Any) -> Any:
    tok = HFTokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


class BPETokenizer(Tokenizer):
    """Byte-level BPE run by Hugging Face `tokenizers` (trained here, or any HF tokenizer.json / GPT-2 pair)."""

    kind = "bpe"

    def __init__(self, hf_tokenizer: Any, *, eos_token: str = EOS, spec: str | None = None, source: str = "tokenizer") -> None:
        self._tok = hf_tokenizer
        self._byte_level = isinstance(hf_tokenizer.decoder, decoders.ByteLevel)
        self._eos_token = eos_token
        self._source = source
        self._rebuild()
        if eos_token not in self._special:
            raise TokenizerError(
                f"{source}: has no special token {eos_token!r}; add it to the vocabulary or name the "
                "end-of-text token with eos_token="
            )
        self.spec = spec or f"bpe:{self.vocab_size}"

    def _rebuild(self) -> None:
        """Refresh the derived state after the HF tokenizer changed (init, add_special_tokens)."""
        added = self._tok.get_added_tokens_decoder()
        self._special = {t.content: i for i, t in sorted(added.items()) if t.special}
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self._vocab_size = max(vocab.values()) + 1 if vocab else 0
        # A second copy that treats special-token strings as ordinary text (allow_special=False).
        self._plain = HFTokenizer.from_str(self._tok.to_str())
        self._plain.encode_special_tokens = True
        table: list[bytes | None] = [None] * self._vocab_size
        for token, i in vocab.items():
            if i in added:
                table[i] = added[i].content.encode("utf-8")
            elif self._byte_level:
                table[i] = _gpt2_str_to_bytes(token)
                if table[i] is None:
                    table[i] = token.encode("utf-8")
            elif isinstance(self._tok.decoder, decoders.BPEDecoder):  # GPT-1: a word's last piece ends in a space
                table[i] = token.replace(self._tok.decoder.suffix, " ").encode("utf-8")
            else:
                table[i] = self._tok.decode([i], skip_special_tokens=False).encode("utf-8")
        self._table = table

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], *, eos_token: str | None = None) -> BPETokenizer:
        """Wrap a Hugging Face `tokenizer.json` (its directory's transformers config may name the EOS token)."""
        path = Path(path)
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a plain Exception for malformed files
            raise TokenizerError(f"{path}: not a readable Hugging Face tokenizer.json ({str(e).splitlines()[0][:120]}); re-save or re-download it") from None
        if eos_token is None:
            eos_token = EOS
            if EOS not in {t.content for t in tok.get_added_tokens_decoder().values()}:
                eos_token = _hf_config_eos(path.parent) or EOS
        return cls(tok, eos_token=eos_token, source=str(path))

    @classmethod
    def from_gpt2_pair(cls, dir_or_files: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> BPETokenizer:
        """Wrap a GPT-2 `encoder.json`+`vocab.bpe` / `vocab.json`+`merges.txt` pair with HF's BPE."""
        vocab_path, merges_path = _pair_paths(dir_or_files)
        vocab, merges, specials = _read_gpt2_pair(vocab_path, merges_path)
        tok = _bytelevel_tokenizer(models.BPE(vocab=vocab, merges=merges))
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in sorted(specials, key=specials.__getitem__)])
        return cls(tok, source=str(vocab_path))

    @property
    def byte_level(self) -> bool:
        """Whether ids decode through GPT-2's byte-to-unicode table (what transformers' GPT-2 tokenizers expect)."""
        return self._byte_level

    @property
    def eos_token(self) -> str:
        return self._eos_token

    @property
    def hf_tokenizer(self) -> Any:
        """The underlying `tokenizers.Tokenizer` (special tokens parsed)."""
        return self._tok

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        tok = self._tok if allow_special else self._plain
        return tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], *, allow_special: bool = False) -> list[list[int]]:
        tok = self._tok if allow_special else self._plain
        return [e.ids for e in tok.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        ids = _as_ids(ids)
        table = self._table
        try:
            if ids and min(ids) < 0:
                raise IndexError
            return b"".join([table[i] for i in ids]).decode("utf-8", errors="replace")  # type: ignore[misc]
        except (IndexError, TypeError):
            raise _bad_id(ids, self._vocab_size, lambda i: table[i] is not None) from None

    def token_bytes(self, id: int) -> bytes:
        token = self._table[id] if isinstance(id, int) and 0 <= id < self._vocab_size else None
        if token is not None:
            return token
        raise _bad_id([id], self._vocab_size, lambda i: self._table[i] is not None)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special)

    @property
    def eos_id(self) -> int:
        return self._special[self._eos_token]

    def add_special_tokens(self, tokens: list[str]) -> list[int]:
        tokens = _check_special_names(tokens)
        new = [t for t in tokens if t not in self._special]
        for t in new:
            if self._tok.token_to_id(t) is not None:
                raise TokenizerError(f"{t!r} is already an ordinary token of this vocabulary; choose another special-token string")
        if new:
            start = self._vocab_size
            self._tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in new])
            self._rebuild()
            got = [self._special[t] for t in new]
            if got != list(range(start, start + len(new))):  # HF fills holes in sparse vocabularies
                raise TokenizerError(f"{self._source}: new special tokens got ids {got}, not {start}..; this vocabulary has gaps in its ids")
        return [self._special[t] for t in tokens]

    def _save_files(self, directory: Path) -> dict[str, Any]:
        atomic_write_bytes(directory / "tokenizer.json", self._tok.to_str().encode("utf-8"))
        return {"tokenizer_file": "tokenizer.json", "eos_token": self._eos_token}


# --------------------------------------------------------------------------- GPT-1 (OpenAI-GPT)
GPT1_WORD_END = "</w>"


def is_gpt1_pair(vocab_path: Path) -> bool:
    """Whether a vocab.json is GPT-1's kind (pieces ending in ``</w>``) rather than GPT-2's byte-level one."""
    try:
        vocab = parse_json(vocab_path.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(vocab, dict) and any(isinstance(k, str) and k.endswith(GPT1_WORD_END) for k in vocab)


def is_gpt1(tokenizer: Tokenizer) -> bool:
    """Whether ``tokenizer`` is GPT-1's ``</w>`` BPE (``load_gpt1_pair``)."""
    return isinstance(tokenizer, BPETokenizer) and isinstance(tokenizer.hf_tokenizer.decoder, decoders.BPEDecoder)


def load_gpt1_pair(dir_or_files: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> BPETokenizer:
    """GPT-1's vocabulary from vocab.json + merges.txt as transformers' ``OpenAIGPTTokenizer`` writes them.

    Text is cleaned, lower-cased and stripped of accents, split into words and punctuation as BERT's
    BasicTokenizer splits it (CJK characters one by one), and each word is BPE-merged with ``</w>`` on its
    last piece: the pipeline transformers runs without ftfy/spaCy, from ``tokenizers``' own parts. An
    unknown character becomes ``<unk>`` where the vocabulary has it. GPT-1 had no end-of-text token, so
    ``<|endoftext|>`` is added after the vocabulary (``hf.import_hf`` gives it an embedding row).
    """
    vocab_path, merges_path = _pair_paths(dir_or_files)
    try:
        vocab, merges = models.BPE.read_file(str(vocab_path), str(merges_path))
    except Exception as e:  # the Rust side raises a plain Exception for malformed files
        raise TokenizerError(f"{vocab_path}: not a readable vocab.json + merges.txt pair "
                             f"({str(e).splitlines()[0][:120]}); re-save the tokenizer") from None
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, continuing_subword_prefix="",
                                 end_of_word_suffix=GPT1_WORD_END, fuse_unk=False, unk_token="<unk>"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.BPEDecoder(suffix=GPT1_WORD_END)
    tok.add_special_tokens([AddedToken(EOS, special=True, normalized=False)])
    return BPETokenizer(tok, spec=f"gpt1-bpe:{len(vocab)}", source=str(vocab_path))


def _hf_config_eos(directory: Path) -> str | None:
    """The eos_token named by a transformers tokenizer_config.json / special_tokens_map.json, if any."""
    for name in (TOKENIZER_CONFIG, "special_tokens_map.json"):
        p = directory / name
        if not p.is_file():
            continue
        try:
            eos = json.loads(p.read_text(encoding="utf-8")).get("eos_token")
        except (ValueError, UnicodeDecodeError, AttributeError):
            continue
        if isinstance(eos, dict):
            eos = eos.get("content")
        if isinstance(eos, str) and eos:
            return eos
    return None


def _check_text_file(path: Path) -> None:
    """Raise TokenizerError unless `path` is a non-empty UTF-8 text file."""
    if not path.exists():
        raise TokenizerError(f"{path}: input file not found; check the path given to --input")
    if path.is_dir():
        raise TokenizerError(f"{path}: is a directory; pass the text files inside it to --input")
    decoder = codecs.getincrementaldecoder("utf-8")()
    has_text = False
    offset = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            nul = chunk.find(b"\0")
            if nul >= 0:
                raise TokenizerError(f"{path}: binary file (NUL byte at offset {offset + nul}); pass UTF-8 text files only")
            try:
                text = decoder.decode(chunk)
            except UnicodeDecodeError as e:
                raise TokenizerError(f"{path}: not UTF-8 text (bad byte at offset {offset + e.start}); convert it to UTF-8 or leave it out") from None
            has_text = has_text or not text.isspace() and bool(text)
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise TokenizerError(f"{path}: not UTF-8 text (truncated character at the end); convert it to UTF-8 or leave it out") from None
    if not has_text:
        raise TokenizerError(f"{path}: input file is empty; pass files that contain text")


def _file_chunks(paths: Sequence[Path], chunk_chars: int = 1 << 20) -> Iterator[str]:
    """Stream files as ~1 MB pieces cut at line ends (newlines kept, so BPE sees whitespace runs as written)."""
    for p in paths:
        with open(p, encoding="utf-8", newline="") as f:
            buf: list[str] = []
            size = 0
            for line in f:
                buf.append(line)
                size += len(line)
                if size >= chunk_chars:
                    yield "".join(buf)
                    buf, size = [], 0
            if buf:
                yield "".join(buf)


def train_bpe(
    files_or_iterator: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | Iterable[str],
    vocab_size: int,
    special_tokens: Sequence[str] = SPECIAL_TOKENS,
    *,
    show_progress: bool = False,
) -> BPETokenizer:
    """Train a byte-level BPE. A path, or a list/tuple of paths, is read as UTF-8 files;
    any other iterable is taken as a stream of training texts. Special tokens get ids
    0..len(special_tokens)-1, in order, so EOS is id 0 in every vocabulary trained here."""
    special_tokens = _check_special_names(list(special_tokens))
    if EOS not in special_tokens:
        raise TokenizerError(f"special_tokens must include {EOS!r} (the end-of-text token)")
    minimum = 256 + len(special_tokens)
    if not isinstance(vocab_size, int) or vocab_size < minimum:
        raise TokenizerError(f"vocab_size {vocab_size!r} is too small: byte-level BPE needs at least {minimum} (256 bytes + special tokens)")
    counted = [0]
    length = None
    if isinstance(files_or_iterator, (str, os.PathLike)):
        files_or_iterator = [files_or_iterator]
    if isinstance(files_or_iterator, (list, tuple)):
        paths = [Path(p) for p in files_or_iterator]
        if not paths:
            raise TokenizerError("no input files given; pass at least one UTF-8 text file")
        for p in paths:
            _check_text_file(p)
        texts: Iterable[str] = _file_chunks(paths)
        length = sum(p.stat().st_size // (1 << 20) + 1 for p in paths)
    else:
        def counting(it: Iterable[object]) -> Iterator[str]:
            for t in it:
                if not isinstance(t, str):
                    raise TokenizerError(f"training texts must be strings, got {type(t).__name__}; pass file paths in a list")
                if t.strip():
                    counted[0] += 1
                yield t

        texts = counting(files_or_iterator)
    tok = _bytelevel_tokenizer(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    if length is None and counted[0] == 0:
        raise TokenizerError("the training text is empty; pass files or texts that contain text")
    return BPETokenizer(tok, spec=f"bpe:{vocab_size}")


def train_tokenizer_files(
    inputs: Sequence[str | os.PathLike[str]], vocab_size: int | None, out_dir: str | os.PathLike[str], *,
    mode: str = "bpe", show_progress: bool = False
) -> Tokenizer:
    """`gptlab tokenizer train`: train a tokenizer of ``mode`` on UTF-8 text files and save it to `out_dir`."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    paths = [Path(p) for p in inputs]
    if not paths:
        raise TokenizerError("no input files given; pass at least one UTF-8 text file")
    for p in paths:
        _check_text_file(p)
    tok = (train_bpe(paths, vocab_size, show_progress=show_progress) if mode == "bpe" and vocab_size is not None
           else train_tokenizer(mode, _file_chunks(paths), vocab_size, show_progress=show_progress))
    tok.save(out_dir)
    return tok


# --------------------------------------------------------------------------- list vocabularies: characters, words


@functools.lru_cache(maxsize=32)
def _special_pattern(specials: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile("(" + "|".join(map(re.escape, sorted(specials, key=len, reverse=True))) + ")")


def _encode_specials(text: str, specials: dict[str, int], plain: Callable[[str], list[int]]) -> list[int]:
    """Encode ``text`` with its special-token strings as their ids and the pieces between through ``plain``."""
    ids: list[int] = []
    for k, piece in enumerate(_special_pattern(tuple(specials)).split(text)):
        if k % 2:
            ids.append(specials[piece])
        elif piece:
            ids.extend(plain(piece))
    return ids


class _OwnSpecials(Tokenizer):
    """A tokenizer that keeps its special tokens itself (``_special``) and encodes the text between them
    with ``_encode_plain``."""

    _special: dict[str, int]

    @abc.abstractmethod
    def _encode_plain(self, text: str) -> list[int]:
        """Text without special tokens -> ids."""

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        if not allow_special:
            return self._encode_plain(text)
        return _encode_specials(text, self._special, self._encode_plain)

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special)


class _ListVocabTokenizer(_OwnSpecials):
    """A vocabulary that is a list of strings (id = position), special tokens after it.

    With ``<|unk|>`` among the special tokens, text the vocabulary cannot spell encodes to it (and
    ``prepare`` counts it); without it, such text is an error naming the character.
    """

    _rebuild_hint = ""

    def __init__(self, entries: Sequence[str], special_tokens: Sequence[str]) -> None:
        entries = list(entries)
        self._check_entries(entries)
        if len(set(entries)) != len(entries):
            raise TokenizerError(f"{self.kind} vocabulary lists an entry twice; rebuild it with `gptlab tokenizer train`")
        special_tokens = _check_special_names(list(special_tokens))
        if EOS not in special_tokens:
            raise TokenizerError(f"special_tokens must include {EOS!r} (the end-of-text token)")
        self._entries = entries
        self._stoi = {c: i for i, c in enumerate(entries)}
        self._itos: list[str] = entries + special_tokens
        self._special = {t: len(entries) + i for i, t in enumerate(special_tokens)}

    @abc.abstractmethod
    def _check_entries(self, entries: list[str]) -> None:
        """Raise TokenizerError for an entry this kind cannot hold."""

    def _char_id(self, ch: str, text: str) -> int:
        i = self._stoi.get(ch, self._special.get(UNK))
        if i is None:
            raise TokenizerError(
                f"character {ch!r} (U+{ord(ch):04X}) is not in the {self.kind} vocabulary of {len(self._entries)} "
                f"entries and it has no {UNK}; {self._rebuild_hint}")
        return i

    @property
    def unk_id(self) -> int | None:
        return self._special.get(UNK)

    def decode(self, ids: Sequence[int]) -> str:
        ids = _as_ids(ids)
        itos = self._itos
        try:
            if ids and min(ids) < 0:
                raise IndexError
            return "".join([itos[i] for i in ids])
        except (IndexError, TypeError):
            raise _bad_id(ids, len(itos)) from None

    def token_bytes(self, id: int) -> bytes:
        if isinstance(id, int) and 0 <= id < len(self._itos):
            return self._itos[id].encode("utf-8")
        raise _bad_id([id], len(self._itos))

    @property
    def vocab_size(self) -> int:
        return len(self._itos)

    def add_special_tokens(self, tokens: list[str]) -> list[int]:
        tokens = _check_special_names(tokens)
        for t in tokens:
            if t in self._stoi:
                raise TokenizerError(f"{t!r} is already an ordinary entry of this vocabulary; choose a multi-character special token")
        for t in tokens:
            if t not in self._special:
                self._special[t] = len(self._itos)
                self._itos.append(t)
        return [self._special[t] for t in tokens]

    def _save_files(self, directory: Path) -> dict[str, Any]:
        # ensure_ascii keeps odd characters (lone surrogates, U+2028) loadable by any JSON reader.
        atomic_write_bytes(directory / "vocab.json", json.dumps(self._entries, ensure_ascii=True).encode("ascii"))
        return {"vocab_file": "vocab.json"}


def _by_count(counts: Counter[str], limit: int | None) -> list[str]:
    """The most frequent keys first (ties in code-point order), at most ``limit`` of them."""
    ranked = sorted(counts, key=lambda k: (-counts[k], k))
    return ranked if limit is None else ranked[:max(limit, 0)]


def _entry_budget(kind: str, vocab_size: int | None, seen: Counter[str]) -> int | None:
    """How many entries a trained list vocabulary of ``vocab_size`` ids holds beside its special tokens (None:
    all it saw); ``seen`` is what the training text held."""
    if not seen:
        raise TokenizerError("the training text is empty; pass files or texts that contain text")
    if vocab_size is None:
        return None
    if vocab_size - len(UNK_SPECIAL_TOKENS) < 1:
        raise TokenizerError(f"vocab_size {vocab_size} is too small: a {kind} vocabulary needs at least "
                             f"{len(UNK_SPECIAL_TOKENS) + 1} (special tokens + one character)")
    return vocab_size - len(UNK_SPECIAL_TOKENS)


class CharTokenizer(_ListVocabTokenizer):
    """One id per character of the training text (sorted), special tokens after them."""

    kind = "char"
    _rebuild_hint = "rebuild it with CharTokenizer.from_text or `gptlab tokenizer train --mode char` on text that contains it"

    def __init__(self, chars: Sequence[str], special_tokens: Sequence[str] = SPECIAL_TOKENS) -> None:
        if not list(chars):
            raise TokenizerError("a char vocabulary needs at least one character; build it with CharTokenizer.from_text(text)")
        super().__init__(chars, special_tokens)
        self.spec = "char"

    def _check_entries(self, entries: list[str]) -> None:
        bad = [c for c in entries if not isinstance(c, str) or len(c) != 1]
        if bad:
            raise TokenizerError(f"char vocabulary entry {bad[0]!r} is not a single character; rebuild it with CharTokenizer.from_text")

    @classmethod
    def from_text(cls, text: str, special_tokens: Sequence[str] = SPECIAL_TOKENS) -> CharTokenizer:
        """Vocabulary = sorted set of the characters in `text` (nanoGPT's shakespeare_char order), exactly: a
        character outside it is an error naming it. ``train`` (what prepare and `gptlab tokenizer train` use)
        adds ``<|unk|>`` for unseen characters instead."""
        if not text:
            raise TokenizerError("cannot build a char vocabulary from empty text; pass the training text")
        return cls(sorted(set(text)), special_tokens)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int | None = None) -> CharTokenizer:
        """Every character of ``texts`` (sorted), or the ``vocab_size`` minus specials most frequent ones;
        with ``<|unk|>`` for the others."""
        counts: Counter[str] = Counter()
        for t in texts:
            counts.update(t)
        tok = cls(sorted(_by_count(counts, _entry_budget(cls.kind, vocab_size, counts))), UNK_SPECIAL_TOKENS)
        if vocab_size is not None:
            tok.spec = f"char:{vocab_size}"
        return tok

    @property
    def chars(self) -> list[str]:
        return list(self._entries)

    def _encode_plain(self, text: str) -> list[int]:
        stoi = self._stoi
        try:
            return [stoi[c] for c in text]
        except KeyError:
            return [self._char_id(c, text) for c in text]


# jieba builds its prefix dictionary on the first cut (about half a second, cached in the temp directory);
# one segmenter serves every WordTokenizer. Its progress lines are debug noise.
_SEGMENTER = jieba.Tokenizer()
jieba.setLogLevel(logging.WARNING)


def segment(text: str) -> list[str]:
    """jieba's words of ``text`` (its default dictionary + HMM, as GPT2-Chinese cuts); they join back to ``text``."""
    return _SEGMENTER.lcut(text, HMM=True)


class WordTokenizer(_ListVocabTokenizer):
    """Chinese words cut by jieba: a word in the vocabulary is one id, any other word is spelled by its
    characters, and a character outside the vocabulary is ``<|unk|>``.

    The segmenter's words join back to the text (whitespace is kept as its own pieces), so decoding adds
    no spaces between Chinese words.
    """

    kind = "word"
    _rebuild_hint = "rebuild it with `gptlab tokenizer train --mode word` on text that contains it"

    def __init__(self, entries: Sequence[str], special_tokens: Sequence[str] = UNK_SPECIAL_TOKENS) -> None:
        super().__init__(entries, special_tokens)
        self.spec = "word"

    def _check_entries(self, entries: list[str]) -> None:
        if not entries:
            raise TokenizerError("a word vocabulary needs at least one entry; build it with `gptlab tokenizer train --mode word`")
        bad = [w for w in entries if not isinstance(w, str) or not w]
        if bad:
            raise TokenizerError(f"word vocabulary entry {bad[0]!r} is not a non-empty string; rebuild the vocabulary")

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int | None = None, *, min_count: int = 2) -> WordTokenizer:
        """Characters and the words seen ``min_count`` times ranked together by how often they occur (a
        character counted wherever it appears, inside words too), the first ``vocab_size`` minus special
        tokens kept; None keeps them all."""
        chars: Counter[str] = Counter()
        words: Counter[str] = Counter()
        for t in texts:
            chars.update(t)
            words.update(w for w in segment(t) if len(w) > 1)
        limit = _entry_budget(cls.kind, vocab_size, chars)
        ranked = chars + Counter({w: n for w, n in words.items() if n >= min_count})
        tok = cls(_by_count(ranked, limit))
        tok.spec = f"word:{tok.vocab_size}"
        return tok

    def _encode_plain(self, text: str) -> list[int]:
        stoi = self._stoi
        ids: list[int] = []
        for w in segment(text):
            i = stoi.get(w)
            if i is not None:
                ids.append(i)
            else:
                ids.extend(self._char_id(c, text) for c in w)
        return ids


# --------------------------------------------------------------------------- WordPiece (BERT's vocab.txt)

BERT_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_BERT_UNK, _BERT_SEP = "[UNK]", "[SEP]"


def _is_cjk(ch: str) -> bool:
    """The CJK blocks BERT's basic tokenizer cuts into single characters."""
    cp = ord(ch)
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF or 0x2A700 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


class WordPieceTokenizer(_OwnSpecials):
    """BERT's WordPiece over a ``vocab.txt`` (one token per line, ``##`` marks a word's continuation), the
    vocabulary GPT2-Chinese trains with: each CJK character is a word of its own, other words are cut into
    the longest pieces the vocabulary holds, ``[UNK]`` stands for what it cannot spell, and a newline is
    ``[SEP]`` (GPT2-Chinese's convention). gptlab's special tokens get the ids after the vocabulary.

    BERT drops whitespace, so decoding puts it back by rule: a newline for ``[SEP]``, nothing between CJK
    characters (Chinese text round-trips exactly), one space between two Latin words.
    """

    kind = "wordpiece"

    def __init__(self, vocab: Sequence[str], *, lowercase: bool, special_tokens: Sequence[str] = SPECIAL_TOKENS,
                 source: str = "vocab.txt") -> None:
        vocab = list(vocab)
        for t in (_BERT_UNK, _BERT_SEP):
            if t not in vocab:
                raise TokenizerError(f"{source}: has no {t} line; a BERT vocab.txt lists {', '.join(BERT_SPECIAL_TOKENS)}")
        bad = [t for t in vocab if not t or t != t.strip() or any(c.isspace() for c in t)]
        if bad:
            raise TokenizerError(f"{source}: entry {bad[0]!r} is empty or holds whitespace; one token per line, no spaces")
        if len(set(vocab)) != len(vocab):
            dup = next(t for t in vocab if vocab.count(t) > 1)
            raise TokenizerError(f"{source}: {dup!r} is listed twice; a vocab.txt lists each token once")
        specials = _check_special_names(list(special_tokens))
        if EOS not in specials:
            raise TokenizerError(f"special_tokens must include {EOS!r} (the end-of-text token)")
        self._vocab = vocab
        self.lowercase = lowercase
        self._special = {t: len(vocab) + i for i, t in enumerate(specials)}
        self._sep = vocab.index(_BERT_SEP)
        self._unk = vocab.index(_BERT_UNK)
        hf = HFTokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token=_BERT_UNK,
                                          max_input_chars_per_word=100))
        hf.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=False,
                                                   lowercase=lowercase)
        hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        self._hf = hf
        self._text = [t[2:] if t.startswith("##") else t for t in vocab]
        self._text[self._sep] = "\n"
        self.spec = f"wordpiece:{len(vocab)}"

    @classmethod
    def from_vocab_file(cls, path: str | os.PathLike[str], *, lowercase: bool = True,
                        special_tokens: Sequence[str] = SPECIAL_TOKENS) -> WordPieceTokenizer:
        """A BERT ``vocab.txt`` (bert-base-chinese's, GPT2-Chinese's); lower-cased as BERT's Chinese model is."""
        path = Path(path)
        try:
            lines = path.read_text(encoding="utf-8").split("\n")
        except FileNotFoundError:
            raise TokenizerError(f"{path}: file not found; pass a BERT vocab.txt") from None
        except UnicodeDecodeError:
            raise TokenizerError(f"{path}: not UTF-8 text; a vocab.txt is one UTF-8 token per line") from None
        if lines and lines[-1] == "":
            lines.pop()
        return cls([ln.rstrip("\r") for ln in lines], lowercase=lowercase, special_tokens=special_tokens,
                   source=str(path))

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, *, show_progress: bool = False) -> WordPieceTokenizer:
        """A WordPiece vocabulary learned by HF's trainer: ``vocab_size`` ids with gptlab's special tokens, which
        come after it. Characters beyond it (the rarest) are left to ``[UNK]``, as in a char vocabulary."""
        size = vocab_size - len(SPECIAL_TOKENS) if isinstance(vocab_size, int) else 0
        if size < len(BERT_SPECIAL_TOKENS) + 1:
            raise TokenizerError(f"vocab_size {vocab_size!r} is too small: WordPiece needs at least "
                                 f"{len(SPECIAL_TOKENS) + len(BERT_SPECIAL_TOKENS) + 1}")
        hf = HFTokenizer(models.WordPiece(unk_token=_BERT_UNK))
        hf.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=False,
                                                   lowercase=False)
        hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = trainers.WordPieceTrainer(vocab_size=size, special_tokens=BERT_SPECIAL_TOKENS,
                                            limit_alphabet=size - len(BERT_SPECIAL_TOKENS), show_progress=show_progress)
        seen = [0]

        def counting(it: Iterable[str]) -> Iterator[str]:
            for t in it:
                seen[0] += bool(t.strip())
                yield t

        hf.train_from_iterator(counting(texts), trainer=trainer)
        if not seen[0]:
            raise TokenizerError("the training text is empty; pass files or texts that contain text")
        vocab = hf.get_vocab()  # the alphabet's ##-forms may overshoot: the first ``size`` ids are kept
        return cls(sorted(vocab, key=vocab.__getitem__)[:size], lowercase=False)

    @property
    def unk_id(self) -> int | None:
        return self._unk

    def _encode_plain(self, text: str) -> list[int]:
        ids: list[int] = []
        for k, line in enumerate(text.split("\n")):
            if k:
                ids.append(self._sep)
            ids.extend(self._hf.encode(line, add_special_tokens=False).ids)
        return ids

    def _piece(self, id: int) -> str:
        if isinstance(id, int) and 0 <= id < len(self._vocab):
            return self._text[id]
        for t, i in self._special.items():
            if i == id:
                return t
        raise _bad_id([id], self.vocab_size)

    def decode(self, ids: Sequence[int]) -> str:
        out: list[str] = []
        prev = ""
        for i in _as_ids(ids):
            piece = self._piece(i)
            word_start = not (0 <= i < len(self._vocab) and self._vocab[i].startswith("##"))
            if (word_start and prev and piece and prev[-1].isalnum() and piece[0].isalnum()
                    and not _is_cjk(prev[-1]) and not _is_cjk(piece[0])):
                out.append(" ")
            out.append(piece)
            prev = piece
        return "".join(out)

    def token_bytes(self, id: int) -> bytes:
        return self._piece(id).encode("utf-8")

    @property
    def vocab_size(self) -> int:
        return len(self._vocab) + len(self._special)

    def add_special_tokens(self, tokens: list[str]) -> list[int]:
        tokens = _check_special_names(tokens)
        for t in tokens:
            if t not in self._special:
                self._special[t] = self.vocab_size
        return [self._special[t] for t in tokens]

    def _save_files(self, directory: Path) -> dict[str, Any]:
        atomic_write_bytes(directory / "vocab.txt", ("\n".join(self._vocab) + "\n").encode("utf-8"))
        return {"vocab_file": "vocab.txt", "lowercase": self.lowercase}


# --------------------------------------------------------------------------- image palettes


class PaletteTokenizer(_OwnSpecials):
    """Image GPT's vocabulary: one id per palette colour (a pixel of an image in raster order), specials after.

    A pixel's text is its colour as ``#rrggbb``, so an image is a line of text that task files and prompts
    can hold and that encodes back to the same ids; any ``#rrggbb`` goes to the nearest palette colour and
    whitespace is ignored. ``image(ids)`` turns ids back into pixels of ``image_size`` (height, width).
    """

    kind = "palette"
    _TEXT = re.compile(r"#[0-9a-fA-F]{6}|\s+")

    def __init__(self, colours: Any, image_size: tuple[int, int], special_tokens: Sequence[str] = SPECIAL_TOKENS,
                 grey: bool = False) -> None:
        colours = np.asarray(colours)
        if colours.ndim != 2 or colours.shape[1] != 3 or not len(colours) or colours.min() < 0 or colours.max() > 255:
            raise TokenizerError("a palette is a list of [r, g, b] colours with values 0..255; re-run "
                                 "gptlab images prepare")
        if len(image_size) != 2 or min(image_size) < 1:
            raise TokenizerError(f"image_size {list(image_size)} must be [height, width] >= 1; re-run "
                                 "gptlab images prepare")
        special_tokens = _check_special_names(list(special_tokens))
        if EOS not in special_tokens:
            raise TokenizerError(f"special_tokens must include {EOS!r} (the separator between images)")
        self.colours = colours.astype(np.uint8)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.grey = grey
        self._hex = [f"#{r:02x}{g:02x}{b:02x}" for r, g, b in self.colours.tolist()]
        self._special = {t: len(self._hex) + i for i, t in enumerate(special_tokens)}
        self.spec = f"palette-{len(self._hex)}"

    @property
    def palette_size(self) -> int:
        return len(self._hex)

    def quantize(self, pixels: Any) -> np.ndarray:
        """The id of the nearest palette colour of each RGB pixel: (..., 3) values 0..255 -> (...) ids."""
        px = np.asarray(pixels, dtype=np.float32)
        flat = px.reshape(-1, 3)
        ids = np.empty(len(flat), dtype=np.int64)
        pal = self.colours.astype(np.float32)
        for i in range(0, len(flat), 1 << 14):  # bounded memory: (chunk, K) distances at a time
            x = flat[i:i + (1 << 14)]
            ids[i:i + (1 << 14)] = (-2 * x @ pal.T + (pal ** 2).sum(1)[None]).argmin(1)  # |x|^2 is the same for all
        return ids.reshape(px.shape[:-1])

    def image(self, ids: Sequence[int]) -> np.ndarray:
        """Pixels (height, width, 3) uint8 of the first height*width ids, which must all be colours."""
        h, w = self.image_size
        arr = np.asarray(_as_ids(ids), dtype=np.int64)[:h * w]
        if len(arr) != h * w or arr.min() < 0 or arr.max() >= self.palette_size:
            raise TokenizerError(f"an image needs {h * w} palette ids (0..{self.palette_size - 1}); got "
                                 f"{len(arr)} ids {'with' if len(arr) == h * w else 'or'} special tokens or ids "
                                 f"outside the palette")
        return self.colours[arr].reshape(h, w, 3)

    def _encode_plain(self, text: str) -> list[int]:
        colours, end = [], 0
        for m in self._TEXT.finditer(text):
            if m.start() != end:
                break
            end = m.end()
            if m.group()[0] == "#":
                c = m.group()
                colours.append([int(c[1:3], 16), int(c[3:5], 16), int(c[5:7], 16)])
        if end != len(text):
            raise TokenizerError(f"{text[end:end + 12]!r} at character {end} is not a pixel colour: palette text "
                                 "is #rrggbb colours separated by nothing or whitespace")
        return self.quantize(np.asarray(colours).reshape(-1, 3)).tolist() if colours else []

    def token_bytes(self, id: int) -> bytes:
        if isinstance(id, int) and 0 <= id < self.palette_size:
            return self._hex[id].encode("ascii")
        for t, i in self._special.items():
            if i == id:
                return t.encode("utf-8")
        raise _bad_id([id], self.vocab_size)

    @property
    def vocab_size(self) -> int:
        return self.palette_size + len(self._special)

    def add_special_tokens(self, tokens: list[str]) -> list[int]:
        for t in _check_special_names(tokens):
            if t not in self._special:
                self._special[t] = self.vocab_size
        return [self._special[t] for t in tokens]

    def _save_files(self, directory: Path) -> dict[str, Any]:
        _write_json(directory / "palette.json",
                    {"colours": self.colours.tolist(), "image_size": list(self.image_size), "grey": self.grey})
        return {"palette_file": "palette.json"}


# --------------------------------------------------------------------------- training by mode

TOKENIZER_MODES = ("char", "word", "bpe", "wordpiece")


def train_tokenizer(mode: str, texts: Iterable[str], vocab_size: int | None = None, *,
                    show_progress: bool = False) -> Tokenizer:
    """A tokenizer of ``mode`` (char, word, bpe, wordpiece) learned from ``texts``; char and word need no
    ``vocab_size`` (then: every character, every word seen twice)."""
    if mode not in TOKENIZER_MODES:
        raise TokenizerError(f"unknown tokenizer mode {mode!r}; choose one of {', '.join(TOKENIZER_MODES)}")
    if mode == "char":
        return CharTokenizer.train(texts, vocab_size)
    if mode == "word":
        return WordTokenizer.train(texts, vocab_size)
    if vocab_size is None:
        raise TokenizerError(f"a {mode} tokenizer needs a vocabulary size: pass --vocab-size N (for example 4096)")
    if mode == "bpe":
        return train_bpe(iter(texts), vocab_size, show_progress=show_progress)  # an iterator: texts, not paths
    return WordPieceTokenizer.train(texts, vocab_size, show_progress=show_progress)


# --------------------------------------------------------------------------- loading


def _load_saved(directory: Path, config: dict[str, Any]) -> Tokenizer:
    where = str(directory / TOKENIZER_CONFIG)
    kind = config.get("kind")
    specials = _validated_specials(config.get("special_tokens"), where)

    def file_field(field: str, default: str) -> Path:
        name = config.get(field, default)
        if not isinstance(name, str) or not name or Path(name).name != name:
            raise TokenizerError(f"{where}: field {field!r} must be a file name inside the directory, got {name!r}")
        p = directory / name
        if not p.is_file():
            raise TokenizerError(f"{where}: names {field} {name!r} but {p} is missing; copy the whole tokenizer directory")
        return p

    if kind == "tiktoken":
        ranks_path = file_field("ranks_file", "gpt2.tiktoken")
        pat = config.get("pat_str", GPT2_PATTERN)
        if not isinstance(pat, str):
            raise TokenizerError(f"{where}: field 'pat_str' must be a string")
        return TiktokenTokenizer(load_ranks(ranks_path), specials, name=config.get("name") or ranks_path.stem, pat_str=pat)
    tok: Tokenizer
    if kind == "bpe":
        tok = BPETokenizer.from_file(file_field("tokenizer_file", "tokenizer.json"), eos_token=config.get("eos_token", EOS))
        if isinstance(config.get("spec"), str):
            tok.spec = config["spec"]
    elif kind in ("char", "word"):
        entries = _read_json(file_field("vocab_file", "vocab.json"))
        if not isinstance(entries, list):
            raise TokenizerError(f"{directory / 'vocab.json'}: expected a JSON list of vocabulary entries")
        order = sorted(specials, key=specials.__getitem__)
        tok = CharTokenizer(entries, order) if kind == "char" else WordTokenizer(entries, order)
    elif kind == "wordpiece":
        lowercase = config.get("lowercase", True)
        if not isinstance(lowercase, bool):
            raise TokenizerError(f"{where}: field 'lowercase' must be true or false")
        order = sorted(specials, key=specials.__getitem__)
        tok = WordPieceTokenizer.from_vocab_file(file_field("vocab_file", "vocab.txt"), lowercase=lowercase,
                                                 special_tokens=order)
    elif kind == "palette":
        palette = _read_json(file_field("palette_file", "palette.json"))
        if not isinstance(palette, dict) or not isinstance(palette.get("colours"), list) \
                or not isinstance(palette.get("image_size"), list):
            raise TokenizerError(f"{directory / 'palette.json'}: expected colours and image_size; re-run "
                                 "gptlab images prepare")
        tok = PaletteTokenizer(palette["colours"], palette["image_size"],
                               sorted(specials, key=specials.__getitem__), bool(palette.get("grey")))
    else:
        raise TokenizerError(f"{where}: unknown kind {kind!r}; expected 'tiktoken', 'bpe', 'char', 'word', "
                             f"'wordpiece' or 'palette'")
    if isinstance(config.get("spec"), str) and kind != "bpe":
        tok.spec = config["spec"]
    if tok.special_tokens != specials:
        raise TokenizerError(f"{where}: field 'special_tokens' disagrees with the vocabulary files; re-save the tokenizer")
    return tok


def _load_gpt2() -> TiktokenTokenizer:
    env = os.environ.get(_GPT2_ENV)
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise TokenizerError(f"{_GPT2_ENV}={env}: no such file; point it at gpt2.tiktoken or unset it")
        return TiktokenTokenizer.from_file(p, name="gpt2")
    try:
        enc = tiktoken.get_encoding("gpt2")
    except Exception as e:  # network or cache failures come in many types
        raise TokenizerError(f"could not load the GPT-2 vocabulary through tiktoken ({type(e).__name__}); {_GPT2_HINT}") from None
    return TiktokenTokenizer.from_encoding(enc)


def tokenizer_digest(directory: str | os.PathLike[str]) -> dict[str, str]:
    """The sha256 of every file of a saved tokenizer directory, by name: recorded where the tokenizer is used
    (a run's config.json, a data directory's meta.json) so that an edited vocabulary is caught on load."""
    return {p.name: sha256_file(p) for p in sorted(Path(directory).iterdir())
            if p.is_file() and not p.name.startswith(".")}


def load_checked_tokenizer(directory: str | os.PathLike[str], digest: Any, where: str) -> Tokenizer:
    """``load_tokenizer(directory)`` after checking its files against ``digest`` recorded in ``where``
    (None: nothing was recorded, as in runs written before gptlab recorded it)."""
    directory = Path(directory)
    if digest is not None:
        if not isinstance(digest, dict) or not all(isinstance(v, str) for v in digest.values()):
            raise TokenizerError(f"{where}: field 'tokenizer_sha256' must map file names to sha256 digests")
        found = tokenizer_digest(directory) if directory.is_dir() else {}
        for name, sha in digest.items():
            if found.get(name) != sha:
                what = "is missing" if name not in found else "does not match the sha256 recorded in " + where
                raise TokenizerError(f"{directory / name}: {what} (the tokenizer was modified after saving); "
                                     f"copy the whole directory again, or re-run what wrote it")
    return load_tokenizer(directory)


def load_tokenizer(spec: str | os.PathLike[str]) -> Tokenizer:
    """A tokenizer from a spec: "gpt2", a saved/HF tokenizer directory, a tokenizer.json, a .tiktoken file, or
    a BERT WordPiece vocab.txt (or a directory holding one).

    The word "gpt2" and the trained modes (char, word, bpe, wordpiece) are keywords even if a directory
    of that name exists (write ./gpt2 for the directory). "gpt2" reads the file named by
    $GPTLAB_GPT2_TIKTOKEN when set, else asks tiktoken (its cache, or the network).
    """
    if isinstance(spec, str):
        if spec == "gpt2":
            return _load_gpt2()
        if spec in TOKENIZER_MODES:
            raise TokenizerError(
                f"a {spec} vocabulary is built from the training data, not loaded by name: use `gptlab tokenizer "
                f"train --mode {spec}` (or `gptlab prepare --tokenizer {spec}`, CharTokenizer.from_text(text)), "
                f"or pass the directory a {spec} tokenizer was saved to"
            )
    path = Path(spec).expanduser()
    if path.is_dir():
        cfg_path = path / TOKENIZER_CONFIG
        if cfg_path.is_file():
            config = _read_json(cfg_path)
            if isinstance(config, dict) and "kind" in config:
                return _load_saved(path, config)
            # else: a transformers tokenizer_config.json; fall through to the HF files beside it
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file() and is_gpt1_pair(path / "vocab.json"):
            return load_gpt1_pair(path)  # before tokenizer.json, which transformers writes beside it
        if (path / "tokenizer.json").is_file():
            return BPETokenizer.from_file(path / "tokenizer.json")
        if (path / "vocab.txt").is_file():
            return WordPieceTokenizer.from_vocab_file(path / "vocab.txt")
        for vocab, merges in (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")):
            if (path / vocab).is_file() and (path / merges).is_file():
                return BPETokenizer.from_gpt2_pair((path / vocab, path / merges))
        raise TokenizerError(
            f"{path}: no {TOKENIZER_CONFIG}, tokenizer.json, vocab.txt, vocab.json+merges.txt or encoder.json+vocab.bpe; "
            "point at a saved tokenizer directory"
        )
    if path.suffix == ".tiktoken":
        return TiktokenTokenizer.from_file(path)
    if path.name.endswith("tokenizer.json") and path.is_file():
        return BPETokenizer.from_file(path)
    if path.suffix == ".txt" and path.is_file():
        return WordPieceTokenizer.from_vocab_file(path)
    s = str(spec)
    hint = ""
    if s.startswith("bpe"):
        hint = " (BPE vocabularies are trained: run `gptlab tokenizer train` and pass its output directory)"
    elif path.suffix or os.sep in s:
        hint = f" ({path} does not exist)"
    raise TokenizerError(f"unknown tokenizer spec {s!r}{hint}; expected gpt2, char, a directory or a .tiktoken file")


# --------------------------------------------------------------------------- comparing tokenizers
def _tokenizer_name(tok: Tokenizer | None, spec: Any) -> str:
    name = spec if isinstance(spec, str) and spec else type(tok).__name__ if tok is not None else "unknown"
    vocab = getattr(tok, "vocab_size", None)
    return f"{name} (vocab {vocab})" if vocab is not None else str(name)


def check_tokenizers_match(model_tok: Tokenizer | None, data_tok: Tokenizer | None, *, model_vocab: int, data_vocab: int,
                           model_name: str, data_name: str, model_spec: Any = None, data_spec: Any = None) -> None:
    """UserError naming both sides when a data dir was tokenized differently from the model's tokenizer."""
    def fail(why: str) -> None:
        raise TokenizerError(f"tokenizer mismatch ({why}): data {data_name} uses "
                        f"{_tokenizer_name(data_tok, data_spec)} but model {model_name} uses "
                        f"{_tokenizer_name(model_tok, model_spec)}; prepare the data with the model's tokenizer "
                        f"(gptlab prepare --tokenizer {model_name}/tokenizer)")

    if data_vocab > model_vocab:
        fail(f"data vocab_size {data_vocab} > model vocab_size {model_vocab}")
    if model_tok is None or data_tok is None:
        if data_vocab != model_vocab:
            fail(f"vocab_size {data_vocab} != {model_vocab}")
        return
    why = tokenizer_difference(model_tok, data_tok)
    if why is not None:
        fail(why)


def tokenizer_difference(model_tok: Tokenizer, data_tok: Tokenizer) -> str | None:
    """Why ``data_tok`` does not encode text as ``model_tok`` does, or None when it does.

    The model's tokenizer may extend the data's with special tokens at new ids.
    """
    model_special, data_special = dict(model_tok.special_tokens), dict(data_tok.special_tokens)
    # a model may have grown special tokens after the data was prepared (chat or GPT-1 task tokens)
    if not set(range(data_tok.vocab_size, model_tok.vocab_size)) <= set(model_special.values()):
        return f"vocab_size {data_tok.vocab_size} != {model_tok.vocab_size}"
    if any(model_special.get(k) != v for k, v in data_special.items()):
        return "different special tokens"
    special = set(data_special.values())
    for i in range(data_tok.vocab_size):  # ~50k lookups for GPT-2: a few tens of milliseconds
        if i in special:
            continue
        try:
            a, b = data_tok.token_bytes(i), model_tok.token_bytes(i)
        except Exception:  # an id without bytes (gap in a vocabulary): compare the failure
            continue
        if a != b:
            return f"token {i} is {a!r} in the data but {b!r} in the model"
    return None
