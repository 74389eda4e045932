"""Helpers shared by the registry tests: synthetic workspaces and CLI subprocesses.

A module of its own (not conftest) so that test files can import it by a name no other test
directory uses.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lmdepot.formats.config import WorkspaceConfig
from lmdepot.formats.kv_scales import write_kv_scales
from lmdepot.formats.layout import global_file, kv_scale_file, layer_file
from lmdepot.formats.manifest import Manifest
from lmdepot.formats.tensors import save_tensors

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
BUCKET = "lmdepot-test"
TP, LAYERS, KV_HEADS = 3, 4, 6


def make_workspace(root: Path, seed: int = 0, kv_shift: float = 0.0, tp: int = TP, layers: int = LAYERS,
                   **config_overrides) -> Path:
    """A small but well-formed workspace: config.ini, tokenizer, per-layer/rank weights, KV scales."""
    root.mkdir(parents=True, exist_ok=True)
    cfg = WorkspaceConfig(model_name="tiny", tensor_para_size=tp, head_num=12, kv_head_num=KV_HEADS,
                          size_per_head=8, hidden_units=96, vocab_size=192, num_layer=layers, inter_size=192,
                          rotary_embedding=8, quant_policy=8, **config_overrides)
    cfg.write(root / "config.ini")
    (root / "tokenizer").mkdir(exist_ok=True)
    (root / "tokenizer" / "tokenizer.json").write_text('{"model": {"type": "BPE"}}\n')
    (root / "weights").mkdir(exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for rank in range(tp):
        for layer in range(layers):
            save_tensors(root / layer_file(layer, rank), {
                "attention.w_qkv.weight": torch.randn(96, 64, generator=g).half(),
                "attention.wo.weight": torch.randn(32, 96, generator=g).half(),
                "feed_forward.w1.weight": torch.randn(96, 64, generator=g).half(),
                "feed_forward.w2.weight": torch.randn(64, 96, generator=g).half(),
                "attention_norm.weight": torch.ones(96).half(),
            })
            heads = KV_HEADS // tp
            params = np.stack([[0.01 * (layer + 1) + 0.001 * h + kv_shift, 0.0,
                                0.02 * (layer + 1) + 0.001 * h, 0.0] for h in range(heads)])
            write_kv_scales(root / kv_scale_file(layer, rank), params)
        save_tensors(root / global_file(rank), {"tok_embeddings.weight": torch.randn(64, 96, generator=g).half()})
    Manifest.scan(root, provenance={"source": "synthetic", "seed": seed}).write(root)
    return root


def needs_processes(url: str) -> None:
    if url.startswith("memory://"):
        pytest.skip("memory:// lives inside one process; this test needs several")


def cli_proc(*args, **kw) -> subprocess.Popen:
    """`lmdepot registry ARGS` as a real process (for concurrency and signals)."""
    return subprocess.Popen([PYTHON, "-m", "lmdepot.cli", "registry", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO, **kw)
