import pytest
import torch

from lmdepot.runtime.kernels.paged_decode_attention import paged_decode_attention, reference
from tests.kernels.conftest import DEVICE, DTYPES, poisoned


def _cache(num_blocks, page, hkv, d, dtype):
    return (torch.randn(num_blocks, page, hkv, d, device=DEVICE, dtype=dtype),
            torch.randn(num_blocks, page, hkv, d, device=DEVICE, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq, hkv", [(4, 4), (8, 2), (9, 3), (32, 8)])
@pytest.mark.parametrize("page", [16, 32])
@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_matches_reference(dtype, hq, hkv, page, num_splits):
    d, lens = 64, [1, page - 1, 3 * page + 5, 70]
    max_pages = max(-(-n // page) for n in lens)
    k_cache, v_cache = _cache(64, page, hkv, d, dtype)
    # Pages scattered over the pool, as the block manager hands them out.
    tables = torch.stack([torch.randperm(64)[:max_pages] for _ in lens]).to(torch.int32).to(DEVICE)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    q = torch.randn(len(lens), hq, d, device=DEVICE, dtype=dtype)
    out = poisoned(q.shape, dtype)
    y = paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, num_splits=num_splits, out=out)
    ref = reference(q, k_cache, v_cache, tables, seq_lens, d ** -0.5)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y, ref, rtol=tol, atol=tol)


def test_non_contiguous_head_dim_stride():
    """The cache may be a view, e.g. K and V halves of one (blocks, page, 2, Hkv, D) pool."""
    dtype = DTYPES[0]
    pool = torch.randn(8, 16, 2, 2, 32, device=DEVICE, dtype=dtype)
    k_cache, v_cache = pool[:, :, 0], pool[:, :, 1]
    q = torch.randn(2, 4, 32, device=DEVICE, dtype=dtype)
    tables = torch.tensor([[3, 5], [7, 1]], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([20, 9], dtype=torch.int32, device=DEVICE)
    y = paged_decode_attention(q, k_cache, v_cache, tables, lens)
    torch.testing.assert_close(y, reference(q, k_cache, v_cache, tables, lens, 32 ** -0.5), rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(DEVICE != "cuda", reason="real sizes need a GPU")
@pytest.mark.parametrize("batch, seq", [(1, 4096), (16, 1000), (64, 300)])
def test_real_size_llama3_gqa(batch, seq):
    page, hq, hkv, d = 64, 32, 8, 128
    pages = -(-seq // page)
    k_cache, v_cache = _cache(batch * pages + 3, page, hkv, d, torch.float16)
    tables = torch.randperm(batch * pages + 3, device=DEVICE)[: batch * pages].reshape(batch, pages).to(torch.int32)
    lens = torch.full((batch,), seq, dtype=torch.int32, device=DEVICE) - torch.arange(batch, device=DEVICE,
                                                                                    dtype=torch.int32) % 7
    q = torch.randn(batch, hq, d, device=DEVICE, dtype=torch.float16)
    y = paged_decode_attention(q, k_cache, v_cache, tables, lens)
    torch.testing.assert_close(y, reference(q, k_cache, v_cache, tables, lens, d ** -0.5), rtol=2e-2, atol=2e-2)
