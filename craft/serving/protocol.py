"""The OpenAI wire format: request bodies (validated strictly), responses, chunks and errors.

Requests are parsed with pydantic in strict mode: a wrong type (a string where a number belongs,
a bool where an integer belongs) is a 400, and so is an unknown field, so a misspelt or
unsupported option is never ignored silently. Options Craft does not implement (logprobs, echo,
best_of, penalties, logit_bias, tools, ...) are 400 with a message that names them.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# Fields of the OpenAI API that Craft accepts only at their neutral value.
UNSUPPORTED = {
    "logprobs": (None, False),
    "top_logprobs": (None,),
    "echo": (None, False),
    "best_of": (None, 1),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "suffix": (None,),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
}
MAX_STOP = 4


class ApiError(Exception):
    """An error answered as OpenAI error JSON with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(strict=True, extra="forbid")

    model: str
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1)  # an extension of the API (as in vLLM)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored, as it only identifies the caller
    # neutral-only fields (see UNSUPPORTED)
    logprobs: Any = None
    top_logprobs: Any = None
    echo: Any = None
    best_of: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    logit_bias: Any = None
    suffix: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP:
            raise ApiError(
                400, f"stop: at most {MAX_STOP} sequences, got {len(stops)}", param="stop"
            )
        if any(s == "" for s in stops):
            raise ApiError(400, "stop: sequences must not be empty", param="stop")
        return stops


class CompletionRequest(_Sampling):
    prompt: str | list[str]


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str
    name: str | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    add_generation_prompt: bool = True  # an extension (as in vLLM)


def parse(cls: type[_Sampling], body: Any) -> Any:
    """Validate a decoded JSON body; every problem becomes one 400 naming the field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        req = cls.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"] if not str(p).startswith(("str", "list")))
        msg = first["msg"]
        if first["type"] == "extra_forbidden":
            msg = "unknown field"
        elif first["type"] == "missing":
            msg = "required field is missing"
        more = f" (and {len(e.errors()) - 1} more problems)" if len(e.errors()) > 1 else ""
        raise ApiError(400, f"{loc}: {msg}{more}", param=loc or None) from None
    for name, neutral in UNSUPPORTED.items():
        value = getattr(req, name)
        if not any(value == v and type(value) is type(v) for v in neutral) and value is not None:
            raise ApiError(400, f"{name}: not supported by this server", param=name)
    return req


# ------------------------------------------------------------------------------------ responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def envelope(
    rid: str, model: str, obj: str, choices: list[dict[str, Any]], usage_: dict | None = None
) -> dict[str, Any]:
    """The fields every response and chunk carries around its choices."""
    out = {"id": rid, "object": obj, "created": int(time.time()), "model": model}
    out["choices"] = choices
    if usage_ is not None:
        out["usage"] = usage_
    return out


def completion(
    rid: str, model: str, texts: list[tuple[str, str]], prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    """`texts`: (text, finish_reason) of each choice."""
    choices = [
        {"index": i, "text": t, "logprobs": None, "finish_reason": f}
        for i, (t, f) in enumerate(texts)
    ]
    return envelope(rid, model, "text_completion", choices, usage(prompt_tokens, completion_tokens))


def completion_chunk(
    rid: str, model: str, index: int, text: str, finish: str | None
) -> dict[str, Any]:
    choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
    return envelope(rid, model, "text_completion", [choice])


def chat_completion(
    rid: str, model: str, texts: list[tuple[str, str]], prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": t},
            "logprobs": None,
            "finish_reason": f,
        }
        for i, (t, f) in enumerate(texts)
    ]
    return envelope(rid, model, "chat.completion", choices, usage(prompt_tokens, completion_tokens))


def chat_chunk(
    rid: str, model: str, index: int, delta: dict[str, str], finish: str | None
) -> dict[str, Any]:
    choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
    return envelope(rid, model, "chat.completion.chunk", [choice])


def usage_chunk(rid: str, model: str, obj: str, prompt: int, completion: int) -> dict[str, Any]:
    """The last chunk of a stream with `stream_options.include_usage`: no choices, the usage."""
    return envelope(rid, model, obj, [], usage(prompt, completion))
