"""AWQ scale and clip search on planted outliers, and int4 workspaces that compute the float model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmdepot.convert import awq
from lmdepot.convert.arch import LayerTensors
from lmdepot.convert.awq_quantizer import AwqQuantizer, QuantParams
from lmdepot.convert.calib_data import CalibParams, calibration_tokens, encoder_for
from lmdepot.convert.calib_model import LayerRunner
from lmdepot.convert.converter import ConvertOptions, build_config, convert_model
from lmdepot.convert.linear import Linear
from lmdepot.convert.quant_groups import fake_quantize
from lmdepot.convert.source import open_source
from tests.quant.conftest import dequantized_layer


def _outlier_inputs():
    x = torch.randn(512, 128)
    x[:, [3, 50, 77, 100]] *= 30
    return x, torch.randn(128, 64) * 0.05


def test_scale_search_beats_rtn_on_outlier_channels():
    x, w = _outlier_inputs()
    ref = x @ w
    rtn = (x @ fake_quantize(w, 32) - ref).double().pow(2).mean().item()
    s, ratio, errors = awq.search_scales(x.abs().mean(0), [w], [1], 32, lambda eff: x @ eff[0], ref)
    assert len(errors) == 20 and errors[0] == pytest.approx(rtn, rel=1e-6)  # ratio 0 is RTN
    assert 0 < ratio < 1 and min(errors) < 0.4 * rtn
    # The chosen scales reproduce the reported error when applied the way the quantizer does.
    awq_err = ((x / s) @ fake_quantize(w * s[:, None], 32) - ref).double().pow(2).mean().item()
    assert awq_err == pytest.approx(min(errors), rel=1e-4)
    fixed = awq.fixed_scales(x.abs().amax(0), [w])
    assert ((x / fixed) @ fake_quantize(w * fixed[:, None], 32) - ref).pow(2).mean().item() < 0.5 * rtn


def test_clip_search_never_increases_the_error_and_only_shrinks():
    x, w = _outlier_inputs()
    w[5, :] *= 8  # an outlier weight row widens its groups' ranges
    ref = x @ w
    clipped = awq.search_clip(w, x, 32)
    assert (clipped.abs() <= w.abs() + 1e-7).all() and not torch.equal(clipped, w)
    before = (x @ fake_quantize(w, 32) - ref).pow(2).mean()
    after = (x @ fake_quantize(clipped, 32) - ref).pow(2).mean()
    assert after <= before


def _layer_from_merged(m: dict) -> LayerTensors:
    lin = (lambda n: Linear(m[n].t().contiguous(), bias=m.get(f"{n}_bias")))
    return LayerTensors((lin("q"), lin("k"), lin("v")), lin("o"), lin("gate"), lin("up"), lin("down"),
                        m["attn_norm"], m["ffn_norm"])


def _layer_errors(hf, ws, text, layers=(0, 1)) -> list[float]:
    """Relative output error of the workspace's dequantized layers against the float layers, each
    fed the float model's input of that layer (the calibration windows)."""
    src = open_source(str(hf))
    cfg = build_config(src, ConvertOptions())
    runner = LayerRunner(src, cfg, torch.device("cpu"))
    tokens, _ = calibration_tokens(encoder_for(hf), CalibParams(str(text), 4, 64))
    hidden, errors = runner.embed(tokens), []
    for i in layers:
        ref = runner.forward(runner.module(runner.layer_tensors(i)), hidden)
        out = runner.forward(runner.module(_layer_from_merged(dequantized_layer(ws, i))), hidden)
        errors.append(((out - ref).norm() / (ref - hidden).norm()).item())
        hidden = ref
    return errors


def _quantize(hf, dst, text, method, search, tp=2, g=32):
    q = AwqQuantizer(QuantParams(method, 4, g, search, CalibParams(str(text), 4, 64)), torch.device("cpu"))
    convert_model(str(hf), dst, ConvertOptions(tp=tp, quantizer=q))
    return q


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_awq_workspace_computes_the_float_layers(tiny_checkpoint, calib_txt, tmp_path, arch):
    """MHA (v -> o smoothing active), tp = 2: folded norms, smoothed and clipped int4 weights."""
    hf = tiny_checkpoint(arch, num_key_value_heads=8)
    text = calib_txt(2000)
    q = _quantize(hf, tmp_path / "ws", text, "awq", True)
    assert set(q.ratios[0]) == {"qkv", "vo", "gate_up", "down"}
    prov = json.loads((tmp_path / "ws" / "manifest.json").read_text())["provenance"]["quantization"]
    assert prov["method"] == "awq" and prov["group_size"] == 32 and prov["search_scale"] is True
    assert prov["calib"]["samples"] == 4 and prov["calib"]["seqlen"] == 64 and len(prov["calib"]["text_sha256"]) == 64
    errors = _layer_errors(hf, tmp_path / "ws", text)
    _quantize(hf, tmp_path / "rtn", text, "rtn", False)
    rtn = _layer_errors(hf, tmp_path / "rtn", text)
    # A folding mistake would give errors of order 1; 4-bit g32 on these random weights gives ~0.1.
    assert max(errors) < 0.15 and all(a < r for a, r in zip(errors, rtn)), (errors, rtn)


def test_awq_beats_rtn_on_a_model_with_outlier_channels(tiny_checkpoint, calib_txt, tmp_path):
    """Plant outlier channels in layer 0's input norm: the q/k/v inputs get a few huge channels."""
    base = tiny_checkpoint("llama")
    hf = tmp_path / "outliers"
    hf.mkdir()
    for p in base.iterdir():
        if p.is_file():
            (hf / p.name).write_bytes(p.read_bytes())
    sd = load_file(base / "model.safetensors")
    norm = sd["model.layers.0.input_layernorm.weight"].float()
    norm[[3, 17, 40]] *= 25
    sd["model.layers.0.input_layernorm.weight"] = norm.half()
    save_file(sd, hf / "model.safetensors")
    text = calib_txt(2000)
    _quantize(hf, tmp_path / "awq", text, "awq", True)
    _quantize(hf, tmp_path / "rtn", text, "rtn", False)
    awq_err, rtn_err = _layer_errors(hf, tmp_path / "awq", text, (0,))[0], _layer_errors(hf, tmp_path / "rtn", text, (0,))[0]
    assert awq_err < 0.8 * rtn_err, (awq_err, rtn_err)
