"""Store primitives on every backend, and gc's mark-and-sweep."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from lmdepot.cli import main
from lmdepot.formats.manifest import Manifest
from lmdepot.registry import Registry
from lmdepot.registry.refs import ANY
from lmdepot.registry.s3 import S3Store
from lmdepot.registry.store import open_store
from lmdepot.registry.version import blob_key, manifest_key


@pytest.mark.moto
def test_create_is_exclusive_and_update_is_conditional(store_url):
    store = open_store(store_url)
    assert store.create("k/a", b"first") is True
    assert store.create("k/a", b"second") is False
    assert store.read("k/a") == b"first"
    assert store.read("k/missing") is None
    assert store.update_if("k/a", b"third", lambda cur: cur == b"first") is True
    assert store.update_if("k/a", b"fourth", lambda cur: cur == b"first") is False
    assert store.read("k/a") == b"third"
    assert store.list("k/") == ["k/a"]
    assert store.read_range("k/a", start=1, end=3) == b"hi"


@pytest.mark.moto
def test_s3_if_match_refuses_a_stale_etag(store_url):
    from lmdepot.registry.s3 import _is_precondition_failure

    store = open_store(store_url)
    if not isinstance(store, S3Store):
        return
    store.create("t", b"v1")
    stale = store.info("t")["ETag"]
    store.fs.pipe_file(store._p("t"), b"v2")
    try:
        store.fs.pipe_file(store._p("t"), b"v3", IfMatch=stale)
        raise AssertionError("the server ignored If-Match")
    except OSError as exc:
        assert _is_precondition_failure(exc)
    assert store.read("t") == b"v2"
    assert store.update_if("t", b"v4", lambda cur: cur == b"v2") and store.read("t") == b"v4"


def _two_versions(reg, workspace, clone_ws):
    first = reg.push(workspace, "tiny:v1", show_progress=False)
    ws = clone_ws()
    (ws / "weights" / "global.0.safetensors").write_bytes(b"new global weights of rank 0")
    Manifest.scan(ws, provenance={"rev": 2}).write(ws)
    second = reg.push(ws, "tiny:v2", show_progress=False)
    return first, second


def test_gc_sweeps_only_unreachable_and_old(store_url, workspace, clone_ws):
    reg = Registry(store_url)
    first, second = _two_versions(reg, workspace, clone_ws)
    only_v1 = {b.digest for b in reg.load("tiny", first.digest).files} - \
              {b.digest for b in reg.load("tiny", second.digest).files}
    assert only_v1
    assert reg.gc(grace_s=0).deleted == []  # everything is tagged
    reg.rm("tiny:v1")
    res = CliRunner().invoke(main, ["registry", "gc", "--grace", "1h"])
    assert res.exit_code == 0 and "0 objects" in res.output  # young: protected by the grace period
    res = CliRunner().invoke(main, ["registry", "gc", "--grace", "0s", "--dry-run"])
    assert res.exit_code == 0 and "would delete" in res.output
    assert reg.store.exists(manifest_key("tiny", first.digest))
    rep = reg.gc(grace_s=0)
    assert set(rep.deleted) == {manifest_key("tiny", first.digest)} | {blob_key(d) for d in only_v1}
    assert not reg.store.exists(manifest_key("tiny", first.digest))
    reg.verify("tiny:v2")
    assert reg.pull("tiny:v2").joinpath("weights/global.0.safetensors").read_bytes() == \
        b"new global weights of rank 0"


def test_gc_rechecks_refs_after_marking(store_url, workspace, clone_ws, monkeypatch):
    import lmdepot.registry.gc as gc

    reg = Registry(store_url)
    first, second = _two_versions(reg, workspace, clone_ws)
    reg.rm("tiny:v1")
    calls = []
    original = gc._roots

    def roots_with_a_racing_tag(*args):
        calls.append(1)
        if len(calls) == 2:  # between mark and sweep, someone tags the old version again
            reg.tags.move("tiny", "back", first.digest, expect=ANY)
        return original(*args)

    monkeypatch.setattr(gc, "_roots", roots_with_a_racing_tag)
    rep = reg.gc(grace_s=0)
    assert rep.deleted == []
    reg.verify("tiny:back")


def test_gc_keeps_blobs_of_a_push_in_flight(store_url, workspace):
    reg = Registry(store_url)
    reg.push(workspace, "tiny:v1", show_progress=False)
    reg.store.create(blob_key("sha256:" + "ab" * 32), b"uploaded by a push that has not tagged yet")
    assert reg.gc(grace_s=3600).deleted == []
    assert reg.gc(grace_s=0).deleted == [blob_key("sha256:" + "ab" * 32)]


def test_log_cli_text(store_url, workspace):
    reg = Registry(store_url)
    reg.push(workspace, "tiny:v1", show_progress=False)
    out = CliRunner().invoke(main, ["registry", "log", "tiny:v1"]).output
    digest = reg.resolve("tiny:v1")[1]
    assert f"tiny:v1  push  - -> {digest}  by tester@ci" in out
    assert json.loads(reg.store.read("tags/tiny/v1.json"))["digest"] == digest


def test_mover_killed_between_log_and_pointer_is_rolled_forward(store_url, workspace, clone_ws):
    from lmdepot.registry.refs import history_key

    reg = Registry(store_url)
    first, second = _two_versions(reg, workspace, clone_ws)
    # the log entry of move 2 exists, the pointer still says move 1: the state a kill leaves
    entry = {"tag": "v1", "from": first.digest, "to": second.digest, "generation": 2,
             "when": "2026-01-01T00:00:00+00:00", "by": "killed@host", "action": "tag"}
    assert reg.store.create(history_key("tiny", "v1", 2), json.dumps(entry).encode())
    assert json.loads(reg.store.read("tags/tiny/v1.json"))["generation"] == 1
    assert reg.resolve("tiny:v1")[1] == second.digest
    assert reg.tags.list_tags("tiny")["v1"] == second.digest
    e = reg.tag(f"tiny@{first.digest}", "v1", expect=second.digest)
    assert e["generation"] == 3 and e["from"] == second.digest
    assert json.loads(reg.store.read("tags/tiny/v1.json")) == {"digest": first.digest, "generation": 3}
    assert [x["by"] for x in reg.log("tiny", "v1")] == ["tester@ci", "killed@host", "tester@ci"]
