"""The InstructGPT data files, checked row by row before any training starts.

All are JSON lines (optionally ``.gz``); the first bad row stops the load with its
file, line, field and a fix, so hours of training never die on row 90,000:

* demonstrations (SFT): ``{"prompt": ..., "response": ...}`` or
  ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}``
* rankings (reward model, DPO): ``{"prompt": ..., "responses": [K texts], "ranking": [indices, best first]}``
  with K from 2 to 9 (InstructGPT's labelers ranked 4 to 9), or ``{"prompt": ..., "chosen": ..., "rejected": ...}``
* prompts (PPO): ``{"prompt": ...}``; other fields are ignored, so the SFT or rankings file serves too.

Texts are kept exactly as written; a text that is empty or only whitespace is an error.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .atomic import atomic_write_text
from .chat import ROLES, Message
from .corpus import json_lines
from .jsonsafe import json_type
from .errors import DataError

__all__ = ["MIN_RESPONSES", "MAX_RESPONSES", "SFTExample", "Ranking", "load_sft", "load_rankings",
           "load_prompts", "write_rankings"]

MIN_RESPONSES = 2
MAX_RESPONSES = 9

PathLike = str | os.PathLike[str]
_ROLE_LIST = ", ".join(map(repr, ROLES))


@dataclass(frozen=True)
class SFTExample:
    """A demonstration: the conversation, the line it came from (for later error messages), and each message's
    images (data URLs or paths relative to the file's folder; empty for text)."""

    messages: list[Message]
    line: int
    images: list[list[str]] = field(default_factory=list)


@dataclass(frozen=True)
class Ranking:
    """Responses to one prompt, ordered best -> worst; ``line`` is 0 for rankings not read from a file."""

    prompt: str
    responses: list[str]
    line: int = 0


# ================================================================== checks
def _rows(path: PathLike) -> list[tuple[int, str, dict[str, Any]]]:
    """``(line, "path:line", row)`` for every row, each a JSON object; an empty file is an error."""
    rows = []
    for lineno, row in json_lines(os.fspath(path)):
        where = f"{path}:{lineno}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: a row is a JSON object, not {json_type(row)}; write one {{...}} per line")
        rows.append((lineno, where, row))
    if not rows:
        raise DataError(f"{path}: no rows; write one JSON object per line (see the gptlab.align_data docstring)")
    return rows


def _text(row: dict[str, Any], field: str, where: str) -> str:
    if field not in row:
        raise DataError(f"{where}: missing field {field!r}; give it the text", field)
    return _check_text(row[field], f"field {field!r}", where, field)


def _check_text(value: Any, what: str, where: str, field: str | None = None) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: {what} is {json_type(value)}, not a string; write the text in quotes", field)
    if not value.strip():
        raise DataError(f"{where}: {what} is empty; give it some text or drop the row", field)
    return value


