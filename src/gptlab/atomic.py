"""Atomic file writes and checksums: a file is either its old or its new content, never torn.

Torch-free, so the tokenizer and the data-preparation workers can use it too.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Union

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "sha256_file", "fsync_dir"]

PathLike = Union[str, "os.PathLike[str]"]

# The process umask, read once: mkstemp creates 0600 files, and run files should get
# the same permissions as any other file the user creates.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def fsync_dir(directory: Path) -> None:
    """Persist a rename (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: PathLike, write: Callable[[str], None]) -> Path:
    """Run ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``.

    If ``write`` raises, the temporary file is removed and ``path`` keeps its old
    content (or stays absent).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:  # fsync whatever wrote the file (Python or Rust)
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: PathLike, data: bytes | Callable[[IO[bytes]], Any]) -> Path:
    """Atomically replace ``path`` with ``data``: bytes, or a callable that writes to a binary file object.

    The old file stays intact if the callable raises; returns ``path`` as a Path.
    """
    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data)

    return atomic_write(path, write)


def atomic_write_text(path: PathLike, text: str | Callable[[IO[str]], Any], encoding: str = "utf-8") -> Path:
    """Atomically replace ``path`` with ``text``: a string, or a callable that writes to a text file object."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding=encoding, newline="\n") as fh:
            if callable(text):
                text(fh)
            else:
                fh.write(text)

    return atomic_write(path, write)


def atomic_write_json(path: PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Atomically write ``obj`` as JSON (UTF-8, trailing newline).

    ``json.dump`` streams, so an unserialisable value deep inside ``obj`` raises
    midway through writing; the old file is left intact.
    """
    def write(fh: IO[str]) -> None:
        json.dump(obj, fh, indent=indent, ensure_ascii=False, allow_nan=False)
        fh.write("\n")

    return atomic_write_text(path, write)


def sha256_file(path: PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
