"""Server-sent event streams of the two generation endpoints (`stream: true`).

`completion_events` and `chat_events` turn a `RequestHandle`'s engine outputs into OpenAI chunks: text
deltas (holding back the last characters a stop string could still cut, so the pieces join to exactly the
non-streamed text), logprob entries not sent yet, tool calls once complete (chat), the echoed prompt
before a completion's first piece, and the finish reason. `_framed` wraps them: the usage chunk when
asked, `data: [DONE]`, an error event if the engine fails, and the request aborted however the stream
ends (a client gone included).
"""

from __future__ import annotations

from typing import Any, AsyncIterator

from dsv3.serve import protocol as P
from dsv3.serve import tool_calls as T
from dsv3.serve.engine_loop import Aborted, EngineError, RequestHandle


def _chunk(meta: dict[str, Any], choices: list[dict[str, Any]], with_usage: bool,
           usage: dict[str, Any] | None = None) -> str:
    body = {**meta, "choices": choices}
    if with_usage:
        body["usage"] = usage
    return P.sse(body)


def _visible(text: str, sent: int, final: bool, holdback: int) -> tuple[str, int]:
    """The new text that is safe to send, and the new sent count."""
    safe = len(text) if final else max(sent, len(text) - holdback)
    return text[sent:safe], max(sent, safe)


class _ChoiceStream:
    """What one choice of a streamed response has seen so far: its last output, token count and how many
    logprob entries were sent."""

    def __init__(self) -> None:
        self.last: Any = None
        self.tokens = 0
        self.sent_logprobs = 0

    def advance(self, out: Any) -> tuple[bool, str, str | None, list]:
        """-> (final, full text so far, finish reason, logprob entries not sent yet) for an engine output."""
        if isinstance(out, Aborted):
            return True, (self.last.text if self.last else ""), "abort", []
        self.last, self.tokens = out, len(out.token_ids)
        entries = (out.logprobs or [])[self.sent_logprobs:]
        self.sent_logprobs += len(entries)
        return out.finished, out.text, out.finish_reason, entries


async def _framed(handle: RequestHandle, req: P.CompletionRequest | P.ChatCompletionRequest, meta: dict[str, Any],
                  prompt_tokens: int, streams: list[_ChoiceStream], chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """The SSE frame around a request's choice chunks: the usage chunk (when asked), `[DONE]`, an error event
    if the engine fails, and the request aborted however the stream ends (a client gone included)."""
    try:
        async for chunk in chunks:
            yield chunk
        if req.include_usage:
            yield _chunk(meta, [], True, P.usage(prompt_tokens, sum(c.tokens for c in streams)))
        yield P.sse("[DONE]")
    except (EngineError, ValueError) as err:
        yield P.sse(P.error_body(str(err), "server_error", code="engine_error"))
        yield P.sse("[DONE]")
    finally:
        handle.abort()


def completion_events(handle: RequestHandle, req: P.CompletionRequest, meta: dict[str, Any],
                       prompt_tokens: int, holdback: int, token_text: P.TokenText,
                       echo_of: list[str]) -> AsyncIterator[str]:
    streams = [_ChoiceStream() for _ in range(handle.num)]
    sent = [0] * handle.num
    echo = list(echo_of)  # each choice's echoed prompt, sent with its first chunk

    async def chunks() -> AsyncIterator[str]:
        async for index, out in handle:
            final, text, reason, entries = streams[index].advance(out)
            offset = sent[index]
            piece, sent[index] = _visible(text, sent[index], final, holdback)
            lp = P.completion_logprobs(entries, token_text, offset) if req.logprobs is not None and entries else None
            if echo[index] and (piece or final or lp):
                piece, echo[index] = echo[index] + piece, ""
            if piece or final or lp:
                choice = {"index": index, "text": piece, "logprobs": lp, "finish_reason": reason if final else None}
                yield _chunk(meta, [choice], req.include_usage)

    return _framed(handle, req, meta, prompt_tokens, streams, chunks())


def chat_events(handle: RequestHandle, req: P.ChatCompletionRequest, meta: dict[str, Any], prompt_tokens: int,
                 holdback: int, prefix: str, parse_tools: bool, token_text: P.TokenText) -> AsyncIterator[str]:
    n = handle.num
    meta = {**meta, "object": "chat.completion.chunk"}
    parsers = [T.StreamParser(prefix) for _ in range(n)]
    sent, ncalls = [0] * n, [0] * n
    streams = [_ChoiceStream() for _ in range(n)]

    async def chunks() -> AsyncIterator[str]:
        yield _chunk(meta, [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None} for i in range(n)], req.include_usage)
        async for index, out in handle:
            final, text, reason, entries = streams[index].advance(out)
            delta: dict[str, Any] = {}
            if parse_tools:
                piece, calls = parsers[index].feed(text, final, holdback)
                if calls:
                    delta["tool_calls"] = [c.to_openai(index=ncalls[index] + k) for k, c in enumerate(calls)]
                    ncalls[index] += len(calls)
            else:
                piece, sent[index] = _visible(text, sent[index], final, holdback)
            if piece:
                delta = {"content": piece, **delta}
            lp = P.chat_logprobs(entries, token_text) if req.logprobs and entries else None
            if final and ncalls[index] and reason == "stop":
                reason = "tool_calls"
            if delta or final or lp:
                choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": reason if final else None}
                yield _chunk(meta, [choice], req.include_usage)

    return _framed(handle, req, meta, prompt_tokens, streams, chunks())
