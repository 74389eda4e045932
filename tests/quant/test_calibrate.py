"""`lite calibrate` statistics against a float64 forward of the full HF model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmdepot.convert.calib_data import CalibParams, calibration_tokens, encoder_for
from lmdepot.convert.calibrate import CalibStats, calibrate


def _reference(hf_dir, tokens):
    """float64 HF forward: inputs of layer 1's q_proj and down_proj, and the post-RoPE KV cache."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float64)
    seen = {}
    layer = model.model.layers[1]
    layer.self_attn.q_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("attn_in", a[0]))
    layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("down_in", a[0]))
    with torch.no_grad():
        out = model(tokens, use_cache=True)
    cache = out.past_key_values
    return seen, cache.layers[1].keys, cache.layers[1].values  # (n, kv_heads, T, d)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "internlm2"])
def test_stats_equal_a_float64_forward(tiny_checkpoint, calib_txt, tmp_path, arch):
    hf = tiny_checkpoint(arch)
    params = CalibParams(str(calib_txt(400)), samples=3, seqlen=32)
    calibrate(str(hf), tmp_path / "calib", params, device=torch.device("cpu"))
    stats = CalibStats(tmp_path / "calib")

    tokens, _ = calibration_tokens(encoder_for(hf), params)
    # InternLM2 has no transformers class; its fixture carries the equivalent Llama checkpoint.
    seen, keys, values = _reference(hf / "reference" if arch == "internlm2" else hf, tokens)

    x = seen["attn_in"].reshape(-1, seen["attn_in"].shape[-1])
    np.testing.assert_allclose(stats["attn_in/max"][1], x.amax(0).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stats["attn_in/min"][1], x.amin(0).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stats["attn_in/mean"][1], x.mean(0).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stats["attn_in/absmean"][1], x.abs().mean(0).numpy(), rtol=1e-4, atol=1e-5)
    d = seen["down_in"].reshape(-1, seen["down_in"].shape[-1])
    np.testing.assert_allclose(stats["down_in/absmax"][1], d.abs().amax(0).numpy(), rtol=1e-4, atol=1e-5)
    k_absmax = keys.abs().amax(dim=(0, 2))  # (kv_heads, d)
    np.testing.assert_allclose(stats["key/absmax"][1], k_absmax.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stats["value/min"][1], values.amin(dim=(0, 2)).numpy(), rtol=1e-4, atol=1e-5)
    assert stats["key/max"].shape == (2, 4, 8) and stats["o_in/mean"].shape == (2, 64)
    assert stats.attrs["calib"] == {"dataset": "calib.txt", "samples": 3, "seqlen": 32,
                                    "text_sha256": stats.attrs["calib"]["text_sha256"]}
    assert (stats.attrs["num_layer"], stats.attrs["kv_head_num"]) == (2, 4)
