"""Token data directories: ``gptlab prepare`` writes them, training and evaluation read them.

    DATA_DIR/
      tokenizer/             the tokenizer the shards were made with (the directory is self-contained)
      train-00000.bin ...    flat token ids, uint16 when the vocabulary fits, else uint32;
      val-00000.bin ...      every document is followed by <|endoftext|>
      meta.json              written last: a directory with meta.json is complete

``prepare`` streams its inputs (see ``corpus``) through a pool of tokenizer
processes with a bounded number of chunks in flight, so memory stays flat
whatever the input size, and builds everything in a temporary sibling directory
that is renamed into place only when it is complete.

Training batches are drawn statelessly: ``PretrainBatches.get(step, micro)``
depends only on ``(seed, step, micro)``, so resuming needs no data cursor
beyond the step, and every rank of a distributed run takes its rows of the same
global batch (a run on N processes sees exactly the batches of one process).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import multiprocessing
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
from tqdm.auto import tqdm

from . import __version__
from .atomic import atomic_write_json, remove_stale, temporary_name
from .corpus import Piece, expand_inputs, iter_pieces
from .jsonsafe import parse_json
from .errors import DataError
from .tokenizer import (TOKENIZER_MODES, Tokenizer, load_checked_tokenizer, load_tokenizer, tokenizer_digest,
                        train_tokenizer)

__all__ = ["META_FILE", "VERIFIED_FILE", "check_meta", "TokenData", "ShardedTokens", "PretrainBatches", "rank_draw",
           "eval_batches", "prepare", "write_documents", "check_new_dir"]

META_FILE = "meta.json"
TOKENIZER_DIR = "tokenizer"
FORMAT = "gptlab-tokens/1"
SHARD_TOKENS = 1 << 27  # 128 Mi tokens: 256 MB of uint16 per shard
_BATCH_BYTES = 1 << 20
_PARALLEL_MIN_BYTES = 16 << 20


# --------------------------------------------------------------------------- prepare

_worker_tok: Tokenizer | None = None


def _init_worker(tokenizer_dir: str) -> None:
    global _worker_tok
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    _worker_tok = load_tokenizer(tokenizer_dir)


class _Counts(NamedTuple):
    """What a run of pieces of one split holds besides its ids."""
    bytes: int
    chars: int
    documents: int
    unk: int


def _encode(items: list[tuple[str, str, bool]], dtype: str) -> list[tuple[str, np.ndarray, _Counts]]:
    """Encode pieces; consecutive pieces of a split become one array ``(split, ids, counts)``."""
    tok = _worker_tok
    assert tok is not None
    ids = tok.encode_batch([text for _, text, _ in items])
    out: list[tuple[str, np.ndarray, _Counts]] = []
    run: list[int] = []
    nbytes = nchars = docs = 0
    for i, (split, text, doc_end) in enumerate(items):
        run += ids[i]
        nbytes += len(text.encode("utf-8"))
        nchars += len(text)
        if doc_end:
            run.append(tok.eos_id)
            docs += 1
        if i + 1 == len(items) or items[i + 1][0] != split:
            arr = np.asarray(run, dtype=dtype)
            unk = 0 if tok.unk_id is None else int(np.count_nonzero(arr == tok.unk_id))
            out.append((split, arr, _Counts(nbytes, nchars, docs, unk)))
            run, nbytes, nchars, docs = [], 0, 0, 0
    return out


def _batches(pieces: Iterator[Piece]) -> Iterator[list[tuple[str, str, bool]]]:
    batch: list[tuple[str, str, bool]] = []
    size = 0
    for p in pieces:
        batch.append((p.split, p.text, p.doc_end))
        size += len(p.text) + 64
        if size >= _BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


class _SplitWriter:
    """Appends token arrays to ``{split}-NNNNN.bin`` shards, hashing as it writes."""

    def __init__(self, directory: Path, split: str, dtype: str, shard_tokens: int) -> None:
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.tokens = self.bytes = self.chars = self.documents = self.unk = 0
        self._f: Any = None
        self._digest: Any = None

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self._f, self._digest = open(self.directory / name, "wb"), hashlib.sha256()
        self.shards.append({"file": name, "tokens": 0})

    def _close(self) -> None:
        if self._f is not None:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            self.shards[-1]["sha256"] = self._digest.hexdigest()
            self._f = None

    def write(self, ids: np.ndarray, counts: _Counts) -> None:
        self.bytes += counts.bytes
        self.chars += counts.chars
        self.documents += counts.documents
        self.unk += counts.unk
        while len(ids):
            if self._f is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self._close()
                self._open()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            part, ids = ids[:room], ids[room:]
            data = part.tobytes()
            self._f.write(data)
            self._digest.update(data)
            self.shards[-1]["tokens"] += len(part)
            self.tokens += len(part)

    def finish(self) -> dict[str, Any]:
        self._close()
        return {"tokens": self.tokens, "bytes": self.bytes, "characters": self.chars, "documents": self.documents,
                "unk_tokens": self.unk, "shards": self.shards}


def _build_tokenizer(spec: str, sources: Sequence[Any], *, vocab_size: int | None, val_fraction: float,
                     seed: int, text_field: str, progress: bool) -> Tokenizer:
    def texts(train_only: bool) -> Iterator[str]:
        for p in iter_pieces(sources, val_fraction=val_fraction, seed=seed, text_field=text_field):
            if p.text and (p.split == "train" or not train_only):
                yield p.text

    if spec in TOKENIZER_MODES:
        # The train split only, except a char vocabulary of unbounded size: it holds every character of the
        # corpus, val ones included, as nanoGPT's does (a bounded one counts the rest as <|unk|>).
        train_only = spec != "char" or vocab_size is not None
        return train_tokenizer(spec, texts(train_only=train_only), vocab_size, show_progress=progress)
    if vocab_size is not None:
        raise DataError(f"--vocab-size applies to a tokenizer trained here ({', '.join(TOKENIZER_MODES)}), "
                        f"not to {spec}")
    return load_tokenizer(spec)


def _input_bytes(sources: Sequence[Any]) -> int | None:
    if any(s.kind == "hf" or s.gzipped for s in sources):
        return None
    return sum(os.path.getsize(s.path) for s in sources)


def check_new_dir(out: str | os.PathLike[str]) -> Path:
    """``out`` as a Path, refused when it exists and is not an empty directory (data is never written over)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out}: already exists and is not empty; choose another --out or remove it")
    return out


