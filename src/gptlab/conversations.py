"""Real conversations between people, read into the SFT format (``{"messages": [...]}``).

Two PyPI packages ship them (``make install`` installs both with ``--no-deps``; nothing is downloaded at
run time):

* ``chitchat-dataset==0.9.0`` (MIT; BYU's Chit Chat Challenge): 7,168 open-domain conversations between two
  people, 40 MB of JSON: ``{id: {"messages": [[{"text", "sender", ...}, ...], ...]}}``, each inner list one
  speaker's consecutive messages.
* ``chatterbot-corpus==1.3.3`` (BSD): short scripted dialogues in 20 languages, Chinese included, as
  YAML ``conversations: [[turn, turn, ...], ...]``.

A conversation's first speaker is the user and the other the assistant, so turns alternate; messages a
speaker sends in a row are one turn (joined by a newline). Errors name the file and line (YAML) or the
file and conversation (chitchat's JSON is one line), and what to fix.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from .errors import DataError
from .jsonsafe import json_type, parse_json

__all__ = ["Conversation", "read_chitchat", "read_chatterbot", "chatterbot_languages", "held_out_conversation",
           "sft_rows", "plain_text"]

CHITCHAT_HINT = "pip install --no-deps chitchat-dataset==0.9.0 (make install does this)"
CHATTERBOT_HINT = "pip install --no-deps chatterbot-corpus==1.3.3 (make install does this)"


@dataclass(frozen=True)
class Conversation:
    """Turns of two speakers, alternating, the first the user's; ``source`` names where it was read."""

    id: str
    turns: tuple[str, ...]
    source: str

    def messages(self, turns: Sequence[str] | None = None) -> list[dict[str, str]]:
        return [{"role": "user" if k % 2 == 0 else "assistant", "content": t}
                for k, t in enumerate(self.turns if turns is None else turns)]


