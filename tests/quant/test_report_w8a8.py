"""`lite report`: the W8A8 rungs are built (SmoothQuant workspace) and measured like the others."""

from __future__ import annotations

import torch

from lmdepot.convert.calib_data import CalibParams
from lmdepot.eval.report import build_workspaces, format_table, rungs, run_ladder
from lmdepot.formats.config import WorkspaceConfig


def test_w8a8_rungs_in_the_ladder(tiny_checkpoint, calib_txt, tmp_path):
    ladder = rungs([32])
    assert [(r.name, r.workspace, r.quant_policy) for r in ladder[-2:]] == [
        ("W8A8 SmoothQuant", "w8a8", 0), ("W8A8 SmoothQuant + KV int8", "w8a8", 8)]
    text = calib_txt(3000)
    built = build_workspaces(str(tiny_checkpoint("llama")), tmp_path, [32], CalibParams(str(text), 4, 64), False,
                             torch.device("cpu"))
    assert WorkspaceConfig.read(built["w8a8"] / "config.ini").weight_type == "int8"
    picked = [ladder[0], *ladder[-2:]]
    out = run_ladder(built, picked, str(text), seqlen=64, samples=2, chunk=32)
    fp16, w8a8, w8a8_kv = (r.ppl for r in out)
    # int8 weights + activations on the tiny random model: within 3 % of the fp16 engine's perplexity.
    assert abs(w8a8 / fp16 - 1) < 0.03 and abs(w8a8_kv / fp16 - 1) < 0.03, (fp16, w8a8, w8a8_kv)
    assert out[1].weight_bytes < 0.7 * out[0].weight_bytes  # int8 linears: about half the fp16 bytes
    assert "| W8A8 SmoothQuant | " in format_table(out)
