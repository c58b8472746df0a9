"""``OpenAIHandler``: the work behind the OpenAI routes (completions, chat, streaming, log-probs, the tokenizer
routes, the model list): validate a request, decode it, and shape the answer as a JSON-ready dict or, for
``stream=true``, the Server-Sent Events to send.

Requests are decoded together: a ``Batcher`` (batcher.py) runs one batch on a worker thread and new
sequences join it between decode steps, each with its own sampling settings and seed, so a seeded request
gets the same text alone or in a crowd. The ``n`` choices of a request are sequences of the batch (choice
``j`` uses ``seed + j``, streamed or not). A client that disconnects frees its slots. A ``max_tokens`` that
does not fit after the prompt is cut at the context (``finish_reason: "length"``) rather than refused.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any, TypeVar, cast

import torch

from ..batcher import Batcher, Piece
from ..chat import CHAT_TEMPLATE, ROLES, Message, has_chat_tokens, stop_ids
from ..engine import Completion, Engine, SamplingParams
from ..errors import UserError
from ..model import GPT
from ..tokenizer import Tokenizer
from ..vision import VisionEncoder, read_image_ref, render_images
from .metrics import Metrics
from .protocol import (APIError, ChatMessage, ChatRequest, CompletionRequest, ContentPart, DetokenizeRequest,
                       GenerationRequest, TokenizeRequest)

__all__ = ["OpenAIHandler", "Answer", "IsDisconnected"]

MAX_STOP_STRINGS = 16
MAX_LOGPROBS = 5  # legacy completions
MAX_TOP_LOGPROBS = 20  # chat
MAX_SEQUENCES = 256  # prompts x n in one request: bounds its memory and how long it holds the batch
DISCONNECT_POLL_SECONDS = 0.5  # how often a waiting non-streamed request checks its client is still there

Answer = dict[str, Any] | AsyncIterator[str]  # a JSON body, or the SSE events of a stream
IsDisconnected = Callable[[], Awaitable[bool]]
Jobs = Sequence[tuple[list[int], SamplingParams]]
T = TypeVar("T")


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class OpenAIHandler:
    """Built only once the model is loaded (the middleware answers 503 until then), so nothing here is
    ever half there. ``metrics`` receives the token counts of every response."""

    def __init__(self, model: GPT, tokenizer: Tokenizer | None, config: dict[str, Any], *, model_name: str,
                 max_tokens_limit: int | None, max_n: int, max_batch: int, metrics: Metrics,
                 vision: VisionEncoder | None = None):
        if tokenizer is None:
            raise UserError("the server needs a tokenizer: serve a run directory saved with one, or hf:DIR")
        self.engine = Engine(model, tokenizer, vision=vision)
        self.gpt, self.tok, self.config = self.engine.model, tokenizer, config  # .model is GET /v1/models/{name}
        self.model_name, self.max_n, self.metrics = model_name, max_n, metrics
        self.block = self.engine.config.block_size
        self.max_tokens_limit = max_tokens_limit or self.block
        self.chat_ok = bool(config.get("chat_format")) and has_chat_tokens(tokenizer)
        self.created = int(time.time())
        self.batcher = Batcher(self.engine, max_batch)

    def close(self) -> None:
        self.batcher.close()

    # ------------------------------------------------------ models, tokenizer
    def model_card(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "gptlab",
                "max_model_len": self.block}

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self.model_card()]}

    def model(self, name: str) -> dict[str, Any]:
        self.check_model(name)
        return self.model_card()

    def tokenize(self, req: TokenizeRequest) -> dict[str, Any]:
        conversation = req.messages if req.messages is not None else req.prompt if isinstance(req.prompt, list) else None
        if conversation is not None:
            ids = self.chat_ids(conversation, add_generation_prompt=req.add_generation_prompt is not False)
        elif isinstance(req.prompt, str):
            ids = self.encode(req.prompt)
        else:
            raise APIError(400, "give prompt (a text, or a list of messages) or messages", param="prompt")
        return {"tokens": ids, "count": len(ids), "max_model_len": self.block}

    def detokenize(self, req: DetokenizeRequest) -> dict[str, Any]:
        return {"prompt": self.tok.decode(self.check_ids(req.tokens, "tokens"))}

    def tokenizer_info(self) -> dict[str, Any]:
        """What clients that tokenize through the server read (lm-evaluation-harness's remote tokenizer): the
        special tokens by name and id (GPT-2 begins texts with its end-of-text token), and the chat template."""
        eos = self.special_name(self.tok.eos_id)
        return {"eos_token": eos, "eos_token_id": self.tok.eos_id, "bos_token": eos, "bos_token_id": self.tok.eos_id,
                "pad_token": self.special_name(self.tok.pad_id), "pad_token_id": self.tok.pad_id,
                "vocab_size": self.tok.vocab_size, "chat_format": self.config.get("chat_format"),
                "chat_template": CHAT_TEMPLATE if self.chat_ok else None, "max_model_len": self.block}

    def special_name(self, i: int | None) -> str | None:
        return next((name for name, j in self.tok.special_tokens.items() if j == i), None)

    # -------------------------------------------------------- validation
    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"the model '{name}' does not exist: this server serves '{self.model_name}' "
                                "(see GET /v1/models)", param="model", code="model_not_found")

    def check_ids(self, ids: Sequence[int], param: str) -> list[int]:
        vocab = self.tok.vocab_size
        for i in ids:
            if not 0 <= i < vocab:
                raise APIError(400, f"token id {i} is not in the vocabulary (ids 0..{vocab - 1})", param=param)
        return list(ids)

    def encode(self, text: str) -> list[int]:
        """A raw text's ids, special tokens spelt in it read as such (``<|endoftext|>`` -> its id), as vLLM
        does; chat messages never are (``chat_ids``), so that no message can forge a turn."""
        try:
            return self.tok.encode(text, allow_special=True)
        except UserError as e:
            raise APIError(400, f"the text cannot be tokenized: {e}", param="prompt") from None

    def check_length(self, ids: list[int], max_tokens: int, param: str) -> None:
        if not ids:
            raise APIError(400, "empty prompt: give at least one token", param=param)
        if len(ids) > self.block or (max_tokens > 0 and len(ids) >= self.block):
            room = "" if max_tokens == 0 else " with room for at least one new token"
            raise APIError(400, f"the prompt has {len(ids)} tokens, which does not fit the model's context of "
                                f"{self.block} tokens{room}: shorten it", param=param, code="context_length_exceeded")

    def params(self, req: GenerationRequest, max_tokens: int | None, default_max: int, logprobs: int,
               stop_token_ids: Sequence[int] = ()) -> SamplingParams:
        if max_tokens is None:
            max_tokens = default_max
        if not 0 <= max_tokens <= self.max_tokens_limit:
            raise APIError(400, f"max_tokens={max_tokens} must be between 0 and {self.max_tokens_limit}",
                           param="max_tokens")
        for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
            value = getattr(req, name)
            if value is not None and not math.isfinite(value):
                raise APIError(400, f"{name} must be a finite number", param=name)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(req, name)
            if value is not None and not -2 <= value <= 2:
                raise APIError(400, f"{name}={value} must be between -2 and 2", param=name)
        temperature = 1.0 if req.temperature is None else req.temperature
        if not 0 <= temperature <= 100:
            raise APIError(400, f"temperature={temperature} must be between 0 and 100 (0 = greedy)",
                           param="temperature")
        top_p = req.top_p
        if top_p is not None and not 0 < top_p <= 1:
            raise APIError(400, f"top_p={top_p} must be in (0, 1]", param="top_p")
        if req.top_k is not None and req.top_k < -1:
            raise APIError(400, f"top_k={req.top_k} must be >= 1 (or -1/0 for no limit)", param="top_k")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > MAX_STOP_STRINGS or any(not s for s in stop):
            raise APIError(400, f"stop must be up to {MAX_STOP_STRINGS} non-empty strings", param="stop")
        seed = req.seed
        if seed is not None and not -(2 ** 63) <= seed < 2 ** 64:
            raise APIError(400, "seed must fit in 64 bits", param="seed")
        return SamplingParams(max_new_tokens=max_tokens, temperature=temperature,
                              top_k=req.top_k if req.top_k and req.top_k > 0 else None,
                              top_p=None if top_p is None or top_p >= 1 else top_p, stop=stop,
                              seed=None if seed is None else seed % 2 ** 63, logprobs=logprobs,
                              stop_token_ids=list(stop_token_ids), presence_penalty=req.presence_penalty or 0.0,
                              frequency_penalty=req.frequency_penalty or 0.0,
                              skip_special_tokens=req.skip_special_tokens is not False)

    def n(self, n: int | None) -> int:
        n = 1 if n is None else n
        if not 1 <= n <= self.max_n:
            raise APIError(400, f"n={n} must be between 1 and {self.max_n}", param="n")
        return n

    # ------------------------------------------------------------ compute
    async def run(self, fn: Callable[[], T]) -> T:
        """Run ``fn()`` on the batcher's thread between two decode steps (model work that must not race it)."""
        return await asyncio.wrap_future(self.batcher.call(fn))

    async def decode(self, jobs: Jobs, stream: bool, images: torch.Tensor | None = None
                     ) -> AsyncIterator[tuple[int, Piece]]:
        """Submit every job (each with the request's ``images``) to the batcher and yield ``(job index, Piece)``
        as they come, interleaved; leaving early (a client that went away) cancels the jobs, which frees their
        batch slots."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, Piece | BaseException]] = asyncio.Queue()

        def emitter(i: int) -> Callable[[Piece | BaseException], None]:
            def emit(item: Piece | BaseException) -> None:
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, (i, item))
                except RuntimeError:  # the event loop is gone: nobody is listening
                    pass
            return emit

        tickets = [self.batcher.submit(ids, params, emitter(i), stream, images)
                   for i, (ids, params) in enumerate(jobs)]
        left = len(tickets)
        try:
            while left:
                i, item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield i, item
                left -= item.completion is not None
        finally:
            for t in tickets:
                t.cancel()

    async def complete(self, jobs: Jobs, is_disconnected: IsDisconnected,
                       images: torch.Tensor | None = None) -> list[Completion]:
        """Every job's Completion; gives up (cancelling the jobs) when the client disconnects."""
        out: list[Completion | None] = [None] * len(jobs)

        async def collect() -> None:
            async for i, piece in self.decode(jobs, stream=False, images=images):
                out[i] = piece.completion

        task = asyncio.ensure_future(collect())
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
            if not task.done() and await is_disconnected():
                task.cancel()
                raise APIError(499, "the client closed the request", code="client_closed_request")
        task.result()
        return [c for c in out if c is not None]

    @staticmethod
    def choices(prompts: list[list[int]], n: int, params: SamplingParams) -> list[tuple[list[int], SamplingParams]]:
        """n samples of each prompt; sample ``j`` uses ``seed + j``, streamed or not."""
        def seeded(j: int) -> SamplingParams:
            return replace(params, seed=None if params.seed is None else params.seed + j)
        return [(p, seeded(j)) for p in prompts for j in range(n)]

    @torch.inference_mode()
    def prompt_logprobs(self, ids: list[int],
                        k: int) -> tuple[list[float | None], list[list[tuple[int, float]] | None]]:
        """Log-prob of every prompt token given those before it (the first: None), one forward pass."""
        idx = torch.tensor([ids], dtype=torch.long, device=self.engine.device)
        hidden = self.gpt.hidden_states(idx)[0, :-1]
        logprobs = torch.log_softmax(self.gpt.logits(hidden).float(), -1)
        target = torch.tensor(ids[1:], dtype=torch.long, device=logprobs.device)
        chosen = logprobs.gather(-1, target[:, None]).squeeze(-1).tolist()
        tops: list[list[tuple[int, float]] | None] = [None]
        if k:
            top = torch.topk(logprobs, k, dim=-1)
            tops += [list(zip(i, v)) for i, v in zip(top.indices.tolist(), top.values.tolist())]
        else:
            tops += [[] for _ in chosen]
        return [None, *chosen], tops

    # ----------------------------------------------------------- shaping
    def token_str(self, i: int) -> str:
        return self.tok.token_text(i)

    def legacy_logprobs(self, ids: Sequence[int], lps: Sequence[float | None],
                        tops: Sequence[Sequence[tuple[int, float]] | None], start: int = 0) -> dict[str, Any]:
        """The completions API's logprobs; ``start``: characters of text before these tokens (streaming)."""
        text, offsets = b"", []
        for i in ids:
            offsets.append(start + len(text.decode("utf-8", errors="replace")))
            text += self.tok.token_bytes(i)
        top_dicts = [None if t is None else {self.token_str(j): v for j, v in t} for t in tops]
        return {"tokens": [self.token_str(i) for i in ids], "token_logprobs": list(lps),
                "top_logprobs": top_dicts, "text_offset": offsets}

    def chat_logprobs(self, ids: Sequence[int], lps: Sequence[float],
                      tops: Sequence[Sequence[tuple[int, float]]]) -> dict[str, Any]:
        def entry(i: int, lp: float) -> dict[str, Any]:
            return {"token": self.token_str(i), "logprob": lp, "bytes": list(self.tok.token_bytes(i))}
        tops = tops or [[] for _ in ids]
        return {"content": [{**entry(i, lp), "top_logprobs": [entry(j, v) for j, v in top]}
                            for i, lp, top in zip(ids, lps, tops)], "refusal": None}

    def usage(self, prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
        """The response's usage; called once per response, so it also feeds /metrics."""
        self.metrics.prompt_tokens += prompt_tokens
        self.metrics.completion_tokens += completion_tokens
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    @staticmethod
    def generated(c: Completion) -> int:
        return len(c.token_ids) + (c.stop_token is not None)

    # ------------------------------------------------------- completions
    def prompts(self, prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
        if isinstance(prompt, str):
            return [self.encode(prompt)]
        if not prompt:
            raise APIError(400, "prompt must not be an empty list", param="prompt")
        if all(isinstance(p, str) for p in prompt):
            return [self.encode(p) for p in cast(list[str], prompt)]
        if all(isinstance(p, int) for p in prompt):
            return [self.check_ids(cast(list[int], prompt), "prompt")]
        return [self.check_ids(p, "prompt") for p in cast(list[list[int]], prompt)]

    async def completions(self, req: CompletionRequest, is_disconnected: IsDisconnected) -> Answer:
        self.check_model(req.model)
        k = req.logprobs
        if k is not None and not 0 <= k <= MAX_LOGPROBS:
            raise APIError(400, f"logprobs={k} must be between 0 and {MAX_LOGPROBS}", param="logprobs")
        n = self.n(req.n)
        params = self.params(req, req.max_tokens, 16, k or 0)
        prompts = self.prompts(req.prompt)
        if len(prompts) * n > MAX_SEQUENCES:
            raise APIError(400, f"{len(prompts)} prompts x n={n} is more than the {MAX_SEQUENCES} sequences one "
                                "request may ask for: split it into several requests", param="prompt")
        for p in prompts:
            self.check_length(p, params.max_new_tokens, "prompt")
        jobs = self.choices(prompts, n, params)
        if req.stream:
            return self.stream_completions(req, jobs, k, sum(map(len, prompts)))
        comps = await self.complete(jobs, is_disconnected)
        plps = []
        if req.echo and k is not None:
            plps = await self.run(lambda: [self.prompt_logprobs(p, k) for p in prompts])
        choices = []
        for i, c in enumerate(comps):
            p = prompts[i // n]
            text = (self.tok.decode(p) if req.echo else "") + (c.text or "")
            logprobs = None
            if k is not None:
                tops = c.top_logprobs or [[] for _ in c.token_ids]
                ids = list(c.token_ids)
                lps: list[float | None] = list(c.logprobs)
                top: list[list[tuple[int, float]] | None] = list(tops)
                if req.echo:
                    ids, lps, top = p + ids, plps[i // n][0] + lps, plps[i // n][1] + top
                logprobs = self.legacy_logprobs(ids, lps, top)
            choices.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": c.finish_reason})
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.model_name, "system_fingerprint": None, "choices": choices,
                "usage": self.usage(sum(map(len, prompts)), sum(map(self.generated, comps)))}

    def stream_completions(self, req: CompletionRequest, jobs: Jobs, k: int | None,
                           prompt_tokens: int) -> AsyncIterator[str]:
        echo = (lambda p: {"text": self.tok.decode(p)}) if req.echo else (lambda p: None)

        def logprobs(piece: Piece, shown: int) -> dict[str, Any] | None:
            if k is None:
                return None
            return self.legacy_logprobs(piece.token_ids, piece.logprobs,
                                        piece.top_logprobs or [[] for _ in piece.token_ids], start=shown)

        return self.stream(f"cmpl-{uuid.uuid4().hex}", "text_completion", {}, jobs, req, prompt_tokens,
                           opening=echo, piece=lambda text: {"text": text or ""}, logprobs=logprobs)

    def stream(self, rid: str, obj: str, extra: dict[str, Any], jobs: Jobs, req: GenerationRequest,
               prompt_tokens: int, *,
               opening: Callable[[list[int]], dict[str, Any] | None],
               piece: Callable[[str | None], dict[str, Any]],
               logprobs: Callable[[Piece, int], dict[str, Any] | None],
               images: torch.Tensor | None = None) -> AsyncIterator[str]:
        """SSE for completions and chat alike: choice ``i`` generates ``jobs[i]``, all choices in the batch at
        once, their chunks interleaved. ``opening`` gives a choice's first chunk (echo, the assistant role) or
        None; ``piece`` the fields of a text piece (None: the empty piece that carries the finish reason);
        ``logprobs`` a piece's log-probs (given the characters already sent) or None."""
        head = {"id": rid, "object": obj, "created": int(time.time()), "model": self.model_name, **extra}
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(index: int, fields: dict[str, Any], finish: str | None, lps: dict[str, Any] | None = None) -> str:
            body = {**head, "choices": [{"index": index, **fields, "logprobs": lps, "finish_reason": finish}]}
            if include_usage:
                body["usage"] = None
            return _sse(body)

        async def events() -> AsyncIterator[str]:
            completion_tokens, shown = 0, [0] * len(jobs)
            try:
                for index, (ids, _) in enumerate(jobs):
                    first = opening(ids)
                    if first is not None:
                        yield chunk(index, first, None)
                async for index, p in self.decode(jobs, stream=True, images=images):
                    lps = logprobs(p, shown[index]) if p.token_ids else None
                    if p.text or lps is not None:
                        yield chunk(index, piece(p.text), None, lps)
                        shown[index] += len(p.text)
                    if p.completion is not None:
                        completion_tokens += self.generated(p.completion)
                        yield chunk(index, piece(None), p.completion.finish_reason)
                usage = self.usage(prompt_tokens, completion_tokens)
                if include_usage:
                    yield _sse({**head, "choices": [], "usage": usage})
            except Exception as e:  # noqa: BLE001 - the status line is sent: report in the stream
                yield _sse({"error": {"message": str(e), "type": "server_error", "param": None, "code": None}})
            yield "data: [DONE]\n\n"

        return events()

    # -------------------------------------------------------------- chat
    def chat_ids(self, messages: list[ChatMessage], add_generation_prompt: bool = True) -> list[int]:
        return self.chat_prompt(messages, add_generation_prompt)[0]

    def image_part(self, part: ContentPart, param: str) -> torch.Tensor:
        """An ``image_url`` part's image, decoded from its data URL; nothing is ever fetched."""
        vision = self.engine.vision
        if vision is None:
            raise APIError(400, f"{param}: the model '{self.model_name}' does not take images (it is not an "
                                "image-input run: gptlab images chat-train)", param=param)
        field = (part.model_extra or {}).get("image_url")
        url = field.get("url") if isinstance(field, dict) else field
        if not isinstance(url, str):
            raise APIError(400, f"{param}.image_url: give {{\"url\": \"data:image/png;base64,...\"}}", param=param)
        try:
            return read_image_ref(url, vision.cfg)
        except UserError as e:
            raise APIError(400, f"{param}.image_url: {e}", param=param) from None

    def chat_prompt(self, messages: list[ChatMessage], add_generation_prompt: bool = True
                    ) -> tuple[list[int], torch.Tensor | None]:
        """The conversation's ids and its images (n, C, S, S), None without any: each message's images go
        right after its role token (vision.render_images), in the order they come."""
        if not self.chat_ok:
            raise APIError(400, f"the model '{self.model_name}' has no chat format (it was not trained with "
                                "gptlab sft, ppo or dpo): use /v1/completions, or fine-tune it with gptlab sft",
                           param="messages", code="no_chat_format")
        if not messages:
            raise APIError(400, "messages must not be empty", param="messages")
        turns, counts, images = [], [], []
        for i, m in enumerate(messages):
            role = "system" if m.role == "developer" else m.role
            if role not in ROLES:
                raise APIError(400, f"messages[{i}].role '{m.role}' is not one of 'system', 'developer', "
                                    "'user', 'assistant'", param=f"messages[{i}].role")
            content = m.content
            count = 0
            if isinstance(content, list):
                for j, part in enumerate(content):
                    if part.type == "image_url":
                        images.append(self.image_part(part, f"messages[{i}].content[{j}]"))
                        count += 1
                    elif part.type != "text" or part.text is None:
                        raise APIError(400, f"messages[{i}].content[{j}]: only text and image_url parts are "
                                            "supported", param=f"messages[{i}].content")
                content = "".join(part.text or "" for part in content if part.type == "text")
            turns.append(Message(role, content or ""))
            counts.append(count)
        patches = self.engine.vision.cfg.patches if self.engine.vision is not None else 0
        try:
            ids = render_images(turns, counts, self.tok, patches, add_generation_prompt=add_generation_prompt)[0]
            return ids, torch.stack(images) if images else None
        except UserError as e:
            raise APIError(400, f"the messages cannot be tokenized: {e}", param="messages") from None

    async def chat(self, req: ChatRequest, is_disconnected: IsDisconnected) -> Answer:
        self.check_model(req.model)
        k = req.top_logprobs
        if k is not None and not 0 <= k <= MAX_TOP_LOGPROBS:
            raise APIError(400, f"top_logprobs={k} must be between 0 and {MAX_TOP_LOGPROBS}", param="top_logprobs")
        if k and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        n = self.n(req.n)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        ids, images = self.chat_prompt(req.messages)
        params = self.params(req, max_tokens, self.max_tokens_limit, k or 0, stop_ids(self.tok))
        self.check_length(ids, params.max_new_tokens, "messages")
        params.max_new_tokens = min(params.max_new_tokens, self.block - len(ids))
        jobs = self.choices([ids], n, params)
        if req.stream:
            return self.stream(
                f"chatcmpl-{uuid.uuid4().hex}", "chat.completion.chunk", {"system_fingerprint": None}, jobs, req,
                len(ids), opening=lambda _: {"delta": {"role": "assistant", "content": ""}},
                piece=lambda text: {"delta": {} if text is None else {"content": text}},
                logprobs=lambda p, _: self.chat_logprobs(p.token_ids, p.logprobs, p.top_logprobs)
                if req.logprobs else None, images=images)
        comps = await self.complete(jobs, is_disconnected, images)
        choices = [{"index": i, "message": {"role": "assistant", "content": c.text or "", "refusal": None},
                    "logprobs": self.chat_logprobs(c.token_ids, c.logprobs, c.top_logprobs) if req.logprobs else None,
                    "finish_reason": c.finish_reason}
                   for i, c in enumerate(comps)]
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model_name, "system_fingerprint": None, "choices": choices,
                "usage": self.usage(len(ids), sum(map(self.generated, comps)))}
