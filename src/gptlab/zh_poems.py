"""The Chinese poetry corpora of `gptlab demo --corpus zh-poems|zh-tang300`, and the check of a poem's form.

``zh-poems`` is the Complete Tang Poems (全唐诗) of the npm package ``chinese-poetry@2.0.1`` (MIT; an 85 MB
tarball of JSON, whose 58 ``poet.tang.*.json`` files hold 57,607 poems, 4.1 M characters, in traditional
characters): the scale GPT2-Chinese's poem models trained at. ``make install`` fetches the tarball from the
npm registry and unpacks the Tang files into ``.venv/share/chinese-poetry`` (an ``npm install
chinese-poetry`` in the working directory is found too). Poems with lost characters (□) or with editors'
marks left after their notes are removed are left out.

``zh-tang300`` is Debian's ``fortunes-zh`` package (GPL-3.0+; a 546 kB .deb, 2.2 MB unpacked): the Tang 300
poems (唐诗三百首, 313 poems, 29k characters), 95 Song poems, and 5,263 modern Chinese quotations (2.1 MB).
``make install`` fetches it with ``apt-get download`` and unpacks it with ``dpkg-deb -x`` into ``.venv``
(no root needed); a system-wide ``apt install fortunes-zh`` is found too. Its 408 poems are small enough
for a model to learn by heart. Nothing is downloaded at run time.

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
from .jsonsafe import parse_json

__all__ = ["Poem", "fortunes_dir", "read_fortunes", "load_poems", "tang_dir", "load_tang_poems", "verses", "Form",
           "poem_form", "form_shares"]

FORTUNES = ("tang300", "song100", "chinese")
INSTALL_HINT = ("fetch it with `apt-get download fortunes-zh && dpkg-deb -x fortunes-zh_*.deb .venv` "
                "(`make install` does this) or `apt install fortunes-zh`")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_TITLE = re.compile(r"《([^》]+)》")
_VERSE_END = re.compile(r"[，。？！；：、,.?!;:]")
TANG_PACKAGE = "chinese-poetry"
TANG_INSTALL_HINT = ("fetch it with `curl -fsSL https://registry.npmjs.org/chinese-poetry/-/chinese-poetry-2.0.1.tgz "
                     "| tar -xz -C .venv/share/chinese-poetry --strip-components=1` (`make install` does this) "
                     "or `npm install chinese-poetry`")
_NOTE = re.compile(r"（[^（）]*）|\([^()]*\)|〖[^〖〗]*〗|\[[^\[\]]*\]|\{[^{}]*\}")  # editors' notes, variants
_VERSE_LINE = re.compile(r"[\u4e00-\u9fff，。？！；：、]+")


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


def tang_dir() -> Path:
    """The directory of chinese-poetry's ``poet.tang.*.json``: unpacked into this environment, else an npm
    install in the working directory."""
    for root in (Path(sys.prefix) / "share" / TANG_PACKAGE, Path("node_modules") / TANG_PACKAGE):
        d = root / "dist" / "quantangshi"
        if any(d.glob("poet.tang.*.json")):
            return d
    raise DataError(f"the Complete Tang Poems (npm's chinese-poetry) are not installed: {TANG_INSTALL_HINT}")


def _tang_poem(record: object) -> Poem | None:
    """A clean poem from a chinese-poetry record, or None: notes removed, no lost (□) or stray characters."""
    if not isinstance(record, dict) or not isinstance(record.get("paragraphs"), list):
        return None
    lines = tuple(_NOTE.sub("", str(p)).strip() for p in record["paragraphs"])
    title = _NOTE.sub("", str(record.get("title", ""))).strip()
    if not lines or not title or not all(_VERSE_LINE.fullmatch(line) for line in lines) or re.search(r"[《》\n□（）()]", title):
        return None
    return Poem(title, str(record.get("author", "")), lines)


def load_tang_poems(directory: Path | None = None) -> list[Poem]:
    """The clean poems of the Complete Tang Poems, in the package's order."""
    d = directory or tang_dir()
    files = sorted(d.glob("poet.tang.*.json"), key=lambda p: int(p.name.split(".")[2]))
    poems: list[Poem] = []
    for path in files:
        try:
            records = parse_json(path.read_bytes())
        except ValueError as e:  # BadJSON, bad UTF-8 included
            raise DataError(f"{path}: not chinese-poetry's JSON ({e}); reinstall it ({TANG_INSTALL_HINT})") from None
        poems += [p for r in (records if isinstance(records, list) else []) if (p := _tang_poem(r))]
    if not poems:
        raise DataError(f"{d}: no poems found in poet.tang.*.json; reinstall chinese-poetry ({TANG_INSTALL_HINT})")
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