@contextlib.contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A temporary sibling of ``out`` to build a data directory in: renamed to ``out`` when the block ends,
    removed when it raises."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out.parent)  # what an earlier writer that was killed left behind
    tmp = out.parent / temporary_name(out.name, "prepare")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            out.rmdir()  # empty (check_new_dir)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_meta(tmp: Path, tok: Tokenizer, spec: Any, dtype: str, splits: dict[str, Any],
                extra: dict[str, Any]) -> dict[str, Any]:
    """meta.json, written last: a directory with meta.json is complete."""
    meta = {
        "format": FORMAT,
        "tokenizer": spec,
        "tokenizer_dir": TOKENIZER_DIR,
        "tokenizer_sha256": tokenizer_digest(tmp / TOKENIZER_DIR),
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "dtype": dtype,
        "splits": splits,
        **extra,
        "gptlab_version": __version__,
    }
    atomic_write_json(tmp / META_FILE, meta)
    return meta


def write_documents(out: str | os.PathLike[str], tokenizer: Tokenizer,
                    documents: Iterable[tuple[str, np.ndarray, int]], extra: dict[str, Any],
                    files: dict[str, Callable[[Path], Any]] | None = None) -> dict[str, Any]:
    """A data directory from documents already tokenized (``(split, ids, source bytes)``, each followed by
    ``<|endoftext|>`` in its split), as ``prepare`` writes one; ``extra`` joins meta.json and ``files``
    (name -> writer of that path) adds files beside the shards. Returns the meta."""
    out = check_new_dir(out)
    dtype = "uint16" if tokenizer.vocab_size <= 1 << 16 else "uint32"
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    with _staging(out) as tmp:
        tokenizer.save(tmp / TOKENIZER_DIR)
        writers = {s: _SplitWriter(tmp, s, dtype, SHARD_TOKENS) for s in ("train", "val")}
        for split, ids, nbytes in documents:
            writers[split].write(np.concatenate([np.asarray(ids, dtype=dtype), eos]), _Counts(nbytes, 0, 1, 0))
        splits = {s: w.finish() for s, w in writers.items()}
        for name, write in (files or {}).items():
            write(tmp / name)
        meta = _write_meta(tmp, tokenizer, tokenizer.spec, dtype, splits, extra)
    return meta


