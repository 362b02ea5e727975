"""Request bodies of the OpenAI-compatible routes (pydantic). Unknown OpenAI fields
(``user``, ``presence_penalty``, ...) are accepted and ignored, as the official clients
send some of them by default; fields that would change the output and are not
supported are refused by the routes."""
from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from adapterctl.errors import InvalidArgument
from adapterctl.server.types import ResponseFormat


def lone_surrogate(value: Any) -> str | None:
    """Where a string of a parsed JSON body holds a lone UTF-16 surrogate (JSON's
    ``"\\ud800"`` escape decodes to one), which no tokenizer or UTF-8 answer can carry;
    None when there is none. Iterative: the body may be nested deeply."""
    stack: list[tuple[str, Any]] = [("body", value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return where
        elif isinstance(item, dict):
            stack.extend((f"{where}.{k}" if isinstance(k, str) and k.isprintable() else where, v)
                         for k, v in item.items())
            stack.extend((where, k) for k in item)
        elif isinstance(item, list):
            stack.extend((f"{where}[{i}]", v) for i, v in enumerate(item))
    return None


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class StreamOptions(_Body):
    include_usage: bool = False


class JsonSchemaSpec(_Body):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormatBody(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    def engine_format(self) -> ResponseFormat:
        schema = self.json_schema.schema_ if self.json_schema is not None else None
        return ResponseFormat(self.type, schema)


class _Generation(_Body):
    """Fields both routes share (OpenAI defaults: temperature 1, top_p 1, n 1)."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)  # an extension (vLLM has it too)
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormatBody | None = None
    user: str | None = None  # OpenAI's end-user id: the routing key of a weighted (canary) alias

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data: Any) -> Any:
        where = lone_surrogate(data)
        if where is not None:
            raise ValueError(f"{where[:80]}: a lone UTF-16 surrogate (\\ud800-\\udfff) is not text")
        return data

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionBody(_Generation):
    prompt: Union[str, list[str]]
    logprobs: int | None = Field(None, ge=0, le=5)  # OpenAI's bound for completions
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def prompts(self) -> list[str]:
        prompts = [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)
        if not prompts:
            raise InvalidArgument("prompt must not be an empty list")
        if self.echo or self.suffix or (self.best_of or 1) > 1:
            raise InvalidArgument("echo, suffix and best_of are not supported")
        return prompts


class ContentPart(_Body):
    type: str
    text: str | None = None


class Message(_Body):
    role: str
    content: Union[str, list[ContentPart], None] = None

    def text(self, i: int) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise InvalidArgument(f"messages[{i}].content: only text parts are supported, got {part.type!r}")
            parts.append(part.text)
        return "".join(parts)


class ChatBody(_Generation):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    max_completion_tokens: int | None = Field(None, ge=1)

    def turns(self) -> tuple[tuple[str, str], ...]:
        # OpenAI's newer "developer" role is the system prompt of older models.
        return tuple(("system" if m.role == "developer" else m.role, m.text(i)) for i, m in enumerate(self.messages))
