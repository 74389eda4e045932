"""The engine on the CPU with the attention kernels run by Triton's interpreter (the GPU routing of
ops/triton_ops.py without the device check) against the reference ops."""

import pytest
import torch

from lmdepot.convert.converter import ConvertOptions, convert_model
from lmdepot.runtime.kernels import paged_decode_attention as decode_mod
from lmdepot.runtime.kernels import prefill_attention as prefill_mod
from lmdepot.runtime.kernels import rope_store_kv as rope_mod
from lmdepot.runtime.ops import triton_ops
from tests.kernels.attention_engine import check_kernels_follow_reference
from tests.tiny_models import make_tiny_checkpoint

VOCAB = 250


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU runs tests/runtime/test_gpu.py instead")
@pytest.mark.parametrize("arch, extra", [("llama", {}), ("mistral", {"sliding_window": 20})])
def test_engine_with_kernels_follows_reference(tmp_path, monkeypatch, arch, extra):
    # head_dim 32, GQA 2 (Mistral: a window shorter than the prompts, so it really cuts in)
    hf = make_tiny_checkpoint(tmp_path / "hf", arch, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                              **extra)
    convert_model(str(hf), tmp_path / "ws", ConvertOptions())
    calls = {"prefill": 0, "decode": 0, "rope": 0, "split": 0}
    monkeypatch.setattr(triton_ops, "MIXED_DECODES", 1)   # mixed steps with a leading decode split (split_mixed)

    def counted(fn, key):
        def wrapper(*a, **kw):
            calls[key] += 1
            return fn(*a, **kw)
        return wrapper

    monkeypatch.setattr(prefill_mod, "prefill_attention", counted(prefill_mod.prefill_attention, "prefill"))
    monkeypatch.setattr(triton_ops, "split_mixed", counted(triton_ops.split_mixed, "split"))
    monkeypatch.setattr(decode_mod, "paged_decode_attention", counted(decode_mod.paged_decode_attention, "decode"))
    monkeypatch.setattr(rope_mod, "rope_store_kv", counted(rope_mod.rope_store_kv, "rope"))
    steps, hits = check_kernels_follow_reference(
        tmp_path / "ws", "cpu", {"rope_store_kv": triton_ops.rope_store_kv_kernel,
                                 "paged_attention": triton_ops.paged_attention_kernel}, VOCAB)
    assert hits == 4                              # 2 prompts of the batch reuse 2 full shared pages each
    assert any(len(s) > 1 and max(s) > 1 and min(s) == 1 for s in steps)  # prefill chunks beside decodes
    # decode-only steps take the split-K kernel, except where Mistral's window cuts in
    assert calls["prefill"] > 0 and calls["rope"] > 0 and (calls["decode"] > 0) == (arch == "llama")
    assert (calls["split"] > 0) == (arch == "llama")   # a mixed step led by decodes, in two launches
