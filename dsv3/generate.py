"""Text generation for people at a terminal, on the engine: what `dsv3 generate` and `dsv3 chat` share.

- `read_prompts`: the prompts of an input file (plain lines, or JSON lines with a "prompt" field);
- `encode_prompt`: raw text (BOS added) or one chat-formatted user turn;
- `stream_answer`: one request through an `LLM`, its text handed over piece by piece as the engine
  steps, decoded with the tokenizer's `IncrementalDecoder` (no broken characters); Ctrl-C, caught by a
  `StopFlag`, aborts the request and keeps what was generated;
- `run_batch`: many requests at once, each answer handed over as it finishes (so a caller can write it
  before the others are done), with a `BatchStats` summary;
- `Answer` / `Completion`: what one request produced, and the record `dsv3 generate` writes for it.

Flags and their checks live in `dsv3/cli/`; this module parses no arguments.
"""

from __future__ import annotations

import json
import signal
import time
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
    data = file.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno = data.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{file}:{lineno}: not valid UTF-8 (byte 0x{data[e.start]:02x})") from None
    prompts = []
    for lineno, line in enumerate(text.splitlines(), start=1):
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


def weight_format(path: str | Path) -> str:
    """How a checkpoint folder stores its weights: "FP8" (block-scaled, `quantization_config` in config.json) or
    the dtype of its first stored tensor ("BF16", "F32", ...)."""
    folder = Path(path)
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cfg = {}
    if isinstance(cfg, dict) and isinstance(cfg.get("quantization_config"), dict):
        return str(cfg["quantization_config"].get("quant_method", "quantized")).upper()
    from safetensors import safe_open
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                return f.get_slice(name).get_dtype()
    return "unknown"


def memory_format(model: Any) -> str:
    """How the loaded model holds its weights in memory: "fp8" when any weight is kept as FP8, else the dtype
    of its parameters ("float32", "bfloat16", ...)."""
    import torch

    tensors = list(model.parameters()) + list(model.buffers())
    if any(t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) for t in tensors):
        return "fp8"
    return str(next(iter(model.parameters())).dtype).removeprefix("torch.")


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
    """One answer as `dsv3 generate` writes it (a JSON line); `index` is the prompt's place in its file (from 0)."""

    index: int
    prompt: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str

    @classmethod
    def of(cls, index: int, prompt: str, prompt_ids: list[int], answer: Answer) -> "Completion":
        return cls(index=index, prompt=prompt, text=answer.text, prompt_tokens=len(prompt_ids),
                   completion_tokens=len(answer.token_ids), finish_reason=answer.finish_reason)


@dataclass
class BatchStats:
    """What one `run_batch` did: finished requests, their tokens, wall time, mean time to the first token and
    the decode rate (output tokens after each request's first, per second from the first first token on)."""

    requests: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    wall_s: float = 0.0
    mean_ttft_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    interrupted: bool = False
    speculative: str = ""  # with speculative decoding: acceptance per draft position (`SpeculativeStats.summary`)

    def line(self) -> str:
        spec = f", {self.speculative}" if self.speculative else ""
        return (f"[{self.requests} requests, {self.prompt_tokens} prompt tokens, {self.output_tokens} output tokens, "
                f"{self.wall_s:.2f} s, time to first token {self.mean_ttft_s:.3f} s (mean), "
                f"decode {self.decode_tokens_per_s:.1f} tokens/s{spec}]")


def run_batch(llm: "LLM", tok: "Tokenizer", prompts: dict[int, list[int]], params: "SamplingParams",
              on_done: Callable[[int, Answer], None], stop: StopFlag, progress: bool = False) -> BatchStats:
    """Run every prompt (index -> token ids) through the engine at once (continuous batching) and hand each
    answer to `on_done(index, answer)` as soon as it finishes. Ctrl-C (`stop`) aborts the unfinished ones,
    which are not handed over. `progress` shows a progress bar of finished requests on stderr."""
    from tqdm import tqdm

    stop_ids = set(llm.eos_token_ids)
    start = time.perf_counter()
    index_of = {llm.add_request(ids, params): i for i, ids in prompts.items()}
    first: dict[int, float] = {}
    stats = BatchStats()
    with stop, tqdm(total=len(prompts), desc="generating", unit="req", disable=not progress) as bar:
        while llm.has_unfinished():
            if stop.is_set:
                for request_id in index_of:
                    llm.abort(request_id)
                stats.interrupted = True
                break
            for out in llm.step():
                i = index_of.get(out.request_id)
                if i is None:
                    continue
                if out.new_token_ids and i not in first:
                    first[i] = time.perf_counter()
                if out.finished:
                    answer = answer_of(out, tok, stop_ids)
                    stats.requests += 1
                    stats.prompt_tokens += len(prompts[i])
                    stats.output_tokens += len(answer.token_ids)
                    on_done(i, answer)
                    bar.update(1)
    end = time.perf_counter()
    stats.wall_s = end - start
    spec = getattr(llm, "speculative_stats", None)
    stats.speculative = spec.summary() if spec is not None else ""
    if first:
        stats.mean_ttft_s = sum(t - start for t in first.values()) / len(first)
        decoded = stats.output_tokens - stats.requests
        stats.decode_tokens_per_s = decoded / max(end - min(first.values()), 1e-9) if decoded > 0 else 0.0
    return stats
