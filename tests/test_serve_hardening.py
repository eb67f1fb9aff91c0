"""`dsv3 serve` under hostile or unusual input: one test per finding of issue 20 (crashes, denial of
service, exposure, API differences). Oracles: the engine's own `LLM.generate` for outputs, OpenAI's error
shape and status codes, raw sockets for what HTTP clients hide (keep-alive reuse, slow clients).

An in-process server (uvicorn in a thread, with the hardened h11 protocol of `dsv3.serve.guards`) serves
a tiny random checkpoint with the real DeepSeek-V3 tokenizer. What needs signals and command-line flags
(the SIGTERM drain answering 503, the key checked before the body, --allowed-hosts, --allowed-origins) is
in tests/test_serve_api.py, on its `dsv3 serve` subprocesses.
"""

from __future__ import annotations

import json
import socket
import threading

import httpx
import openai
import pytest

from dsv3.engine.llm import LLM
from dsv3.engine.sampling import SamplingParams
from dsv3.serve.app import create_app
from dsv3.serve.guards import guarded_protocol
from test_serve_support import ThreadServer, tiny_checkpoint

CTX = 256
HEADER_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def ckpt():
    return tiny_checkpoint()


@pytest.fixture(scope="module")
def engine(ckpt):
    return LLM(ckpt, dtype="float32", num_blocks=256, max_model_len=CTX, max_num_seqs=16)


@pytest.fixture(scope="module")
def oracle(ckpt):
    """A second engine for expected outputs (the served one belongs to the server's engine thread)."""
    return LLM(ckpt, dtype="float32", num_blocks=256, max_model_len=CTX, max_num_seqs=16)


class GatedTokenizer:
    """The engine's tokenizer, but encoding can be held at a gate (to see what runs meanwhile)."""

    def __init__(self, tokenizer) -> None:
        self._tok = tokenizer
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.gate.set()

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def _wait(self) -> None:
        self.entered.set()
        self.gate.wait(60)

    def encode(self, *args, **kwargs):
        self._wait()
        return self._tok.encode(*args, **kwargs)

    def encode_batch(self, *args, **kwargs):
        self._wait()
        return self._tok.encode_batch(*args, **kwargs)


@pytest.fixture(scope="module")
def server(engine):
    gated = GatedTokenizer(engine.tokenizer)
    real, engine.tokenizer = engine.tokenizer, gated  # the app reads engine.tokenizer once, at creation
    app = create_app(engine, served_model_name="tiny", max_waiting=8, max_request_tokens=600, body_timeout=2.0)
    engine.tokenizer = real
    srv = ThreadServer(app, http=guarded_protocol(HEADER_TIMEOUT))
    srv.gated = gated
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def greedy(engine, prompt, **kw):
    return engine.generate([prompt], SamplingParams(temperature=0, **kw), use_tqdm=False)[0]


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def raw_exchange(port: int, requests: list[bytes]) -> list[bytes]:
    """Send requests one after another on ONE connection; each answer's head and body (Content-Length)."""
    answers = []
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        buf = b""
        for req in requests:
            s.sendall(req)
            while b"\r\n\r\n" not in buf:
                chunk = s.recv(65536)
                assert chunk, f"connection closed after {len(answers)} answers"
                buf += chunk
            head, buf = buf.split(b"\r\n\r\n", 1)
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            while len(buf) < length:
                buf += s.recv(65536)
            answers.append(head + b"\r\n\r\n" + buf[:length])
            buf = buf[length:]
    return answers


def post_raw(path: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


# ---- crashes and wrong answers ----------------------------------------------------------------
def test_lone_surrogates_are_400_and_keep_the_connection(server):
    cases = [("/v1/completions", r'{"prompt": "\ud800abc", "max_tokens": 2}'),
             ("/v1/completions", r'{"prompt": ["ok", "\udfff"], "max_tokens": 2}'),
             ("/v1/completions", r'{"prompt": "ok", "stream": true, "stop": ["\ud834"], "max_tokens": 2}'),
             ("/v1/chat/completions", r'{"messages": [{"role": "user", "content": "hi \ud800"}], "max_tokens": 2}'),
             ("/v1/chat/completions", r'{"messages": [{"role": "user", "content": "hi"}], "stream": true, '
                                      r'"tools": [{"type": "function", "function": {"name": "f", '
                                      r'"description": "\udc00 tool"}}], "max_tokens": 2}')]
    good = post_raw("/v1/completions", b'{"prompt": [5, 6, 7], "max_tokens": 2, "temperature": 0}')
    requests = [post_raw(path, body.encode()) for path, body in cases] + [good]
    answers = raw_exchange(server.port, requests)  # all on one keep-alive connection
    for answer in answers[:-1]:
        head, body = answer.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 400"), answer[:300]
        err = json.loads(body)["error"]
        assert "surrogate" in err["message"] and err["type"] == "invalid_request_error"
    assert answers[-1].startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("fields", [dict(temperature=1e-300), dict(temperature=1e-45), dict(temperature=1e-38),
                                    dict(temperature=0.7, top_p=1e-300)])
def test_tiny_temperature_and_top_p_are_greedy(client, oracle, fields):
    prompt = "The quick brown fox"
    want = greedy(oracle, prompt, max_tokens=6)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, seed=3, **fields)
    assert r.choices[0].text == want.text and r.usage.completion_tokens == len(want.token_ids)