def _package_file(module: str, relative: str, hint: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise DataError(f"the conversations of {module} are not installed: {hint}")
    path = Path(spec.origin).parent / relative
    if not path.exists():
        raise DataError(f"{path}: missing from the {module} package; reinstall it ({hint})")
    return path


def read_chitchat(path: str | os.PathLike[str] | None = None) -> list[Conversation]:
    """The Chit Chat Challenge's conversations (``path``: its dataset.json; default: the installed package's)."""
    path = Path(path) if path is not None else _package_file("chitchat_dataset", "dataset.json", CHITCHAT_HINT)
    try:
        data = parse_json(path.read_bytes())
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; {CHITCHAT_HINT}") from None
    except ValueError as e:
        raise DataError(f"{path}: {e}; reinstall the package ({CHITCHAT_HINT})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected an object of conversations by id, found {json_type(data)}")
    out = []
    for cid, conv in data.items():
        where = f"{path}: conversation {cid}"
        groups = conv.get("messages") if isinstance(conv, dict) else None
        if not isinstance(groups, list):
            raise DataError(f"{where}: needs a 'messages' list of turns")
        turns: list[str] = []
        senders: list[Any] = []
        for k, group in enumerate(groups):
            if not isinstance(group, list) or not group or not all(
                    isinstance(m, dict) and isinstance(m.get("text"), str) for m in group):
                raise DataError(f"{where}: turn {k} must be a non-empty list of {{\"text\": ..., \"sender\": ...}}")
            sender = group[0].get("sender")
            text = "\n".join(m["text"].strip() for m in group if m["text"].strip())
            if not text:
                continue
            if senders and sender == senders[-1]:
                turns[-1] += "\n" + text
            else:
                turns.append(text)
                senders.append(sender)
        if len(set(senders)) > 2:
            raise DataError(f"{where}: has {len(set(senders))} speakers; a conversation here has two")
        if len(turns) >= 2:
            out.append(Conversation(str(cid), tuple(turns), str(path)))
    return out


def chatterbot_languages() -> list[str]:
    """The languages chatterbot-corpus has dialogues in (its data/ folders)."""
    return sorted(p.name for p in _package_file("chatterbot_corpus", "data", CHATTERBOT_HINT).iterdir() if p.is_dir())


def _read_yaml_dialogues(path: Path, skipped: list[str] | None = None) -> list[Conversation]:
    """The file's dialogues; a malformed one is an error, or, given ``skipped``, its file:line goes there."""
    try:
        root = yaml.compose(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (bad byte at offset {e.start}); save it as UTF-8") from None
    except yaml.MarkedYAMLError as e:
        line = e.problem_mark.line + 1 if e.problem_mark else 0
        raise DataError(f"{path}:{line}: not YAML ({e.problem}); fix the file") from None
    convs = None
    if isinstance(root, yaml.MappingNode):
        convs = next((v for k, v in root.value if isinstance(k, yaml.ScalarNode) and k.value == "conversations"), None)
    if not isinstance(convs, yaml.SequenceNode):
        line = root.start_mark.line + 1 if root is not None else 1
        raise DataError(f"{path}:{line}: needs a 'conversations:' list of dialogues (each a list of turns)")
    out = []
    for k, node in enumerate(convs.value):
        where = f"{path}:{node.start_mark.line + 1}"
        if not isinstance(node, yaml.SequenceNode) or not all(isinstance(t, yaml.ScalarNode) for t in node.value):
            if skipped is not None:
                skipped.append(where)
                continue
            raise DataError(f"{where}: a dialogue is a list of turns (strings), as `- - hello\\n  - hi`")
        turns = tuple(str(yaml.safe_load(yaml.serialize(t)) if t.tag != "tag:yaml.org,2002:str" else t.value).strip()
                      for t in node.value)
        empty = next((j for j, t in enumerate(turns) if not t), None)
        if empty is not None:
            raise DataError(f"{path}:{node.value[empty].start_mark.line + 1}: turn {empty} is empty; write its text")
        if len(turns) >= 2:
            out.append(Conversation(f"{path.parent.name}/{path.stem}#{k}", turns, f"{where}"))
    return out


def read_chatterbot(language: str = "english", paths: Iterable[str | os.PathLike[str]] | None = None
                    ) -> list[Conversation]:
    """The dialogues of chatterbot-corpus in ``language`` (or of the given .yml files), file by file.

    A malformed dialogue in a file the user gives is an error; in the installed package (whose English
    trivia.yml has one) it is left out and named on stderr, so the package's own data always reads."""
    if paths is not None:
        return [c for p in paths for c in _read_yaml_dialogues(Path(p))]
    folder = _package_file("chatterbot_corpus", "data", CHATTERBOT_HINT) / language
    if not folder.is_dir():
        raise DataError(f"chatterbot-corpus has no {language!r} dialogues; choose one of "
                        f"{', '.join(chatterbot_languages())}")
    skipped: list[str] = []
    convs = [c for p in sorted(folder.glob("*.yml")) for c in _read_yaml_dialogues(p, skipped)]
    if skipped:
        print(f"chatterbot-corpus: left out {len(skipped)} dialogue(s) that are not lists of turns: "
              f"{', '.join(skipped)}", file=sys.stderr)
    return convs


def held_out_conversation(conv: Conversation, fraction: float, seed: int) -> bool:
    """Whether a conversation is held out: a seeded hash of its id, so it never trains whatever else changes."""
    digest = hashlib.blake2b(f"{seed}:{conv.id}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


def sft_rows(conversations: Iterable[Conversation], max_chars: int | None = None) -> list[dict[str, Any]]:
    """SFT rows, ``{"messages": [...]}`` with alternating user/assistant turns.

    ``max_chars``: a conversation longer than a model's context is cut into consecutive pieces of whole
    exchanges (each starting at a user turn) of at most that many characters, so every turn is trained on
    with the turns before it in its piece; an exchange longer than that alone is left out. None keeps
    whole conversations.
    """
    rows = []
    for conv in conversations:
        if max_chars is None:
            rows.append({"messages": conv.messages()})
            continue
        start = 0
        while start + 1 < len(conv.turns):
            end, size = start, 0
            while end + 1 < len(conv.turns) and (end == start or size + len(conv.turns[end]) + len(conv.turns[end + 1])
                                                 <= max_chars):
                size += len(conv.turns[end]) + len(conv.turns[end + 1])
                end += 2
            if size <= max_chars:
                rows.append({"messages": conv.messages(conv.turns[start:end])})
            start = end
    return rows


def plain_text(conv: Conversation) -> str:
    """A conversation as pretraining text: one turn per line, speakers marked A and B."""
    return "\n".join(f"{'AB'[k % 2]}: {t}" for k, t in enumerate(conv.turns)) + "\n"
