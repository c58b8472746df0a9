"""The API's wire shapes: the request models, ``APIError`` and OpenAI's error body, and the OpenAPI fragments
that document the errors and streams this server really answers."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

__all__ = ["APIError", "error_response", "GenerationRequest", "CompletionRequest", "ChatRequest", "ChatMessage",
           "ContentPart", "StreamOptions", "TokenizeRequest", "DetokenizeRequest", "STREAMED", "ERRORS",
           "ERROR_SCHEMA"]


class APIError(Exception):
    """An error answered in OpenAI's shape with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, type=self.type, param=self.param, code=self.code)


def error_response(status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}},
                        status_code=status)


# ------------------------------------------------------------------ requests
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    include_usage: bool | None = False


class GenerationRequest(BaseModel):  # what completions and chat share
    model_config = ConfigDict(extra="allow", strict=True)  # ignored extras (user, metadata, ...); no coercion
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    skip_special_tokens: bool | None = True  # vLLM's extension: False shows <|end|> and the like in the text


class CompletionRequest(GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = False


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: str
    content: str | list[ContentPart] | None = None


class ChatRequest(GenerationRequest):
    messages: list[ChatMessage]
    logprobs: bool | None = False
    top_logprobs: int | None = None
    max_completion_tokens: int | None = None


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a text (special tokens spelt in it are read as such), or a conversation (``messages``,
    or ``prompt`` as a list of messages) rendered through the model's chat format."""

    model_config = ConfigDict(extra="allow", strict=True)
    prompt: str | list[ChatMessage] | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # gptlab's tokenizers add none: accepted for vLLM's clients
    add_generation_prompt: bool | None = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    tokens: list[int]


# ------------------------------------------------------------------ OpenAPI
STREAMED: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {"schema": {  # each event: data is a JSON chunk, or [DONE]
        "type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}}},
          "description": "JSON, or with stream=true Server-Sent Events ending in data: [DONE]"}}
ERRORS = {"400": "invalid request", "401": "missing or wrong API key", "404": "unknown model or route",
          "413": "body too large", "429": "queue full", "503": "model loading"}
ERROR_SCHEMA: dict[str, Any] = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
