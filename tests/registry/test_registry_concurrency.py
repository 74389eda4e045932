"""Racing tag moves, killed pushes and concurrent pulls, with real processes and signals."""

from __future__ import annotations

import json
import os
import signal

import pytest
from regkit import cli_proc, needs_processes

from lmdepot.formats.manifest import Manifest
from lmdepot.registry import Registry, TagConflictError

RACERS = 16


def _versions(reg, workspace, clone_ws, n=2):
    """n distinct versions of tiny (tags v0..v{n-1}); their digests."""
    digests = [reg.push(workspace, "tiny:v0", show_progress=False).digest]
    for i in range(1, n):
        ws = clone_ws(f"ws{i}")
        (ws / "tokenizer" / "tokenizer.json").write_text(f'{{"rev": {i}}}\n')
        Manifest.scan(ws, provenance={"rev": i}).write(ws)
        digests.append(reg.push(ws, f"tiny:v{i}", show_progress=False).digest)
    return digests


def test_16_processes_moving_one_tag_lose_no_move(store_url, workspace, clone_ws):
    needs_processes(store_url)
    reg = Registry(store_url)
    digests = _versions(reg, workspace, clone_ws)
    procs = [cli_proc("tag", f"tiny@{digests[i % 2]}", "race", env={**os.environ, "LMDEPOT_USER": f"racer{i}"})
             for i in range(RACERS)]
    outs = [(p.wait(120), *p.communicate()) for p in procs]
    assert all(rc == 0 for rc, _, _ in outs), outs  # losers retried by themselves
    log = reg.log("tiny", "race")
    assert sorted(e["by"] for e in log) == sorted(f"racer{i}" for i in range(RACERS))
    assert [e["generation"] for e in sorted(log, key=lambda e: e["generation"])] == list(range(1, RACERS + 1))
    chain = sorted(log, key=lambda e: e["generation"])
    assert all(a["to"] == b["from"] for a, b in zip(chain, chain[1:]))  # each move saw the previous one
    assert reg.tags.resolve("tiny", "race").digest == chain[-1]["to"]
    assert reg.tags.list_tags("tiny")["race"] == chain[-1]["to"]


@pytest.mark.moto
def test_racing_cas_with_expect_has_exactly_one_winner_per_round(store_url, workspace, clone_ws):
    needs_processes(store_url)
    reg = Registry(store_url)
    digests = _versions(reg, workspace, clone_ws)
    for rnd in range(2):
        expect = reg.tags.resolve("tiny", "race").digest or "none"
        target = digests[(rnd + 1) % 2]
        procs = [cli_proc("tag", f"tiny@{target}", "race", "--expect", expect,
                          env={**os.environ, "LMDEPOT_USER": f"r{rnd}-{i}"}) for i in range(RACERS // 2)]
        outs = [(p.wait(120), *p.communicate()) for p in procs]
        winners = [o for o in outs if o[0] == 0]
        losers = [o for o in outs if o[0] != 0]
        assert len(winners) == 1, outs
        for rc, _, err in losers:
            assert rc == TagConflictError.exit_code and err.count("\n") == 1 and "retry" in err, err
        log = reg.log("tiny", "race")
        assert len(log) == rnd + 1 and log[-1]["to"] == target
        assert reg.tags.resolve("tiny", "race").digest == target


def _paused_push(ws, ref, point):
    proc = cli_proc("push", str(ws), ref, stdin=-1, env={**os.environ, "LMDEPOT_TEST_PUSH_PAUSE": point})
    for line in proc.stderr:
        if line.startswith("paused at"):
            return proc
    pytest.fail(f"push never reached {point}: rc={proc.wait()} {proc.stdout.read()}")


@pytest.mark.parametrize("point,sig", [("blobs", signal.SIGKILL), ("manifest", signal.SIGTERM)])
def test_killed_push_leaves_no_visible_version(store_url, workspace, clone_ws, point, sig):
    needs_processes(store_url)
    reg = Registry(store_url)
    reg.push(workspace, "tiny:v1", show_progress=False)
    before = (reg.ls(), reg.log("tiny"))
    ws = clone_ws()
    (ws / "tokenizer" / "tokenizer.json").write_text('{"new": true}\n')
    Manifest.scan(ws, provenance={"rev": 2}).write(ws)
    for ref in ("tiny:v1", "other:v1"):
        proc = _paused_push(ws, ref, point)
        proc.send_signal(sig)
        assert proc.wait(30) != 0
        proc.stdout.close(), proc.stderr.close(), proc.stdin.close()
    assert (reg.ls(), reg.log("tiny")) == before
    assert reg.log("other") == [] and Registry(store_url).tags.list_tags("other") == {}
    # the interrupted work is garbage: gc with no grace reclaims it, then a retried push succeeds
    reg.gc(grace_s=0)
    assert reg.verify("tiny:v1")
    res = reg.push(ws, "tiny:v1", show_progress=False)
    assert reg.pull("tiny:v1").joinpath("tokenizer/tokenizer.json").read_text() == '{"new": true}\n'
    assert res.uploaded


def test_two_processes_pulling_one_tag_both_get_correct_bytes(store_url, workspace):
    needs_processes(store_url)
    reg = Registry(store_url)
    reg.push(workspace, "tiny:v1", show_progress=False)
    procs = [cli_proc("pull", "tiny:v1") for _ in range(2)]
    outs = [(p.wait(120), *p.communicate()) for p in procs]
    assert [o[0] for o in outs] == [0, 0], outs
    paths = {o[1].strip() for o in outs}
    assert len(paths) == 1
    path = paths.pop()
    Manifest.read(path).verify(path)
    for e in Manifest.read(workspace).files:
        assert (workspace / e.path).read_bytes() == open(os.path.join(path, e.path), "rb").read()
    assert not [p for p in reg.cache_dir.rglob(".tmp.*")]


def test_tag_log_lines_are_json(store_url, workspace):
    reg = Registry(store_url)
    reg.push(workspace, "tiny:v1", show_progress=False)
    raw = reg.store.read("history/tiny/v1/000000000001.json")
    e = json.loads(raw)
    assert e["from"] is None and e["to"].startswith("sha256:") and e["by"] == "tester@ci" and e["when"]
