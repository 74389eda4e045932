"""Split-K decode attention over an int8 / int4 paged cache vs its torch reference (same dequantized
keys and values, float32 attention)."""

import pytest
import torch

from lmdepot.runtime.kernels.paged_decode_attention_quant import paged_decode_attention_quant, reference
from lmdepot.runtime.kv_cache import make_spec, allocate
from lmdepot.runtime.ops.kv_quant import store_kv_quant
from tests.kernels.conftest import DEVICE, DTYPES


def _filled_cache(spec, num_blocks, page, hkv, d, lens, tables):
    """A cache holding each sequence's tokens, written in two appends (the second one re-derives
    the per-channel key ranges of a partly filled block), like a prefill then decode steps."""
    cache = allocate(spec, num_blocks, page, hkv, d, device=DEVICE)
    for n, table in zip(lens, tables.long()):
        k = torch.randn(n, hkv, d, device=DEVICE)
        k[:, :, 3] += 8   # an offset outlier channel, like real keys
        v = torch.randn(n, hkv, d, device=DEVICE)
        slots = (table[:, None] * page + torch.arange(page, device=DEVICE)).reshape(-1)[:n]
        cut = n // 2 + 1
        store_kv_quant(k[:cut], v[:cut], cache, slots[:cut])
        if cut < n:
            store_kv_quant(k[cut:], v[cut:], cache, slots[cut:])
    return cache


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits, scheme", [(8, "plain"), (4, "plain"), (4, "rotate"), (4, "channel")])
@pytest.mark.parametrize("hq, hkv, num_splits", [(9, 3, None), (4, 4, 2)])
def test_matches_reference(dtype, bits, scheme, hq, hkv, num_splits):
    page, d, lens = 16, 32, [1, 15, 3 * 16 + 5]
    max_pages = max(-(-n // page) for n in lens)
    tables = torch.stack([torch.randperm(24)[:max_pages] for _ in lens]).to(torch.int32).to(DEVICE)
    spec = make_spec(bits, dtype, d, scheme=scheme)
    cache = _filled_cache(spec, 24, page, hkv, d, lens, tables)
    q = torch.randn(len(lens), hq, d, device=DEVICE, dtype=dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    y = paged_decode_attention_quant(q, cache, tables, seq_lens, num_splits=num_splits)
    ref = reference(q, cache, tables, seq_lens, d ** -0.5)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y, ref, rtol=tol, atol=tol)


def test_group_size_quantizers():
    """Per-token quantizers of 8 channels: each group reads its own scale and zero."""
    page, d, hkv = 16, 32, 2
    spec = make_spec(8, torch.float32, d, group=8)
    tables = torch.tensor([[2, 0, 5]], dtype=torch.int32, device=DEVICE)
    cache = _filled_cache(spec, 6, page, hkv, d, [40], tables)
    q = torch.randn(1, 4, d, device=DEVICE)
    lens = torch.tensor([40], dtype=torch.int32, device=DEVICE)
    torch.testing.assert_close(paged_decode_attention_quant(q, cache, tables, lens),
                               reference(q, cache, tables, lens, d ** -0.5), rtol=1e-4, atol=1e-4)
