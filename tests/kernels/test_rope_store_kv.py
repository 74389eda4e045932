import pytest
import torch

from lmdepot.runtime.kernels.rope_store_kv import reference, rope_store_kv
from lmdepot.runtime.ops.reference import rope_cos_sin
from tests.kernels.conftest import DEVICE, DTYPES


def _inputs(T, hq, hkv, d, rot_dim, page, dtype, seed=0, blocks=8):
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(T, (hq + 2 * hkv) * d, generator=gen).to(DEVICE, dtype)   # the projection's output
    q, k, v = (x.view(T, n, d) for x, n in zip(qkv.split([hq * d, hkv * d, hkv * d], dim=-1), (hq, hkv, hkv)))
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot_dim, 2).float() / rot_dim))
    positions = torch.randint(0, 5000, (T,), generator=gen).to(DEVICE)
    cos, sin = rope_cos_sin(inv_freq, positions, dtype)
    slots = torch.randperm(blocks * page, generator=gen)[:T].to(DEVICE)
    if T > 2:
        slots[1] = -1   # a padding row: nothing stored
    caches = [torch.full((blocks, page, hkv, d), float("nan"), device=DEVICE, dtype=dtype) for _ in range(2)]
    return q, k, v, cos, sin, slots, caches


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq, hkv", [(4, 4), (8, 2), (8, 1), (12, 3)])
@pytest.mark.parametrize("d, rot_dim", [(64, 64), (128, 128), (64, 32), (128, 96)])
@pytest.mark.parametrize("page", [16, 64])
def test_matches_apply_rope_and_store_kv_exactly(dtype, hq, hkv, d, rot_dim, page):
    q, k, v, cos, sin, slots, (kc, vc) = _inputs(13, hq, hkv, d, rot_dim, page, dtype)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    q_ref, k_ref = reference(q.clone(), k.clone(), v, cos, sin, rot_dim, kc_ref, vc_ref, slots)
    q_out, k_out = rope_store_kv(q, k, v, cos, sin, rot_dim, kc, vc, slots)
    assert q_out.data_ptr() == q.data_ptr() and k_out.data_ptr() == k.data_ptr()   # rotated in place
    # Same ops in the same dtype and order as the reference: bit-identical, NaN (unwritten slots) included.
    torch.testing.assert_close(q_out, q_ref, rtol=0, atol=0)
    torch.testing.assert_close(k_out, k_ref, rtol=0, atol=0)
    torch.testing.assert_close(kc, kc_ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(vc, vc_ref, rtol=0, atol=0, equal_nan=True)
    assert kc.isnan().sum() == kc.numel() - 12 * hkv * d   # 12 tokens stored, the padding row not


def test_cache_views_with_strides():
    """K and V halves of one (blocks, page, 2, Hkv, D) pool."""
    dtype = DTYPES[0]
    q, k, v, cos, sin, slots, _ = _inputs(5, 4, 2, 64, 64, 16, dtype, seed=2, blocks=4)
    pool = torch.zeros(4, 16, 2, 2, 64, device=DEVICE, dtype=dtype)
    kc_ref, vc_ref = torch.zeros(4, 16, 2, 64, device=DEVICE, dtype=dtype), torch.zeros(4, 16, 2, 64, device=DEVICE,
                                                                                       dtype=dtype)
    q_ref, k_ref = reference(q.clone(), k.clone(), v, cos, sin, 64, kc_ref, vc_ref, slots)
    rope_store_kv(q, k, v, cos, sin, 64, pool[:, :, 0], pool[:, :, 1], slots)
    torch.testing.assert_close(pool[:, :, 0], kc_ref, rtol=0, atol=0)
    torch.testing.assert_close(pool[:, :, 1], vc_ref, rtol=0, atol=0)
    torch.testing.assert_close(q, q_ref, rtol=0, atol=0)


@pytest.mark.parametrize("d, rot_dim", [(128, 128), (64, 32)])
def test_rope_only_without_caches(d, rot_dim):
    """No caches (a quantized cache's prologue): q and k rotated in place, bit for bit, and v untouched."""
    q, k, v, cos, sin, slots, _ = _inputs(9, 8, 2, d, rot_dim, 16, DTYPES[0], seed=3)
    v_before = v.clone()
    q_ref, k_ref = reference(q.clone(), k.clone(), v, cos, sin, rot_dim, None, None, slots)
    q_out, k_out = rope_store_kv(q, k, v, cos, sin, rot_dim, None, None, slots)
    assert q_out.data_ptr() == q.data_ptr() and k_out.data_ptr() == k.data_ptr()
    torch.testing.assert_close(q_out, q_ref, rtol=0, atol=0)
    torch.testing.assert_close(k_out, k_ref, rtol=0, atol=0)
    assert torch.equal(v, v_before)


def test_empty_batch_is_a_no_op():
    q, k, v, cos, sin, slots, (kc, vc) = _inputs(0, 4, 2, 64, 64, 16, DTYPES[0])
    assert rope_store_kv(q, k, v, cos, sin, 64, kc, vc, slots)[0].shape == (0, 4, 64)


@pytest.mark.skipif(DEVICE != "cuda", reason="real sizes need a GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_real_size_llama3_exact(dtype):
    q, k, v, cos, sin, slots, (kc, vc) = _inputs(4096, 32, 8, 128, 128, 64, dtype, blocks=80)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    q_ref, k_ref = reference(q.clone(), k.clone(), v, cos, sin, 128, kc_ref, vc_ref, slots)
    rope_store_kv(q, k, v, cos, sin, 128, kc, vc, slots)
    for got, want in ((q, q_ref), (k, k_ref), (kc, kc_ref), (vc, vc_ref)):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
