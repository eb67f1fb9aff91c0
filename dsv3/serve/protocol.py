"""The OpenAI wire format: request schemas (pydantic) and the small pieces of response formatting.

Requests are validated here, once, so a bad parameter becomes a 400 that names it before anything
reaches the engine. Fields follow the OpenAI API (and vLLM's extensions `top_k`, `min_p`,
`repetition_penalty`, `ignore_eos`), with `logit_bias`, `echo` and `response_format` (`json_object`, `json_schema`); what
the engine cannot do (`suffix`, `echo` with `logprobs`, non-text content parts) is refused with a 400
rather than silently ignored. Text anywhere in a request (keys included) must be valid Unicode: a lone
UTF-16 surrogate (`"\ud800"`, which JSON allows) is a 400 naming the field. Responses are plain dicts
built by the functions at the bottom (`usage`, the two log-probability layouts, SSE framing).
"""

from __future__ import annotations

import json
import time
import uuid
from functools import lru_cache
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

MAX_N = 16  # choices per request
MAX_STOP = 16  # stop strings per request
MAX_TOP_LOGPROBS = 20  # as SamplingParams.MAX_LOGPROBS and OpenAI's limit
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for logit_bias values
MAX_LOGIT_BIAS_ENTRIES = 1024


def _has_surrogate(text: str) -> bool:
    """Whether `text` holds a lone surrogate (the one thing that stops a str from encoding as UTF-8)."""
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _surrogate_path(value: Any, path: str = "") -> str | None:
    """The path of the first string (or key) in `value` holding a lone UTF-16 surrogate, else None."""
    stack = [(value, path)]
    while stack:
        v, where = stack.pop()
        if isinstance(v, str):
            if _has_surrogate(v):
                return where or "body"
        elif isinstance(v, dict):
            for k, item in v.items():
                key = str(k)
                if _has_surrogate(key):
                    return f"{where}.{key.encode('utf-8', 'backslashreplace').decode()}".lstrip(".") or "body"
                stack.append((item, f"{where}.{key}".lstrip(".")))
        elif isinstance(v, list):
            stack.extend((item, f"{where}[{i}]") for i, item in enumerate(v))
    return None