def _content(content: Any, at: str) -> tuple[str, list[str]]:
    """A message's text and images: a string, or OpenAI's content parts (``text``, and ``image_url`` whose url is
    a data URL or a local file; remote URLs are refused, nothing is fetched)."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise DataError(f"{at}: field 'content' is {json_type(content)}, not a string or a list of parts; write the "
                        "text in quotes")
    texts, images = [], []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str) or not url:
                raise DataError(f"{at}: content[{j}] needs image_url.url: a data URL or an image file's path")
            if url.split(":", 1)[0].lower() in ("http", "https", "ftp"):
                raise DataError(f"{at}: content[{j}]: remote image URLs are not fetched; give a data URL or a local "
                                "file's path")
            images.append(url)
        else:
            raise DataError(f"{at}: content[{j}] is not a text part or an image_url part; write "
                            '{"type": "text", "text": ...} or {"type": "image_url", "image_url": {"url": ...}}')
    return "".join(texts), images


def _sft_messages(row: dict[str, Any], where: str) -> tuple[list[Message], list[list[str]]]:
    pair = [f for f in ("prompt", "response") if f in row]
    if "messages" in row and pair:
        raise DataError(f"{where}: has both 'messages' and {pair[0]!r}; use one form per row")
    if not pair and "messages" not in row:
        raise DataError(f"{where}: neither 'prompt'+'response' nor 'messages' (fields: {', '.join(sorted(row)) or 'none'}); "
                        'write {"prompt": ..., "response": ...} or {"messages": [{"role": ..., "content": ...}, ...]}')
    if pair:
        return [Message("user", _text(row, "prompt", where)), Message("assistant", _text(row, "response", where))], []
    turns = row["messages"]
    if not isinstance(turns, list) or not turns:
        shown = "an empty list" if turns == [] else json_type(turns)
        raise DataError(f"{where}: field 'messages' is {shown}; give a non-empty list of {{\"role\", \"content\"}} objects")
    messages, images = [], []
    for i, turn in enumerate(turns):
        at = f"{where}: messages[{i}]"
        if not isinstance(turn, dict):
            raise DataError(f"{at} is {json_type(turn)}, not an object; write {{\"role\": ..., \"content\": ...}}")
        role = turn.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise DataError(f"{at}: role {role!r} is not one of {_ROLE_LIST}; use one of those")
        content, pictures = _content(turn.get("content"), at)
        if pictures and role != "user":
            raise DataError(f"{at}: only user messages hold images; move the image into a user message")
        if role == "assistant" and not content.strip():
            raise DataError(f"{at}: the assistant content is empty; give the reply or drop the message")
        messages.append(Message(role, content))
        images.append(pictures)
    if not any(m.role == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message, so nothing to learn; add the reply as "
                        '{"role": "assistant", "content": ...}')
    return messages, images if any(images) else []


def _ranked(row: dict[str, Any], where: str) -> list[str]:
    """The row's responses ordered best -> worst."""
    listed = "responses" in row or "ranking" in row
    paired = "chosen" in row or "rejected" in row
    if listed and paired:
        raise DataError(f"{where}: mixes 'responses'/'ranking' with 'chosen'/'rejected'; use one form per row")
    if not listed and not paired:
        raise DataError(f"{where}: neither 'responses'+'ranking' nor 'chosen'+'rejected'; write "
                        '{"prompt": ..., "responses": [...], "ranking": [...]} or {"prompt": ..., "chosen": ..., "rejected": ...}')
    if paired:
        chosen, rejected = _text(row, "chosen", where), _text(row, "rejected", where)
        if chosen == rejected:
            raise DataError(f"{where}: 'chosen' and 'rejected' are identical, so there is no preference; drop the row")
        return [chosen, rejected]
    if "responses" not in row:
        raise DataError(f"{where}: missing field 'responses'; give the {MIN_RESPONSES} to {MAX_RESPONSES} response texts",
                        "responses")
    responses = row["responses"]
    if not isinstance(responses, list):
        raise DataError(f"{where}: field 'responses' is {json_type(responses)}; give a list of "
                        f"{MIN_RESPONSES} to {MAX_RESPONSES} response texts", "responses")
    k = len(responses)
    if not MIN_RESPONSES <= k <= MAX_RESPONSES:
        raise DataError(f"{where}: field 'responses' has {k} text(s); a ranking needs {MIN_RESPONSES} to "
                        f"{MAX_RESPONSES} (split a longer list into several rows)", "responses")
    first: dict[str, int] = {}
    for i, response in enumerate(responses):
        _check_text(response, f"response {i}", where, f"responses[{i}]")
        if response in first:
            raise DataError(f"{where}: responses {first[response]} and {i} are identical and cannot be ranked; drop one",
                            f"responses[{i}]")
        first[response] = i
    if "ranking" not in row:
        raise DataError(f"{where}: missing field 'ranking'; list the response indices from best to worst", "ranking")
    ranking = row["ranking"]
    fix = f"list each index 0..{k - 1} once, best response first"
    if not isinstance(ranking, list):
        raise DataError(f"{where}: field 'ranking' is {json_type(ranking)}, not a list; {fix}", "ranking")
    for j, index in enumerate(ranking):
        if not isinstance(index, int) or isinstance(index, bool):
            raise DataError(f"{where}: ranking[{j}] is {json_type(index)}, not an integer index; {fix}", "ranking")
        if not 0 <= index < k:
            raise DataError(f"{where}: ranking[{j}] = {index} is out of range for {k} responses; {fix}", "ranking")
    size = f" ({len(ranking)} entries for {k} responses)" if len(ranking) != k else ""
    repeated = [i for i, n in Counter(ranking).items() if n > 1]
    if repeated:
        raise DataError(f"{where}: field 'ranking' lists index {repeated[0]} more than once{size}; {fix}", "ranking")
    missing = sorted(set(range(k)) - set(ranking))
    if missing:
        raise DataError(f"{where}: field 'ranking' leaves out index {missing[0]}{size}; {fix}", "ranking")
    return [responses[i] for i in ranking]


# ================================================================== files
def load_sft(path: PathLike) -> list[SFTExample]:
    """Demonstrations for SFT; either row form becomes a conversation with at least one assistant turn."""
    out = []
    for line, where, row in _rows(path):
        messages, images = _sft_messages(row, where)
        out.append(SFTExample(messages, line, images))
    return out


def load_rankings(path: PathLike) -> list[Ranking]:
    """Comparisons for the reward model and DPO; both row forms may be mixed in one file."""
    return [ranking_of(row, where, line) for line, where, row in _rows(path)]


def ranking_of(row: dict[str, Any], where: str, line: int = 0) -> Ranking:
    """One rankings row as ``load_rankings`` reads it, or a DataError (with its ``field``) saying why not:
    the check the /rank page runs before it appends a row."""
    return Ranking(_text(row, "prompt", where), _ranked(row, where), line)


def load_prompts(path: PathLike) -> list[str]:
    """Prompts for PPO: the ``prompt`` of every row, so an SFT or rankings file works as well."""
    return [_text(row, "prompt", where) for _, where, row in _rows(path)]


def write_rankings(path: PathLike, rankings: Sequence[Ranking]) -> None:
    """Save labelled comparisons (the RLHF demo's labeler, the /rank page) in the form `load_rankings` reads.

    Every ranking is checked first, so a file is never written that its reader would refuse.
    """
    if not rankings:
        raise DataError(f"{path}: no rankings to write; label at least one comparison first")
    rows = []
    for n, r in enumerate(rankings, 1):
        row = {"prompt": r.prompt, "responses": list(r.responses), "ranking": list(range(len(r.responses)))}
        ranking_of(row, f"{path}: ranking {n}")
        rows.append(json.dumps(row, ensure_ascii=False) + "\n")
    atomic_write_text(path, "".join(rows))
