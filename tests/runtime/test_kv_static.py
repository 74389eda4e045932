"""`--kv-scales static`: the workspace's scale files are read back and used; bad files are refused."""

import shutil

import numpy as np
import torch

from lmdepot.formats import layout
from lmdepot.formats.config import WorkspaceConfig
from lmdepot.formats.kv_scales import write_kv_scales
from lmdepot.formats.manifest import FileEntry, Manifest, sha256_file
from lmdepot.runtime.config import EngineConfig
from lmdepot.runtime.engine import Engine
from runtime_helpers import eval_ppl_error, prefill_logits


def with_scales(src, dst, heads: int, bits: int = 8):
    """A copy of workspace src with scale files of `heads` rows per layer (row h: distinct values)."""
    shutil.copytree(src, dst)
    cfg = WorkspaceConfig.read(dst / layout.CONFIG_FILE)
    m = Manifest.read(dst)
    files = {}
    for i in range(cfg.num_layer):
        rows = np.array([[0.004 * (h + 1), 128 - h, 0.002 * (h + 1), 127 + h] for h in range(heads)])
        write_kv_scales(dst / layout.kv_scale_file(i, 0), rows)
        files[layout.kv_scale_file(i, 0)] = i
    cfg.quant_policy = bits
    cfg.write(dst / layout.CONFIG_FILE)
    entries = [e for e in m.files if e.path != layout.CONFIG_FILE]
    for rel, layer in [*files.items(), (layout.CONFIG_FILE, None)]:
        entries.append(FileEntry(rel, (dst / rel).stat().st_size, sha256_file(dst / rel), layer,
                                 0 if layer is not None else None))
    Manifest(entries, m.provenance, m.format_version).write(dst)
    return dst


def test_static_scales_read_back_and_used(tiny, tmp_path):
    _, ws = tiny("llama")
    ws = with_scales(ws, tmp_path / "ws", heads=2)
    ids = [5, 9, 17, 33, 64, 100, 7, 8, 9, 10]
    caches = {}
    for scales in ("online", "static"):
        eng = Engine(ws, EngineConfig(quant_policy=8 if scales == "static" else 0, kv_scales=scales,
                                      dtype="fp32", num_kv_blocks=4, quiet=True))
        prefill_logits(eng, ids)
        att = eng.runner.model.layers[0].attention
        caches[scales] = att.kv_quant if scales == "static" else att.k_cache.view(-1, 2, 16)[:len(ids)].clone()
        eng.close()
    static = caches["static"]
    k_scale, k_zero = static.static_params[0]
    assert torch.equal(k_scale, torch.tensor([0.004, 0.008], dtype=torch.float32))
    assert torch.equal(k_zero, torch.tensor([128.0, 127.0]))
    assert static.scales == [] and static.codes[0].dtype == torch.uint8
    # layer 0's keys come from the embeddings alone, so both engines computed the same fp32 keys:
    # the static cache holds exactly round(k / scale + zero) of them
    k = caches["online"]
    want = torch.round(k / k_scale[:, None] + k_zero[:, None]).clamp(0, 255)
    assert torch.equal(static.codes[0].view(-1, 2, 16)[:len(ids)].float(), want)
    assert (want > 0).all() and (want < 255).all()   # in range: the test scales fit these keys


def test_head_count_mismatch_and_bits_mismatch(tiny, tmp_path):
    _, ws = tiny("llama")
    wrong = with_scales(ws, tmp_path / "wrong", heads=3)
    msg = eval_ppl_error(wrong, "--quant-policy", 8, "--kv-scales", "static")
    assert "past_kv_scale.0.weight: 48 bytes, expected 32 for 2 kv heads" in msg
    right = with_scales(ws, tmp_path / "right", heads=2, bits=8)
    assert "scales are for int8" in eval_ppl_error(right, "--quant-policy", 4, "--kv-scales", "static")
