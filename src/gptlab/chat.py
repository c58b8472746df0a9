"""The one chat format of gptlab, shared by SFT, the reward model, PPO, DPO and the chat server.

A conversation is a run of turns, each a role token, the content, and ``<|end|>``::

    <|system|>Be brief.<|end|><|user|>Hi<|end|><|assistant|>Hello!<|end|>

Every stage renders through this module, so a model trained by one stage reads
prompts from the next exactly as it was trained.  Content is encoded with
``allow_special=False``: text that spells ``<|user|>`` stays ordinary tokens, so
no message can forge a turn.  ``<|end|>`` closing an assistant turn is the
response's end-of-sequence token (trained, and a stop id for generation);
padding uses ``<|pad|>`` so a model never learns to stop at padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .errors import TokenizerError
from .tokenizer import ASSISTANT, END_OF_TURN, SYSTEM, USER, Tokenizer

__all__ = [
    "CHAT_TOKENS", "CHAT_FORMAT", "CHAT_TEMPLATE", "ROLES", "Message", "has_chat_tokens", "render", "render_prompt",
    "render_pair", "stop_ids", "add_chat_tokens",
]

CHAT_TOKENS = [SYSTEM, USER, ASSISTANT, END_OF_TURN]
CHAT_FORMAT = "gptlab-chat-v1"  # recorded in a run's config.json by the stages that train the format
ROLES = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}


@dataclass(frozen=True)
class Message:
    """One turn of a conversation; ``role`` is a key of ``ROLES``."""

    role: str
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role {self.role!r} is not one of {', '.join(map(repr, ROLES))}")
        if not isinstance(self.content, str):
            raise ValueError(f"content of a {self.role} message must be a string, not {type(self.content).__name__}")


def has_chat_tokens(tokenizer: Tokenizer) -> bool:
    """Whether `tokenizer` can render chats (a plain pre-training vocabulary may lack the role tokens)."""
    specials = tokenizer.special_tokens
    return all(t in specials for t in CHAT_TOKENS)


def _chat_ids(tokenizer: Tokenizer) -> dict[str, int]:
    specials = tokenizer.special_tokens
    missing = [t for t in CHAT_TOKENS if t not in specials]
    if missing:
        raise TokenizerError(
            f"tokenizer {tokenizer.spec or type(tokenizer).__name__} has no chat token(s) {', '.join(missing)}; "
            "add them with gptlab.chat.add_chat_tokens(tokenizer), or start from a run made by `gptlab sft`"
        )
    return {t: specials[t] for t in CHAT_TOKENS}


def render(
    messages: Sequence[Message], tokenizer: Tokenizer, *, add_generation_prompt: bool = False
) -> tuple[list[int], list[bool]]:
    """``(ids, train_mask)``: the mask is True on assistant content and the ``<|end|>`` closing it, so
    SFT learns the replies and when to stop, never the prompts.  ``add_generation_prompt`` appends
    ``<|assistant|>`` (untrained) so generation continues as the assistant."""
    special = _chat_ids(tokenizer)
    end = special[END_OF_TURN]
    ids: list[int] = []
    mask: list[bool] = []
    for m in messages:
        body = tokenizer.encode(m.content, allow_special=False) + [end]
        ids += [special[ROLES[m.role]], *body]
        mask += [False] + [m.role == "assistant"] * len(body)
    if add_generation_prompt:
        ids.append(special[ASSISTANT])
        mask.append(False)
    return ids, mask


def render_prompt(prompt: str, tokenizer: Tokenizer, system: str | None = None) -> list[int]:
    """A single-turn prompt ready for generation: [system turn] + user turn + ``<|assistant|>``."""
    messages = [Message("system", system)] if system is not None else []
    return render([*messages, Message("user", prompt)], tokenizer, add_generation_prompt=True)[0]


def render_pair(prompt: str, response: str, tokenizer: Tokenizer) -> tuple[list[int], int]:
    """``(ids, start)`` of prompt + response + ``<|end|>``; ``ids[start:]`` is what the reward model,
    PPO and DPO score, and ``ids[:start] == render_prompt(prompt)`` is what the policy saw."""
    ids = render_prompt(prompt, tokenizer)
    start = len(ids)
    return ids + tokenizer.encode(response, allow_special=False) + [tokenizer.special_tokens[END_OF_TURN]], start


def stop_ids(tokenizer: Tokenizer) -> list[int]:
    """Ids that end an assistant turn: ``<|end|>``, or EOS from a model that never learnt the format."""
    return [_chat_ids(tokenizer)[END_OF_TURN], tokenizer.eos_id]


# The format as a Jinja chat template (transformers' ``chat_template``): what clients that render prompts
# themselves read (lm-evaluation-harness's remote tokenizer). Rendered text holds the role tokens as text, so
# it is for trusted prompts only; ``render`` is what gptlab itself uses.
CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}" + USER + "{%- elif m['role'] == 'assistant' -%}" + ASSISTANT +
    "{%- else -%}" + SYSTEM + "{%- endif -%}"
    "{{ m['content'] }}" + END_OF_TURN + "{%- endfor -%}"
    "{%- if add_generation_prompt -%}" + ASSISTANT + "{%- endif -%}"
)


def add_chat_tokens(tokenizer: Tokenizer) -> list[int]:
    """Give `tokenizer` the chat tokens (no-op for those present); returns their ids in ``CHAT_TOKENS`` order."""
    return tokenizer.add_special_tokens(list(CHAT_TOKENS))
