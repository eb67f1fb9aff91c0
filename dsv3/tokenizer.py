"""The DeepSeek-V3 tokenizer: loading from a checkpoint folder, chat rendering, stream decoding.

A checkpoint folder holds `tokenizer.json` (a `tokenizers` byte-level BPE) and
`tokenizer_config.json` (special tokens, `add_bos_token`, the official `chat_template`). We use the
`tokenizers` library directly (fast to import, no `transformers` at run time) and add what the
config asks for on top:

- BOS: `encode(text)` prepends BOS when `add_bos_token` is true (DeepSeek-V3: true). Rendered chats
  already start with BOS, so `encode_chat` encodes them without adding another.
- Chat template: rendered with jinja2 in a sandbox set up like `transformers` sets it up (trim and
  lstrip blocks, loop controls, `tojson`, `raise_exception`, `strftime_now`), so any checkpoint's
  template renders as it would there. Order of preference: the folder's `chat_template.jinja`, the
  config's `chat_template`, then the built-in copy of the DeepSeek-V3 format
  (`dsv3/assets/chat_template.jinja`). Unlike `transformers`, keys whose value is None are kept:
  the DeepSeek-V3 template marks tool-call turns with `content: None`.
- Streaming: `IncrementalDecoder` turns token ids into text piece by piece, holding back bytes of a
  character split over tokens, so no U+FFFD is ever shown for an incomplete character and the
  pieces joined equal `decode` of all the ids.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Sequence

from tokenizers import Tokenizer as _HFTokenizer

__all__ = ["Tokenizer", "IncrementalDecoder", "load_tokenizer", "builtin_chat_template"]

_REPLACEMENT = "\ufffd"
# Used when tokenizer_config.json is absent: the DeepSeek-V3 special tokens.
_DEFAULT_BOS = "<｜begin▁of▁sentence｜>"
_DEFAULT_EOS = "<｜end▁of▁sentence｜>"


def builtin_chat_template() -> str:
    """The built-in DeepSeek-V3 chat template (used when a checkpoint carries none)."""
    return (Path(__file__).parent / "assets" / "chat_template.jinja").read_text(encoding="utf-8")


@lru_cache(maxsize=8)
def _compile_template(source: str) -> Any:
    """Compile a chat template in a sandboxed jinja2 environment configured like `transformers`."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
        # jinja's own tojson escapes HTML characters; chat templates expect plain JSON.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


