"""Unit tests of the `dsv3 serve` parts that need no server: tool-call parsing (on token strings made by
the real DeepSeek-V3 tokenizer and on the official chat template's own rendering of tool calls),
the Prometheus text format, request validation, token bytes for log-probabilities, and the CLI."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from dsv3.serve import protocol as P
from dsv3.serve import tool_calls as T
from dsv3.cli import build_parser, main
from dsv3.cli.flags import UsageError, resolve_model
from dsv3.serve.metrics import Counter, Gauge, Histogram, ServerMetrics, parse_text
from dsv3.tokenizer import load_tokenizer
from test_serve_support import ensure_tokenizer_dir


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ensure_tokenizer_dir())


def engine_text(tok, text: str) -> str:
    """What the engine reports for a generation of `text` ending in EOS: ids decoded without specials."""
    ids = tok.encode(text, add_special_tokens=False) + [tok.eos_id]
    return tok.decode(ids, skip_special_tokens=True)


# ---- tool calls -----------------------------------------------------------------------------
def test_markers_are_single_tokens_kept_by_the_engine_decode(tok):
    for marker in (T.CALLS_BEGIN, T.CALLS_END, T.CALL_BEGIN, T.CALL_END, T.SEP):
        ids = tok.encode(marker, add_special_tokens=False)
        assert len(ids) == 1 and tok.decode(ids, skip_special_tokens=True) == marker


def test_parse_crafted_generation(tok):
    text = (f"Let me check both.{T.CALLS_BEGIN}{T.CALL_BEGIN}function{T.SEP}get_weather\n```json\n"
            f'{{"city": "Paris", "unit": "C"}}\n```{T.CALL_END}\n{T.CALL_BEGIN}function{T.SEP}get_time\n'
            f'```json\n{{"tz": "Europe/Paris"}}\n```{T.CALL_END}{T.CALLS_END}')
    content, calls = T.parse(engine_text(tok, text))
    assert content == "Let me check both."
    assert [c.name for c in calls] == ["get_weather", "get_time"]
    assert [json.loads(c.arguments) for c in calls] == [{"city": "Paris", "unit": "C"}, {"tz": "Europe/Paris"}]
    openai_calls = [c.to_openai() for c in calls]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in openai_calls)
    assert len({c["id"] for c in openai_calls}) == 2
    # no markers: all content; an unfinished call (cut by max_tokens) keeps its arguments so far
    assert T.parse("plain answer") == ("plain answer", [])
    assert T.parse(f"x{T.CALLS_BEGIN}{T.CALL_BEGIN}function{T.SEP}f\n```json\n{{") == ("x", [T.ParsedCall("f", "{")])


@pytest.mark.parametrize("n_calls", [1, 2])
def test_round_trip_through_the_official_chat_template(tok, n_calls):
    calls = [{"type": "function", "function": {"name": f"tool_{i}", "arguments": {"q": f"v{i}", "k": [i, i + 1]}}}
             for i in range(n_calls)]
    text = tok.apply_chat_template([{"role": "user", "content": "go"},
                                    {"role": "assistant", "content": None, "tool_calls": calls}],
                                   add_generation_prompt=False)
    answer = text.split("<｜Assistant｜>", 1)[1]  # what the model would have generated
    content, parsed = T.parse(engine_text(tok, answer))
    assert content == ""
    assert [(c.name, json.loads(c.arguments)) for c in parsed] == \
        [(c["function"]["name"], c["function"]["arguments"]) for c in calls]


def test_stream_parser_matches_parse_token_by_token(tok):
    text = (f"Sure: `x < y`.{T.CALLS_BEGIN}{T.CALL_BEGIN}function{T.SEP}lookup\n```json\n"
            f'{{"term": "ÿ深度"}}\n```{T.CALL_END}{T.CALLS_END}')
    ids = tok.encode(text, add_special_tokens=False) + [tok.eos_id]
    decoder = tok.stream_decoder(skip_special_tokens=True)
    parser = T.StreamParser()
    so_far, pieces, calls = "", [], []
    for i, t in enumerate(ids):
        so_far += decoder.step(t)
        final = i == len(ids) - 1
        if final:
            so_far += decoder.flush()
        piece, new = parser.feed(so_far, final=final)
        assert "<｜" not in piece  # never a piece of a marker
        pieces.append(piece)
        calls += new
    content, expected = T.parse(so_far)
    assert "".join(pieces) == content == "Sure: `x < y`."
    assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in expected]
    # a tail that might start a marker is held back until it is known not to
    p = T.StreamParser()
    assert p.feed("abc<｜tool") == ("abc", [])
    assert p.feed("abc<｜tool", final=True) == ("<｜tool", [])
    # forced prefix (tool_choice): the model continues the arguments
    p = T.StreamParser(T.forced_prefix("get_weather"))
    piece, new = p.feed(f'{{"city": "Oslo"}}\n```{T.CALL_END}', final=True)
    assert piece == "" and [(c.name, json.loads(c.arguments)) for c in new] == [("get_weather", {"city": "Oslo"})]


def test_tools_system_prompt_names_every_tool():
    tools = [{"type": "function", "function": {"name": "a_b", "description": "does A",
                                               "parameters": {"type": "object", "properties": {"x": {"type": "int"}}}}},
             {"type": "function", "function": {"name": "c"}}]
    text = T.tools_system_prompt(tools)
    assert "`a_b`: does A" in text and "`c`" in text and '"properties"' in text and T.CALLS_BEGIN in text


# ---- metrics --------------------------------------------------------------------------------
def test_prometheus_text_format():
    values = [0.0005, 0.003, 0.003, 0.2, 7.0, 1000.0]
    h = Histogram("lat_seconds", "latency", (0.001, 0.01, 1.0, 10.0))
    for v in values:
        h.observe(v)
    samples = parse_text("\n".join(h.render()))
    for upper in (0.001, 0.01, 1.0, 10.0):
        assert samples[f'lat_seconds_bucket{{le="{upper:g}"}}'] == sum(v <= upper for v in values)
    assert samples['lat_seconds_bucket{le="+Inf"}'] == samples["lat_seconds_count"] == len(values)
    assert samples["lat_seconds_sum"] == pytest.approx(sum(values))
    c = Counter("reqs_total", "requests", ("reason",))
    c.inc(2, "stop")
    c.inc(1, 'we"ird')
    lines = c.render()
    assert lines[:2] == ["# HELP reqs_total requests", "# TYPE reqs_total counter"]
    assert 'reqs_total{reason="stop"} 2' in lines and 'reqs_total{reason="we\\"ird"} 1' in lines
    with pytest.raises(ValueError, match="only go up"):
        c.inc(-1, "stop")
    g = Gauge("g", "a gauge", read=lambda: 0.25)
    assert g.render()[-1] == "g 0.25"
    with pytest.raises(ValueError, match="increasing"):
        Histogram("bad", "x", (1.0, 0.5))
    text = ServerMetrics(lambda: {"running": 3, "cache_usage": 0.5}).render()
    parsed = parse_text(text)
    assert parsed["dsv3_num_requests_running"] == 3 and parsed["dsv3_cache_usage_ratio"] == 0.5
    assert all(line.startswith("# ") or " " in line for line in text.splitlines())


# ---- protocol -------------------------------------------------------------------------------
def test_request_validation():
    ok = P.ChatCompletionRequest(messages=[{"role": "developer", "content": [{"type": "text", "text": "a"},
                                                                           {"type": "text", "text": "b"}]}],
                                 max_completion_tokens=5, stop="x")
    assert ok.messages[0].to_template() == {"role": "system", "content": "ab"}
    assert ok.max_tokens == 5 and ok.stop == ["x"] and ok.num_logprobs is None
    assert P.ChatCompletionRequest(messages=[{"role": "user", "content": "q"}], logprobs=True,
                                   top_logprobs=3).num_logprobs == 3
    bad = [
        dict(messages=[{"role": "user", "content": "q"}], top_logprobs=2),  # needs logprobs
        dict(messages=[{"role": "user", "content": [{"type": "image_url"}]}]),
        dict(messages=[{"role": "robot", "content": "q"}]),
        dict(messages=[{"role": "user", "content": "q"}], tool_choice="auto"),  # no tools
        dict(messages=[{"role": "user", "content": "q"}], tools=[{"function": {"name": "f"}}],
             tool_choice={"type": "function", "function": {"name": "g"}}),
        dict(messages=[{"role": "user", "content": "q"}], n=0),
        dict(messages=[{"role": "user", "content": "q"}], stop=[""]),
        dict(messages=[{"role": "user", "content": "q"}], logit_bias={"x": 1.0}),  # keys are token ids
        dict(messages=[{"role": "user", "content": "q"}], logit_bias={"5": 101.0}),  # values in [-100, 100]
        dict(messages=[{"role": "user", "content": "q"}], presence_penalty=3),
        dict(messages=[{"role": "user", "content": "q\ud800"}]),  # a lone surrogate
        dict(messages=[{"role": "user", "content": "q"}], response_format={"type": "json_schema"}),
    ]
    for fields in bad:
        with pytest.raises(ValidationError):
            P.ChatCompletionRequest(**fields)
    assert P.CompletionRequest(prompt="hi").prompts() == ["hi"]
    assert P.CompletionRequest(prompt=[1, 2]).prompts() == [[1, 2]]
    assert P.CompletionRequest(prompt=["a", "b"]).prompts() == ["a", "b"]
    assert P.CompletionRequest(prompt=[[1], [2, 3]]).prompts() == [[1], [2, 3]]
    assert P.ChatCompletionRequest(messages=[{"role": "user", "content": "q"}],
                                   logit_bias={"5": -100}).token_bias == {5: -100.0}
    assert P.CompletionRequest(prompt="x", echo=True).echo
    for fields in (dict(prompt=[]), dict(prompt=[[]]), dict(prompt="x", echo=True, logprobs=1), dict(prompt=[True]),
                   dict(prompt="x", max_tokens=0), dict(prompt="x", logprobs=21)):
        with pytest.raises(ValidationError):
            P.CompletionRequest(**fields)
    # a tool-call turn reaches the template with content None and dict arguments
    msg = P.ChatMessage(role="assistant", content="", tool_calls=[{"id": "c1", "function": {"name": "f",
                                                                                          "arguments": "{}"}}])
    assert msg.to_template()["content"] is None and msg.to_template()["tool_calls"][0]["function"]["name"] == "f"


def test_token_text_bytes_join_to_the_utf8_text(tok):
    text = "naïve café — 深度求索 🚀 done"
    ids = tok.encode(text, add_special_tokens=False)
    token_text = P.TokenText(tok)
    assert bytes(b for t in ids for b in token_text(t)[1]).decode("utf-8") == text
    user = tok.token_to_id("<｜User｜>")
    assert token_text(user) == ("<｜User｜>", list("<｜User｜>".encode()))
    assert token_text(129000) == ("", [])  # an embedding row with no token


# ---- CLI ------------------------------------------------------------------------------------
def test_cli_parser_defaults_and_errors(tmp_path, capsys):
    sub = next(a for a in build_parser(["serve"])._actions if a.dest == "verb")
    args = sub.choices["serve"].parse_args([])
    assert (args.host, args.port, args.model, args.max_num_seqs, args.max_model_len) == ("127.0.0.1", 8000, None, 64, None)
    assert callable(args.run)
    assert main(["serve", "--port", "70000"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--port" in err
    with pytest.raises(UsageError, match="not found"):
        resolve_model(str(tmp_path / "missing"))
    with pytest.raises(UsageError, match="config.json"):
        resolve_model(str(tmp_path))
    import dsv3
    try:
        default = dsv3.default_model_path()
    except FileNotFoundError:
        with pytest.raises(UsageError, match="--model"):
            resolve_model(None)
    else:
        assert resolve_model(None) == default
    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dsv3 serve: error:") and "missing" in err[0]
