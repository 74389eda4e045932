"""W8A8 SmoothQuant: int8 per-channel weights, smoothing that keeps the float function, int8
workspaces the engine runs close to HF fp32, and `lite smooth_quant`'s bad-input refusals."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from lmdepot.cli import main
from lmdepot.convert import smooth_quant as sq
from lmdepot.convert.calib_data import CalibParams, calibration_tokens, encoder_for
from lmdepot.convert.calib_model import LayerRunner
from lmdepot.convert.converter import ConvertOptions, build_config, convert_model
from lmdepot.convert.source import open_source
from lmdepot.formats.config import WorkspaceConfig
from lmdepot.formats.int8 import dequantize_int8, quantize_int8
from lmdepot.formats.tensors import load_tensors


def test_int8_per_channel_round_trip_against_float64():
    w = torch.randn(96, 40) * torch.logspace(-3, 1, 40)  # columns of very different ranges
    w[:, 7] = 0.0                                           # an all-zero column
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and q.shape == (96, 40) and s.shape == (40,)
    w64 = w.double()
    s64 = w64.abs().amax(0) / 127
    torch.testing.assert_close(s.double()[s64 > 0], s64[s64 > 0], rtol=1e-7, atol=0)
    assert q.abs().max() <= 127 and (q[:, 7] == 0).all() and s[7] > 0
    # Every element within half a step (float32 division may land on the other side of a tie).
    err = (dequantize_int8(q, s).double() - w64).abs()
    assert (err <= s.double() * (0.5 + 1e-6)).all()
    # The largest element of every non-zero column is exactly representable: code ±127.
    assert (q.abs().amax(0)[s64 > 0] == 127).all()


def _tokens(hf, text, n=4, seqlen=64):
    return calibration_tokens(encoder_for(hf), CalibParams(str(text), n, seqlen))[0]


@pytest.mark.parametrize("kv_heads", [8, 4])  # MHA: v -> o smoothing applies; GQA: it is skipped
def test_smoothing_keeps_the_float_function(tiny_checkpoint, calib_txt, kv_heads):
    hf = tiny_checkpoint("qwen2", num_key_value_heads=kv_heads)  # qwen2: q/k/v biases are smoothed too
    src = open_source(str(hf))
    cfg = build_config(src, ConvertOptions())
    runner = LayerRunner(src, cfg, torch.device("cpu"))
    hidden = runner.embed(_tokens(hf, calib_txt(1000)))
    layer = runner.layer_tensors(0)
    # Strongly non-uniform statistics, so every scale differs from 1 by a lot.
    absmax = {"attn_in": torch.rand(cfg.hidden_units) * 50 + 0.1, "ffn_in": torch.rand(cfg.hidden_units) * 50 + 0.1,
              "o_in": torch.rand(cfg.q_size) * 50 + 0.1, "down_in": torch.rand(cfg.inter_size) * 50 + 0.1}
    smoothed = sq.smooth_layer(layer, absmax, 0.5)
    ref = runner.forward(runner.module(layer), hidden)
    out = runner.forward(runner.module(smoothed), hidden)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    changed = {n: not torch.equal(getattr(smoothed, n).weight, getattr(layer, n).weight) for n in ("o", "down")}
    assert changed == {"o": kv_heads == 8, "down": True}
    assert not torch.equal(smoothed.attn_norm, layer.attn_norm.float())


def _convert(hf, dst, text, tp=1, alpha=0.5):
    q = sq.SmoothQuantizer(CalibParams(str(text), 4, 64), alpha, torch.device("cpu"))
    convert_model(str(hf), dst, ConvertOptions(tp=tp, quantizer=q))
    return dst


@pytest.mark.parametrize("tp", [1, 2])
def test_w8a8_workspace_format_and_engine_logits(tiny_checkpoint, calib_txt, tmp_path, tp):
    from transformers import AutoModelForCausalLM

    from lmdepot.runtime.llm import LLM
    from tests.runtime.runtime_helpers import prefill_logits

    hf = tiny_checkpoint("llama", num_key_value_heads=8)
    ws = _convert(hf, tmp_path / "ws", calib_txt(1000), tp=tp)
    cfg = WorkspaceConfig.read(ws / "config.ini")
    assert cfg.weight_type == "int8" and cfg.group_size == 0 and cfg.tensor_para_size == tp
    t = load_tensors(ws / "weights" / "layers.0.0.safetensors")
    assert t["attention.w_qkv.qweight"].dtype == torch.int8 and t["attention.w_qkv.qweight"].shape == (64, 192 // tp)
    assert t["attention.w_qkv.scales"].dtype == torch.float32 and t["attention.w_qkv.scales"].shape == (192 // tp,)
    assert t["feed_forward.w2.qweight"].shape == (128 // tp, 64) and "attention.w_qkv.weight" not in t
    prov = json.loads((ws / "manifest.json").read_text())["provenance"]["quantization"]
    assert prov["method"] == "smooth_quant" and prov["alpha"] == 0.5 and prov["calib"]["samples"] == 4

    ids = torch.randint(3, 240, (48,), generator=torch.Generator().manual_seed(1)).tolist()
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0]
    llm = LLM(str(ws), dtype="fp32", num_kv_blocks=8, cache_block_seq_len=8, quiet=True)
    try:
        ours = prefill_logits(llm.engine, ids)
    finally:
        llm.close()
    # int8 weights and activations: each matmul's relative error is about step/sqrt(12) / rms, i.e. a
    # few 1e-3 on these Gaussian tensors; through two layers and the residual stream the logits stay
    # within 2 %. A missing scale or a wrong orientation gives errors of order 1.
    rel = float((ours - ref).norm() / ref.norm())
    assert rel < 0.02, rel
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def _lite_error(args):
    r = CliRunner().invoke(main, ["lite", *args])
    assert r.exit_code == 2, (r.output, r.exception)
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    return lines[0]


@pytest.mark.parametrize("flags,message", [
    (["--alpha", "1.5"], "--alpha 1.5: must be between 0 and 1"),
    (["--alpha", "-0.1"], "--alpha -0.1: must be between 0 and 1"),
    (["--tp", "3"], "--tp 3 does not divide the model's heads"),
    (["--calib-samples", "0"], "--calib-samples 0: expected a positive integer or 'auto'"),
])
def test_smooth_quant_refuses_bad_options(tiny_checkpoint, calib_txt, tmp_path, flags, message):
    args = ["smooth_quant", str(tiny_checkpoint("llama")), "--calib-dataset", str(calib_txt(400)),
            "--calib-samples", "2", "--calib-seqlen", "32", "--dst-path", str(tmp_path / "ws")]
    assert message in _lite_error(args + flags)
    assert not (tmp_path / "ws").exists()


def test_smooth_quant_refuses_an_architecture_without_a_smoothing_map(tiny_checkpoint, calib_txt, tmp_path,
                                                                       monkeypatch):
    monkeypatch.delitem(sq.SMOOTHING_MAPS, "MistralForCausalLM")
    args = ["smooth_quant", str(tiny_checkpoint("mistral")), "--calib-dataset", str(calib_txt(400)),
            "--calib-samples", "2", "--calib-seqlen", "32", "--dst-path", str(tmp_path / "ws")]
    assert _lite_error(args) == ("error: smooth_quant: no smoothing map for architecture MistralForCausalLM"
                                 " (known: LlamaForCausalLM, Qwen2ForCausalLM, InternLM2ForCausalLM)")
    assert not (tmp_path / "ws").exists()


def test_smooth_quant_cli_writes_a_workspace(tiny_checkpoint, calib_txt, tmp_path):
    r = CliRunner().invoke(main, ["lite", "smooth_quant", str(tiny_checkpoint("llama")), "--alpha", "0.8",
                                  "--calib-dataset", str(calib_txt(400)), "--calib-samples", "2",
                                  "--calib-seqlen", "32", "--dst-path", str(tmp_path / "ws")])
    assert r.exit_code == 0, r.output
    assert "W8A8 int8 (SmoothQuant, alpha 0.8)" in r.output
    assert WorkspaceConfig.read(tmp_path / "ws" / "config.ini").weight_type == "int8"


def _emulate_w8a8(ws, ids) -> torch.Tensor:
    """float64 forward of a tp=1 W8A8 workspace, written out from the format's definition: every
    linear's input quantized per token (symmetric, absmax/127, round half up), int8 x int8 summed
    exactly, scaled by the token's and the channel's scales."""
    import math

    cfg = WorkspaceConfig.read(ws / "config.ini")
    g = load_tensors(ws / "weights" / "global.0.safetensors")
    d, hq, hkv = cfg.size_per_head, cfg.head_num, cfg.kv_head_num

    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * w.double()

    def linear(t, name, x):
        amax = x.abs().amax(-1, keepdim=True).clamp(min=1e-8)
        xq = torch.floor(x * (127.0 / amax) + 0.5).clamp(-127, 127)
        y = (xq @ t[f"{name}.qweight"].double()) * (amax / 127) * t[f"{name}.scales"].double()
        b = t.get(f"{name}.bias")
        return y if b is None else y + b.double()

    T = len(ids)
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv
    cos, sin = torch.cat([ang, ang], -1).cos()[:, None], torch.cat([ang, ang], -1).sin()[:, None]
    rope = (lambda x: x * cos + torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1) * sin)
    h = g["tok_embeddings.weight"].double()[ids]
    for i in range(cfg.num_layer):
        t = load_tensors(ws / "weights" / f"layers.{i}.0.safetensors")
        q, k, v = linear(t, "attention.w_qkv", norm(h, t["attention_norm.weight"])).split(
            [hq * d, hkv * d, hkv * d], -1)
        q, k, v = rope(q.view(T, hq, d)), rope(k.view(T, hkv, d)), v.view(T, hkv, d)
        k, v = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
        s = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        o = torch.einsum("hqk,khd->qhd", s.softmax(-1), v).reshape(T, hq * d)
        h = h + linear(t, "attention.wo", o)
        x = norm(h, t["ffn_norm.weight"])
        gate, up = linear(t, "feed_forward.w1", x), linear(t, "feed_forward.w3", x)
        h = h + linear(t, "feed_forward.w2", torch.nn.functional.silu(gate) * up)
    return norm(h, g["norm.weight"]) @ g["output.weight"].double().t()


def test_w8a8_engine_equals_the_format_definition(tiny_checkpoint, calib_txt, tmp_path):
    """The engine (fp32) against a float64 emulation of the same int8 arithmetic: differences come
    only from fp32 rounding (and, rarely, a code rounded the other way at a tie), far below the
    quantization error itself (about 1e-2 against the float model)."""
    from lmdepot.runtime.llm import LLM
    from tests.runtime.runtime_helpers import prefill_logits

    ws = _convert(tiny_checkpoint("llama"), tmp_path / "ws", calib_txt(1000))
    ids = torch.randint(3, 240, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    llm = LLM(str(ws), dtype="fp32", num_kv_blocks=8, cache_block_seq_len=8, quiet=True)
    try:
        ours = prefill_logits(llm.engine, ids).double()
    finally:
        llm.close()
    ref = _emulate_w8a8(ws, ids)
    # Measured 2e-7; one activation code rounded the other way moves the logits by about 1e-5, and
    # leaving any one linear's input unquantized by about 1e-3.
    assert float((ours - ref).norm() / ref.norm()) < 1e-4


def test_config_refuses_a_group_size_with_int8():
    from lmdepot.errors import FormatError

    cfg = WorkspaceConfig(model_name="m", head_num=8, kv_head_num=8, size_per_head=8, hidden_units=64,
                          vocab_size=250, num_layer=2, inter_size=128, rotary_embedding=8, weight_type="int8",
                          group_size=128)
    with pytest.raises(FormatError, match="group_size = 128 must be 0 when weight_type = int8"):
        cfg.validate()
