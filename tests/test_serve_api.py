"""`dsv3 serve` end to end: real server subprocesses on a tiny random checkpoint, the official `openai`
client (and raw HTTP for what the client hides), the engine's own `LLM.generate` as the oracle.

Two servers start together: `main` (API key, 40 sequences per step, context 160, 64 KiB body limit,
--allowed-hosts, --allowed-origins) for outputs, batching, errors and the network guards; `small` (one sequence per step, one waiting slot, 1 s shutdown
grace) for the 503 back-pressure, client disconnects and SIGTERM.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from dsv3.engine.llm import LLM
from dsv3.engine.sampling import SamplingParams
from test_serve_support import ServerProcess, metric, sse_events, tiny_checkpoint

KEY = "test-key-123"
CTX = 160


@pytest.fixture(scope="module")
def ckpt():
    return tiny_checkpoint()


@pytest.fixture(scope="module")
def servers(ckpt):
    main = ServerProcess(ckpt, "--api-key", KEY, "--served-model-name", "tiny", "--max-num-seqs", "40",
                         "--num-blocks", "512", "--max-model-len", str(CTX), "--max-body-bytes", "65536",
                         "--allowed-hosts", "api.example,127.0.0.1", "--allowed-origins", "https://app.example")
    small = ServerProcess(ckpt, "--served-model-name", "tiny", "--max-num-seqs", "1", "--max-waiting", "1",
                          "--num-blocks", "64", "--shutdown-grace", "1")
    try:
        yield main.wait(), small.wait()
    finally:
        main.stop()
        small.stop()


@pytest.fixture(scope="module")
def main(servers):
    return servers[0]


@pytest.fixture(scope="module")
def small(servers):
    return servers[1]


@pytest.fixture(scope="module")
def oracle(ckpt):
    return LLM(ckpt, dtype="float32", num_blocks=512, max_model_len=CTX, max_num_seqs=40)


@pytest.fixture(scope="module")
def client(main):
    return openai.OpenAI(base_url=f"{main.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def generate(oracle, prompts, **kw):
    return oracle.generate(prompts, SamplingParams(**{"temperature": 0.0, **kw}), use_tqdm=False)


def assert_error(response: httpx.Response, status: int, param: str | None = None, code: str | None = None):
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code


def test_models_health_metrics_and_auth(main, client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"] and models[0].max_model_len == CTX
    assert_error(httpx.get(f"{main.url}/v1/models"), 401, code="invalid_api_key")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{main.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(f"{main.url}/health").json()["status"] == "ok"
    text = httpx.get(f"{main.url}/metrics").text
    for name in ("dsv3_num_requests_running", "dsv3_num_requests_waiting", "dsv3_cache_usage_ratio",
                 "dsv3_prompt_tokens_total", "dsv3_generation_tokens_total",
                 "dsv3_time_to_first_token_seconds_bucket", "dsv3_time_per_output_token_seconds_bucket"):
        assert name in text
    page = httpx.get(f"{main.url}/")
    assert page.status_code == 200 and "<textarea" in page.text
    assert httpx.get(f"{main.url}/static/app.js").status_code == 200


def test_completions_equal_generate(client, oracle):
    prompts = ["The capital of France is", "def fibonacci(n):"]
    expected = generate(oracle, prompts, max_tokens=10)
    tok = oracle.tokenizer
    for prompt, exp in zip(prompts, expected):
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0)
        assert r.choices[0].text == exp.text and r.choices[0].finish_reason == exp.finish_reason
        assert r.usage.prompt_tokens == len(tok.encode(prompt)) and r.usage.completion_tokens == len(exp.token_ids)
        chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == exp.text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == exp.finish_reason
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(exp.token_ids)
    # token-id prompts (several in one request) give the same texts, choices in prompt order
    r = client.completions.create(model="tiny", prompt=[tok.encode(p) for p in prompts], max_tokens=10, temperature=0)
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == [e.text for e in expected]


def test_chat_equals_generate(client, oracle):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a prime."},
                {"role": "assistant", "content": "Seven."}, {"role": "user", "content": "Another one?"}]
    ids = oracle.tokenizer.encode_chat(messages)
    exp = generate(oracle, [ids], max_tokens=10)[0]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert r.choices[0].message.content == exp.text and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(exp.token_ids)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == exp.text
    assert chunks[-1].choices[0].finish_reason == exp.finish_reason


def test_n_seed_logprobs_penalties_and_stop(client, oracle):
    # n choices with a seed: choice i is the engine's seeded draw with seed + i, reproducibly
    r = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6, temperature=1.0, n=3, seed=7)
    texts = [c.text for c in sorted(r.choices, key=lambda c: c.index)]
    exp = oracle.generate(["Once upon a time"] * 3, [SamplingParams(temperature=1.0, max_tokens=6, seed=7 + i)
                                                     for i in range(3)], use_tqdm=False)
    assert texts == [e.text for e in exp] and len(set(texts)) > 1
    # chat logprobs: the engine's own numbers, top_logprobs sorted and of the asked size
    messages = [{"role": "user", "content": "Count to three."}]
    ids = oracle.tokenizer.encode_chat(messages)
    ref = generate(oracle, [ids], max_tokens=4, logprobs=2)[0]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0,
                                       logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == len(ref.token_ids)
    for got, want in zip(content, ref.logprobs):
        assert got.logprob == pytest.approx(want.logprob, abs=1e-4)
        assert [t.logprob for t in got.top_logprobs] == pytest.approx([lp for _, lp in want.top], abs=1e-4)
    assert b"".join(bytes(c.bytes) for c in content).decode("utf-8", "replace").replace("\ufffd", "") \
        == oracle.tokenizer.decode(ref.token_ids).replace("\ufffd", "")
    # completion logprobs layout
    r = client.completions.create(model="tiny", prompt="Count:", max_tokens=3, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    # penalties reach the sampler
    pen = dict(presence_penalty=1.5, frequency_penalty=0.5)
    exp = generate(oracle, ["a a a a a"], max_tokens=8, **pen)[0]
    r = client.completions.create(model="tiny", prompt="a a a a a", max_tokens=8, temperature=0, **pen)
    assert r.choices[0].text == exp.text
    # a stop string cut from the middle of the greedy answer: streamed pieces join to the cut text
    full = generate(oracle, ["The weather today"], max_tokens=10)[0].text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip()
    exp = generate(oracle, ["The weather today"], max_tokens=10, stop=[stop])[0]
    r = client.completions.create(model="tiny", prompt="The weather today", max_tokens=10, temperature=0, stop=stop)
    assert r.choices[0].text == exp.text == full[:full.find(stop)] and r.choices[0].finish_reason == "stop"
    chunks = client.completions.create(model="tiny", prompt="The weather today", max_tokens=10, temperature=0,
                                       stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == exp.text


def test_32_concurrent_streams_are_batched(main, client, oracle):
    prompts = [f"Request {i}: tell me about the number {i * 7}" for i in range(32)]
    expected = [o.text for o in generate(oracle, prompts, max_tokens=8)]
    steps_before = metric(main.url, "dsv3_engine_steps_total")
    start = threading.Barrier(32)

    def one(prompt: str) -> tuple[str, int]:
        start.wait()
        stream = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0, stream=True,
                                           stream_options={"include_usage": True})
        text, tokens = "", 0
        for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return text, tokens

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, prompts))
    assert [t for t, _ in results] == expected
    total_tokens = sum(n for _, n in results)
    steps = metric(main.url, "dsv3_engine_steps_total") - steps_before
    assert total_tokens == 32 * 8 and steps < total_tokens / 4, (steps, total_tokens)


def test_error_statuses_and_objects(main, client, oracle):
    url, auth = f"{main.url}/v1", {"Authorization": f"Bearer {KEY}"}

    def post(path: str, headers: dict | None = None, **kw) -> httpx.Response:
        return httpx.post(f"{url}/{path}", headers={**auth, **(headers or {})}, timeout=30, **kw)

    assert_error(post("completions", json={"model": "nope", "prompt": "x"}), 404, "model", "model_not_found")
    assert_error(post("completions", json={"prompt": "x", "max_tokens": -3}), 400, "max_tokens")
    assert_error(post("completions", json={"prompt": "x", "max_tokens": 10 ** 6}), 400, "max_tokens")
    assert_error(post("completions", json={"prompt": list(range(5, 5 + CTX))}), 400, "prompt", "context_length_exceeded")
    assert_error(post("chat/completions", json={"messages": [{"role": "user", "content": "hi " * 200}]}), 400,
                 "messages", "context_length_exceeded")
    assert_error(post("completions", json={"prompt": [10 ** 7]}), 400, "prompt")
    assert_error(post("chat/completions", json={"messages": []}), 400, "messages")
    assert_error(post("completions", json={"prompt": "x", "temperature": "hot"}), 400, "temperature")
    assert_error(post("completions", content=b'{"prompt": "x", ', headers={"Content-Type": "application/json"}),
                 400)
    assert_error(post("completions", json={"prompt": "x" * 70000}), 413, code="request_too_large")
    chunked = (b'{"prompt": "' + b"y" * 9000 if i == 0 else b"y" * 9000 for i in range(10))  # no Content-Length
    assert_error(post("completions", content=chunked), 413, code="request_too_large")
    assert_error(httpx.get(f"{main.url}/nowhere"), 404)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=0)
    assert httpx.get(f"{main.url}/health").status_code == 200  # still serving


def test_key_first_hosts_and_cors(main):
    """The key is checked before the body is read; --allowed-hosts and --allowed-origins (issue 20)."""
    url = main.url
    r = httpx.post(f"{url}/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert_error(r, 401, code="invalid_api_key")  # no key and a body that is not JSON: never parsed
    assert_error(httpx.get(f"{url}/health", headers={"Host": "evil.example"}), 400, code="invalid_host")
    assert httpx.get(f"{url}/health", headers={"Host": "api.example"}).status_code == 200
    pre = httpx.options(f"{url}/v1/completions", headers={"Origin": "https://app.example",
                                                          "Access-Control-Request-Method": "POST",
                                                          "Access-Control-Request-Headers": "authorization"})
    assert pre.headers.get("access-control-allow-origin") == "https://app.example"
    other = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}", "Origin": "https://evil.example"})
    assert other.status_code == 200 and "access-control-allow-origin" not in other.headers


def test_queue_full_503_and_disconnects_free_blocks(small):
    url = small.url
    body = {"prompt": "Tell me a long story", "max_tokens": 480, "ignore_eos": True, "temperature": 0}
    aborts_before = metric(url, 'dsv3_request_success_total{finished_reason="abort"}')
    waiter: dict = {}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as streaming:
            lines = streaming.iter_lines()
            got = 0
            while got < 3:
                got += next(lines).startswith("data:")
            assert metric(url, "dsv3_cache_blocks_used") > 0 and metric(url, "dsv3_num_requests_running") == 1
            # one sequence runs, the next waits, the one after that is refused
            t = threading.Thread(target=lambda: waiter.update(
                r=httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 3}, timeout=60)))
            t.start()
            deadline = time.monotonic() + 20
            while metric(url, "dsv3_num_requests_waiting") < 1:
                assert time.monotonic() < deadline, "second request never queued"
                time.sleep(0.05)
            busy = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 3}, timeout=30)
            assert_error(busy, 503, code="queue_full")
            assert busy.headers["Retry-After"] == "1"
        # leaving the block closed the streaming connection mid-answer
        t.join(60)
    assert waiter["r"].status_code == 200 and waiter["r"].json()["choices"][0]["finish_reason"] == "length"
    # a non-streamed request whose client gives up is aborted too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json=body, timeout=1.0)
    deadline = time.monotonic() + 20
    while (metric(url, 'dsv3_request_success_total{finished_reason="abort"}') < aborts_before + 2
           or metric(url, "dsv3_num_requests_running") > 0):
        assert time.monotonic() < deadline, httpx.get(f"{url}/metrics").text
        time.sleep(0.05)
    assert metric(url, "dsv3_cache_blocks_used") == 0 and metric(url, "dsv3_num_requests_waiting") == 0
    # both long requests were cut short (aborted), none ran to its length
    assert metric(url, 'dsv3_request_success_total{finished_reason="abort"}') == aborts_before + 2
    assert metric(url, 'dsv3_request_success_total{finished_reason="length"}') == 1


def test_sigterm_drains_then_exits_zero(small):
    body = {"prompt": "Another long story", "max_tokens": 480, "ignore_eos": True, "temperature": 0, "stream": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{small.url}/v1/completions", json=body) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data:"))
            assert json.loads(first[5:])["choices"][0]["finish_reason"] is None
            small.proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            # draining: the socket stays open and new requests get 503 with Retry-After (issue 20)
            while httpx.get(f"{small.url}/health").status_code != 503:
                assert time.monotonic() - t0 < 10, "never started draining"
                time.sleep(0.02)
            late = httpx.post(f"{small.url}/v1/completions", json={"prompt": "x", "max_tokens": 1})
            assert_error(late, 503, code="shutting_down")
            assert int(late.headers["Retry-After"]) > 0
            rest = [line[5:].strip() for line in lines if line.startswith("data:")]
    assert rest[-1] == "[DONE]"
    last = json.loads(rest[-2])["choices"][0]
    assert last["finish_reason"] == "abort"  # the grace (1 s) ran out long before 480 tokens
    assert small.proc.wait(30) == 0 and time.monotonic() - t0 < 20
    assert "Traceback" not in small.output()
