"""The chat page in a real browser: headless Debian Chromium driven by Playwright against the server
running the real engine on the tiny checkpoint.

It sends a message, watches the answer stream in, presses stop mid-answer (and checks the server
aborted the sequence and freed its blocks), reloads (the conversation comes back from
localStorage), sends a second turn that runs to its end, checks the Markdown renderer on crafted
input, and saves a screenshot to build/test-artifacts/serve_chat.png (or $DSV3_TEST_ARTIFACTS).
Chromium and Playwright are installed by .ci/run; without them the test fails under CI and is
skipped elsewhere.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from dsv3.engine.llm import LLM
from dsv3.serve.app import create_app
from test_serve_support import ROOT, ThreadServer, metric, tiny_checkpoint

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _require_browser():
    missing = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("playwright (pip)")
    if CHROMIUM is None:
        missing.append("chromium (apt)")
    if missing:
        message = f"browser test needs {', '.join(missing)}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def server():
    engine = LLM(tiny_checkpoint(), dtype="float32", num_blocks=128, max_num_seqs=4)
    srv = ThreadServer(create_app(engine, served_model_name="tiny"))
    yield srv
    srv.stop()


def wait_until(predicate, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_chat_page_streams_stops_and_remembers(server):
    _require_browser()
    from playwright.sync_api import sync_playwright

    artifacts = Path(os.environ.get("DSV3_TEST_ARTIFACTS", ROOT / "build" / "test-artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1000, "height": 760})
        page.goto(server.url + "/")
        page.wait_for_selector("#model-name:has-text('tiny')")  # no eval: the page's CSP forbids it
        page.click("#toggle-settings")
        page.fill("#system-prompt", "You are a test.")
        page.fill("#max-tokens", "400")
        page.dispatch_event("#max-tokens", "change")

        # turn 1: stream, then stop mid-answer
        page.fill("#input", "Tell me a long story about **dragons**.")
        page.press("#input", "Enter")
        answer = page.locator(".msg.assistant .content").last
        wait_until(lambda: len(answer.inner_text()) > 0, what="streamed text")
        first_seen = answer.inner_text()
        wait_until(lambda: len(answer.inner_text()) > len(first_seen), what="more streamed text")
        assert page.is_visible("#stop") and not page.is_visible("#send")
        page.click("#stop")
        page.wait_for_selector(".msg.assistant.stopped")
        assert page.is_visible("#send") and not page.is_visible("#stop")
        assert "(stopped)" in page.inner_text(".msg.assistant .note")
        wait_until(lambda: metric(server.url, 'dsv3_request_success_total{finished_reason="abort"}') == 1
                   and metric(server.url, "dsv3_cache_blocks_used") == 0, what="server-side abort")
        assert metric(server.url, "dsv3_generation_tokens_total") < 400
        stopped_text = answer.inner_text()

        # the conversation survives a reload (localStorage)
        page.reload()
        page.wait_for_selector(".msg.assistant")
        assert page.locator(".msg").count() == 2
        assert page.locator(".msg.user .content").first.inner_text() == "Tell me a long story about **dragons**."
        assert page.locator(".msg.assistant .content").last.inner_text() == stopped_text

        # turn 2 runs to its token limit
        page.click("#toggle-settings")
        page.fill("#max-tokens", "6")
        page.dispatch_event("#max-tokens", "change")
        page.fill("#input", "Shorter, please.")
        page.click("#send")
        page.wait_for_selector("#status:has-text('finished')")
        assert page.inner_text("#status") == "finished: length" and page.locator(".msg").count() == 4

        # the Markdown renderer escapes HTML and renders code, emphasis and lists
        html = page.evaluate("""() => Markdown.render(
            "# Title\\n<script>alert(1)</script> **bold** and `a<b`\\n\\n```python\\nprint('<b>')\\n```\\n\\n- one\\n- two\\n\\n[bad](javascript:alert(1)) [ok](https://example.org)")""")
        assert "<script" not in html and "&lt;script&gt;" in html
        assert "<h1>Title</h1>" in html and "<strong>bold</strong>" in html and "<code>a&lt;b</code>" in html
        assert '<code class="language-python">print(&#39;&lt;b&gt;&#39;)</code>' in html
        assert "<ul><li>one</li><li>two</li></ul>" in html
        assert 'href="javascript' not in html and 'href="https://example.org"' in html
        unclosed = page.evaluate("() => Markdown.render('text\\n```js\\nlet x = 1;')")
        assert '<code class="language-js">let x = 1;</code>' in unclosed

        shot = artifacts / "serve_chat.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert shot.stat().st_size > 10_000
