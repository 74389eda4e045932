"""Corruption, bad names, traversal, missing data, unreachable stores, unsafe backends.

Each must give one error line, a non-zero exit, and leave the store as it was.
"""

from __future__ import annotations

import json
import socket

import pytest
from click.testing import CliRunner

from lmdepot.cli import main
from lmdepot.formats.manifest import Manifest
from lmdepot.registry import Registry, RegistryError
from lmdepot.registry.refs import ANY
from lmdepot.registry.version import Blob, Version, blob_key, manifest_key


def fails(*args, match):
    res = CliRunner().invoke(main, ["registry", *args])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], res.stderr
    return lines[0]


def snapshot(reg):
    return {k: reg.store.read(k) for k in reg.store.list("")}


def _layer_blob(reg, rank=1):
    _, digest, version = reg.get("tiny:v1")
    return next(b for b in version.files if b.rank == rank and b.path.endswith(".safetensors") and b.layer == 2)


@pytest.mark.moto
def test_flipped_byte_fails_verify_and_pull_naming_the_blob(store_url, workspace):
    reg = Registry(store_url)
    reg.push(workspace, "tiny:v1", show_progress=False)
    assert "blobs verified" in CliRunner().invoke(main, ["registry", "verify", "tiny:v1"]).output
    b = _layer_blob(reg)
    data = bytearray(reg.store.read(blob_key(b.digest)))
    data[len(data) // 2] ^= 0x01
    reg.store.fs.pipe_file(reg.store._p(blob_key(b.digest)), bytes(data))
    line = fails("verify", "tiny:v1", match=b.digest)
    assert b.path in line and "corrupt" in line
    line = fails("pull", "tiny:v1", match=b.digest)
    assert b.path in line
    assert not list(reg.cache_dir.rglob(b.digest.split(":")[1]))  # never materialized
    assert not (reg.cache_dir / "snapshots").exists()
    # other ranks do not need that blob and still pull
    assert reg.pull("tiny:v1", rank=0).joinpath("config.ini").is_file()


def test_truncated_and_missing_blobs_are_named(store_url, workspace):
    reg = Registry(store_url)
    reg.push(workspace, "tiny:v1", show_progress=False)
    b = _layer_blob(reg, rank=2)
    reg.store.fs.pipe_file(reg.store._p(blob_key(b.digest)), reg.store.read(blob_key(b.digest))[:100])
    fails("verify", "tiny:v1", match=f"blob {b.digest} ({b.path}) has 100 bytes")
    fails("pull", "tiny:v1", match=f"blob {b.digest} ({b.path})")
    reg.store.delete(blob_key(b.digest))
    fails("verify", "tiny:v1", match=f"blob {b.digest} ({b.path}) is missing")
    fails("pull", "tiny:v1", match=b.digest)


BAD_NAMES = [
    ["push", "{ws}", "Tiny:v1"], ["push", "{ws}", "tiny:v1/x"], ["push", "{ws}", "../tiny:v1"],
    ["push", "{ws}", "tiny:" + "x" * 129], ["push", "{ws}", "tiny"], ["pull", "tiny@sha256:abc"],
    ["tag", "tiny:v1", "BAD TAG"], ["rm", "tiny:.."], ["tags", "a/b"], ["log", "--", "-x"],
    ["log", "tiny:" + "a" * 200], ["audit", "a b"], ["diff", "tiny:v1", "x:Y"],
]


def test_invalid_names_and_tags(store_url, workspace):
    reg = Registry(store_url)
    reg.push(workspace, "tiny:v1", show_progress=False)
    before = snapshot(reg)
    for args in BAD_NAMES:
        fails(*[a.format(ws=workspace) for a in args], match="invalid")
    assert snapshot(reg) == before


def test_manifest_with_path_traversal_is_refused(store_url, workspace, clone_ws, tmp_path):
    reg = Registry(store_url)
    reg.push(workspace, "tiny:v1", show_progress=False)
    # a workspace whose manifest.json points outside it
    ws = clone_ws()
    body = json.loads((ws / "manifest.json").read_text())
    body["files"][0]["path"] = "../escape"
    (ws / "manifest.json").write_text(json.dumps(body))
    before = snapshot(reg)
    fails("push", str(ws), "tiny:v2", match="unsafe file path")
    assert snapshot(reg) == before
    # a registry manifest planted in the store with an absolute path
    good = reg.get("tiny:v1")[2]
    evil = Version([Blob("/etc/evil", good.files[0].digest, good.files[0].size)] + good.files[1:], good.config)
    reg.store.create(manifest_key("tiny", evil.digest), evil.to_bytes())
    reg.tags.move("tiny", "evil", evil.digest, expect=ANY)
    fails("pull", "tiny:evil", match="unsafe file path")
    fails("verify", f"tiny@{evil.digest}", match="unsafe file path")


def test_manifest_digest_mismatch(store_url, workspace):
    reg = Registry(store_url)
    reg.push(workspace, "tiny:v1", show_progress=False)
    _, digest = reg.resolve("tiny:v1")
    key = manifest_key("tiny", digest)
    reg.store.fs.pipe_file(reg.store._p(key), reg.store.read(key).replace(b'"synthetic"', b'"tampered"'))
    fails("pull", "tiny:v1", match="digest mismatch")
    fails("verify", f"tiny@{digest}", match="digest mismatch")


def test_unknown_refs(store_url):
    fails("pull", "tiny:v9", match="no such tag")
    fails("pull", "tiny@sha256:" + "0" * 64, match="no such version")
    fails("rm", "tiny:v9", match="no such tag")


def test_push_of_missing_workspace(store_url, tmp_path):
    fails("push", str(tmp_path / "nope"), "tiny:v1", match="not a directory")
    fails("push", str(tmp_path), "tiny:v1", match="no manifest.json")
    assert Registry(store_url).store.list("") == []


def test_unreachable_s3_store(monkeypatch, workspace):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once we leave: nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    fails("push", str(workspace), "tiny:v1", "--registry", "s3://nowhere/reg", match="unreachable")
    fails("ls", "--registry", "s3://nowhere/reg", match="unreachable")


def test_unusable_local_store(tmp_path, workspace):
    (tmp_path / "afile").write_text("not a directory")
    fails("push", str(workspace), "tiny:v1", "--registry", str(tmp_path / "afile" / "reg"), match="unreachable")


def test_backend_without_exclusive_create_cannot_move_tags(store_url, workspace, monkeypatch):
    reg = Registry(store_url)
    cls = type(reg.store)
    original = cls.create

    def overwriting_create(self, key, data):  # what a server ignoring If-None-Match does
        self.delete(key)
        return original(self, key, data)

    monkeypatch.setattr(cls, "create", overwriting_create)
    with pytest.raises(RegistryError, match="does not make create-only writes exclusive"):
        reg.push(workspace, "tiny:v1", show_progress=False)
    assert reg.ls() == {} and not reg.store.list("blobs/")
    fails("push", str(workspace), "tiny:v1", match="refusing to move tags")


def test_generic_fsspec_backend_is_refused(tmp_path, workspace):
    from lmdepot.registry.store import GenericStore, open_store

    store = open_store(f"dir::file://{tmp_path}/reg")
    assert isinstance(store, GenericStore)
    fails("push", str(workspace), "tiny:v1", "--registry", f"dir::file://{tmp_path}/reg",
          match="no create-only write")


def test_rank_pull_of_snapshot_manifest_is_original(store_url, workspace):
    reg = Registry(store_url)
    reg.push(workspace, "tiny:v1", show_progress=False)
    path = reg.pull("tiny:v1", rank=2)
    assert (path / "manifest.json").read_bytes() == (workspace / "manifest.json").read_bytes()
    assert Manifest.read(path).digest == Manifest.read(workspace).digest


def test_pull_after_a_failed_pull_fetches_only_what_was_missing(store_url, workspace):
    from lmdepot.registry.pull import pull

    reg = Registry(store_url)
    reg.push(workspace, "tiny:v1", show_progress=False)
    b = _layer_blob(reg, rank=0)
    good = reg.store.read(blob_key(b.digest))
    reg.store.fs.pipe_file(reg.store._p(blob_key(b.digest)), good[:-1] + bytes([good[-1] ^ 0xFF]))
    with pytest.raises(RegistryError, match=b.digest):
        pull(reg, "tiny:v1", show_progress=False)
    reg.store.fs.pipe_file(reg.store._p(blob_key(b.digest)), good)  # repaired, e.g. by a re-push
    res = pull(reg, "tiny:v1", show_progress=False)
    assert [x.digest for x in res.fetched] == [b.digest]
    assert (res.path / b.path).read_bytes() == (workspace / b.path).read_bytes()
