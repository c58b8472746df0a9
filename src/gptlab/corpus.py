"""Reading a user's text: files, directories, globs, ``.txt``/``.jsonl`` (optionally gzipped), Hugging Face datasets.

Everything is streamed: a source yields ``Piece(split, text, doc_end)`` items of
about a megabyte, so a corpus of any size is read in bounded memory, and every
problem is reported with the file (and line) that caused it.

The validation split is decided here, deterministically:

* a text file is one document; its first ``1 - val_fraction`` of bytes, extended to
  the end of that line, is train and the rest is val (nanoGPT's rule for
  tiny-Shakespeare, applied per file so every file contributes to both splits);
* a JSONL line or a dataset record is one document; it goes to val when a seeded
  hash of its position is below ``val_fraction`` (the same records for the same
  inputs, seed and fraction, on any machine).
"""

from __future__ import annotations

import codecs
import glob
import gzip
import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from .errors import DataError
from .jsonsafe import parse_json

__all__ = ["Piece", "Source", "expand_inputs", "iter_pieces", "json_lines", "text_chunks"]

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".json")
CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class Piece:
    """A run of text from one document; ``doc_end`` marks the last piece of a document in its split."""

    split: str
    text: str
    doc_end: bool


@dataclass(frozen=True)
class Source:
    """One input: a text file, a JSONL file, or a Hugging Face dataset (``path`` = its name or directory)."""

    path: str
    kind: str  # "text" | "jsonl" | "hf"

    @property
    def gzipped(self) -> bool:
        return self.path.endswith(".gz")


def _kind_of(path: Path) -> str | None:
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    return None


def _is_hf_dataset_dir(path: Path) -> bool:
    return (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()


def expand_inputs(inputs: Sequence[str | os.PathLike[str]]) -> list[Source]:
    """Resolve ``--input`` values: ``hf:NAME[:SPLIT]``, saved dataset dirs, directories (recursively,
    known suffixes only), globs, and files (any name; ``.jsonl``/``.json`` read as JSON lines)."""
    sources: list[Source] = []
    for raw in inputs:
        spec = os.fspath(raw)
        if spec.startswith("hf:"):
            sources.append(Source(spec[3:], "hf"))
            continue
        path = Path(spec).expanduser()
        if path.is_dir():
            if _is_hf_dataset_dir(path):
                sources.append(Source(str(path), "hf"))
                continue
            found = sorted(p for p in path.rglob("*") if p.is_file() and _kind_of(p)
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise DataError(f"{path}: directory has no .txt/.md/.jsonl files (optionally .gz); "
                                "pass the files themselves to --input")
            sources += [Source(str(p), _kind_of(p) or "text") for p in found]
        elif any(c in spec for c in "*?["):
            found = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True))
            found = [p for p in found if p.is_file()]
            if not found:
                raise DataError(f"{spec}: the pattern matches no files; check the glob (quote it so the shell "
                                "does not expand it)")
            sources += [Source(str(p), _kind_of(p) or "text") for p in found]
        elif path.is_file():
            sources.append(Source(str(path), _kind_of(path) or "text"))
        else:
            raise DataError(f"{spec}: input not found; pass existing files, directories, globs or hf:NAME")
    if not sources:
        raise DataError("no inputs given; pass --input FILE_OR_DIR")
    return sources


class _HashingReader(io.RawIOBase):
    """Reads a file while hashing the raw bytes, so inputs are fingerprinted in the same pass."""

    def __init__(self, f: io.BufferedIOBase, digest: Any) -> None:
        self._f, self._digest = f, digest

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = self._f.readinto(b)
        if n:
            self._digest.update(memoryview(b)[:n])
        return n or 0


def _open_binary(path: str, digest: Any = None) -> io.BufferedIOBase:
    raw: io.BufferedIOBase = open(path, "rb")
    if digest is not None:
        raw = io.BufferedReader(_HashingReader(raw, digest), CHUNK_BYTES)
    if path.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb")
    return raw


def _content_size(path: str) -> int:
    if not path.endswith(".gz"):
        return os.path.getsize(path)
    size = 0
    try:
        with gzip.open(path, "rb") as f:
            while block := f.read(CHUNK_BYTES * 4):
                size += len(block)
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: not a valid gzip file ({e}); re-compress it or pass it uncompressed") from None
    return size


class _Decoder:
    """Incremental UTF-8 with NUL detection; errors name the file and line."""

    def __init__(self, path: str) -> None:
        self.path, self.line, self.offset = path, 1, 0
        self._dec = codecs.getincrementaldecoder("utf-8")()

    def __call__(self, data: bytes, final: bool = False) -> str:
        nul = data.find(b"\0")
        if nul >= 0:
            line = self.line + data.count(b"\n", 0, nul)
            raise DataError(f"{self.path}:{line}: binary data (NUL byte at offset "
                            f"{self.offset + nul}); pass UTF-8 text files only")
        try:
            text = self._dec.decode(data, final)
        except UnicodeDecodeError as e:
            line = self.line + data.count(b"\n", 0, max(e.start, 0))
            raise DataError(f"{self.path}:{line}: not UTF-8 text (bad byte at offset {self.offset + e.start}); "
                            "convert the file to UTF-8 or leave it out") from None
        self.line += data.count(b"\n")
        self.offset += len(data)
        return text


