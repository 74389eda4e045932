"""Registry refs go through lmdepot.registry.Registry and pull one rank only."""

import pytest

from lmdepot.errors import LmdepotError
from lmdepot.registry import Registry
from lmdepot.formats.manifest import Manifest
from lmdepot.runtime.errors import RuntimeLoadError
from lmdepot.runtime.llm import LLM
from lmdepot.runtime.loader import is_ref, resolve_workspace
from lmdepot.runtime.sequence import SamplingParams


@pytest.fixture
def registry(monkeypatch, tmp_path):
    """A real file:// registry; pulls land in a per-test cache."""
    url = f"file://{tmp_path}/registry"
    monkeypatch.setenv("LMDEPOT_REGISTRY", url)
    monkeypatch.setenv("LMDEPOT_CACHE", str(tmp_path / "cache"))
    return Registry(url, cache_dir=tmp_path / "cache")


def test_ref_syntax():
    assert is_ref("tiny:v1") and is_ref("org/model@sha256:" + "a" * 64)
    assert not is_ref("tiny") and not is_ref("tiny@sha256:abc")


def test_ref_is_pulled_for_rank_0_and_served(tiny, registry, tmp_path):
    _, ws = tiny("qwen2", tp=2)
    registry.push(ws, "tiny:v1")
    path = resolve_workspace("tiny:v1", rank=0)
    assert list(path.glob("weights/*.0.safetensors"))
    assert not list(path.glob("weights/*.1.safetensors"))   # rank 1's files never came
    Manifest.read(path).verify(path, Manifest.read(path).for_rank(0))


def test_llm_from_ref_matches_the_directory(tiny, registry, tmp_path):
    _, ws = tiny("llama")
    registry.push(ws, "tiny:v1")
    outs = []
    for source in (ws, "tiny:v1"):
        llm = LLM(source, dtype="fp32", num_kv_blocks=8, quiet=True)
        try:
            outs.append(llm.generate([5, 6, 7, 8], SamplingParams(max_tokens=6, temperature=0)).token_ids)
        finally:
            llm.close()
    assert outs[0] == outs[1]


def test_unknown_tag_is_a_clear_error(registry):
    with pytest.raises(LmdepotError, match="tiny:nope: no such tag"):
        resolve_workspace("tiny:nope")


def test_not_a_dir_nor_a_ref():
    with pytest.raises(RuntimeLoadError, match="no such workspace directory, and not a registry ref"):
        resolve_workspace("/nonexistent/ws")
