"""Start and stop `lmdepot serve ...` processes on free loopback ports; read SSE streams."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra: str) -> dict:
    e = dict(os.environ) | extra
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("OMP_NUM_THREADS", "1")
    return e


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    """Poll instead of sleeping a fixed time; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Server:
    """`lmdepot serve <command> ...` in a subprocess, on 127.0.0.1 and a free port."""

    def __init__(self, command: str, target: str, *args: str, health: str = "/health", timeout: float = 180,
                 extra_env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # A file, not a pipe: nobody reads a pipe while tests run, and a full pipe blocks the server.
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"lmdepot-{command}-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "lmdepot.cli", "serve", command, str(target), "--server-name", "127.0.0.1",
               "--server-port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, env=env(**(extra_env or {})), cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)

        def up():
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                return httpx.get(self.url + health, timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        try:
            wait_until(up, timeout, f"{command} on port {self.port}", interval=0.2)
        except BaseException:
            self.stop()
            raise

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")[-5000:]

    def metric(self, name: str, labels: str = "") -> float:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        key = f"{name}{{{labels}}}" if labels else name
        for line in text.splitlines():
            if line.startswith(key + " "):
                return float(line.split()[-1])
        return 0.0

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def sse_events(lines) -> tuple[list[dict], bool]:
    """Parse `data:` lines; returns (json events, whether the stream ended with [DONE])."""
    events, done = [], False
    for line in lines:
        if not line:
            continue
        assert line.startswith("data: "), f"malformed SSE line: {line!r}"
        assert not done, "data after [DONE]"
        data = line[6:]
        if data == "[DONE]":
            done = True
            continue
        events.append(json.loads(data))
    return events, done
