"""Registry refs go through lmdepot.registry.Registry and pull one rank only."""

import shutil
from pathlib import Path

import pytest

import lmdepot.registry
from lmdepot.formats.manifest import Manifest
from lmdepot.runtime.errors import RuntimeLoadError
from lmdepot.runtime.llm import LLM
from lmdepot.runtime.loader import is_ref, resolve_workspace
from lmdepot.runtime.sequence import SamplingParams


class FakeRegistry:
    """Stands in for the registry client: `pull` copies the rank's files of a known workspace."""

    calls = []
    known: dict = {}

    def __init__(self, url=None):
        self.url = url

    def pull(self, ref, rank=0):
        FakeRegistry.calls.append((self.url, ref, rank))
        if ref not in self.known:
            raise FileNotFoundError(f"no tag {ref}")
        src, dst = self.known[ref]
        for e in Manifest.read(src).for_rank(rank):
            (dst / e.path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / e.path, dst / e.path)
        shutil.copyfile(src / "manifest.json", dst / "manifest.json")
        return str(dst)


@pytest.fixture
def registry(monkeypatch):
    monkeypatch.setattr(lmdepot.registry, "Registry", FakeRegistry, raising=False)
    monkeypatch.setenv("LMDEPOT_REGISTRY", "file:///fake")
    FakeRegistry.calls, FakeRegistry.known = [], {}
    return FakeRegistry


def test_ref_syntax():
    assert is_ref("tiny:v1") and is_ref("org/model@sha256:" + "a" * 64)
    assert not is_ref("tiny") and not is_ref("tiny@sha256:abc")


def test_ref_is_pulled_for_rank_0_and_served(tiny, registry, tmp_path):
    _, ws = tiny("qwen2", tp=2)
    registry.known["tiny:v1"] = (Path(ws), tmp_path / "pulled")
    path = resolve_workspace("tiny:v1", rank=0)
    assert registry.calls == [("file:///fake", "tiny:v1", 0)]
    assert not list(path.glob("weights/*.1.safetensors"))   # rank 1's files never came


def test_llm_from_ref_matches_the_directory(tiny, registry, tmp_path):
    _, ws = tiny("llama")
    registry.known["tiny:v1"] = (Path(ws), tmp_path / "pulled")
    outs = []
    for source in (ws, "tiny:v1"):
        llm = LLM(source, dtype="fp32", num_kv_blocks=8, quiet=True)
        try:
            outs.append(llm.generate([5, 6, 7, 8], SamplingParams(max_tokens=6, temperature=0)).token_ids)
        finally:
            llm.close()
    assert outs[0] == outs[1]


def test_unknown_tag_is_a_clear_error(registry):
    with pytest.raises(RuntimeLoadError, match="tiny:nope: not found in the registry"):
        resolve_workspace("tiny:nope")


def test_not_a_dir_nor_a_ref():
    with pytest.raises(RuntimeLoadError, match="no such workspace directory, and not a registry ref"):
        resolve_workspace("/nonexistent/ws")
