"""Structured outputs through `dsv3 serve` with the official `openai` client and the built-in model:
`response_format` (json_schema, json_object) and forced tool calls (`tool_choice` named or "required")
are constrained token by token by the engine (llguidance), so every answer parses and validates.

Oracle: `jsonschema` (an independent validator) on every answer, for random schemas with nested
objects, enums, arrays and required fields. CI runs `DSV3_SCHEMAS` of them (default 12, all at once, so
the engine batches them); `DSV3_SCHEMAS=100` is the issue's full run (see benchmarks/RESULTS.md).
The grammar mask itself is checked against a plain reference: the packed bitmask the sampler unpacks on
the device against bit arithmetic in Python.
"""

from __future__ import annotations

import json
import os
import random
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest
import torch

import dsv3
from dsv3.engine.llm import LLM
from dsv3.engine.sampling import unpack_bitmask
from dsv3.serve.app import create_app
from test_serve_support import ThreadServer

NUM_SCHEMAS = int(os.environ.get("DSV3_SCHEMAS", "12"))
WORDS = ["red", "green", "blue", "cat", "dog", "north", "south", "alpha", "beta", "gamma"]


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """A random JSON schema: objects (nested, with required fields), enums, arrays, bounded strings and
    integers, booleans. Bounds keep every answer finite."""
    kinds = ["string", "integer", "boolean", "enum", "array"] + (["object"] * 2 if depth < 2 else [])
    kind = rng.choice(kinds) if depth else "object"
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(1, 12)}
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 1000)}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        return {"enum": rng.sample(WORDS, rng.randint(1, 4))}
    if kind == "array":
        return {"type": "array", "items": random_schema(rng, depth + 1), "maxItems": rng.randint(1, 3)}
    names = rng.sample(["id", "name", "color", "size", "tags", "owner", "count", "kind", "meta"], rng.randint(1, 4))
    props = {n: random_schema(rng, depth + 1) for n in names}
    required = [n for n in names if rng.random() < 0.7] or names[:1]
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


@pytest.fixture(scope="module")
def engine():
    return LLM(dsv3.default_model_path(), dtype="float32", num_blocks=1024, max_num_seqs=max(16, NUM_SCHEMAS),
               max_model_len=1024)


@pytest.fixture(scope="module")
def client(engine):
    srv = ThreadServer(create_app(engine, served_model_name="builtin", max_waiting=512))
    try:
        yield openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=600)
    finally:
        srv.stop()


def test_bitmask_unpacks_like_bit_arithmetic():
    gen = torch.Generator().manual_seed(0)
    vocab = 100
    packed = torch.randint(-(2 ** 31), 2 ** 31 - 1, (3, 4), dtype=torch.int32, generator=gen)
    got = unpack_bitmask(packed, vocab)
    want = [[bool((int(packed[b, t // 32]) >> (t % 32)) & 1) for t in range(vocab)] for b in range(3)]
    assert got.tolist() == want


def test_random_json_schemas_all_validate(client):
    rng = random.Random(20)
    schemas = [random_schema(rng) for _ in range(NUM_SCHEMAS)]

    def ask(i: int):
        return client.chat.completions.create(
            model="builtin", max_tokens=400, temperature=0.8, seed=i,
            messages=[{"role": "user", "content": "Describe a thing as JSON."}],
            response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schemas[i]}})

    with ThreadPoolExecutor(NUM_SCHEMAS) as pool:
        answers = list(pool.map(ask, range(NUM_SCHEMAS)))
    for schema, r in zip(schemas, answers):
        choice = r.choices[0]
        assert choice.finish_reason == "stop", (schema, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_json_object_and_unconstrained_differ(client):
    # completions take response_format too, as in vLLM (the openai client passes it as an extra field)
    r = client.completions.create(model="builtin", prompt="Here is the data:", max_tokens=300, temperature=0,
                                  extra_body={"response_format": {"type": "json_object"}})
    assert r.choices[0].finish_reason == "stop" and isinstance(json.loads(r.choices[0].text), dict)
    plain = client.completions.create(model="builtin", prompt="Here is the data:", max_tokens=8, temperature=0)
    assert not plain.choices[0].text.lstrip().startswith("{")  # the grammar, not the prompt, made it JSON
    with pytest.raises(openai.BadRequestError):  # a schema llguidance cannot compile is a 400
        client.chat.completions.create(model="builtin", messages=[{"role": "user", "content": "x"}], max_tokens=5,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "bad", "schema": {"type": "bogus"}}})


def test_forced_tool_calls_always_parse(client):
    rng = random.Random(7)
    tools = [{"type": "function", "function": {"name": f"tool_{k}", "description": f"does thing {k}",
                                               "parameters": random_schema(rng)}} for k in range(3)]
    params = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    messages = [{"role": "user", "content": "Please use a tool."}]
    choices = [{"type": "function", "function": {"name": "tool_1"}}, "required", "required"]

    def ask(i: int):
        return client.chat.completions.create(model="builtin", messages=messages, tools=tools, max_tokens=300,
                                              tool_choice=choices[i % 3], temperature=1.0, seed=i)

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(ask, range(6)))
    for i, r in enumerate(answers):
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        call = choice.message.tool_calls[0]
        if i % 3 == 0:
            assert call.function.name == "tool_1"
        jsonschema.validate(json.loads(call.function.arguments), params[call.function.name])
    # streamed: the call arrives as one tool_calls delta with the same guarantees
    chunks = list(client.chat.completions.create(model="builtin", messages=messages, tools=tools, max_tokens=300,
                                                 tool_choice="required", temperature=1.0, seed=11, stream=True))
    calls = [c for ch in chunks for c in (ch.choices[0].delta.tool_calls or [])] if chunks else []
    assert len(calls) >= 1 and chunks[-1].choices[0].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(calls[0].function.arguments), params[calls[0].function.name])