def _token_content(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string, an AddedToken dict, or None."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special-token rules and chat template of its checkpoint."""

    def __init__(self, tokenizer: _HFTokenizer, config: dict[str, Any] | None = None,
                 chat_template: str | None = None) -> None:
        self.backend = tokenizer
        config = dict(config or {})
        self.config = config
        bos = _token_content(config["bos_token"]) if "bos_token" in config else _DEFAULT_BOS
        eos = _token_content(config["eos_token"]) if "eos_token" in config else _DEFAULT_EOS
        self.bos_token: str | None = bos if bos is not None and tokenizer.token_to_id(bos) is not None else None
        self.eos_token: str | None = eos if eos is not None and tokenizer.token_to_id(eos) is not None else None
        pad = _token_content(config.get("pad_token"))
        self.pad_token: str | None = pad
        self.unk_token: str | None = _token_content(config.get("unk_token"))
        self.bos_id: int | None = tokenizer.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_id: int | None = tokenizer.token_to_id(self.eos_token) if self.eos_token else None
        self.add_bos: bool = bool(config.get("add_bos_token", self.bos_id is not None)) and self.bos_id is not None
        self.add_eos: bool = bool(config.get("add_eos_token", False)) and self.eos_id is not None
        self.chat_template: str = chat_template if chat_template is not None else builtin_chat_template()
        self.model_max_length: int | None = config.get("model_max_length")

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (highest id + 1 for DeepSeek-V3: 128815)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with `add_special_tokens`, BOS/EOS as the config says."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            if self.add_bos:
                ids = [self.bos_id, *ids]
            if self.add_eos:
                ids = [*ids, self.eos_id]
        return ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """`encode` for many texts at once (the backend runs them in parallel)."""
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=False)
        prefix = [self.bos_id] if add_special_tokens and self.add_bos else []
        suffix = [self.eos_id] if add_special_tokens and self.add_eos else []
        return [prefix + e.ids + suffix for e in encodings]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of token ids (invalid or incomplete UTF-8 becomes U+FFFD, as in `tokenizers`).

        Ids with no token (a model's embedding may have more rows than the tokenizer has entries,
        e.g. 129280 vs 128815) decode to nothing, as in `tokenizers`.
        """
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], tools: list[dict] | None = None,
                            add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """Render a conversation to the prompt text (BOS included) with the checkpoint's template.

        `messages` are OpenAI-style dicts (`role`, `content`, `tool_calls` with string or dict
        `arguments`). Dict arguments are serialised with `json.dumps` first, as the DeepSeek-V3
        template concatenates them as text.
        """
        if not messages:
            raise ValueError("apply_chat_template needs at least one message")
        template_vars = {
            "bos_token": self.bos_token or "",
            "eos_token": self.eos_token or "",
            "pad_token": self.pad_token,
            "unk_token": self.unk_token,
            **kwargs,
        }
        return _compile_template(self.chat_template).render(
            messages=[_normalize_message(m) for m in messages],
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            **template_vars,
        )

    def encode_chat(self, messages: Sequence[dict[str, Any]], tools: list[dict] | None = None,
                    add_generation_prompt: bool = True, **kwargs: Any) -> list[int]:
        """Token ids of the rendered conversation (the template writes BOS itself)."""
        text = self.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt, **kwargs)
        return self.encode(text, add_special_tokens=False)

    def stream_decoder(self, skip_special_tokens: bool = False) -> "IncrementalDecoder":
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)


def _normalize_message(message: dict[str, Any]) -> dict[str, Any]:
    """A plain-dict copy of one message, with tool-call arguments as JSON text."""
    if not isinstance(message, dict):
        raise TypeError(f"chat messages must be dicts with 'role' and 'content', got {type(message).__name__}")
    if "role" not in message:
        raise ValueError(f"chat message has no 'role': {message!r}")
    out = dict(message)
    calls = out.get("tool_calls")
    if calls:
        fixed = []
        for call in calls:
            call = dict(call)
            fn = dict(call.get("function", {}))
            if not isinstance(fn.get("arguments", ""), str):
                fn["arguments"] = json.dumps(fn["arguments"], ensure_ascii=False)
            call["function"] = fn
            call.setdefault("type", "function")
            fixed.append(call)
        out["tool_calls"] = fixed
    return out


class IncrementalDecoder:
    """Decode token ids one at a time into text pieces that join to the full decode.

    Keeps a small window of ids: `prefix` (already shown, kept as context) and the ids after it.
    A new piece is released only when the window's text grows and does not end in U+FFFD, i.e. the
    last character is complete. `flush()` releases whatever is held back at the end (then a truly
    incomplete tail does show as U+FFFD, exactly as `decode` shows it).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # start of the window (ids already shown, kept for context)
        self._read = 0  # end of what has been shown

    def _text(self, start: int, end: int | None = None) -> str:
        return self._tok.decode(self.ids[start:end], skip_special_tokens=self._skip)

    def step(self, token_id: int) -> str:
        """Add one token id; return the newly complete text ('' while a character is incomplete)."""
        self.ids.append(int(token_id))
        shown = self._text(self._prefix, self._read)
        window = self._text(self._prefix)
        if len(window) > len(shown) and not window.endswith(_REPLACEMENT):
            self._prefix, self._read = self._read, len(self.ids)
            return window[len(shown):]
        return ""

    def extend(self, token_ids: Iterable[int]) -> str:
        """Add several ids; return the text they complete."""
        return "".join(self.step(t) for t in token_ids)

    def flush(self) -> str:
        """Release the held-back tail (decoded as `decode` would, U+FFFD for broken bytes)."""
        if self._read == len(self.ids):
            return ""
        shown = self._text(self._prefix, self._read)
        window = self._text(self._prefix)
        self._prefix, self._read = self._read, len(self.ids)
        return window[len(shown):]


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load the tokenizer of a checkpoint folder (`tokenizer.json`, optional `tokenizer_config.json`)."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {folder}")
    tok_file = folder / "tokenizer.json"
    if not tok_file.is_file():
        raise FileNotFoundError(f"{tok_file} not found (a checkpoint folder needs tokenizer.json)")
    backend = _HFTokenizer.from_file(str(tok_file))
    config: dict[str, Any] = {}
    cfg_file = folder / "tokenizer_config.json"
    if cfg_file.is_file():
        with open(cfg_file, encoding="utf-8") as f:
            config = json.load(f)
    return Tokenizer(backend, config, chat_template=_find_chat_template(folder, config))


def _find_chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    """The checkpoint's own template: chat_template.jinja, else the config's (str or named list)."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None
