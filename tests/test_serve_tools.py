"""Tool calls through the server, end to end with the official `openai` client.

A random tiny model never writes a tool call, so here the server (the real app, uvicorn and
tokenizer) drives a scripted engine: it has the `LLM` incremental interface and "generates" the
tokens of a given text one per step, reporting them exactly as `LLM` does (`RequestOutput`, text
decoded without special tokens). It records the prompts it was given, so the tests also check what
the server asks the model (tool definitions, forced call prefix, tool results rendered by the
chat template).
"""

from __future__ import annotations

import json

import openai
import pytest

from dsv3.engine.llm import RequestOutput
from dsv3.serve import tool_calls as T
from dsv3.serve.app import create_app
from dsv3.tokenizer import load_tokenizer
from test_serve_support import ThreadServer, ensure_tokenizer_dir

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}


class ScriptedEngine:
    """The `LLM` incremental interface over a script: each request emits `script`'s tokens, then EOS."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = 4096
        self.vocab_size = 129280
        self.script = ""
        self.prompts: list[list[int]] = []
        self._live: dict[int, dict] = {}
        self._next = 0

    def add_request(self, prompt, params) -> int:
        rid, self._next = self._next, self._next + 1
        self.prompts.append(list(prompt))
        todo = self.tokenizer.encode(self.script, add_special_tokens=False) + [self.tokenizer.eos_id]
        self._live[rid] = {"prompt": list(prompt), "todo": todo, "out": [], "max": params.max_tokens}
        return rid

    def abort(self, rid: int) -> bool:
        return self._live.pop(rid, None) is not None

    def has_unfinished(self) -> bool:
        return bool(self._live)

    def step(self) -> list[RequestOutput]:
        outputs = []
        for rid, r in list(self._live.items()):
            token = r["todo"].pop(0)
            r["out"].append(token)
            reason = "stop" if token == self.tokenizer.eos_id else "length" if len(r["out"]) >= r["max"] else None
            text = self.tokenizer.decode(r["out"], skip_special_tokens=True)
            outputs.append(RequestOutput(request_id=rid, prompt=None, prompt_token_ids=r["prompt"],
                                         token_ids=list(r["out"]), text=text, finish_reason=reason, logprobs=None,
                                         new_token_ids=[token]))
            if reason:
                del self._live[rid]
        return outputs


@pytest.fixture(scope="module")
def setup():
    tok = load_tokenizer(ensure_tokenizer_dir())
    engine = ScriptedEngine(tok)
    server = ThreadServer(create_app(engine, served_model_name="scripted"))
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=30)
    yield engine, client, tok
    server.stop()


def call_text(name: str, args: dict) -> str:
    return f"{T.CALL_BEGIN}function{T.SEP}{name}\n```json\n{json.dumps(args)}\n```{T.CALL_END}"


def test_tool_calls_non_streamed(setup):
    engine, client, tok = setup
    engine.script = (f"Checking.{T.CALLS_BEGIN}" + call_text("get_weather", {"city": "Paris"}) + "\n"
                     + call_text("get_time", {}) + T.CALLS_END)
    r = client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "Weather?"}],
                                       tools=[WEATHER, TIME])
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking."
    calls = choice.message.tool_calls
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == \
        [("get_weather", {"city": "Paris"}), ("get_time", {})]
    prompt = tok.decode(engine.prompts[-1])
    assert "get_weather" in prompt and "Weather in a city" in prompt and prompt.endswith("<｜Assistant｜>")


def test_tool_calls_streamed_accumulate_to_the_same(setup):
    engine, client, _ = setup
    engine.script = (f"One moment.{T.CALLS_BEGIN}" + call_text("get_weather", {"city": "Lima"}) + "\n"
                     + call_text("get_time", {"tz": "UTC"}) + T.CALLS_END)
    stream = client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "Weather?"}],
                                            tools=[WEATHER, TIME], stream=True)
    content, calls, reasons = "", {}, []
    for chunk in stream:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for c in delta.tool_calls or []:
            slot = calls.setdefault(c.index, {"name": "", "arguments": "", "id": None})
            slot["id"] = slot["id"] or c.id
            slot["name"] += c.function.name or ""
            slot["arguments"] += c.function.arguments or ""
        reasons.append(chunk.choices[0].finish_reason)
    assert content == "One moment." and "<｜" not in content
    assert [(calls[i]["name"], json.loads(calls[i]["arguments"])) for i in sorted(calls)] == \
        [("get_weather", {"city": "Lima"}), ("get_time", {"tz": "UTC"})]
    assert all(calls[i]["id"] for i in calls) and reasons[-1] == "tool_calls"


def test_tool_choice_forces_a_call_and_none_disables_tools(setup):
    engine, client, tok = setup
    engine.script = '{"city": "Oslo"}\n```' + T.CALL_END + T.CALLS_END  # continues the forced prefix
    r = client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "Oslo?"}],
                                       tools=[WEATHER, TIME],
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = r.choices[0].message.tool_calls[0]
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Oslo"})
    assert tok.decode(engine.prompts[-1]).endswith("<｜Assistant｜>" + T.forced_prefix("get_weather"))
    engine.script = "get_time" + T.SEP + "x"
    client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "t?"}],
                                   tools=[WEATHER, TIME], tool_choice="required")
    assert tok.decode(engine.prompts[-1]).endswith(T.forced_prefix(None))
    engine.script = "No tools needed."
    r = client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "hi"}],
                                       tools=[WEATHER], tool_choice="none")
    assert r.choices[0].message.content == "No tools needed." and not r.choices[0].message.tool_calls
    assert "get_weather" not in tok.decode(engine.prompts[-1])


def test_tool_results_go_back_through_the_template(setup):
    engine, client, tok = setup
    engine.script = "It is 21 degrees in Paris."
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"celsius": 21}'}]
    r = client.chat.completions.create(model="scripted", messages=messages, tools=[WEATHER])
    assert r.choices[0].message.content == "It is 21 degrees in Paris." and r.choices[0].finish_reason == "stop"
    expected = tok.apply_chat_template([{"role": "system", "content": T.tools_system_prompt([WEATHER])}, *messages])
    assert tok.decode(engine.prompts[-1]) == expected
