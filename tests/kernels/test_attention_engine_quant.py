"""The engine over an int8 / int4 KV cache with the quantized attention kernels run by Triton's
interpreter (ops/triton_ops' routing without the device check) against the reference ops."""

import pytest
import torch

from lmdepot.convert.converter import ConvertOptions, convert_model
from lmdepot.runtime.kernels import paged_decode_attention_quant as decode_mod
from lmdepot.runtime.kernels import prefill_attention_quant as prefill_mod
from lmdepot.runtime.ops import triton_ops
from tests.kernels.attention_engine import check_kernels_follow_reference
from tests.tiny_models import make_tiny_checkpoint

VOCAB = 250


def _count(monkeypatch, mod, name, calls, key):
    orig = getattr(mod, name)

    def wrapper(*a, **kw):
        calls[key] += 1
        return orig(*a, **kw)
    monkeypatch.setattr(mod, name, wrapper)


def _workspace_and_counted_kernels(tmp_path, monkeypatch, hidden_size: int) -> dict:
    """A tiny GQA-2 llama workspace at tmp_path/ws; the returned dict counts the quantized prefill and
    decode kernel launches. Mixed steps give their leading decodes to the decode kernel (split_mixed)."""
    hf = make_tiny_checkpoint(tmp_path / "hf", "llama", hidden_size=hidden_size, num_attention_heads=4,
                              num_key_value_heads=2)
    convert_model(str(hf), tmp_path / "ws", ConvertOptions())
    calls = {"prefill": 0, "decode": 0}
    monkeypatch.setattr(triton_ops, "MIXED_DECODES", 1)   # every mixed step with a leading decode splits
    _count(monkeypatch, prefill_mod, "prefill_attention_quant", calls, "prefill")
    _count(monkeypatch, decode_mod, "paged_decode_attention_quant", calls, "decode")
    return calls


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the GPU-ops test below runs instead")
@pytest.mark.parametrize("quant_policy, scheme", [(8, None), (4, None), (4, "rotate")])
def test_engine_with_quant_kernels_follows_reference(tmp_path, monkeypatch, quant_policy, scheme):
    # head_dim 32, GQA 2; int4's default scheme is per-channel keys (the sink row, block requantizing)
    calls = _workspace_and_counted_kernels(tmp_path, monkeypatch, hidden_size=128)
    steps, hits = check_kernels_follow_reference(
        tmp_path / "ws", "cpu", {"paged_attention_quant": triton_ops.paged_attention_quant_kernel}, VOCAB,
        engine_kw=dict(quant_policy=quant_policy, kv_scheme=scheme))
    assert hits == 4                              # 2 prompts of the batch reuse 2 full shared pages each
    assert any(len(s) > 1 and max(s) > 1 and min(s) == 1 for s in steps)  # prefill chunks beside decodes
    assert calls["prefill"] > 0 and calls["decode"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("quant_policy, scheme", [(8, None), (4, None), (4, "rotate")])
def test_engine_on_gpu_with_quant_kernels_follows_reference(tmp_path, monkeypatch, quant_policy, scheme):
    """The installed GPU ops (store kernels, decode-quant and prefill-quant attention) in a real engine,
    fp16, head_dim 64, against the reference ops; the prefill kernel really ran (no fallback)."""
    calls = _workspace_and_counted_kernels(tmp_path, monkeypatch, hidden_size=256)
    steps, hits = check_kernels_follow_reference(
        tmp_path / "ws", "cuda", {"store_kv_quant": triton_ops.store_kv_quant,
                                  "paged_attention_quant": triton_ops.paged_attention_quant}, VOCAB,
        engine_kw=dict(quant_policy=quant_policy, kv_scheme=scheme))
    assert hits == 4 and calls["prefill"] > 0 and calls["decode"] > 0
    assert False not in triton_ops._prefill_quant_state.values()   # no first launch failed
