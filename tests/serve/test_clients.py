"""`serve api_client` in a terminal session and `serve gradio` (the web UI), the latter in headless Chromium."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.serve.helpers import ROOT, Server, env, sse_events

CHROMIUM = next((p for p in (os.environ.get("LMDEPOT_CHROMIUM"), shutil.which("chromium"),
                             shutil.which("chromium-browser"), "/usr/bin/chromium") if p and Path(p).exists()), None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _client(url: str, stdin: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmdepot.cli", "serve", "api_client", url, *args], input=stdin,
                          capture_output=True, text=True, timeout=120, env=env(), cwd=ROOT)


def test_api_client_chats(smol_server):
    proc = _client(smol_server.url, "Hello, who are you?\n\nAnd what can you do?\n\nexit\n", "--max-tokens", "12",
                   "--temperature", "0", "--system", "You are terse.")
    assert proc.returncode == 0, proc.stderr
    assert "connected to" in proc.stderr and "smollm2-135m" in proc.stderr
    turns = proc.stdout.split("double enter to end input >>> ")
    assert len(turns) == 4 and all(t.strip() for t in turns[1:3])   # two answered turns, then exit


def test_api_client_unreachable_is_one_line():
    proc = _client("http://127.0.0.1:9", "")
    assert proc.returncode == 2 and proc.stderr.startswith("error: cannot reach") and proc.stderr.count("\n") == 1


@pytest.fixture(scope="module")
def webui(smol_server):
    server = Server("gradio", smol_server.url, health="/")
    yield server
    server.stop()


def test_webui_proxies_streams(webui):
    page = httpx.get(webui.url + "/").text
    assert "<title>lmdepot chat</title>" in page and 'id="stop"' in page
    assert httpx.get(webui.url + "/api/models").json()["data"][0]["id"] == "smollm2-135m"
    body = {"model": "smollm2-135m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True}
    with httpx.stream("POST", webui.url + "/api/chat", json=body, timeout=60) as r:
        events, done = sse_events(r.iter_lines())
    assert done and events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    bad = httpx.post(webui.url + "/api/chat", json={"model": "nope", "messages": []}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["message"]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_webui_in_chromium(webui, smol_server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    shot = Path(os.environ.get("LMDEPOT_SCREENSHOT_DIR", tmp_path)) / "webui.png"
    aborted = smol_server.metric("lmdepot_request_finished_total", 'finish_reason="abort"')
    with sync_api.sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True,
                                                   args=FLAGS, viewport={"width": 1000, "height": 640})
        try:
            page = ctx.new_page()
            page.set_default_timeout(90_000)
            page.goto(webui.url)
            page.wait_for_function("document.getElementById('model').textContent === 'model: smollm2-135m'")
            page.fill("#system", "You are a friendly assistant.")
            page.fill("#max_tokens", "48")
            page.fill("#input", "Tell me about the sea.")
            page.press("#input", "Enter")
            # a partial answer is on screen while the reply is still streaming
            page.wait_for_function("document.querySelector('.msg.assistant') && document.querySelector("
                                   "'.msg.assistant').textContent.length > 0 && document.body.dataset.state === "
                                   "'streaming'")
            page.wait_for_selector(".msg.assistant[data-done='true']")
            answer = page.text_content(".msg.assistant")
            assert answer.strip() and page.text_content(".msg.user") == "Tell me about the sea."
            page.screenshot(path=str(shot))
            # the stop button ends a long reply; the server aborts the request
            page.fill("#max_tokens", "600")
            page.fill("#input", "Write a long story.")
            page.click("#send")
            page.wait_for_function("document.querySelectorAll('.msg.assistant')[1].textContent.length > 0")
            page.click("#stop")
            page.wait_for_selector(".msg.assistant[data-done='stopped']")
        finally:
            ctx.close()
    assert shot.stat().st_size > 10_000
    from tests.serve.helpers import wait_until

    wait_until(lambda: smol_server.metric("lmdepot_request_finished_total", 'finish_reason="abort"') > aborted, 30,
               "the stopped reply to be aborted on the server")
