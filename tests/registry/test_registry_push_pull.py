"""push / pull round trips, dedup, rank-selective pulls and the local cache."""

from __future__ import annotations

import filecmp
import json

import pytest
from click.testing import CliRunner

from lmdepot.cli import main
from lmdepot.formats.manifest import Manifest
from lmdepot.registry import Registry, RegistryError
from lmdepot.registry.version import manifest_key


def run(*args, ok=True):
    res = CliRunner().invoke(main, ["registry", *args])
    if ok:
        assert res.exit_code == 0, res.output
    return res


def same_tree(a, b, paths):
    for p in paths:
        assert (a / p).read_bytes() == (b / p).read_bytes(), p


@pytest.mark.moto
def test_push_pull_round_trip(store_url, workspace):
    res = run("push", str(workspace), "tiny:v1")
    assert "uploaded config.ini" in res.output and "skipped" in res.output
    reg = Registry(store_url)
    path = reg.pull("tiny:v1")
    files = [e.path for e in Manifest.read(workspace).files] + ["manifest.json"]
    same_tree(workspace, path, files)
    Manifest.read(path).verify(path)  # byte-identical manifest.json, every file present
    # the version id is the sha256 of the stored manifest bytes, and names it forever
    _, digest = reg.resolve("tiny:v1")
    assert reg.store.read(manifest_key("tiny", digest)) is not None
    assert reg.pull(f"tiny@{digest}") == path


def test_same_workspace_twice_same_version(store_url, workspace):
    run("push", str(workspace), "tiny:v1")
    res = run("push", str(workspace), "tiny:v1")
    assert "nothing uploaded" in res.output
    reg = Registry(store_url)
    assert len(reg.log("tiny", "v1")) == 1
    res = run("push", str(workspace), "tiny:v2")
    assert "uploaded 0 blobs" in res.output
    assert reg.resolve("tiny:v1")[1] == reg.resolve("tiny:v2")[1]  # no parent on a fresh tag, same bytes


@pytest.mark.moto
def test_config_only_change_uploads_under_64k(store_url, workspace, clone_ws):
    reg = Registry(store_url)
    first = reg.push(workspace, "tiny:v1", show_progress=False)
    ws2 = clone_ws()
    text = (ws2 / "config.ini").read_text().replace("session_len = 4096", "session_len = 8192")
    (ws2 / "config.ini").write_text(text)
    Manifest.scan(ws2, provenance=Manifest.read(ws2).provenance).write(ws2)
    second = reg.push(ws2, "tiny:v1", show_progress=False)
    assert {b.path for b in second.uploaded} == {"config.ini", "manifest.json"}
    assert second.uploaded_bytes < 64 * 1024
    assert first.uploaded_bytes > 10 * second.uploaded_bytes
    v2 = reg.load("tiny", second.digest)
    assert v2.parent == first.digest and "session_len = 8192" in v2.config


def test_pull_rank_transfers_a_third_of_layer_bytes(store_url, workspace):
    from lmdepot.registry.pull import pull

    reg = Registry(store_url)
    reg.push(workspace, "tiny:v1", show_progress=False)
    res = pull(reg, "tiny:v1", rank=1, show_progress=False)
    files = Manifest.read(workspace).files
    layer_total = sum(e.size for e in files if e.layer is not None)
    layer_fetched = sum(b.size for b in res.fetched if b.layer is not None)
    assert abs(layer_fetched / layer_total - 1 / 3) < 0.02
    assert {b.rank for b in res.fetched} == {None, 1}
    present = sorted(p.relative_to(res.path).as_posix() for p in res.path.rglob("*") if p.is_file())
    assert present == sorted([e.path for e in files if e.rank in (None, 1)] + ["manifest.json"])
    Manifest.read(res.path).verify(res.path, entries=Manifest.read(res.path).for_rank(1))
    # a later full pull fetches only what rank 1 did not
    full = pull(reg, "tiny:v1", show_progress=False)
    assert {b.rank for b in full.fetched} == {0, 2}


def test_pull_cli_dst_and_bad_rank(store_url, workspace, tmp_path):
    run("push", str(workspace), "tiny:v1")
    dst = tmp_path / "out"
    res = run("pull", "tiny:v1", "--dst", str(dst))
    assert res.stdout.strip().endswith(str(dst))
    assert filecmp.cmp(workspace / "config.ini", dst / "config.ini", shallow=False)
    res = run("pull", "tiny:v1", "--rank", "7", ok=False)
    assert res.exit_code == 2 and "no rank 7" in res.output
    res = run("pull", "tiny:v1", "--dst", str(dst), ok=False)
    assert res.exit_code == 2 and "not an empty directory" in res.output


