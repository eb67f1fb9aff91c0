"""DeepSeek-V3 tool calls: the model's tool-call token format <-> OpenAI `tool_calls`.

The model writes tool calls after its (possibly empty) text answer as

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
    ```json
    ARGUMENTS
    ```<｜tool▁call▁end｜>
    <｜tool▁call▁begin｜>...<｜tool▁call▁end｜><｜tool▁calls▁end｜>

(the markers are single, non-special tokens of the tokenizer, so they stay in the decoded text).
`parse` splits a finished text into content and calls, leniently (a missing calls-end marker, as
the official template itself writes for a lone call, is fine, and so is a last call cut off by
`max_tokens`: its arguments so far are returned, as OpenAI does with finish reason "length"). `StreamParser` does the same on a
growing text, releasing content only up to where a marker might begin and each call only once
its end marker has arrived. `tools_system_prompt` renders tool definitions for templates that have
no place for them (the official DeepSeek-V3 template does not render `tools`), and `forced_prefix`
is the assistant text that makes the model call a tool (`tool_choice: "required"` or a named one);
`call_grammar` is the Lark grammar of the rest of that call (a function name when none is forced, then
arguments valid under the function's JSON schema, then the closing markers), which the engine enforces
token by token, so a forced call always parses.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
CALLS_END = "<｜tool▁calls▁end｜>"
CALL_BEGIN = "<｜tool▁call▁begin｜>"
CALL_END = "<｜tool▁call▁end｜>"
SEP = "<｜tool▁sep｜>"


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    type: str = "function"

    def to_openai(self, index: int | None = None, call_id: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"id": call_id or f"call_{uuid.uuid4().hex[:24]}", "type": self.type,
                               "function": {"name": self.name, "arguments": self.arguments}}
        if index is not None:
            out = {"index": index, **out}
        return out


def _tools_start(text: str) -> int:
    """Where the tool-call section begins (either marker opens it), or -1."""
    hits = [i for i in (text.find(CALLS_BEGIN), text.find(CALL_BEGIN)) if i >= 0]
    return min(hits) if hits else -1


def parse_call(block: str) -> ParsedCall | None:
    """One call's body (between call-begin and call-end): `TYPE<sep>NAME\\n```json\\nARGS\\n````."""
    if SEP not in block:
        return None
    kind, rest = block.split(SEP, 1)
    name, _, body = rest.partition("\n")
    name = name.strip()
    if not name:
        return None
    body = body.strip()
    if body.startswith("```"):
        body = body.split("\n", 1)[1] if "\n" in body else ""  # drop the opening fence and its language tag
        if body.rstrip().endswith("```"):
            body = body.rstrip()[:-3]
    arguments = body.strip() or "{}"
    return ParsedCall(name=name, arguments=arguments, type=kind.strip() or "function")


def _complete_calls(section: str, final: bool = False) -> list[ParsedCall]:
    """Every call whose end marker has arrived, in order (and, when `final`, a last unclosed one)."""
    calls = []
    pos = 0
    while True:
        start = section.find(CALL_BEGIN, pos)
        if start < 0:
            break
        end = section.find(CALL_END, start)
        if end < 0:
            if final:  # cut off (max_tokens): what it has so far
                call = parse_call(section[start + len(CALL_BEGIN):].split(CALLS_END)[0])
                if call is not None:
                    calls.append(call)
            break
        call = parse_call(section[start + len(CALL_BEGIN):end])
        if call is not None:
            calls.append(call)
        pos = end + len(CALL_END)
    return calls


def parse(text: str) -> tuple[str, list[ParsedCall]]:
    """Split a finished generation into (content, tool calls). Text without markers is all content."""
    start = _tools_start(text)
    if start < 0:
        return text, []
    return text[:start], _complete_calls(text[start:], final=True)


def _partial_marker_len(text: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of an opening marker."""
    longest = 0
    for marker in (CALLS_BEGIN, CALL_BEGIN):
        for k in range(min(len(marker) - 1, len(text)), 0, -1):
            if text.endswith(marker[:k]):
                longest = max(longest, k)
                break
    return longest


class StreamParser:
    """Incremental `parse`: feed the whole text so far, get the new content and newly complete calls."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix  # text forced into the prompt (already "written" by the model)
        self.content_sent = 0
        self.calls_sent = 0

    def feed(self, text: str, final: bool = False, holdback: int = 0) -> tuple[str, list[ParsedCall]]:
        """`text`: everything generated so far. `holdback`: characters at the end still subject to
        change (a stop string being matched). Returns (content delta, new calls)."""
        full = self.prefix + text
        start = _tools_start(full)
        if start < 0:
            content = full if final else full[:max(0, len(full) - max(holdback, _partial_marker_len(full)))]
            calls: list[ParsedCall] = []
        else:
            content = full[:start]
            calls = _complete_calls(full[start:], final)
        delta = content[self.content_sent:] if len(content) > self.content_sent else ""
        self.content_sent = max(self.content_sent, len(content))
        new_calls = calls[self.calls_sent:]
        self.calls_sent = len(calls)
        return delta, new_calls


def tools_system_prompt(tools: list[dict[str, Any]]) -> str:
    """A system-prompt section describing the tools and the exact call format."""
    lines = ["## Tools", "", "You can call these functions. To call one, answer with",
             f"{CALLS_BEGIN}{CALL_BEGIN}function{SEP}NAME", "```json", "ARGUMENTS AS A JSON OBJECT",
             f"```{CALL_END}{CALLS_END}", "", "Functions:"]
    for tool in tools:
        fn = tool["function"]
        lines.append(f"- `{fn['name']}`" + (f": {fn['description']}" if fn.get("description") else ""))
        if fn.get("parameters"):
            lines.append("```json")
            lines.append(json.dumps(fn["parameters"], ensure_ascii=False))
            lines.append("```")
    return "\n".join(lines)


def call_grammar(tools: list[dict[str, Any]], name: str | None, literal: Any) -> str:
    """Lark grammar (llguidance's dialect) of what follows `forced_prefix(name)`: for each allowed function,
    its name unless forced, the JSON fence, arguments valid under its `parameters` schema, and the closing
    markers. `literal(text)` writes a marker as a grammar term (a special token where it is one)."""
    end = f'"\\n```" {literal(CALL_END)} {literal(CALLS_END)}'
    rules, alternatives = [], []
    for i, tool in enumerate(tools):
        fn = tool["function"]
        if name is not None and fn["name"] != name:
            continue
        schema = fn.get("parameters") or {"type": "object"}
        head = "" if name is not None else json.dumps(f"{fn['name']}\n```json\n") + " "
        rules.append(f"call_{i}: {head}args_{i} {end}")
        rules.append(f"args_{i}: %json {json.dumps(schema)}")
        alternatives.append(f"call_{i}")
    return "\n".join([f"start: {' | '.join(alternatives)}", *rules])


def forced_prefix(name: str | None) -> str:
    """Assistant text that starts a tool call (of function `name`, or of the model's choice)."""
    head = f"{CALLS_BEGIN}{CALL_BEGIN}function{SEP}"
    return head if name is None else f"{head}{name}\n```json\n"
