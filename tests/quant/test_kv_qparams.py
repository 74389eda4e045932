"""`lite kv_qparams`: the exact scale / zero formulas, per-rank files read back, manifest update."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from lmdepot.cli import main
from lmdepot.convert.calib_data import CalibParams
from lmdepot.convert.calibrate import CalibStats, StatsWriter, calibrate
from lmdepot.convert.converter import ConvertOptions, convert_model
from lmdepot.convert.kv_qparams import kv_qparams
from lmdepot.formats import layout
from lmdepot.formats.config import WorkspaceConfig
from lmdepot.formats.kv_scales import read_kv_scales
from lmdepot.formats.manifest import Manifest


@pytest.fixture
def workspace(tiny_checkpoint, tmp_path):
    ws = tmp_path / "ws"
    convert_model(str(tiny_checkpoint("llama")), ws, ConvertOptions(tp=2))
    return ws


def _planted_stats(ws, tmp_path):
    """Statistics with known values: layer l, head h, channel c: key max = 1 + h + l + c/8,
    key min = -(h + 1) / 2, value in [-2, 6] except head 3 (absmax 10); key absmax = max(max, -min)."""
    cfg = WorkspaceConfig.read(ws / layout.CONFIG_FILE)
    writer = StatsWriter(tmp_path / "calib", cfg, {"calib": {"dataset": "planted"}})
    L, H, D = cfg.num_layer, cfg.kv_head_num, cfg.size_per_head
    for layer in range(L):
        kmax = 1 + np.arange(H)[:, None] + layer + np.arange(D)[None] / 8
        kmin = np.broadcast_to(-(np.arange(H)[:, None] + 1) / 2, (H, D))
        vmax, vmin = np.full((H, D), 6.0), np.full((H, D), -2.0)
        vmin[3, 2] = -10.0
        writer.write(layer, {"key/max": kmax, "key/min": kmin, "key/absmax": np.maximum(kmax, -kmin),
                             "value/max": vmax, "value/min": vmin, "value/absmax": np.maximum(vmax, -vmin)})
    writer.close()
    return tmp_path / "calib"


def test_asymmetric_8bit_formula_and_files(workspace, tmp_path):
    calib = _planted_stats(workspace, tmp_path)
    kv_qparams(calib, workspace, bits=8)
    # layer 1, head 2 (rank 1, row 0): key max over channels = 1 + 2 + 1 + 7/8, key min = -1.5
    k_max, k_min = 4.875, -1.5
    rows = read_kv_scales(workspace / layout.kv_scale_file(1, 1), 2)
    scale = (k_max - k_min) / 255
    np.testing.assert_allclose(rows[0], [scale, 1.5 / scale, 8 / 255, 2 / (8 / 255)], rtol=1e-6)
    # head 3 (rank 1, row 1): value min -10.
    np.testing.assert_allclose(rows[1, 2:], [16 / 255, 10 / (16 / 255)], rtol=1e-6)
    # The stored rule maps min to code 0 and max to 2^b - 1, and dequantizes them back.
    s, z = rows[0, 0], rows[0, 1]
    assert round(k_min / s + z) == 0 and round(k_max / s + z) == 255
    np.testing.assert_allclose([(0 - z) * s, (255 - z) * s], [k_min, k_max], rtol=1e-5)


def test_symmetric_4bit_formula(workspace, tmp_path):
    calib = _planted_stats(workspace, tmp_path)
    kv_qparams(calib, workspace, bits=4, sym=True)
    rows = read_kv_scales(workspace / layout.kv_scale_file(0, 0), 2)
    # layer 0 head 0: key absmax = 1 + 7/8; value absmax = 6; scale = absmax / 7, zero = 0
    np.testing.assert_allclose(rows[0], [1.875 / 7, 0, 6 / 7, 0], rtol=1e-6)
    assert WorkspaceConfig.read(workspace / layout.CONFIG_FILE).quant_policy == 4


def test_scales_from_a_real_calibration_and_the_manifest(tiny_checkpoint, calib_txt, workspace, tmp_path):
    calibrate(str(tiny_checkpoint("llama")), tmp_path / "calib", CalibParams(str(calib_txt(400)), 3, 32))
    before = Manifest.read(workspace)
    result = CliRunner().invoke(main, ["lite", "kv_qparams", str(tmp_path / "calib"), str(workspace)])
    assert result.exit_code == 0, result.output
    stats = CalibStats(tmp_path / "calib")
    for layer in range(2):
        k_hi, k_lo = stats["key/max"][layer].max(-1), stats["key/min"][layer].min(-1)
        v_hi, v_lo = stats["value/max"][layer].max(-1), stats["value/min"][layer].min(-1)
        expected = np.stack([(k_hi - k_lo) / 255, -k_lo * 255 / (k_hi - k_lo),
                             (v_hi - v_lo) / 255, -v_lo * 255 / (v_hi - v_lo)], axis=1)
        got = np.concatenate([read_kv_scales(workspace / layout.kv_scale_file(layer, r), 2) for r in range(2)])
        np.testing.assert_allclose(got, expected, rtol=1e-5)
    after = Manifest.read(workspace)
    after.verify(workspace)
    kv = {e.path: (e.layer, e.rank) for e in after.files if "past_kv_scale" in e.path}
    assert kv == {layout.kv_scale_file(i, r): (i, r) for i in range(2) for r in range(2)}
    assert after.provenance["kv_qparams"]["kv_bits"] == 8 and after.provenance["kv_qparams"]["kv_sym"] is False
    assert after.provenance["source"] == before.provenance["source"]
    unchanged = {e.path: e.sha256 for e in before.files if e.path != layout.CONFIG_FILE}
    assert all(after.entry(p).sha256 == h for p, h in unchanged.items())