def test_pull_resumes_from_verified_blobs(store_url, workspace):
    from lmdepot.registry.pull import pull

    reg = Registry(store_url)
    reg.push(workspace, "tiny:v1", show_progress=False)
    first = pull(reg, "tiny:v1", rank=0, show_progress=False)
    # leftovers of a killed pull: a half-written temp file is ignored, verified blobs are reused
    blob = next(reg.cache_dir.joinpath("blobs").rglob("*"))
    (blob.parent / f".tmp.{blob.name}.999.deadbeef").write_bytes(b"partial")
    again = pull(reg, "tiny:v1", show_progress=False)
    assert not ({b.digest for b in again.fetched} & {b.digest for b in first.fetched})
    assert len(again.cached) == len({b.digest for b in first.fetched} | {b.digest for b in first.cached})


def test_tags_ls_log(store_url, workspace, clone_ws):
    unknown = run("tags", "tiny", ok=False)
    assert unknown.exit_code == 2 and unknown.output.strip() == f"error: tiny: no tags in {store_url}"
    run("push", str(workspace), "tiny:v1")
    run("tag", "tiny:v1", "prod")
    out = run("tags", "tiny").output
    assert "v1\tsha256:" in out and "prod\tsha256:" in out
    assert run("ls").output.strip() == "tiny\tprod, v1"
    log = [json.loads(line) for line in run("log", "tiny", "--json").output.splitlines()]
    assert [(e["tag"], e["action"], e["by"]) for e in log] == [("v1", "push", "tester@ci"), ("prod", "tag", "tester@ci")]
    run("rm", "tiny:prod")
    assert "prod" not in run("tags", "tiny").output
    out = run("log", "tiny:prod").output.splitlines()
    assert len(out) == 2 and "rm" in out[1] and "-> -" in out[1]


def test_push_refuses_inconsistent_workspace(store_url, clone_ws):
    ws = clone_ws()
    (ws / "weights" / "global.0.safetensors").write_bytes(b"changed after the manifest")
    res = run("push", str(ws), "tiny:v1", ok=False)
    assert res.exit_code == 2 and "global.0.safetensors" in res.output
    assert Registry(store_url).store.list("") == []  # not even the backend probe ran


def test_progress_bar_on_stderr(store_url, workspace, monkeypatch):
    monkeypatch.setenv("LMDEPOT_PROGRESS", "1")
    res = run("push", str(workspace), "tiny:v1")
    assert "push tiny:v1" in res.stderr


@pytest.mark.parametrize("cmd", ["push", "pull", "tags", "ls", "log", "tag", "rm", "verify", "gc", "diff", "audit"])
def test_every_command_has_help(cmd):
    res = run(cmd, "--help")
    assert "Usage:" in res.output


def test_api_errors_are_registry_errors(store_url):
    reg = Registry(store_url)
    with pytest.raises(RegistryError, match="no such tag"):
        reg.pull("tiny:nope")


def test_default_registry_and_cache_in_user_cache_dir(monkeypatch, tmp_path, workspace):
    from lmdepot.registry.core import default_cache_dir, default_registry_url

    monkeypatch.delenv("LMDEPOT_REGISTRY", raising=False)
    monkeypatch.delenv("LMDEPOT_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_registry_url() == str(tmp_path / "xdg" / "lmdepot" / "registry")
    assert default_cache_dir() == tmp_path / "xdg" / "lmdepot"
    run("push", str(workspace), "tiny:v1")
    assert (tmp_path / "xdg" / "lmdepot" / "registry" / "tags" / "tiny" / "v1.json").is_file()
    path = run("pull", "tiny:v1").stdout.strip()
    assert path.startswith(str(tmp_path / "xdg" / "lmdepot" / "snapshots" / "tiny"))


def test_registry_option_on_group_or_command(tmp_path, workspace, monkeypatch):
    monkeypatch.setenv("LMDEPOT_REGISTRY", f"file://{tmp_path}/from-env")  # the options win over it
    url = f"file://{tmp_path}/explicit"
    res = CliRunner().invoke(main, ["registry", "--registry", url, "push", str(workspace), "tiny:v1"])
    assert res.exit_code == 0, res.output
    assert run("tags", "tiny", "--registry", url).output.startswith("v1\tsha256:")
    assert (tmp_path / "explicit" / "tags" / "tiny" / "v1.json").is_file()
    assert not (tmp_path / "from-env").exists()
