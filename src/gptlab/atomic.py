"""Atomic file writes, whole-line appends and checksums: a file is either its old or its new content, never torn.

Torch-free, so the tokenizer and the data-preparation workers can use it too.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Union

try:
    import fcntl
except ImportError:  # Windows: the thread lock alone serialises this process's appends
    fcntl = None  # type: ignore[assignment]

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_write_jsonl", "append_jsonl", "sha256_file",
           "fsync_dir", "temporary_name", "remove_stale", "FileFull"]

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


def temporary_name(name: str, kind: str = "tmp") -> str:
    """A hidden name for ``name`` being written by this process: ``.{name}.{pid}.{kind}.tmp``.

    The writer's pid in the name lets ``remove_stale`` tell what a killed process left behind.
    """
    return f".{name}.{os.getpid()}.{kind}.tmp"


def atomic_write(path: PathLike, write: Callable[[str], None]) -> Path:
    """Run ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``.

    The temporary file sits in a private directory named by ``temporary_name``, so that whatever the writer
    creates on its way (safetensors' own ``.tmpXXXX`` file) goes with it. If ``write`` raises, it is all
    removed and ``path`` keeps its old content (or stays absent); after a kill, ``remove_stale`` removes it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
    tmp = scratch / path.name
    try:
        write(str(tmp))
        with open(tmp, "rb+") as fh:  # fsync whatever wrote the file (Python or Rust)
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    fsync_dir(path.parent)
    return path


_STALE = re.compile(r"^\..+\.(\d+)\.[^.]+\.tmp$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # another user's process, or no such call: assume it lives
        return True
    return True


def remove_stale(directory: PathLike) -> None:
    """Delete the temporaries (``temporary_name``) of writers that died, e.g. by ``kill -9``, in ``directory``."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for entry in directory.iterdir():
        m = _STALE.match(entry.name)
        if m and not _alive(int(m.group(1))):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


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


def atomic_write_jsonl(path: PathLike, rows: Iterable[Any]) -> Path:
    """Atomically write one JSON object per line (UTF-8, characters unescaped): the data files stages read."""
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


_append_lock = threading.Lock()


def _whole_lines_end(fd: int) -> int:
    """Offset just past the file's last newline (0 if none): where its complete lines end."""
    end = os.lseek(fd, 0, os.SEEK_END)
    pos = end
    while pos > 0:
        start = max(0, pos - 4096)
        os.lseek(fd, start, os.SEEK_SET)
        chunk = os.read(fd, pos - start)
        cut = chunk.rfind(b"\n")
        if cut >= 0:
            return start + cut + 1
        pos = start
    return 0


class FileFull(Exception):
    """An append refused because the file would grow past its limit."""


def append_jsonl(path: Path, row: dict[str, Any], max_bytes: int | None = None) -> None:
    """Append ``row`` to ``path`` as one JSON line that readers only ever see whole; ``FileFull`` when the file
    would grow past ``max_bytes``.

    Chosen over temp + rename, which would rewrite the whole file for every label: the complete line
    goes out in ``os.write`` calls on an ``O_APPEND`` descriptor under a thread lock and an advisory
    ``flock`` (another server may share the data dir), and is fsynced before the request is answered.
    A line torn by a failed write is cut off at once, or, after a crash, by the next append, which first
    truncates the file to its last newline; so no line can be interleaved or left half-written under
    a good one.
    """
    line = memoryview((json.dumps(row, ensure_ascii=False) + "\n").encode())
    path.parent.mkdir(parents=True, exist_ok=True)
    with _append_lock:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)  # released by close
            size = _whole_lines_end(fd)
            if size != os.fstat(fd).st_size:
                os.ftruncate(fd, size)
            if max_bytes is not None and size + len(line) > max_bytes:
                raise FileFull(f"{path} would grow past {max_bytes} bytes")
            try:
                while line:
                    line = line[os.write(fd, line):]
                os.fsync(fd)
            except OSError:
                os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)


def sha256_file(path: PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