def prepare(inputs: Sequence[str | os.PathLike[str]], tokenizer: str | Tokenizer, out: str | os.PathLike[str], *,
            val_fraction: float = 0.1, seed: int = 1337, text_field: str = "text", vocab_size: int | None = None,
            dtype: str = "auto", workers: int | None = None, shard_tokens: int = SHARD_TOKENS,
            progress: bool = True) -> dict[str, Any]:
    """Tokenize ``inputs`` into the data directory ``out``; returns its meta.

    ``tokenizer`` is a spec (``gpt2``, a directory, a ``.tiktoken`` file or ``vocab.txt``), a Tokenizer, or
    a mode (``char``, ``word``, ``bpe``, ``wordpiece``): a tokenizer of that mode, of ``vocab_size`` entries
    (needed by bpe and wordpiece), trained on the train split first. Each split's meta counts the
    characters of its text and the ``<|unk|>`` tokens that stand for ones the vocabulary lacks. ``workers`` defaults to the number of cores (inputs under
    16 MB are tokenized in this process: starting workers would cost more).
    """
    out = check_new_dir(out)
    if dtype not in ("auto", "uint16", "uint32"):
        raise DataError(f"dtype {dtype!r} must be auto, uint16 or uint32")
    sources = expand_inputs(inputs)
    spec = tokenizer if isinstance(tokenizer, str) else tokenizer.spec
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else _build_tokenizer(
        tokenizer, sources, vocab_size=vocab_size, val_fraction=val_fraction, seed=seed, text_field=text_field,
        progress=progress)
    if spec in TOKENIZER_MODES:
        spec = tok.spec
    if dtype == "auto":
        dtype = "uint16" if tok.vocab_size <= 1 << 16 else "uint32"
    elif dtype == "uint16" and tok.vocab_size > 1 << 16:
        raise DataError(f"the tokenizer has {tok.vocab_size} tokens, too many for uint16 shards (at most 65536); "
                        "use --dtype uint32 (or auto)")

    with _staging(out) as tmp:
        tok.save(tmp / TOKENIZER_DIR)
        writers = {s: _SplitWriter(tmp, s, dtype, shard_tokens) for s in ("train", "val")}
        digests: dict[str, Any] = {}
        batches = _batches(iter_pieces(sources, val_fraction=val_fraction, seed=seed, text_field=text_field,
                                       digests=digests))
        total = _input_bytes(sources)
        nproc = max(1, workers if workers is not None else (os.cpu_count() or 1))
        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="prepare",
                   disable=not progress, dynamic_ncols=True)

        def write(results: list[tuple[str, np.ndarray, _Counts]]) -> None:
            for split, ids, counts in results:
                writers[split].write(ids, counts)
                bar.update(counts.bytes)
            bar.set_postfix(tokens=f"{writers['train'].tokens + writers['val'].tokens:,}", refresh=False)

        if nproc == 1 or (total is not None and total < _PARALLEL_MIN_BYTES):
            _init_worker(str(tmp / TOKENIZER_DIR))
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
            for batch in batches:
                write(_encode(batch, dtype))
        else:
            ctx = multiprocessing.get_context("spawn")  # fork after torch/tokenizers threads start can hang
            with ctx.Pool(nproc, initializer=_init_worker, initargs=(str(tmp / TOKENIZER_DIR),)) as pool:
                pending: collections.deque[Any] = collections.deque()
                for batch in batches:
                    pending.append(pool.apply_async(_encode, (batch, dtype)))
                    while len(pending) > 2 * nproc:  # bounded: the reader never runs far ahead
                        write(pending.popleft().get())
                while pending:
                    write(pending.popleft().get())
        bar.close()
        splits = {s: w.finish() for s, w in writers.items()}
        if splits["train"]["tokens"] == 0:
            raise DataError(f"{', '.join(map(str, inputs))}: no training text after the split; pass more text")
        if val_fraction > 0 and splits["val"]["tokens"] == 0:
            raise DataError(f"the validation split is empty ({splits['train']['documents']} documents, "
                            f"--val-fraction {val_fraction}); raise --val-fraction or add documents")
        meta = _write_meta(tmp, tok, spec, dtype, splits, {
            "inputs": [{"path": s.path, "kind": s.kind, "sha256": digests[s.path].hexdigest()} for s in sources],
            "val_fraction": val_fraction, "split_seed": seed, "text_field": text_field})
    return meta


