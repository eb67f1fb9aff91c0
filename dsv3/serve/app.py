"""The FastAPI app: OpenAI-compatible endpoints, the chat page, health and metrics.

`create_app(engine, ...)` wires an engine with the `LLM` interface to HTTP:

- `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (streamed as server-sent
  events ending in `data: [DONE]`, or whole), `GET /health`, `GET /metrics`, the chat page at `/`;
- every error is an OpenAI error object `{"error": {"message", "type", "param", "code"}}`: 400 for
  bad parameters, JSON or text (lone surrogates), and for requests that could never be served (more
  sequences than `max_waiting`, more prompt tokens than `max_request_tokens`), 401 for a wrong API key
  (checked before the body is read), 404 for an unknown model, 408 for a body slower than
  `body_timeout`, 413 for an oversized body, 503 (with `Retry-After`) when the waiting queue is full
  or the server is draining;
- the network-facing guards (Host check, API key, CORS, CSP and framing headers, body limits) are the
  middlewares of `dsv3.serve.guards`; `/docs` is off (it would load a third-party script);
- prompts are tokenized (and chat templates rendered, grammars compiled) in a worker thread, never on
  the event loop; a text whose length alone proves it longer than the context is refused untokenized;
- `response_format` (`json_object`, `json_schema`) and forced tool calls (`tool_choice` "required" or
  a named function) are compiled into a grammar (`dsv3.engine.grammar`, llguidance) that the engine
  enforces token by token;
- a client that goes away (mid-stream, or while waiting for a whole answer) has its sequences
  aborted, which frees their cache blocks.

Text is always taken from the engine's cumulative `.text`; while a request has stop strings, the
last `max(len(stop)) - 1` characters are held back from the stream until they can no longer be cut
by a stop match, so the streamed pieces join to exactly the non-streamed text (the event streams are
built in `dsv3.serve.streaming`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from dsv3.serve import guards
from dsv3.serve import protocol as P
from dsv3.serve import tool_calls as T
from dsv3.serve.engine_loop import Aborted, EngineError, EngineLoop, QueueFull, RequestHandle, ShuttingDown
from dsv3.serve.metrics import ServerMetrics
from dsv3.serve.streaming import chat_events, completion_events

log = logging.getLogger("dsv3.serve")
STATIC = Path(__file__).parent / "static"


class APIError(StarletteHTTPException):
    """An error answered as an OpenAI error object (a Starlette HTTPException, so FastAPI's body
    parsing lets it through unchanged)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(status_code=status, detail=message, headers=headers)
        self.type, self.param, self.code = type_, param, code


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(P.error_body(str(err.detail), err.type, err.param, err.code), status_code=err.status_code,
                        headers=err.headers)


class _Choice:
    """The final state of one choice (one engine sequence)."""

    def __init__(self) -> None:
        self.text, self.token_ids, self.logprobs = "", [], []
        self.finish_reason: str | None = None
        self.num_cached = 0

    def update(self, out: Any) -> None:
        if isinstance(out, Aborted):
            self.finish_reason = "abort"
            return
        self.text, self.token_ids = out.text, out.token_ids
        self.logprobs = out.logprobs or []
        self.finish_reason = out.finish_reason
        self.num_cached = getattr(out, "num_cached_tokens", 0)


