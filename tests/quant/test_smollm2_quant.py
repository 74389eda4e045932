"""SmolLM2-135M end to end, once per session: calibrate, auto_awq g128 tp3 (per-rank padding of
the row-parallel wo: 192 rows = 1.5 groups), kv_qparams, inspect --verify."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lmdepot.cli import main
from lmdepot.convert.calibrate import CalibStats
from lmdepot.formats import layout
from lmdepot.formats.config import WorkspaceConfig
from lmdepot.formats.kv_scales import read_kv_scales
from lmdepot.formats.manifest import Manifest
from lmdepot.formats.tensors import load_tensors

CALIB = ["--calib-samples", "8", "--calib-seqlen", "256"]


@pytest.fixture(scope="session")
def smollm2_int4(tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2-int4")
    runs = [["calibrate", "smollm2-135m", *CALIB, "--work-dir", str(root / "calib")],
            ["auto_awq", "smollm2-135m", "--w-group-size", "128", "--tp", "3", *CALIB,
             "--dst-path", str(root / "ws"), "--work-dir", str(root / "calib-awq")],
            ["kv_qparams", str(root / "calib"), str(root / "ws")]]
    for args in runs:
        result = CliRunner().invoke(main, ["lite", *args])
        assert result.exit_code == 0, result.output
    return root


def test_int4_tp3_files_pad_each_rank_slice(smollm2_int4):
    ws = smollm2_int4 / "ws"
    cfg = WorkspaceConfig.read(ws / layout.CONFIG_FILE)
    assert (cfg.weight_type, cfg.group_size, cfg.tensor_para_size, cfg.quant_policy) == ("int4", 128, 3, 8)
    t = load_tensors(ws / layout.layer_file(4, 2))
    shapes = {k: tuple(v.shape) for k, v in t.items() if k.endswith(("qweight", "scales"))}
    assert shapes == {  # (padded rows / 8, out) and (groups, out) per rank
        "attention.w_qkv.qweight": (80, 320), "attention.w_qkv.scales": (5, 320),      # 576 -> 640 rows
        "attention.wo.qweight": (32, 576), "attention.wo.scales": (2, 576),            # 192 -> 256 rows
        "feed_forward.w1.qweight": (80, 512), "feed_forward.w3.scales": (5, 512),
        "feed_forward.w1.scales": (5, 512), "feed_forward.w3.qweight": (80, 512),
        "feed_forward.w2.qweight": (64, 576), "feed_forward.w2.scales": (4, 576)}      # 512 rows
    prov = Manifest.read(ws).provenance
    assert prov["quantization"]["calib"] | {"text_sha256": None} == {
        "dataset": "pydoc", "samples": 8, "seqlen": 256, "text_sha256": None}
    assert prov["quantization"]["method"] == "awq" and prov["kv_qparams"]["kv_bits"] == 8
    result = CliRunner().invoke(main, ["inspect", str(ws), "--verify"])
    assert result.exit_code == 0 and "verify: OK, all 187 digests match" in result.output, result.output


def test_auto_awq_statistics_equal_calibrate(smollm2_int4):
    a, b = CalibStats(smollm2_int4 / "calib"), CalibStats(smollm2_int4 / "calib-awq")
    assert a.attrs == b.attrs and a.attrs["num_layer"] == 30 and a.attrs["kv_head_num"] == 3
    for name in ("attn_in/absmax", "down_in/absmean", "key/max", "value/min"):
        np.testing.assert_allclose(a[name], b[name], rtol=1e-6)
    assert a["key/absmax"].shape == (30, 3, 64) and a["down_in/mean"].shape == (30, 1536)


def test_kv_scales_of_a_rank(smollm2_int4):
    stats = CalibStats(smollm2_int4 / "calib")
    rows = read_kv_scales(smollm2_int4 / "ws" / layout.kv_scale_file(17, 2), 1)  # kv head 2 of layer 17
    hi, lo = stats["key/max"][17, 2].max(), stats["key/min"][17, 2].min()
    np.testing.assert_allclose(rows[0, :2], [(hi - lo) / 255, -lo * 255 / (hi - lo)], rtol=1e-5)


def test_dequantized_layers_compute_the_float_layers(smollm2_int4):
    from lmdepot.convert.calib_data import CalibParams
    from lmdepot.convert.calibrate import load_tokens
    from lmdepot.convert.calib_model import LayerRunner
    from lmdepot.convert.converter import ConvertOptions, build_config
    from lmdepot.convert.source import open_source
    from tests.quant.conftest import dequantized_layer
    from tests.quant.test_awq import _layer_from_merged

    src = open_source("smollm2-135m")
    runner = LayerRunner(src, build_config(src, ConvertOptions()), torch.device("cpu"))
    tokens, _ = load_tokens(src, CalibParams("pydoc", 8, 256))
    hidden = runner.embed(tokens[:2])
    for i in (0, 1):
        ref = runner.forward(runner.module(runner.layer_tensors(i)), hidden)
        out = runner.forward(runner.module(_layer_from_merged(dequantized_layer(smollm2_int4 / "ws", i))), hidden)
        err = ((out - ref).norm() / (ref - hidden).norm()).item()
        assert err < 0.15, (i, err)  # measured: about 0.11 (RTN 0.10-0.11, searched AWQ 0.08)
        hidden = ref
