import pytest
import torch

from lmdepot.runtime.kernels.prefill_attention import prefill_attention, reference
from tests.kernels.conftest import DEVICE, DTYPES, poisoned


def _batch(seqs, page, hq, hkv, d, dtype, gen):
    """seqs: [(q_len, ctx_len)]. Random caches with every sequence's pages scattered over the pool."""
    pages = [-(-n // page) for _, n in seqs]
    pool = sum(pages) + 3
    k_cache = torch.randn(pool, page, hkv, d, generator=gen).to(DEVICE, dtype)
    v_cache = torch.randn(pool, page, hkv, d, generator=gen).to(DEVICE, dtype)
    perm = torch.randperm(pool, generator=gen)
    tables = torch.zeros(len(seqs), max(pages), dtype=torch.int32)
    used = 0
    for i, p in enumerate(pages):
        tables[i, :p] = perm[used:used + p]
        used += p
    starts = torch.tensor([0] + [q for q, _ in seqs]).cumsum(0).to(torch.int32)
    lens = torch.tensor([n for _, n in seqs], dtype=torch.int32)
    q = torch.randn(int(starts[-1]), hq, d, generator=gen).to(DEVICE, dtype)
    return q, k_cache, v_cache, tables.to(DEVICE), starts.to(DEVICE), lens.to(DEVICE)


def _check(seqs, page, hq, hkv, d, dtype, window=0, config=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, kc, vc, tables, starts, lens = _batch(seqs, page, hq, hkv, d, dtype, gen)
    out = poisoned(q.shape, dtype)
    y = prefill_attention(q, kc, vc, tables, starts, lens, max(s for s, _ in seqs), sliding_window=window,
                          out=out, config=config)
    assert y.data_ptr() == out.data_ptr() and not y.isnan().any()
    ref = reference(q, kc, vc, tables, starts, lens, d ** -0.5, window)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y, ref, rtol=tol, atol=tol)


# Plain prefill (ctx == q), prefix hits (ctx > q, odd lengths), and decode rows (q = 1), in one batch.
MIXED = [(7, 7), (1, 23), (19, 40), (1, 1), (33, 33), (5, 70)]
SMALL = dict(block_m=16, block_n=16, num_warps=4, num_stages=1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page", [16, 32, 64])
@pytest.mark.parametrize("hq, hkv", [(4, 4), (4, 2), (8, 2), (8, 1)])
def test_mixed_batch_matches_reference(dtype, page, hq, hkv):
    _check(MIXED, page, hq, hkv, 64, dtype, config=SMALL)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_m, block_n", [(16, 32), (32, 16), (64, 64)])
def test_tile_sizes_and_head_dim_128(dtype, block_m, block_n):
    _check([(21, 50), (1, 9), (12, 12)], 16, 8, 2, 128, dtype,
           config=dict(block_m=block_m, block_n=block_n, num_warps=4, num_stages=1))


@pytest.mark.parametrize("window", [1, 8, 17, 40])
@pytest.mark.parametrize("page", [16, 32])
def test_sliding_window(window, page):
    # (40, 100) with window 40: some key tiles lie inside every row's window (the unmasked loop)
    _check([(30, 45), (1, 40), (9, 9), (3, 20), (40, 100)], page, 4, 2, 64, DTYPES[0], window=window, config=SMALL)


def test_non_power_of_two_group_and_default_config():
    """GQA group of 3 (rows of one tile span tokens unevenly) with the launcher's own tile choice."""
    _check([(11, 30), (1, 17)], 16, 6, 2, 64, DTYPES[0])


def test_cache_views_with_strides():
    """K and V halves of one (blocks, page, 2, Hkv, D) pool, q a slice of a wider qkv row."""
    dtype, gen = DTYPES[0], torch.Generator().manual_seed(1)
    pool = torch.randn(6, 16, 2, 2, 64, generator=gen).to(DEVICE, dtype)
    kc, vc = pool[:, :, 0], pool[:, :, 1]
    qkv = torch.randn(20, (4 + 2 + 2) * 64, generator=gen).to(DEVICE, dtype)
    q = qkv[:, :4 * 64].view(20, 4, 64)
    tables = torch.tensor([[4, 1, 0], [5, 2, 3]], dtype=torch.int32, device=DEVICE)
    starts = torch.tensor([0, 13, 20], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([40, 7], dtype=torch.int32, device=DEVICE)
    y = prefill_attention(q, kc, vc, tables, starts, lens, 13, config=SMALL)
    torch.testing.assert_close(y, reference(q, kc, vc, tables, starts, lens, 64 ** -0.5), rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(DEVICE != "cuda", reason="real sizes need a GPU")
@pytest.mark.parametrize("seqs", [[(2048, 2048)], [(512, 1536)] * 4, [(1, 3000)] * 16 + [(700, 900), (300, 300)]])
@pytest.mark.parametrize("window", [0, 1024])
def test_real_size_llama3_gqa(seqs, window):
    _check(seqs, 64, 32, 8, 128, torch.bfloat16, window=window)


@pytest.mark.parametrize("seqs, window, kernels", [
    ([(1, 23), (1, 40), (5, 70), (1, 9), (7, 7)], 0, ["decode", "prefill"]),   # 2 leading decodes: split
    ([(1, 23), (1, 40), (5, 70), (1, 9), (7, 7)], 30, ["prefill"]),            # the window cuts in
    ([(1, 23), (5, 70), (1, 40), (7, 7)], 0, ["prefill"]),                     # 1 leading decode: one launch
])
@pytest.mark.parametrize("dtype", DTYPES[:1])
def test_routing_splits_mixed_steps(monkeypatch, seqs, window, kernels, dtype):
    """ops/triton_ops routes a mixed step's leading decodes (at least MIXED_DECODES, 2 here) to the
    decode kernel and the rest to this one; the result equals the reference op's."""
    from lmdepot.runtime.context import Context, SeqSlice
    from lmdepot.runtime.kernels import paged_decode_attention as decode_mod
    from lmdepot.runtime.kernels import prefill_attention as prefill_mod
    from lmdepot.runtime.ops import triton_ops

    calls = []
    for mod, name, key in ((prefill_mod, "prefill_attention", "prefill"),
                           (decode_mod, "paged_decode_attention", "decode")):
        orig = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _o=orig, _k=key, **kw: calls.append(_k) or _o(*a, **kw))
    monkeypatch.setattr(triton_ops, "MIXED_DECODES", 2)
    q, kc, vc, tables, starts, lens = _batch(seqs, 16, 4, 2, 64, dtype, torch.Generator().manual_seed(3))
    slices = [SeqSlice(int(starts[i]), ql, n, tables[i].long()) for i, (ql, n) in enumerate(seqs)]
    ctx = Context(None, slices, 16, window, block_tables=tables, context_lens=lens, q_start_loc=starts,
                  max_q_len=max(ql for ql, _ in seqs), max_ctx_len=max(n for _, n in seqs),
                  leading_decodes=next(i for i, (ql, _) in enumerate(seqs) if ql != 1))
    y = triton_ops.paged_attention_kernel(q, None, None, kc, vc, ctx, 64 ** -0.5)
    assert calls == kernels
    want = reference(q, kc, vc, tables, starts, lens, 64 ** -0.5, window)
    torch.testing.assert_close(y, want, rtol=2e-2, atol=2e-2)