def text_chunks(path: str, digest: Any = None) -> Iterator[tuple[int, str]]:
    """``(byte offset, text)`` pieces of about ``CHUNK_BYTES``, cut after a newline where one is near."""
    decode = _Decoder(path)
    pending = b""
    pos = 0
    try:
        with _open_binary(path, digest) as f:
            while True:
                block = f.read(CHUNK_BYTES)
                data = pending + block
                if not block:
                    if data or pos == 0:
                        yield pos, decode(data, final=True)
                    return
                cut = data.rfind(b"\n") + 1
                if cut == 0:
                    if len(data) < 4 * CHUNK_BYTES:
                        pending = data
                        continue
                    cut = len(data)  # a very long line: cut anywhere, the decoder keeps split characters
                pending = data[cut:]
                yield pos, decode(data[:cut])
                pos += cut
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read ({e}); check the file (a truncated .gz?)") from None


def _text_file_pieces(path: str, val_fraction: float, digest: Any) -> Iterator[Piece]:
    size = _content_size(path)
    mark = int(size * (1 - val_fraction)) if val_fraction > 0 else size + 1
    split, in_doc, seen_text = "train", False, False
    for pos, text in text_chunks(path, digest):
        seen_text = seen_text or bool(text.strip())
        if split == "train" and pos + 4 * len(text) >= mark and pos + len(raw := text.encode()) >= mark:
            line_end = raw.find(b"\n", max(mark - pos - 1, 0))
            k = len(raw) if line_end < 0 else line_end + 1
            head, text = raw[:k].decode(), raw[k:].decode()
            if head or in_doc:
                yield Piece("train", head, True)
            split, in_doc = "val", False
        if text:
            yield Piece(split, text, False)
            in_doc = True
    if not seen_text:
        raise DataError(f"{path}: input file is empty; pass files that contain text")
    if in_doc:
        yield Piece(split, "", True)


def _record_split(seed: int, index: int, val_fraction: float) -> str:
    if val_fraction <= 0:
        return "train"
    h = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return "val" if int.from_bytes(h, "little") / 2.0**64 < val_fraction else "train"


def json_lines(path: str, digest: Any = None) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` for each non-blank line of a JSONL file (optionally .gz); bad bytes or
    bad JSON (``parse_json``) name the line. A byte-order mark from a Windows editor is accepted."""
    try:
        with _open_binary(path, digest) as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not UTF-8 text (bad byte at column {e.start + 1}); "
                                    "save the file as UTF-8") from None
                if not line.strip():
                    continue
                try:
                    value = parse_json(line)
                except ValueError as e:
                    raise DataError(f"{path}:{lineno}: {e}; each line must be one JSON object") from None
                yield lineno, value
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; check the path") from None
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read ({e}); check the file (a truncated .gz?)") from None


def _jsonl_records(path: str, field: str, digest: Any) -> Iterator[str]:
    for lineno, obj in json_lines(path, digest):
        if not isinstance(obj, dict) or field not in obj:
            raise DataError(f"{path}:{lineno}: no {field!r} field; set --text-field to the field "
                            "that holds the text")
        text = obj[field]
        if not isinstance(text, str):
            raise DataError(f"{path}:{lineno}: field {field!r} is {type(text).__name__}, not a string; "
                            "set --text-field to a text field")
        yield text


def _hf_records(name: str, field: str, digest: Any) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"hf:{name}: reading Hugging Face datasets needs the `datasets` package "
                        "(pip install datasets)") from None
    path = Path(name)
    if path.is_dir():
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    else:
        repo, _, split = name.partition(":")
        ds = datasets.load_dataset(repo, split=split or "train", streaming=True)
    digest.update(str(getattr(ds, "_fingerprint", name)).encode())
    for i, row in enumerate(ds):
        if field not in row or not isinstance(row[field], str):
            raise DataError(f"hf:{name}: record {i} has no text field {field!r}; set --text-field")
        yield row[field]


def iter_pieces(sources: Sequence[Source], *, val_fraction: float = 0.1, seed: int = 1337,
                text_field: str = "text", digests: dict[str, Any] | None = None) -> Iterator[Piece]:
    """All documents of all sources as pieces with their split; ``digests`` receives a sha256 per source."""
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction {val_fraction} must be in [0, 1); pass --val-fraction 0.1 for example")
    record = 0
    for src in sources:
        digest = hashlib.sha256()
        if digests is not None:
            digests[src.path] = digest
        if src.kind == "text":
            yield from _text_file_pieces(src.path, val_fraction, digest)
            continue
        records = _jsonl_records(src.path, text_field, digest) if src.kind == "jsonl" else \
            _hf_records(src.path, text_field, digest)
        empty = True
        for text in records:
            empty = False
            yield Piece(_record_split(seed, record, val_fraction), text, True)
            record += 1
        if empty:
            raise DataError(f"{src.path}: no records; pass a file with one JSON object per line")