def test_logit_bias_and_echo(client, oracle):
    prompt = "Once upon a time"
    forced = oracle.tokenizer.encode(" banana", add_special_tokens=False)[-1]
    want = oracle.generate([prompt], SamplingParams(temperature=0, max_tokens=4, logit_bias={forced: 100}),
                           use_tqdm=False)[0]
    assert want.token_ids == [forced] * 4  # +100 outweighs any logit of this model
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0,
                                  logit_bias={str(forced): 100})
    assert r.choices[0].text == want.text
    plain = greedy(oracle, prompt, max_tokens=5)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=0, echo=True)
    assert r.choices[0].text == prompt + plain.text
    chunks = client.completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=0, echo=True,
                                       stream=True)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == prompt + plain.text
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt=prompt, max_tokens=2, logit_bias={"999999999": 5})


# ---- denial of service --------------------------------------------------------------------------
def test_tokenizing_runs_off_the_event_loop(server):
    gated = server.gated
    gated.gate.clear()
    gated.entered.clear()
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(r=httpx.post(
        f"{server.url}/v1/completions", json={"prompt": "held at the gate", "max_tokens": 2}, timeout=60)))
    t.start()
    try:
        assert gated.entered.wait(30), "the request never reached the tokenizer"
        health = httpx.get(f"{server.url}/health", timeout=10)  # answered while the prompt is being encoded
        assert health.status_code == 200
    finally:
        gated.gate.set()
        t.join(60)
    assert result["r"].status_code == 200


def test_request_limits_are_400_not_503(server):
    # more sequences than the waiting queue holds can never be served: 400 on an idle server
    err = error_of(httpx.post(f"{server.url}/v1/completions",
                              json={"prompt": [[5, 6]] * 3, "n": 3, "max_tokens": 2}, timeout=30), 400)
    assert err["code"] == "too_many_sequences"
    # the prompt-token budget of one request (600 here)
    err = error_of(httpx.post(f"{server.url}/v1/completions",
                              json={"prompt": [list(range(10, 210))] * 4, "max_tokens": 2}, timeout=30), 400)
    assert err["code"] == "request_too_large" and "600" in err["message"]
    # a text whose length alone proves it longer than the context is refused before tokenizing
    server.gated.gate.clear()
    try:
        err = error_of(httpx.post(f"{server.url}/v1/completions", json={"prompt": "x" * 200_000}, timeout=30), 400)
    finally:
        server.gated.gate.set()
    assert err["code"] == "context_length_exceeded"


def test_slow_headers_and_bodies_are_cut_off(server):
    conns = []
    for _ in range(10):
        s = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")  # headers never finish
        conns.append(s)
    for s in conns:  # each is closed by the server (recv returns b"" at EOF); a timeout here fails the test
        assert s.recv(1024) == b""
        s.close()
    # headers complete, body promised but never finished: 408 in OpenAI's shape, then the connection closes
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"prompt\": ")
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408") and b'"request_timeout"' in answer
    # an idle keep-alive connection between requests is not cut by the header deadline mid-request
    assert raw_exchange(server.port, [post_raw("/v1/completions", b'{"prompt": [5], "max_tokens": 1}')] * 2)


# ---- exposure and API differences ------------------------------------------------------------------
def test_pages_headers_hosts_and_models(server, client):
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert page.headers["x-frame-options"] == "DENY"
    assert "http" not in page.text.split("<body")[0].lower().replace("http-equiv", "")  # no third-party assets
    assert httpx.get(f"{server.url}/docs").status_code == 404  # would load swagger-ui from a CDN
    # no key: only localhost and IP-literal Host headers (DNS rebinding)
    err = error_of(httpx.get(f"{server.url}/health", headers={"Host": "evil.example"}), 400)
    assert err["code"] == "invalid_host"
    assert httpx.get(f"{server.url}/health", headers={"Host": f"localhost:{server.port}"}).status_code == 200
    # no filesystem path in /v1/models
    listed = httpx.get(f"{server.url}/v1/models").json()["data"][0]
    assert "/" not in json.dumps(listed)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
