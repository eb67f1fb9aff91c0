"""Fuzzing the server with `schemathesis` from its own OpenAPI schema: no request may get a 5xx or
take the server down.

The server runs the real engine on the tiny checkpoint with a 12-token context, so every valid
request finishes within a few steps; schemathesis generates schema-conforming requests (positive
mode) and schema-violating ones (negative mode) for every operation, and hypothesis adds raw
bodies that are not JSON at all.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsv3.engine.llm import LLM
from dsv3.serve.app import create_app
from test_serve_support import ThreadServer, tiny_checkpoint

FUZZ = settings(max_examples=40, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def server():
    engine = LLM(tiny_checkpoint(), dtype="float32", num_blocks=64, max_model_len=12, max_num_seqs=16)
    srv = ThreadServer(create_app(engine, served_model_name="tiny", max_body_bytes=1 << 16))
    yield srv
    srv.stop()


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_schema_fuzz_finds_no_5xx(server, mode):
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    strategy = schema.as_strategy(generation_mode=schemathesis.GenerationMode(mode))
    statuses: list[int] = []

    @FUZZ
    @given(case=strategy)
    def run(case):
        response = case.call(base_url=server.url, timeout=60)
        statuses.append(response.status_code)
        assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
        if response.status_code >= 400 and case.path.startswith("/v1/"):
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}

    run()
    assert len(statuses) >= 40
    if mode == "positive":
        assert any(s == 200 for s in statuses)  # the fuzzer did reach the engine
    health = httpx.get(f"{server.url}/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_raw_bodies_find_no_5xx(server):
    @FUZZ
    @given(body=st.binary(max_size=300) | st.text(max_size=300).map(str.encode),
           path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
           content_type=st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded"]))
    def run(body, path, content_type):
        r = httpx.post(f"{server.url}{path}", content=body, headers={"Content-Type": content_type}, timeout=60)
        assert r.status_code < 500, (body, r.text[:300])

    run()
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
