"""The Chinese poetry corpus of `gptlab demo --corpus zh-poems`, and the check of a poem's classical form.

The text is Debian's ``fortunes-zh`` package (GPL-3.0+; a 546 kB .deb, 2.2 MB unpacked): the Tang 300
poems (唐诗三百首, 313 poems, 29k characters), 95 Song poems, and 5,263 modern Chinese quotations (2.1 MB).
No larger Chinese corpus is on PyPI. ``make install`` fetches the package with ``apt-get download`` and
unpacks it with ``dpkg-deb -x`` into ``.venv`` (no root needed); a system-wide ``apt install fortunes-zh``
is found too. Nothing is downloaded at run time.

Classical form (近体诗): every verse (the text between two punctuation marks) five or seven characters, all
of one length, four verses (a 绝句) or eight (a 律诗); 241 of the 313 Tang poems have it.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .errors import DataError

__all__ = ["Poem", "fortunes_dir", "read_fortunes", "load_poems", "verses", "Form", "poem_form", "form_shares"]

FORTUNES = ("tang300", "song100", "chinese")
INSTALL_HINT = ("fetch it with `apt-get download fortunes-zh && dpkg-deb -x fortunes-zh_*.deb .venv` "
                "(`make install` does this) or `apt install fortunes-zh`")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_TITLE = re.compile(r"《([^》]+)》")
_VERSE_END = re.compile(r"[，。？！；：、,.?!;:]")


def fortunes_dir() -> Path:
    """Where fortunes-zh's files are: unpacked into this Python environment, else installed system-wide."""
    for root in (Path(sys.prefix) / "usr", Path("/usr")):
        d = root / "share" / "games" / "fortunes"
        if all((d / name).is_file() for name in FORTUNES):
            return d
    raise DataError(f"the Chinese corpus (Debian's fortunes-zh) is not installed: {INSTALL_HINT}")


def read_fortunes(path: str | Path) -> list[str]:
    """The entries of a fortune file (``%`` lines between them), without the terminal colour codes."""
    text = _ANSI.sub("", Path(path).read_text(encoding="utf-8"))
    return [e.strip("\n") for e in re.split(r"\n%\n", text) if e.strip()]


@dataclass(frozen=True)
class Poem:
    title: str
    author: str
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        """The training text: the title in 《》 on the first line, then the poem's lines."""
        return f"《{self.title}》\n" + "\n".join(self.lines) + "\n"


def _parse_poem(entry: str) -> Poem | None:
    rows = [r.strip() for r in entry.split("\n") if r.strip()]
    if len(rows) < 3 or not (title := _TITLE.search(rows[0])) or not rows[1].startswith("作者"):
        return None
    author = re.sub(r"[（(].*", "", rows[1][3:]).strip()
    lines = tuple(r for r in rows[2:] if _VERSE_END.search(r))  # drops subtitles such as 其一
    return Poem(title.group(1), author, lines) if lines else None


def load_poems(directory: Path | None = None) -> list[Poem]:
    """The Tang 300 and the Song poems of fortunes-zh, in file order."""
    d = directory or fortunes_dir()
    poems = [p for name in ("tang300", "song100") for e in read_fortunes(d / name) if (p := _parse_poem(e))]
    if not poems:
        raise DataError(f"{d}: no poems found in tang300/song100; reinstall fortunes-zh ({INSTALL_HINT})")
    return poems


def verses(body: str) -> list[str]:
    """The verses of a poem's body: the runs of text between punctuation marks and line ends."""
    return [v for v in _VERSE_END.split(body.replace("\n", "，")) if v.strip()]


@dataclass(frozen=True)
class Form:
    verse_lengths: tuple[int, ...]

    @property
    def classical_lines(self) -> bool:
        """Every verse 5 or every verse 7 characters."""
        return len(set(self.verse_lengths)) == 1 and self.verse_lengths[0] in (5, 7)

    @property
    def classical(self) -> bool:
        """Classical lines, and four of them (jueju) or eight (lüshi)."""
        return self.classical_lines and len(self.verse_lengths) in (4, 8)


def poem_form(text: str) -> Form:
    """The form of a poem as the demo writes it: a title line in 《》, then the body."""
    body = text.split("\n", 1)[1] if text.lstrip().startswith("《") and "\n" in text else text
    return Form(tuple(len(v.strip()) for v in verses(body)))


def form_shares(texts: Iterable[str]) -> dict[str, float]:
    """The share of poems with classical lines, and with the classical form too."""
    forms = [poem_form(t) for t in texts]
    n = max(len(forms), 1)
    return {"poems": len(forms), "classical_lines": sum(f.classical_lines for f in forms) / n,
            "classical_form": sum(f.classical for f in forms) / n}
