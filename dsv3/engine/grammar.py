"""Structured outputs: grammars that constrain generation token by token (llguidance).

A `GrammarCompiler` wraps the checkpoint's tokenizer once for llguidance (about two seconds for the
DeepSeek-V3 vocabulary, so it is built once per engine) and compiles request grammars: a JSON schema,
any JSON object, or a Lark grammar (which may embed JSON schemas with `%json {...}` and special tokens
as `<[id]>`). A compiled `Grammar` is immutable and shared by every sequence of a request; each sequence
gets its own `GrammarState` (an llguidance matcher plus how many of its generated tokens it has seen).

Each step the model runner calls `token_bitmask`: every constrained row's state first catches up with
the tokens generated since the last step (so preemption, recomputation and several tokens per step
need no special case), then llguidance fills the constrained rows of a packed bitmask (`[B, ceil(V / 32)]`
int32, bit `t % 32` of word `t // 32` set when token t is allowed; unconstrained rows are all ones) on
the CPU, in parallel over rows and while the GPU still runs the forward. The sampler unpacks the bitmask on the logits' device
(`dsv3.engine.sampling.unpack_bitmask`) and sets disallowed logits to -inf before anything else.

A state whose grammar has finished (or failed) allows only the end-of-sequence token, so the sequence
stops there. llguidance is an optional dependency (`pip install -e ".[serve]"`); importing this module
does not need it, building a compiler does.
"""

from __future__ import annotations

import json
from typing import Any

import torch

# a bitmask word holds 32 tokens
WORD = 32


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError:
        raise ImportError('structured outputs need llguidance: pip install -e ".[serve]"') from None
    return llguidance


class GrammarError(ValueError):
    """A grammar or schema llguidance cannot compile (the message says why)."""


class Grammar:
    """One compiled grammar: validated at construction, shared by the sequences of a request."""

    def __init__(self, compiler: "GrammarCompiler", spec: str) -> None:
        self.compiler = compiler
        self.spec = spec  # llguidance's grammar JSON

    def state(self) -> "GrammarState":
        llg = _llguidance()
        return GrammarState(llg.LLMatcher(self.compiler.lltokenizer, self.spec, log_level=0),
                            self.compiler.eos_token_id, self.compiler.executor)


class GrammarState:
    """The matcher of one sequence and how many of its generated tokens it has consumed."""

    def __init__(self, matcher: Any, eos_token_id: int, executor: Any = None) -> None:
        self.matcher = matcher
        self.eos_token_id = eos_token_id
        self.executor = executor  # llguidance's thread pool, for filling many rows at once
        self.consumed = 0

    def advance(self, output_token_ids: list[int]) -> None:
        """Consume the generated tokens not seen yet (a token the grammar refuses ends it in error)."""
        new = output_token_ids[self.consumed:]
        self.consumed = len(output_token_ids)
        if new and not self.matcher.is_stopped() and not self.matcher.is_error():
            self.matcher.consume_tokens(new)

    @property
    def done(self) -> bool:
        """The grammar has finished or failed: only end-of-sequence is allowed."""
        return self.matcher.is_stopped() or self.matcher.is_error()

    def fill(self, row: torch.Tensor) -> None:
        """Write this state's allowed tokens into `row` (a contiguous CPU int32 `[W]`)."""
        if self.done:
            row.zero_()
            row[self.eos_token_id // WORD] = _bit(self.eos_token_id % WORD)
            return
        self.matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())


def _bit(k: int) -> int:
    """Bit k of an int32 word, as the signed value torch stores."""
    return (1 << k) - (1 << 32) if k == 31 else 1 << k


def bitmask_width(vocab_size: int) -> int:
    return (vocab_size + WORD - 1) // WORD


def token_bitmask(states: list[GrammarState | None], output_token_ids: list[list[int]], vocab_size: int,
                  device: torch.device | str) -> torch.Tensor | None:
    """The packed allowed-token bitmask `[B, ceil(V / 32)]` int32 on `device` for a batch (one state per
    row, None for unconstrained rows, which allow everything); None when no row is constrained."""
    if not any(s is not None for s in states):
        return None
    device = torch.device(device)
    mask = torch.full((len(states), bitmask_width(vocab_size)), -1, dtype=torch.int32,
                      pin_memory=device.type == "cuda")
    live: list[tuple[Any, int]] = []
    executor = None
    for b, state in enumerate(states):
        if state is None:
            continue
        state.advance(output_token_ids[b])
        if state.done or state.executor is None:
            state.fill(mask[b])
        else:
            live.append((state.matcher, b))
            executor = state.executor
    if live:  # llguidance computes the rows' masks in parallel, in Rust threads, without the GIL
        executor.unsafe_compute_mask_ptr(live, mask.data_ptr(), mask.shape[1] * mask.element_size(), mask.shape[0])
    return mask.to(device, non_blocking=True)


class GrammarCompiler:
    """Compiles request grammars against one tokenizer (a `dsv3.tokenizer.Tokenizer`)."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        llg = _llguidance()
        if getattr(tokenizer, "eos_id", None) is None:
            raise ValueError("structured outputs need a tokenizer with an end-of-sequence token")
        self.tokenizer = tokenizer
        self.vocab_size = int(vocab_size)
        self.eos_token_id = int(tokenizer.eos_id)
        self.lltokenizer = llg.LLTokenizer(tokenizer.backend.to_str(), n_vocab=self.vocab_size,
                                           eos_token=self.eos_token_id)
        self.executor = llg.LLExecutor()

    def _compile(self, spec: str) -> Grammar:
        llg = _llguidance()
        error = llg.LLMatcher.validate_grammar(spec, self.lltokenizer)  # "" when the grammar is valid
        if error:
            raise GrammarError(f"invalid grammar: {error.strip().splitlines()[0][:300]}")
        return Grammar(self, spec)

    def json_schema(self, schema: dict[str, Any] | bool) -> Grammar:
        """JSON text valid under `schema` (compact: no free whitespace)."""
        llg = _llguidance()
        try:
            spec = llg.LLMatcher.grammar_from_json_schema(json.dumps(schema),
                                                          defaults={"whitespace_flexible": False})
        except (ValueError, TypeError, RuntimeError) as err:
            raise GrammarError(f"invalid JSON schema: {str(err).splitlines()[0][:300]}") from None
        return self._compile(spec)

    def json_object(self) -> Grammar:
        """Any JSON object."""
        return self.json_schema({"type": "object"})

    def lark(self, grammar: str) -> Grammar:
        """A Lark grammar in llguidance's dialect."""
        llg = _llguidance()
        try:
            spec = llg.LLMatcher.grammar_from_lark(grammar)
        except (ValueError, TypeError, RuntimeError) as err:
            raise GrammarError(f"invalid grammar: {str(err).splitlines()[0][:300]}") from None
        return self._compile(spec)

    def literal(self, text: str) -> str:
        """`text` as a Lark term: a special token by id when the tokenizer has it as one token, else a string."""
        token = self.tokenizer.token_to_id(text)
        if token is not None and text.startswith("<"):
            return f"<[{token}]>"
        return json.dumps(text, ensure_ascii=False)
