"""Shared fixtures: tiny random HF checkpoints of every supported architecture, and SmolLM2 workspaces."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

# Kernels run on the CPU through Triton's interpreter; the flag must be set before any @triton.jit.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.tiny_models import ARCHS, make_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory: tiny_checkpoint(arch, **overrides) -> HF dir (cached per arguments for the session)."""
    made: dict[str, Path] = {}

    def make(arch: str, **overrides) -> Path:
        key = json.dumps([arch, overrides], sort_keys=True)
        if key not in made:
            made[key] = make_tiny_checkpoint(tmp_path_factory.mktemp(f"hf-{arch}"), arch, **overrides)
        return made[key]

    return make


@pytest.fixture(scope="session")
def smollm2_ws(tmp_path_factory):
    """SmolLM2-135M converted with tp=1 and tp=3 (converted once per session)."""
    from lmdepot.convert.converter import ConvertOptions, convert_model

    root = tmp_path_factory.mktemp("smollm2")
    out = {}
    for tp in (1, 3):
        convert_model("smollm2-135m", root / f"tp{tp}", ConvertOptions(tp=tp))
        out[tp] = root / f"tp{tp}"
    return out


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


__all__ = ["ARCHS"]
