"""The request bodies the server accepts, as pydantic models: each field's type and range is
checked before a handler runs, and the first problem becomes a 400 naming the field.

Types are strict (a string is not a number); fields the server does not use (OpenAI's
`frequency_penalty`, Ollama's `keep_alive`, ...) are accepted and ignored. Where an API allows
a string or a list of strings, a validator turns it into a tuple of strings. Unlike OpenAI's
and Ollama's defaults, sampling is greedy unless a request sets a temperature: what
`llmft generate` does.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_INPUTS = 64  # texts per /v1/classify request


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


def strings(value: Any, what: str) -> tuple[str, ...]:
    """A string or a list of strings as a tuple of strings (a ValueError naming `what` else)."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError(f"must be {what} or a list of them")


def stop_strings(value: Any) -> tuple[str, ...]:
    """`stop`: a string or up to `MAX_STOP_STRINGS` of them, none empty."""
    stops = () if value is None else strings(value, "a string")
    if len(stops) > MAX_STOP_STRINGS or not all(stops):
        raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, none empty")
    return stops


class Message(Strict):
    """One chat turn. OpenAI's content may be a list of parts; only text parts are served."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str = ""

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, value: Any) -> Any:
        if value is None:
            return ""
        if isinstance(value, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in value):
                raise ValueError("only text content parts ({'type': 'text', 'text': ...}) are supported")
            return "".join(p["text"] for p in value)
        return value


class StreamOptions(Strict):
    include_usage: bool = False


class Sampling(Strict):
    """What OpenAI's chat and text completions share."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)

    _stop = field_validator("stop", mode="before")(stop_strings)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens


class CompletionRequest(Sampling):
    prompt: str

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value: Any) -> Any:
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("one prompt per request (a string, or a list holding one)")
            return value[0]
        return value


class OllamaOptions(Strict):
    """Ollama's `options` that change the answer; the others (num_ctx, ...) are ignored."""

    temperature: float = Field(0.0, ge=0.0, le=2.0)
    seed: int | None = None
    num_predict: int | None = None  # -1 (or any negative): as many as the server allows
    top_k: int | None = Field(None, ge=1)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: tuple[str, ...] = ()

    _stop = field_validator("stop", mode="before")(stop_strings)


class OllamaRequest(Strict):
    model: str
    stream: bool = True
    options: OllamaOptions = Field(default_factory=OllamaOptions)


class OllamaChatRequest(OllamaRequest):
    messages: list[Message] = Field(min_length=1)


class OllamaGenerateRequest(OllamaRequest):
    prompt: str = Field(min_length=1)
    system: str | None = None
    raw: bool = False  # the prompt as it is, without the prompt style


class ClassifyRequest(Strict):
    input: tuple[str, ...]
    model: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _texts(cls, value: Any) -> tuple[str, ...]:
        texts = strings(value, "a string")
        if not 1 <= len(texts) <= MAX_INPUTS:
            raise ValueError(f"between 1 and {MAX_INPUTS} texts per request")
        empty = next((i for i, t in enumerate(texts) if not t.strip()), None)
        if empty is not None:
            raise ValueError(f"text {empty} is empty; nothing to classify")
        return texts
