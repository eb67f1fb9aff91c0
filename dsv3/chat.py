"""A multi-turn conversation on the engine, kept as token ids so the prefix cache can reuse it.

`ChatSession` holds the messages and `ids`, the token ids of the conversation as the engine last saw
them: the last turn's prompt followed by the answer it generated. Each turn renders the whole
conversation with the chat template; when the text of `ids` is a prefix of that rendering, the new
prompt is `ids` plus the encoding of the rest (the end-of-answer tag, the new user turn and the
assistant tag), so its leading blocks are exactly those the engine cached during the previous turn,
and `LLM`'s prefix cache serves them instead of recomputing the conversation. When the rendering no
longer starts with them (the system prompt changed), the conversation is encoded afresh.

A turn is one `LLM` request streamed with `dsv3.generate.stream_answer`: text arrives piece by piece,
Ctrl-C (a `StopFlag`) stops the answer and keeps what was said. The terminal loop with its /commands is
`dsv3/cli/chat.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from dsv3.generate import Answer, StopFlag, stream_answer

if TYPE_CHECKING:
    from dsv3.engine.llm import LLM
    from dsv3.engine.sampling import SamplingParams
    from dsv3.tokenizer import Tokenizer


class ContextFull(ValueError):
    """The next turn does not fit the engine's context (`max_model_len`)."""


@dataclass
class Turn:
    """One exchange: the prompt sent to the engine, how it related to the cached conversation, the answer."""

    prompt_ids: list[int]
    cache: str  # "kept" (the conversation continued), "new" (first turn) or "rebuilt" (the start changed)
    answer: Answer


class ChatSession:
    """Messages of one conversation and the token ids the engine computed for them."""

    def __init__(self, llm: "LLM", tokenizer: "Tokenizer", system: str | None = None) -> None:
        if tokenizer is None:
            raise ValueError("chat needs a tokenizer (the checkpoint folder has no tokenizer.json)")
        self.llm = llm
        self.tok = tokenizer
        self.system = system
        self.messages: list[dict[str, Any]] = []
        self.ids: list[int] = []  # last prompt + its answer, as the engine saw them

    def reset(self) -> None:
        self.messages = []
        self.ids = []

    def rendered(self, user_text: str) -> list[dict[str, Any]]:
        """The conversation with `user_text` as the next user turn, system prompt first."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.messages + [{"role": "user", "content": user_text}]

    def prompt_for(self, user_text: str) -> tuple[list[int], str]:
        """Token ids of the next prompt and whether they continue `ids` ("kept"), start the conversation
        ("new") or re-encode it because its beginning changed ("rebuilt")."""
        text = self.tok.apply_chat_template(self.rendered(user_text), add_generation_prompt=True)
        if not self.ids:
            return self.tok.encode(text, add_special_tokens=False), "new"
        seen = self.tok.decode(self.ids)
        if text.startswith(seen):
            return self.ids + self.tok.encode(text[len(seen):], add_special_tokens=False), "kept"
        return self.tok.encode(text, add_special_tokens=False), "rebuilt"

    def turn(self, user_text: str, params: "SamplingParams", on_text: Callable[[str], None],
             stop: StopFlag | None = None) -> Turn:
        """Answer `user_text`, streaming the answer to `on_text`; the exchange joins the conversation."""
        prompt_ids, cache = self.prompt_for(user_text)
        limit = self.llm.max_model_len
        if len(prompt_ids) >= limit:
            raise ContextFull(f"the conversation needs {len(prompt_ids)} tokens but the context holds {limit}; "
                              "/reset to start over")
        answer = stream_answer(self.llm, self.tok, prompt_ids, params, on_text, stop or StopFlag())
        self.messages += [{"role": "user", "content": user_text}, {"role": "assistant", "content": answer.text}]
        self.ids = prompt_ids + answer.token_ids
        return Turn(prompt_ids, cache, answer)
