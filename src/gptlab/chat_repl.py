"""`gptlab chat`: a multi-turn conversation with a chat model in the terminal.

    gptlab chat --model runs/sft [--system "Be brief." --temperature 0.8 --top-p 0.95 --max-new-tokens 128]

The conversation is rendered through the chat format (``chat.render``) and
kept within the model's context: when it no longer fits with room for the
reply, the oldest user/assistant exchanges are dropped (the system prompt is
kept) and a notice says how many. Replies stream as they are generated and
stop at ``<|end|>``. Commands: ``/reset`` (forget the conversation),
``/system TEXT`` (set or, without text, clear the system prompt), ``/save FILE``
(write the conversation as JSON, atomically), ``/image PATH`` (an image-input model: the image goes with
the next message), ``/help``, ``/quit`` (or Ctrl-D).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, TextIO

import torch

from .atomic import atomic_write_text
from .chat import Message, has_chat_tokens, stop_ids
from .engine import Engine, SamplingParams
from .errors import UserError
from .tokenizer import Tokenizer
from .vision import read_image, render_images

__all__ = ["Conversation", "run_chat"]

HELP = "commands: /reset, /system [TEXT], /save FILE, /image PATH, /help, /quit (or Ctrl-D)"


@dataclass
class Conversation:
    """The messages of one conversation and how to fit them into ``block_size`` tokens."""

    tokenizer: Tokenizer
    block_size: int
    reply_tokens: int
    system: str | None = None
    turns: list[Message] = field(default_factory=list)  # user/assistant messages, oldest first
    images: list[torch.Tensor | None] = field(default_factory=list)  # each turn's image (C, S, S) or None
    patches: int = 0  # image tokens per image (an image-input model)

    def add(self, message: Message, image: torch.Tensor | None = None) -> None:
        self.turns.append(message)
        self.images.append(image)

    def pop(self) -> None:
        self.turns.pop()
        self.images.pop()

    def turn_images(self) -> list[torch.Tensor | None]:
        """Each turn's image; turns appended to ``turns`` directly have none."""
        return (self.images + [None] * len(self.turns))[:len(self.turns)]

    def image_batch(self) -> torch.Tensor | None:
        """The images of the conversation in order (n, C, S, S), or None without any."""
        given = [im for im in self.turn_images() if im is not None]
        return torch.stack(given) if given else None

    def messages(self) -> list[Message]:
        head = [Message("system", self.system)] if self.system else []
        return head + self.turns

    def prompt_ids(self) -> tuple[list[int], int]:
        """(ids of the conversation + the assistant's turn opener, user turns dropped to fit).

        The oldest exchanges go first, whole (a user turn and the reply to it); the
        newest user turn always stays. Raises UserError when even it does not fit.
        """
        dropped = 0
        budget = self.block_size - self.reply_tokens
        while True:
            counts = ([0] if self.system else []) + [int(im is not None) for im in self.turn_images()]
            ids, _ = render_images(self.messages(), counts, self.tokenizer, self.patches, add_generation_prompt=True)
            if len(ids) <= budget:
                return ids, dropped
            users = [i for i, m in enumerate(self.turns) if m.role == "user"]
            if len(users) <= 1:
                raise UserError(f"the message needs {len(ids)} tokens with the system prompt, more than the "
                                f"{budget} the model's context leaves for it; shorten it or lower --max-new-tokens")
            self.turns, self.images = self.turns[users[1]:], self.turn_images()[users[1]:]
            dropped += 1

    def to_json(self) -> str:
        return json.dumps({"messages": [{"role": m.role, "content": m.content} for m in self.messages()]},
                          ensure_ascii=False, indent=2) + "\n"


def run_chat(engine: Engine, params: SamplingParams, *, system: str | None = None, read: Callable[[str], str] = input,
             out: TextIO | None = None) -> Conversation:
    """The REPL over ``engine`` (a model with a chat format); returns the conversation at exit.

    ``read`` is called with the prompt string and raises EOFError at the end of input.
    """
    out = out or sys.stdout
    tokenizer = engine.tokenizer
    if tokenizer is None or not has_chat_tokens(tokenizer):
        raise UserError("this model has no chat format (no <|user|>/<|assistant|> tokens): fine-tune it with "
                        "gptlab sft first, or use gptlab generate for plain completion")
    params.stop_token_ids = stop_ids(tokenizer)
    params.slide = True  # a reply longer than the room left goes on, the window sliding past the oldest tokens
    block = engine.config.block_size
    room = min(params.max_new_tokens, block // 2)  # kept free for the reply; the rest holds the conversation
    vision = engine.vision
    conv = Conversation(tokenizer, block, room, system, patches=vision.cfg.patches if vision is not None else 0)
    pending: torch.Tensor | None = None  # the image /image attached to the next message
    print(HELP, file=out)
    if room < params.max_new_tokens:
        print(f"(the model's context is {block} tokens: the conversation keeps {block - room} of them, and "
              f"replies longer than {room} tokens slide the window)", file=out)
    while True:
        try:
            line = read("you> ")
        except (EOFError, KeyboardInterrupt):
            print(file=out)
            return conv
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd, _, arg = text.partition(" ")
            arg = arg.strip()
            if cmd in ("/quit", "/exit"):
                return conv
            if cmd == "/reset":
                conv.turns, conv.images = [], []
                print("(conversation cleared)", file=out)
            elif cmd == "/image" and arg:
                if vision is None:
                    print("(this model does not take images: train one with gptlab images chat-train)", file=out)
                    continue
                try:
                    pending = read_image(arg, vision.cfg)
                    print(f"(image {arg} attached to your next message)", file=out)
                except UserError as exc:
                    print(f"(error: {exc})", file=out)
            elif cmd == "/system":
                conv.system = arg or None
                print(f"(system prompt {'set' if arg else 'cleared'})", file=out)
            elif cmd == "/save" and arg:
                try:
                    atomic_write_text(os.path.expanduser(arg), conv.to_json())
                    print(f"(saved {len(conv.messages())} messages to {arg})", file=out)
                except OSError as exc:  # a directory, no permission, a full disk: the conversation stays
                    print(f"(could not save to {arg}: {exc.strerror or exc}; the conversation is kept)", file=out)
            else:
                print(HELP, file=out)
            continue
        conv.add(Message("user", line), pending)
        try:
            ids, dropped = conv.prompt_ids()
        except UserError as exc:
            conv.pop()
            print(f"(error: {exc})", file=out)
            continue
        pending = None
        if dropped:
            print(f"(the oldest {dropped} exchange{'s' if dropped > 1 else ''} dropped to fit the context)", file=out)
        print("assistant> ", end="", file=out, flush=True)
        reply = []
        try:
            for piece in engine.stream_ids(ids, params, conv.image_batch()):
                reply.append(piece)
                print(piece, end="", file=out, flush=True)
        except KeyboardInterrupt:  # Ctrl-C stops this reply, not the conversation
            print(" (stopped)", end="", file=out)
        print(file=out)
        conv.add(Message("assistant", "".join(reply).strip()))
