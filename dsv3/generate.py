"""Text generation for people at a terminal, on the engine: what `dsv3 generate` and `dsv3 chat` share.

- `read_prompts`: the prompts of an input file (plain lines, or JSON lines with a "prompt" field);
- `encode_prompt`: raw text (BOS added) or one chat-formatted user turn;
- `stream_answer`: one request through an `LLM`, its text handed over piece by piece as the engine
  steps, decoded with the tokenizer's `IncrementalDecoder` (no broken characters); Ctrl-C, caught by a
  `StopFlag`, aborts the request and keeps what was generated;
- `Answer` / `Completion`: what one request produced, and the record `dsv3 generate` writes for it.

Flags and their checks live in `dsv3/cli/`; this module parses no arguments.
"""

from __future__ import annotations

import json
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from dsv3.engine.llm import LLM, RequestOutput
    from dsv3.engine.sampling import SamplingParams
    from dsv3.tokenizer import Tokenizer


def read_prompts(path: str | Path) -> list[str]:
    """Prompts of an input file: one per non-empty line, or the "prompt" field of a JSON-object line."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"prompt file not found: {file}")
    prompts = []
    for lineno, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{file}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise ValueError(f"{file}:{lineno}: a JSON line needs a string \"prompt\" field")
            prompts.append(obj["prompt"])
        else:
            prompts.append(line)
    if not prompts:
        raise ValueError(f"{file}: no prompts in the file")
    return prompts


def encode_prompt(tok: "Tokenizer", prompt: str, chat: bool = False, system: str | None = None) -> list[int]:
    """`prompt` as token ids: raw text with BOS, or (`chat`) a user turn in the chat template."""
    if not chat:
        return tok.encode(prompt)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tok.encode_chat(messages, add_generation_prompt=True)


class StopFlag:
    """Set by Ctrl-C while installed (`with flag:`), so generation stops at the next engine step."""

    def __init__(self) -> None:
        self.is_set = False
        self._previous: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        self.is_set = True

    def __enter__(self) -> "StopFlag":
        self.is_set = False
        self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        signal.signal(signal.SIGINT, self._previous)


@dataclass
class Answer:
    """What one request produced. `token_ids` leave out the EOS / stop token that ended the answer."""

    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS or a stop), "length" (max tokens or context), "interrupted" (Ctrl-C)
    num_cached_tokens: int = 0  # prompt tokens the engine took from its prefix cache


def _answer_ids(output: "RequestOutput | None", stop_ids: set[int]) -> list[int]:
    ids = list(output.token_ids) if output is not None else []
    if ids and output.finish_reason == "stop" and ids[-1] in stop_ids:
        ids = ids[:-1]
    return ids


def answer_of(output: "RequestOutput", tok: "Tokenizer", stop_ids: set[int]) -> Answer:
    """The `Answer` of a finished engine output."""
    ids = _answer_ids(output, stop_ids)
    return Answer(ids, tok.decode(ids), output.finish_reason, output.num_cached_tokens)


def stream_answer(llm: "LLM", tok: "Tokenizer", prompt_ids: list[int], params: "SamplingParams",
                  on_text: Callable[[str], None], stop: StopFlag) -> Answer:
    """Run one request through the engine, handing its text to `on_text` as it grows; Ctrl-C aborts it."""
    stop_ids = set(llm.eos_token_ids)
    request_id = llm.add_request(prompt_ids, params)
    decoder = tok.stream_decoder()
    last = None
    with stop:
        while llm.has_unfinished():
            if stop.is_set:
                llm.abort(request_id)
                break
            for out in llm.step():
                if out.request_id != request_id:
                    continue
                last = out
                new = out.new_token_ids
                if out.finished and new and new[-1] in stop_ids and out.finish_reason == "stop":
                    new = new[:-1]
                piece = decoder.extend(new) + (decoder.flush() if out.finished else "")
                if piece:
                    on_text(piece)
    if last is not None and last.finished:
        return answer_of(last, tok, stop_ids)
    tail = decoder.flush()
    if tail:
        on_text(tail)
    ids = _answer_ids(last, stop_ids)
    return Answer(ids, tok.decode(ids), "interrupted", last.num_cached_tokens if last is not None else 0)


@dataclass
class Completion:
    """One answer as `dsv3 generate` writes it (a JSON line)."""

    prompt: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str

    @classmethod
    def of(cls, prompt: str, prompt_ids: list[int], answer: Answer) -> "Completion":
        return cls(prompt=prompt, text=answer.text, prompt_tokens=len(prompt_ids),
                   completion_tokens=len(answer.token_ids), finish_reason=answer.finish_reason)