# --------------------------------------------------------------------------- reading


class ShardedTokens:
    """The shards of one split as one read-only sequence of token ids (memory-mapped).

    With ``vocab_size``, every window read is checked to hold ids below it, so that a corrupted shard
    read without ``TokenData.verify`` still stops with its place named rather than inside the model.
    """

    def __init__(self, paths: Sequence[Path], dtype: str, vocab_size: int | None = None) -> None:
        self.paths = [p for p in paths if os.path.getsize(p) > 0]
        self.maps = [np.memmap(p, dtype=dtype, mode="r") for p in self.paths]
        self.offsets = np.cumsum([0] + [len(m) for m in self.maps])
        self.vocab_size = vocab_size

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` as int64, crossing shard boundaries when needed."""
        ids = self._window(start, length)
        if self.vocab_size is not None and len(ids) and int(ids.max()) >= self.vocab_size:
            at = start + int(np.argmax(ids >= self.vocab_size))
            i = int(np.searchsorted(self.offsets, at, side="right")) - 1
            raise DataError(f"{self.paths[i]}: token id {int(ids[at - start])} at offset {at - int(self.offsets[i])} "
                            f"is not below vocab_size {self.vocab_size} (the shard was corrupted or written with "
                            f"another tokenizer); re-run gptlab prepare")
        return ids

    def _window(self, start: int, length: int) -> np.ndarray:
        if start < 0 or start + length > len(self):
            raise IndexError(f"window [{start}, {start + length}) outside {len(self)} tokens")
        if length == 0:
            return np.zeros(0, dtype=np.int64)
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        local = start - int(self.offsets[i])
        if local + length <= len(self.maps[i]):
            return self.maps[i][local:local + length].astype(np.int64)
        parts, need = [], length
        while need:
            part = self.maps[i][local:local + need]
            parts.append(part)
            need -= len(part)
            i, local = i + 1, 0
        return np.concatenate(parts).astype(np.int64)

    def __getitem__(self, key: slice) -> np.ndarray:
        start, stop, step = key.indices(len(self))
        if step != 1:
            raise IndexError("ShardedTokens supports contiguous slices only")
        return self.window(start, max(stop - start, 0))


def _plain_name(value: Any) -> bool:
    """A file name that stays inside its directory: no separators, no ``..``, not hidden."""
    return isinstance(value, str) and bool(value) and Path(value).name == value and "\\" not in value \
        and not value.startswith(".")


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_meta(meta: Any, where: Path) -> dict[str, Any]:
    """``meta`` checked as the schema ``prepare`` writes; a ``DataError`` names the field otherwise."""
    def need(cond: bool, field: str, what: str) -> None:
        if not cond:
            raise DataError(f"{where}: field {field} {what}; re-run gptlab prepare")

    need(isinstance(meta, dict) and meta.get("format") == FORMAT, "format", f"is not {FORMAT!r}")
    vocab, dtype = meta.get("vocab_size"), meta.get("dtype")
    need(_count(vocab) and vocab > 0, "vocab_size", "must be a positive integer")
    need(dtype in ("uint16", "uint32"), "dtype", "must be 'uint16' or 'uint32'")
    need(dtype == "uint32" or vocab <= 1 << 16, "vocab_size", f"{vocab} does not fit uint16 shards")
    need(_count(meta.get("eos_id")) and meta["eos_id"] < vocab, "eos_id", "must be a token id below vocab_size")
    need(_plain_name(meta.get("tokenizer_dir", TOKENIZER_DIR)), "tokenizer_dir", "must be a directory name inside "
                                                                                "the data directory")
    splits = meta.get("splits")
    need(isinstance(splits, dict) and isinstance(splits.get("train"), dict), "splits", "must hold a 'train' split")
    for name, info in splits.items():
        at = f"splits.{name}"
        need(isinstance(info, dict), at, "must be an object")
        for key in ("tokens", "bytes", "documents"):
            need(_count(info.get(key)), f"{at}.{key}", "must be a count (an integer >= 0)")
        shards = info.get("shards")
        need(isinstance(shards, list), f"{at}.shards", "must be a list")
        for i, shard in enumerate(shards):
            field = f"{at}.shards[{i}]"
            need(isinstance(shard, dict), field, "must be an object")
            need(_plain_name(shard.get("file")), f"{field}.file", "must be a file name inside the data directory")
            need(_count(shard.get("tokens")), f"{field}.tokens", "must be a count (an integer >= 0)")
            sha = shard.get("sha256")
            need(isinstance(sha, str) and len(sha) == 64, f"{field}.sha256", "must be a sha256 digest")
        need(sum(s["tokens"] for s in shards) == info["tokens"], f"{at}.tokens", "is not the sum of its shards'")
    return meta


VERIFIED_FILE = ".verified.json"  # shards already checked, by size and mtime: the check runs once per change


class TokenData:
    """A data directory written by ``prepare``: its meta (checked as a schema), splits and tokenizer."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        meta_path = self.path / META_FILE
        if not meta_path.is_file():
            what = "does not exist" if not self.path.exists() else "is not a data directory (no meta.json)"
            raise DataError(f"{self.path}: {what}; create it with `gptlab prepare --input FILES "
                            f"--tokenizer SPEC --out {self.path}`")
        try:
            meta = parse_json(meta_path.read_bytes())
        except (ValueError, OSError) as e:
            raise DataError(f"{meta_path}: {e}; re-run gptlab prepare") from None
        self.meta: dict[str, Any] = check_meta(meta, meta_path)
        self._splits: dict[str, ShardedTokens] = {}

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def _shard_path(self, shard: dict[str, Any]) -> Path:
        """A shard's file, checked to be there with the size meta.json gives it."""
        p = self.path / shard["file"]
        expected = shard["tokens"] * np.dtype(self.meta["dtype"]).itemsize
        if not p.is_file() or p.stat().st_size != expected:
            raise DataError(f"{p}: missing or truncated (expected {shard['tokens']} tokens, {expected} bytes); "
                            "re-run gptlab prepare")
        return p

    def split(self, name: str) -> ShardedTokens:
        if name not in self._splits:
            info = self.meta["splits"].get(name)
            if info is None:
                raise DataError(f"{self.path}: no split {name!r}; it has {', '.join(self.meta['splits'])}")
            paths = [self._shard_path(shard) for shard in info["shards"]]
            self._splits[name] = ShardedTokens(paths, self.meta["dtype"], self.vocab_size)
        return self._splits[name]

    def bytes_per_token(self, split: str) -> float:
        info = self.meta["splits"][split]
        return info["bytes"] / max(info["tokens"], 1)

    def tokenizer(self) -> Tokenizer:
        directory = self.path / self.meta.get("tokenizer_dir", TOKENIZER_DIR)
        tok = load_checked_tokenizer(directory, self.meta.get("tokenizer_sha256"), str(self.path / META_FILE))
        if (tok.vocab_size, tok.eos_id) != (self.vocab_size, self.meta["eos_id"]):
            raise DataError(f"{self.path / META_FILE}: vocab_size {self.vocab_size} and eos_id {self.meta['eos_id']} "
                            f"are not the tokenizer's ({tok.vocab_size}, {tok.eos_id}); re-run gptlab prepare")
        return tok

    def verify(self) -> None:
        """Check every shard against its sha256 and every id against the vocabulary, once per change.

        A full read (the cost per GB is in docs/BENCHMARKS.md); a shard already checked at its size and
        mtime is skipped, remembered in ``.verified.json`` when the directory is writable.
        """
        cache_path = self.path / VERIFIED_FILE
        try:
            cache = json.loads(cache_path.read_text(encoding="utf-8"))
            cache = cache if isinstance(cache, dict) else {}
        except (OSError, ValueError):
            cache = {}
        fresh: dict[str, Any] = {}
        for info in self.meta["splits"].values():
            for shard in info["shards"]:
                p = self._shard_path(shard)
                stat = p.stat()
                stamp = [stat.st_size, stat.st_mtime_ns, shard["sha256"], self.vocab_size]
                if cache.get(shard["file"]) != stamp:
                    self._check_shard(p, shard["sha256"])
                fresh[shard["file"]] = stamp
        if fresh != cache:
            try:
                atomic_write_json(cache_path, fresh)
            except OSError:  # a read-only data directory: check again next time
                pass

    def _check_shard(self, path: Path, sha256: str) -> None:
        dtype = np.dtype(self.meta["dtype"])
        digest, offset = hashlib.sha256(), 0
        with open(path, "rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
                ids = np.frombuffer(block, dtype=dtype)
                if len(ids) and int(ids.max()) >= self.vocab_size:
                    at = offset + int(np.argmax(ids >= self.vocab_size))
                    raise DataError(f"{path}: token id {int(ids[at - offset])} at offset {at} is not below "
                                    f"vocab_size {self.vocab_size} (the shard was corrupted or written with "
                                    f"another tokenizer); re-run gptlab prepare")
                offset += len(ids)
        if digest.hexdigest() != sha256:
            raise DataError(f"{path}: sha256 does not match meta.json (the file changed after prepare); "
                            "re-run gptlab prepare")


def rank_draw(seed: Sequence[int], high: int, batch_size: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
    """This rank's rows of one seeded global draw of ``batch_size * world_size`` indices in ``[0, high)``.

    Every stage samples its batches this way: the draw depends only on ``seed``
    (e.g. ``(seed, step, micro_step)``), so a resumed run draws the same batch and
    N processes together see exactly the batch of one process.
    """
    everyone = np.random.default_rng(list(seed)).integers(0, high, size=batch_size * world_size)
    return everyone[rank * batch_size:(rank + 1) * batch_size]


class PretrainBatches:
    """Random training windows; batch ``(step, micro)`` depends only on ``(seed, step, micro)``.

    Each call draws the global batch (``batch_size * world_size`` windows) and
    returns this rank's rows, so N processes together see one process's batch.
    """

    def __init__(self, tokens: ShardedTokens, batch_size: int, block_size: int, seed: int, *,
                 rank: int = 0, world_size: int = 1) -> None:
        if len(tokens) < block_size + 1:
            raise DataError(f"the train split has {len(tokens)} tokens, fewer than block_size + 1 = "
                            f"{block_size + 1}; lower --block-size or prepare more text")
        self.tokens, self.batch_size, self.block_size = tokens, batch_size, block_size
        self.seed, self.rank, self.world_size = seed, rank, world_size

    def starts(self, step: int, micro: int) -> np.ndarray:
        return rank_draw((self.seed, step, micro), len(self.tokens) - self.block_size, self.batch_size,
                         self.rank, self.world_size)

    def get(self, step: int, micro: int) -> tuple[Any, Any]:
        import torch  # here, not at the top: prepare's tokenizer processes import this module without torch

        rows = np.stack([self.tokens.window(int(s), self.block_size + 1) for s in self.starts(step, micro)])
        t = torch.from_numpy(rows)
        return t[:, :-1], t[:, 1:]


def eval_batches(tokens: ShardedTokens, batch_size: int, block_size: int,
                 max_batches: int | None = None) -> Iterator[tuple[Any, Any]]:
    """Consecutive non-overlapping windows from the start of a split, ``batch_size`` at a time."""
    import torch  # see PretrainBatches.get

    n_windows = (len(tokens) - 1) // block_size
    if max_batches is not None:
        n_windows = min(n_windows, max_batches * batch_size)
    for first in range(0, n_windows, batch_size):
        rows = np.stack([tokens.window(w * block_size, block_size + 1)
                         for w in range(first, min(first + batch_size, n_windows))])
        t = torch.from_numpy(rows)
        yield t[:, :-1], t[:, 1:]
