"""Multi-node launch on the CPU: two gloo processes as two "nodes" (torchrun-style env://), each with
its own registry cache, pulling only its own rank's files of a tp=2 workspace from a file:// registry."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from lmdepot.registry import Registry
from lmdepot.runtime import tp
from lmdepot.runtime.errors import RuntimeLoadError
from lmdepot.runtime.llm import LLM
from lmdepot.runtime.sequence import SamplingParams

PROMPT = "w7 w8 w9 w10 w11"
GENERATE = ["generate", "--prompt", PROMPT, "--no-chat-template", "--temperature", "0", "--max-new-tokens", "8",
            "--cache-max-entry-count", "0.01"]


@pytest.fixture
def registry(tmp_path):
    return Registry(f"file://{tmp_path}/registry", cache_dir=tmp_path / "push-cache")


def launch(ref: str, tmp_path, registries: list[str], extra_env=(), args=GENERATE, world: int = 2):
    """Start one `lmdepot` process per rank with the torchrun environment; returns their results."""
    port = tp.free_port()
    procs = []
    for r in range(len(registries)):
        env = {**os.environ, "RANK": str(r), "LOCAL_RANK": "0", "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "LMDEPOT_REGISTRY": registries[r], "LMDEPOT_CACHE": str(tmp_path / f"node{r}"),
               "LMDEPOT_DEVICE": "cpu", "LMDEPOT_TP_TIMEOUT": "30", "OMP_NUM_THREADS": "1",
               "LMDEPOT_PROGRESS": "0", "PYTHONPATH": os.getcwd(), **dict(extra_env)}
        procs.append(subprocess.Popen([sys.executable, "-m", "lmdepot.cli", args[0], ref, *args[1:]], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return [(p.wait(timeout=120), *p.communicate()) for p in procs]


def cached_blobs(root) -> set[str]:
    return {"sha256:" + p.name for p in (root / "blobs" / "sha256").rglob("*") if p.is_file()}


def test_two_nodes_pull_their_own_rank_and_equal_tp1(tiny, registry, tmp_path):
    _, ws1 = tiny("qwen2")
    _, ws2 = tiny("qwen2", tp=2)
    registry.push(ws2, "tiny:tp2", show_progress=False)
    _, digest, version = registry.get("tiny:tp2")
    with LLM(ws1, dtype="fp32", num_kv_blocks=16, quiet=True) as llm:
        want = llm.generate(PROMPT, SamplingParams(max_tokens=8, temperature=0)).text

    results = launch("tiny:tp2", tmp_path, [registry.url] * 2)
    for r, (rc, out, err) in enumerate(results):
        assert rc == 0, (r, err)
        # one line per rank with the bytes it fetched: exactly its own files plus the shared ones
        line = re.search(rf"\[lmdepot\] rank {r} pulled tiny:tp2 \(sha256:\w+\): (\d+) files fetched \((\d+) bytes",
                         err)
        assert line, err
        own = {b.digest: b.size for b in version.for_rank(r)}
        assert (int(line[1]), int(line[2])) == (len(own), sum(own.values()))
        cache = tmp_path / f"node{r}"
        assert cached_blobs(cache) == set(own)
        snap = cache / "snapshots" / "tiny" / f"{digest.split(':')[1]}.rank{r}" / "weights"
        assert sorted(p.name for p in snap.iterdir()) == sorted(
            [f"global.{r}.safetensors"] + [f"layers.{i}.{r}.safetensors" for i in range(3)])
    assert results[0][1] == want + "\n" and len(want.split()) == 8
    assert results[1][1] == ""   # rank 1 only follows rank 0's steps


def one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if not line.startswith("[lmdepot]")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_world_size_differing_from_the_workspace_fails_on_every_rank(tiny, registry, tmp_path):
    _, ws1 = tiny("qwen2")
    registry.push(ws1, "tiny:tp1", show_progress=False)
    results = launch("tiny:tp1", tmp_path, [registry.url] * 2)
    for rc, out, err in results:
        assert rc == 2 and out == ""
        assert one_error_line(err) == ("error: WORLD_SIZE=2 but tiny:tp1 has tensor_para_size = 1;"
                                       " launch 1 ranks or re-convert with --tp 2")


def test_a_rank_that_cannot_pull_stops_every_rank(tiny, registry, tmp_path):
    _, ws2 = tiny("qwen2", tp=2)
    registry.push(ws2, "tiny:tp2", show_progress=False)
    empty = Registry(f"file://{tmp_path}/empty")   # node 1 sees a registry without the tag
    results = launch("tiny:tp2", tmp_path, [registry.url, empty.url])
    for rc, out, err in results:
        assert rc == 2 and out == ""
        assert one_error_line(err).startswith("error: rank 1: tiny:tp2: no such tag in file://")


LONE = """
from lmdepot.runtime import tp
from lmdepot.runtime.errors import RuntimeLoadError
launch = tp.launched()
print(launch.rank, launch.world_size, launch.local_rank)
try:
    tp.join_launched(launch, "cpu")
except RuntimeLoadError as exc:
    print(exc)
"""


def test_a_lone_rank_times_out_in_one_line():
    # In a process of its own: a failed rendezvous leaves torch.distributed's group counter behind.
    port = tp.free_port()
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "LMDEPOT_TP_TIMEOUT": "1", "PYTHONPATH": os.getcwd()}
    env.pop("LOCAL_RANK", None)
    start = time.monotonic()
    r = subprocess.run([sys.executable, "-c", LONE], env=env, capture_output=True, text=True, timeout=60)
    assert time.monotonic() - start < 30
    first, message = r.stdout.splitlines()
    assert first == "0 2 0"
    assert re.fullmatch(rf"rank 0: could not join the 2 ranks at 127\.0\.0\.1:{port} within"
                        r" LMDEPOT_TP_TIMEOUT=1 s \(.*\)", message), r.stdout + r.stderr


def test_an_incomplete_launch_environment_is_one_line(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RuntimeLoadError, match="WORLD_SIZE=2 is set but MASTER_ADDR"):
        tp.launched()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert tp.launched() is None   # a plain start: rank 0 spawns its own workers


def test_tp_differing_from_world_size_fails_before_joining(tiny, monkeypatch):
    _, ws2 = tiny("qwen2", tp=2)
    for k, v in {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(RuntimeLoadError, match=r"^--tp 4 differs from WORLD_SIZE=2; launch 4 ranks or drop --tp$"):
        LLM(ws2, tp=4, dtype="fp32", quiet=True)


IDLE = """
import sys, time
from lmdepot.runtime import tp
r, port = int(sys.argv[1]), int(sys.argv[2])
tp.init(r, 2, port)
if r == 0:
    time.sleep(6)   # an idle server: longer than LMDEPOT_TP_TIMEOUT
print(tp.broadcast_object({"step": 1} if r == 0 else None), flush=True)
tp.shutdown()
"""


def test_idle_workers_outlive_the_collective_timeout():
    """Workers wait for the next step on a group without a short timeout: an idle server keeps them."""
    port = tp.free_port()
    env = {**os.environ, "LMDEPOT_TP_TIMEOUT": "4", "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", IDLE, str(r), str(port)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0 and out == "{'step': 1}\n", err