def create_app(engine: Any, served_model_name: str = "dsv3", api_key: str | None = None,
               max_waiting: int | None = 256, max_body_bytes: int = 4 << 20, shutdown_grace: float = 30.0,
               allowed_hosts: list[str] | None = None, allowed_origins: list[str] | None = None,
               max_request_tokens: int | None = None, body_timeout: float = 30.0) -> FastAPI:
    """The app serving `engine` (an `LLM` or anything with its interface) as `served_model_name`.

    `allowed_hosts`: Host header names served (`["*"]`: any); None: any with an API key, else localhost
    and IP-address literals. `allowed_origins`: browser origins allowed by CORS (none by default).
    `max_request_tokens`: prompt tokens one request may bring, over its prompts and `n` choices
    (default: the larger of the context length and 16384)."""
    metrics_holder: dict[str, EngineLoop] = {}
    metrics = ServerMetrics(lambda: metrics_holder["loop"].stats())
    loop = EngineLoop(engine, metrics=metrics, max_waiting=max_waiting)
    metrics_holder["loop"] = loop
    tokenizer = getattr(engine, "tokenizer", None)
    token_text = P.TokenText(tokenizer)
    max_model_len = int(engine.max_model_len)
    vocab = _vocab_size(engine)
    created = P.now()
    budget = max_request_tokens if max_request_tokens is not None else max(max_model_len, 16384)
    chars_per_token = _max_token_chars(tokenizer)
    workers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="dsv3-tokenize")
    grammars = _Grammars(tokenizer, vocab)

    async def off_loop(fn: Callable[..., Any], *args: Any) -> Any:
        """Run blocking work (tokenizing, templates, grammars) in the worker threads."""
        return await asyncio.get_running_loop().run_in_executor(workers, fn, *args)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop.start()
        yield
        loop.shutdown()
        workers.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="dsv3", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="OpenAI-compatible DeepSeek-V3 server")
    app.state.engine_loop = loop
    app.state.metrics = metrics
    app.state.served_model_name = served_model_name
    app.state.shutdown_grace = shutdown_grace
    # added innermost first: BodyGuard runs last, HostCheck first
    app.add_middleware(guards.BodyGuard, max_bytes=max_body_bytes, body_timeout=body_timeout,
                       too_big=lambda: APIError(413, f"request body is larger than the limit of {max_body_bytes} "
                                                     "bytes", code="request_too_large", headers={"Connection": "close"}),
                       too_slow=lambda: APIError(408, f"the request body did not arrive within {body_timeout:g} s",
                                                 code="request_timeout", headers={"Connection": "close"}))
    if api_key is not None:
        app.add_middleware(guards.KeyCheck, api_key=api_key)
    if allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)
    app.add_middleware(guards.SecurityHeaders)
    app.add_middleware(guards.HostCheck, allowed=allowed_hosts if allowed_hosts is not None
                       else (["*"] if api_key is not None else None))

    # ---- errors -----------------------------------------------------------------------------
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        metrics.http_errors.inc(1, str(err.status_code))
        if isinstance(err, APIError):
            return _error_response(err)
        type_ = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(P.error_body(str(err.detail), type_), status_code=err.status_code, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        metrics.http_errors.inc(1, "400")
        first = err.errors()[0] if err.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            message, param = f"invalid JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}", None
        else:
            where = ".".join(loc)
            msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
            message = f"{where}: {msg}" if where else msg
            param = loc[0] if loc else (msg.split(":")[0].split(".")[0].split("[")[0] if ": " in msg else None)
        return JSONResponse(P.error_body(message, param=param, code="invalid_value"), status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        metrics.http_errors.inc(1, "500")
        return JSONResponse(P.error_body(f"internal error: {type(err).__name__}", "server_error"), status_code=500)

    # ---- helpers ----------------------------------------------------------------------------
    def check_model(name: str | None) -> None:
        if name is not None and name != served_model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {served_model_name!r}",
                           "not_found_error", param="model", code="model_not_found")

    def params_for(req: P.SamplingRequest, prompt_len: int, num_logprobs: int | None, j: int,
                   default_max: int | None, grammar: Any = None) -> Any:
        from dsv3.engine.sampling import SamplingParams
        room = max_model_len - prompt_len
        if room < 1:
            raise APIError(400, f"the prompt has {prompt_len} tokens; this model's context is {max_model_len} "
                                f"tokens, so a prompt may have at most {max_model_len - 1}",
                           param="messages" if isinstance(req, P.ChatCompletionRequest) else "prompt",
                           code="context_length_exceeded")
        max_tokens = req.max_tokens if req.max_tokens is not None else min(default_max or room, room)
        if max_tokens > room:
            raise APIError(400, f"max_tokens is {max_tokens}, but the prompt has {prompt_len} tokens and the "
                                f"context {max_model_len}: at most {room} tokens can be generated",
                           param="max_tokens", code="context_length_exceeded")
        bad_ids = [t for t in req.stop_token_ids or [] if t >= vocab]
        if bad_ids:
            raise APIError(400, f"stop_token_ids must be in [0, {vocab}), got {bad_ids[:5]}", param="stop_token_ids")
        bias = req.token_bias
        bad_ids = [t for t in bias or {} if t >= vocab]
        if bad_ids:
            raise APIError(400, f"logit_bias keys must be token ids in [0, {vocab}), got {bad_ids[:5]}",
                           param="logit_bias")
        try:
            return SamplingParams(
                temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0,
                min_p=req.min_p or 0.0, max_tokens=max_tokens, stop=list(req.stop or []),
                stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos,
                seed=None if req.seed is None else (req.seed + j) % (2 ** 63),
                presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                repetition_penalty=req.repetition_penalty, logprobs=num_logprobs, logit_bias=bias, grammar=grammar)
        except ValueError as err:
            raise APIError(400, str(err)) from None

    def submit(seqs: list[tuple[list[int], Any]]) -> RequestHandle:
        if max_waiting is not None and len(seqs) > max_waiting:
            raise APIError(400, f"the request makes {len(seqs)} sequences (prompts x n); this server queues at "
                                f"most {max_waiting} (--max-waiting)", param="n", code="too_many_sequences")
        prompt_tokens = sum(len(ids) for ids, _ in seqs)
        if prompt_tokens > budget:
            raise APIError(400, f"the request brings {prompt_tokens} prompt tokens (over its prompts and n "
                                f"choices); one request may bring at most {budget}", param="prompt",
                           code="request_too_large")
        try:
            return loop.submit(seqs)
        except QueueFull as err:
            raise APIError(503, f"server busy: {err}; retry later", "server_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except ShuttingDown as err:
            raise APIError(503, str(err), "server_error", code="shutting_down", headers={"Retry-After": "5"}) from None
        except EngineError as err:
            raise APIError(503, str(err), "server_error", code="engine_unavailable",
                           headers={"Retry-After": "5"}) from None

    async def accepted(handle: RequestHandle) -> None:
        try:
            await handle.accepted
        except ValueError as err:
            raise APIError(400, str(err)) from None
        except EngineError as err:
            raise APIError(500, str(err), "server_error", code="engine_error") from None

    async def collect(handle: RequestHandle, request: Request) -> list[_Choice] | None:
        """Run the handle to the end; None if the client went away (the handle is aborted)."""
        choices = [_Choice() for _ in range(handle.num)]

        async def consume() -> None:
            async for index, out in handle:
                choices[index].update(out)

        task = asyncio.ensure_future(consume())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.25)
                if done:
                    task.result()
                    return choices
                if await request.is_disconnected():
                    handle.abort()
                    return None
        except (EngineError, ValueError) as err:
            raise APIError(500, str(err), "server_error", code="engine_error") from None
        finally:
            if not task.done():
                task.cancel()
            handle.abort()

    def stream(events: AsyncIterator[str], handle: RequestHandle) -> StreamingResponse:
        return StreamingResponse(events, media_type="text/event-stream", background=BackgroundTask(handle.abort),
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def tokenizer_or_400(what: str) -> Any:
        if tokenizer is None:
            raise APIError(400, f"{what} needs a tokenizer, and this model has none (no tokenizer.json)")
        return tokenizer

    # ---- routes -----------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/health")
    async def health() -> JSONResponse:
        if not loop.is_alive:
            return JSONResponse({"status": "down"}, status_code=503)
        if loop.draining:  # shutting down: tell load balancers to stop sending
            return JSONResponse({"status": "draining", **loop.stats()}, status_code=503)
        return JSONResponse({"status": "ok", **loop.stats()})

    @app.get("/metrics")
    async def metrics_text() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": served_model_name, "object": "model", "created": created,
                                            "owned_by": "dsv3", "root": served_model_name,
                                            "max_model_len": max_model_len}]}

    def check_length(text: str, param: str) -> None:
        """Refuse, untokenized, a text whose length alone proves it longer than the budget or context."""
        least = -(-len(text) // chars_per_token)  # no token covers more than chars_per_token characters
        if least > min(budget, max_model_len - 1):
            raise APIError(400, f"the {param} has {len(text)} characters, so at least {least} tokens; this "
                                f"model's context is {max_model_len} tokens", param=param,
                           code="context_length_exceeded")

    def structured_grammar(req: P.SamplingRequest) -> Any:
        """The grammar of a request's response_format (in a worker thread), or None."""
        if not req.structured:
            return None
        if req.ignore_eos:
            raise APIError(400, "response_format cannot be combined with ignore_eos", param="ignore_eos")
        fmt = req.response_format
        try:
            if fmt.type == "json_object":
                return grammars.get().json_object()
            return grammars.get().json_schema(fmt.json_schema.schema_)
        except ValueError as err:
            raise APIError(400, f"response_format: {err}", param="response_format") from None
        except ImportError as err:
            raise APIError(400, f"response_format: {err}", param="response_format") from None

    def encode_prompts(req: P.CompletionRequest) -> list[list[int]]:
        texts = [(i, p) for i, p in enumerate(req.prompts()) if isinstance(p, str)]
        out: list[list[int] | None] = [None if isinstance(p, str) else list(p) for p in req.prompts()]
        if texts:
            tok = tokenizer_or_400("a text prompt")
            for _, text in texts:
                check_length(text, "prompt")
            # encode_batch runs in Rust without the GIL, so other threads (the engine's) go on meanwhile
            for (i, _), ids in zip(texts, tok.encode_batch([t for _, t in texts])):
                out[i] = ids
        return out  # type: ignore[return-value]

    @app.post("/v1/completions")
    async def completions(req: P.CompletionRequest, request: Request) -> Any:
        check_model(req.model)
        prompt_ids = await off_loop(encode_prompts, req)
        for ids in prompt_ids:
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise APIError(400, f"prompt token ids must be in [0, {vocab}), got {bad[:5]}", param="prompt")
            if not ids:
                raise APIError(400, "the prompt is empty", param="prompt")
        grammar = await off_loop(structured_grammar, req)
        seqs = [(ids, params_for(req, len(ids), req.logprobs, j, 16, grammar))
                for ids in prompt_ids for j in range(req.n)]
        echoes = [""] * len(prompt_ids)
        if req.echo:
            texts = req.prompts()
            echoes = [t if isinstance(t, str) else await off_loop(_decode, tokenizer_or_400("echo"), ids)
                      for t, ids in zip(texts, prompt_ids)]
        handle = submit(seqs)
        await accepted(handle)
        meta = {"id": P.new_id("cmpl"), "object": "text_completion", "created": P.now(), "model": served_model_name}
        prompt_tokens = sum(len(ids) for ids in prompt_ids)
        holdback = max((len(s) for s in req.stop or []), default=1) - 1
        echo_of = [echoes[i // req.n] for i in range(len(seqs))]
        if req.stream:
            return stream(completion_events(handle, req, meta, prompt_tokens, holdback, token_text, echo_of), handle)
        choices = await collect(handle, request)
        if choices is None:
            return Response(status_code=499)
        out = []
        for i, c in enumerate(choices):
            lp = P.completion_logprobs(c.logprobs, token_text) if req.logprobs is not None else None
            out.append({"index": i, "text": echo_of[i] + c.text, "logprobs": lp, "finish_reason": c.finish_reason})
        cached = sum(choices[k * req.n].num_cached for k in range(len(prompt_ids)))
        return {**meta, "choices": out,
                "usage": P.usage(prompt_tokens, sum(len(c.token_ids) for c in choices), cached)}

    def chat_prompt(req: P.ChatCompletionRequest) -> tuple[list[int], str, bool, Any]:
        tok = tokenizer_or_400("chat")
        for m in req.messages:
            check_length(m.text() or "", "messages")
        ids, prefix, parse_tools = _chat_prompt(tok, req)
        grammar = structured_grammar(req)
        if grammar is None and prefix:  # a forced tool call: its name (if not forced) and arguments
            if req.ignore_eos:
                raise APIError(400, "a forced tool call cannot be combined with ignore_eos", param="ignore_eos")
            if req.structured:
                raise APIError(400, "response_format cannot be combined with a forced tool call",
                               param="response_format")
            name = req.tool_choice.function.name if isinstance(req.tool_choice, P.NamedToolChoice) else None
            tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
            try:
                compiler = grammars.get()
                grammar = compiler.lark(T.call_grammar(tools, name, compiler.literal))
            except ValueError as err:
                raise APIError(400, f"tools: the parameters schema cannot be enforced: {err}", param="tools") from None
            except ImportError as err:
                raise APIError(400, f"tool_choice: {err}", param="tool_choice") from None
        return ids, prefix, parse_tools, grammar

    @app.post("/v1/chat/completions")
    async def chat_completions(req: P.ChatCompletionRequest, request: Request) -> Any:
        check_model(req.model)
        ids, prefix, parse_tools, grammar = await off_loop(chat_prompt, req)
        seqs = [(ids, params_for(req, len(ids), req.num_logprobs, j, None, grammar)) for j in range(req.n)]
        handle = submit(seqs)
        await accepted(handle)
        meta = {"id": P.new_id("chatcmpl"), "object": "chat.completion", "created": P.now(),
                "model": served_model_name}
        holdback = max((len(s) for s in req.stop or []), default=1) - 1
        if req.stream:
            return stream(chat_events(handle, req, meta, len(ids), holdback, prefix, parse_tools, token_text), handle)
        choices = await collect(handle, request)
        if choices is None:
            return Response(status_code=499)
        out = []
        for i, c in enumerate(choices):
            content, calls = T.parse(prefix + c.text) if parse_tools else (c.text, [])
            message: dict[str, Any] = {"role": "assistant", "content": content if content or not calls else None}
            reason = c.finish_reason
            if calls:
                message["tool_calls"] = [call.to_openai() for call in calls]
                reason = "tool_calls" if reason == "stop" else reason
            lp = P.chat_logprobs(c.logprobs, token_text) if req.logprobs else None
            out.append({"index": i, "message": message, "logprobs": lp, "finish_reason": reason})
        return {**meta, "choices": out,
                "usage": P.usage(len(ids), sum(len(c.token_ids) for c in choices), choices[0].num_cached)}

    return app


class _Grammars:
    """The grammar compiler, built on first use (wrapping the tokenizer takes a second or two)."""

    def __init__(self, tokenizer: Any, vocab: int) -> None:
        self.tokenizer, self.vocab = tokenizer, vocab
        self._compiler: Any = None
        self._lock = threading.Lock()

    def get(self) -> Any:
        from dsv3.engine.grammar import GrammarCompiler
        with self._lock:
            if self._compiler is None:
                if self.tokenizer is None:
                    raise ValueError("structured outputs need a tokenizer, and this model has none")
                self._compiler = GrammarCompiler(self.tokenizer, self.vocab)
            return self._compiler


def _decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def _max_token_chars(tokenizer: Any) -> int:
    """The most characters one token can stand for (at least 1): a bound for counting tokens from text."""
    if tokenizer is None:
        return 1 << 30
    backend = getattr(tokenizer, "backend", None)
    vocab = backend.get_vocab(with_added_tokens=True) if backend is not None else {}
    return max((len(piece) for piece in vocab), default=1 << 30)


def _vocab_size(engine: Any) -> int:
    model = getattr(engine, "model", None)
    args = getattr(model, "args", None)
    vocab = getattr(args, "vocab_size", None) or getattr(engine, "vocab_size", None)
    if vocab is None:
        raise ValueError("the engine exposes no vocab size (engine.model.args.vocab_size or engine.vocab_size)")
    return int(vocab)


def _chat_prompt(tok: Any, req: P.ChatCompletionRequest) -> tuple[list[int], str, bool]:
    """Prompt ids of a chat request, the forced assistant prefix (tool_choice) and whether to parse tool calls."""
    messages = [m.to_template() for m in req.messages]
    use_tools = bool(req.tools) and req.tool_choice != "none"
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if use_tools else None
    if use_tools and "tools" not in tok.chat_template:  # the template has no place for tool definitions
        first_other = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
        messages.insert(first_other, {"role": "system", "content": T.tools_system_prompt(tools)})
    prefix = ""
    if use_tools and req.tool_choice == "required":
        prefix = T.forced_prefix(None)
    elif use_tools and isinstance(req.tool_choice, P.NamedToolChoice):
        prefix = T.forced_prefix(req.tool_choice.function.name)
    try:
        text = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True)
    except Exception as err:  # noqa: BLE001 - a template error is the caller's conversation
        raise APIError(400, f"cannot render the conversation with the chat template: {err}",
                       param="messages") from None
    return tok.encode_batch([text + prefix], add_special_tokens=False)[0], prefix, use_tools