def clean_text(text: str) -> str:
    """`text` with lone surrogates escaped (`\\ud800`), so it can be encoded as UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8") if _has_surrogate(text) else text


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class JSONSchemaFormat(_Model):
    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Model):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _check(self) -> "ResponseFormat":
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise ValueError("response_format of type json_schema needs json_schema.schema")
        return self


class StreamOptions(_Model):
    include_usage: bool = False


class FunctionDef(_Model):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Model):
    type: Literal["function"] = "function"
    function: FunctionDef


class ToolChoiceFunction(_Model):
    name: str


class NamedToolChoice(_Model):
    type: Literal["function"] = "function"
    function: ToolChoiceFunction


class FunctionCall(_Model):
    name: str
    arguments: str | dict[str, Any] = ""


class ToolCall(_Model):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ContentPart(_Model):
    type: str
    text: str | None = None


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str | None:
        """The content as one string (text parts joined); other part types are refused."""
        if self.content is None or isinstance(self.content, str):
            return self.content
        pieces = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ValueError(f"only text content parts are supported, got a {part.type!r} part")
            pieces.append(part.text)
        return "".join(pieces)

    def to_template(self) -> dict[str, Any]:
        """The dict the chat template expects (`developer` is a system message)."""
        role = "system" if self.role == "developer" else self.role
        content = self.text()
        out: dict[str, Any] = {"role": role, "content": content}
        if self.tool_calls:
            out["tool_calls"] = [{"type": "function", "id": c.id,
                                  "function": {"name": c.function.name, "arguments": c.function.arguments}}
                                 for c in self.tool_calls]
            if not content:
                out["content"] = None  # the DeepSeek-V3 template marks a tool-call turn by content None
        elif content is None:
            out["content"] = ""
        return out


class SamplingRequest(_Model):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: StrictInt | None = Field(None, ge=-1, le=2 ** 31 - 1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    n: StrictInt = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[StrictInt] | None = None
    seed: StrictInt | None = Field(None, ge=-(2 ** 63), le=2 ** 63 - 1)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False
    user: str | None = None
    response_format: ResponseFormat | None = None

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        where = _surrogate_path(data)
        if where is not None:
            raise ValueError(f"{where}: text holds a lone UTF-16 surrogate, which is not valid Unicode")
        return data

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v: str | list[str] | None) -> list[str]:
        stops = [] if v is None else [v] if isinstance(v, str) else list(v)
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops

    @field_validator("stop_token_ids")
    @classmethod
    def _check_stop_ids(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(t < 0 for t in v):
            raise ValueError("stop_token_ids must be >= 0")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if not v:
            return None
        if len(v) > MAX_LOGIT_BIAS_ENTRIES:
            raise ValueError(f"at most {MAX_LOGIT_BIAS_ENTRIES} logit_bias entries, got {len(v)}")
        for key, value in v.items():
            if not key.isascii() or not key.isdigit():
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
            if not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {value} for token {key}")
        return v

    @property
    def token_bias(self) -> dict[int, float] | None:
        return {int(k): float(b) for k, b in self.logit_bias.items()} if self.logit_bias else None

    @property
    def structured(self) -> bool:
        return self.response_format is not None and self.response_format.type != "text"

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None

    @model_validator(mode="after")
    def _check(self) -> "ChatCompletionRequest":
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.tool_choice is not None and self.tool_choice != "none" and not self.tools:
            raise ValueError("tool_choice needs tools")
        if isinstance(self.tool_choice, NamedToolChoice):
            names = {t.function.name for t in self.tools or []}
            if self.tool_choice.function.name not in names:
                raise ValueError(f"tool_choice names {self.tool_choice.function.name!r}, "
                                 f"which is not among the tools {sorted(names)}")
        for m in self.messages:
            m.text()  # refuses non-text parts now, as a validation error
        return self

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


PromptType = str | list[str] | list[StrictInt] | list[list[StrictInt]]


class CompletionRequest(SamplingRequest):
    prompt: PromptType
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = None

    @model_validator(mode="after")
    def _check(self) -> "CompletionRequest":
        if self.echo and self.logprobs is not None:
            raise ValueError("echo with logprobs is not supported by this server (no prompt log-probabilities)")
        if self.suffix:
            raise ValueError("suffix is not supported by this server")
        p = self.prompt
        if isinstance(p, list) and (not p or any(isinstance(x, list) and not x for x in p)):
            raise ValueError("prompt must not be empty")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of prompts (each a string or a list of token ids)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


# ---- responses ------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """An OpenAI error object (text that holds lone surrogates is escaped, so it always encodes)."""
    return {"error": {"message": clean_text(message), "type": type_,
                      "param": None if param is None else clean_text(param), "code": code}}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def sse(payload: dict[str, Any] | str) -> str:
    """One server-sent event carrying a JSON object (or the literal `[DONE]`)."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of the byte-level BPE alphabet (printable stand-ins for the 256 byte values)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars = list(keep)
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars)}


class TokenText:
    """Text and raw bytes of single token ids, for log-probability reports (cached per id)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is not None:
            return hit
        piece = self.tokenizer.id_to_token(token_id) if self.tokenizer is not None else None
        if piece is None:
            raw = b""
        else:
            table = _byte_decoder()
            if all(ch in table for ch in piece):
                raw = bytes(table[ch] for ch in piece)
            else:  # an added token (special or not) is its own text
                raw = piece.encode("utf-8")
        result = (raw.decode("utf-8", errors="replace"), list(raw))
        if len(self._cache) < 200_000:
            self._cache[token_id] = result
        return result


def chat_logprobs(entries: list[Any], token_text: TokenText) -> dict[str, Any]:
    """`choices[i].logprobs` of a chat completion from engine `TokenLogprob`s."""
    content = []
    for e in entries:
        text, raw = token_text(e.token_id)
        top = []
        for tid, lp in e.top:
            t, r = token_text(tid)
            top.append({"token": t, "logprob": _finite(lp), "bytes": r})
        content.append({"token": text, "logprob": _finite(e.logprob), "bytes": raw, "top_logprobs": top})
    return {"content": content}


def completion_logprobs(entries: list[Any], token_text: TokenText, offset: int = 0) -> dict[str, Any]:
    """`choices[i].logprobs` of a (legacy) completion: parallel lists, `offset` = text already sent."""
    tokens, lps, tops, offsets = [], [], [], []
    for e in entries:
        text, _ = token_text(e.token_id)
        tokens.append(text)
        lps.append(_finite(e.logprob))
        tops.append({token_text(tid)[0]: _finite(lp) for tid, lp in e.top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def _finite(x: float) -> float:
    """JSON has no -inf: clamp to the most negative float (as vLLM does)."""
    return max(float(x), -9999.0)
