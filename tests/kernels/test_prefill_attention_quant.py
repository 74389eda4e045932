"""Prefill/extend attention over an int8 / int4 paged cache vs its torch reference (the whole cache
dequantized, float32 attention): every online scheme, mixed prefill + decode batches with prefix
hits, odd lengths, GQA, sliding window."""

import pytest
import torch

from lmdepot.runtime.kernels.prefill_attention_quant import prefill_attention_quant, reference
from lmdepot.runtime.kv_cache import allocate, make_spec
from lmdepot.runtime.ops.kv_quant import store_kv_quant
from tests.kernels.conftest import DEVICE, DTYPES, poisoned

SCHEMES = [(8, "plain"), (4, "plain"), (4, "rotate"), (4, "channel")]
# Plain prefill (ctx == q), prefix hits / later chunks (ctx > q, odd lengths), decode rows (q = 1).
MIXED = [(7, 7), (1, 23), (19, 40), (1, 1), (5, 70)]
SMALL = dict(block_m=16, block_n=16, num_warps=4, num_stages=1)
NEW_KV = torch.empty(0, 2, 64)   # the ops' k/v arguments: only their kv head count is read (stored already)


def _batch(seqs, spec, page, hq, hkv, d, dtype, seed):
    """seqs: [(q_len, ctx_len)]. Each sequence's cached tokens are stored as the engine does: the
    cached part first, then the step's q_len new tokens (a second append re-derives the per-channel
    key ranges of a partly filled block); pages scattered over the pool."""
    gen = torch.Generator().manual_seed(seed)
    pages = [-(-n // page) for _, n in seqs]
    pool = sum(pages) + 3
    cache = allocate(spec, pool, page, hkv, d, device=DEVICE)
    perm = torch.randperm(pool, generator=gen)
    tables = torch.zeros(len(seqs), max(pages), dtype=torch.int64)
    used = 0
    for i, ((q_len, n), p) in enumerate(zip(seqs, pages)):
        tables[i, :p] = perm[used:used + p]
        used += p
        k = torch.randn(n, hkv, d, generator=gen)
        k[:, :, 3] += 8   # an offset outlier channel, like real keys
        v = torch.randn(n, hkv, d, generator=gen)
        slots = (tables[i, :p, None] * page + torch.arange(page)).reshape(-1)[:n]
        for a, b in ((0, n - q_len), (n - q_len, n)):
            if b > a:
                store_kv_quant(k[a:b].to(DEVICE), v[a:b].to(DEVICE), cache, slots[a:b].to(DEVICE))
    starts = torch.tensor([0] + [q for q, _ in seqs]).cumsum(0).to(torch.int32)
    lens = torch.tensor([n for _, n in seqs], dtype=torch.int32)
    q = torch.randn(int(starts[-1]), hq, d, generator=gen).to(DEVICE, dtype)
    return q, cache, tables.to(torch.int32).to(DEVICE), starts.to(DEVICE), lens.to(DEVICE)


def _check(seqs, bits, scheme, page, hq, hkv, d, dtype, window=0, config=SMALL, seed=0):
    spec = make_spec(bits, dtype, d, scheme=scheme)
    q, cache, tables, starts, lens = _batch(seqs, spec, page, hq, hkv, d, dtype, seed)
    out = poisoned(q.shape, dtype)
    y = prefill_attention_quant(q, cache, tables, starts, lens, max(s for s, _ in seqs), sliding_window=window,
                                out=out, config=config)
    assert y.data_ptr() == out.data_ptr() and not y.isnan().any()
    ref = reference(q, cache, tables, starts, lens, d ** -0.5, window)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("bits, scheme", SCHEMES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_mixed_batch_every_scheme(bits, scheme, dtype):
    _check(MIXED, bits, scheme, 16, 4, 2, 64, dtype, config=SMALL)


@pytest.mark.parametrize("bits, scheme", [(8, "plain"), (4, "channel")])
@pytest.mark.parametrize("page, hq, hkv", [(32, 4, 4), (64, 8, 2), (16, 6, 2)])
def test_pages_and_gqa(bits, scheme, page, hq, hkv):
    """Pages of 32/64 (tiles inside one page), GQA 1/4 and a group of 3 (rows span tokens unevenly)."""
    _check([(1, 40), (13, 75), (6, 6)], bits, scheme, page, hq, hkv, 64, DTYPES[0], seed=page)


@pytest.mark.parametrize("bits, scheme", [(8, "plain"), (4, "channel")])
@pytest.mark.parametrize("page", [16, 48])
def test_tiles_stay_in_one_block(bits, scheme, page):
    """64-key tiles asked for over pages of 16 and 48 keys: tiles shrink to the page's largest
    power-of-two divisor (16), so each uses one block's channel ranges and sink row."""
    _check([(20, 70), (1, 33), (9, 9)], bits, scheme, page, 4, 2, 64, DTYPES[0],
           config=dict(block_m=16, block_n=64, num_warps=4, num_stages=1), seed=page)


@pytest.mark.parametrize("bits, scheme", [(8, "plain"), (4, "rotate"), (4, "channel")])
def test_head_dim_128_and_tile_sizes(bits, scheme):
    _check([(21, 50), (1, 9)], bits, scheme, 16, 4, 2, 128, DTYPES[0],
           config=dict(block_m=32, block_n=16, num_warps=4, num_stages=1))


@pytest.mark.parametrize("bits, scheme", [(8, "plain"), (4, "channel")])
@pytest.mark.parametrize("window", [1, 17])
def test_sliding_window(bits, scheme, window):
    _check([(30, 45), (1, 40), (9, 9)], bits, scheme, 16, 4, 2, 64, DTYPES[0], window=window)


@pytest.mark.parametrize("d, group, error", [(64, 16, "got group 16"), (48, None, "head_dim 48 is not a power of two")])
def test_group_size_quantizers_and_odd_heads_are_refused(d, group, error):
    """The kernel applies one quantizer per token and head; groups of channels and head dims that are
    not a power of two (which the engine sends to the reference, triton_ops._kv_kernels_fit) are
    refused, not read wrongly."""
    spec = make_spec(8, DTYPES[0], d, group=group)
    q, cache, tables, starts, lens = _batch([(9, 30), (1, 17)], spec, 16, 4, 2, d, DTYPES[0], 3)
    with pytest.raises(ValueError, match=error):
        prefill_attention_quant(q, cache, tables, starts, lens, 9, config=SMALL)


@pytest.mark.skipif(DEVICE != "cuda", reason="real sizes need a GPU")
@pytest.mark.parametrize("bits, scheme", SCHEMES)
@pytest.mark.parametrize("seqs", [[(2048, 2048)], [(512, 1536)] * 2 + [(1, 3000)] * 8 + [(300, 300)]])
def test_real_size_llama3_gqa(bits, scheme, seqs):
    """Llama-3-8B attention shapes (32 q heads, 8 kv heads, head_dim 128, pages of 64), the launcher's
    own tile choice."""
    _check(seqs, bits, scheme, 64, 32, 8, 128, torch.bfloat16, config=None)


def _context(seqs, tables, starts, lens, page, window=0):
    from lmdepot.runtime.context import Context, SeqSlice

    slices = [SeqSlice(int(starts[i]), q, n, tables[i].long()) for i, (q, n) in enumerate(seqs)]
    lead = next((i for i, (q, _) in enumerate(seqs) if q != 1), len(seqs))   # as the runner counts them
    return Context(None, slices, page, window, block_tables=tables, context_lens=lens, q_start_loc=starts,
                   max_q_len=max(q for q, _ in seqs), max_ctx_len=max(n for _, n in seqs), leading_decodes=lead)


# Two decodes first, then a prefix hit, a decode and a fresh prompt: a mixed step split_mixed splits.
LEADING = [(1, 23), (1, 40), (5, 70), (1, 9), (7, 7)]


@pytest.mark.parametrize("seqs, window, launched, kernel", [
    (MIXED, 0, True, "prefill"),                  # prefill + extend + decode rows: one prefill-quant launch
    ([(1, 23), (1, 40)], 0, False, "decode"),     # decode-only: the split-K decode-quant kernel
    ([(1, 23), (1, 40)], 30, False, "prefill"),   # decode-only but the window cuts in: the prefill kernel
    (LEADING, 0, True, "decode,prefill"),         # mixed, 2 leading decodes (MIXED_DECODES = 2 here)
    (LEADING, 0, False, "prefill"),               # the same before the prefill kernel ever ran: one launch
    (LEADING, 30, True, "prefill"),               # the window cuts in: no decode kernel
])
def test_routing(monkeypatch, seqs, window, launched, kernel):
    """ops/triton_ops' routing (without its device check) picks the kernels and matches the reference op."""
    from lmdepot.runtime.kernels import paged_decode_attention_quant as decode_mod
    from lmdepot.runtime.kernels import prefill_attention_quant as prefill_mod
    from lmdepot.runtime.ops import reference as ref_ops
    from lmdepot.runtime.ops import triton_ops

    calls = []
    for mod, name in ((prefill_mod, "prefill_attention_quant"), (decode_mod, "paged_decode_attention_quant")):
        orig = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _o=orig, _n=name, **kw: calls.append(_n) or _o(*a, **kw))
    monkeypatch.setattr(triton_ops, "MIXED_DECODES", 2)
    spec = make_spec(4, DTYPES[0], 64)
    q, cache, tables, starts, lens = _batch(seqs, spec, 16, 4, 2, 64, DTYPES[0], 5)
    monkeypatch.setattr(triton_ops, "_prefill_quant_state", {(4, cache.key_channel, 64): True} if launched else {})
    ctx = _context(seqs, tables, starts, lens, 16, window)
    y = triton_ops.paged_attention_quant_kernel(q, NEW_KV, NEW_KV, cache, ctx, 64 ** -0.5)
    names = {"prefill": "prefill_attention_quant", "decode": "paged_decode_attention_quant"}
    assert calls == [names[k] for k in kernel.split(",")]
    want = ref_ops.paged_attention_quant(q, NEW_KV, NEW_KV, cache, ctx, 64 ** -0.5)
    torch.testing.assert_close(y, want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("bits, scheme", SCHEMES)
def test_split_mixed_every_scheme(monkeypatch, bits, scheme):
    """A mixed step split into the decode-quant and prefill-quant kernels (rotated values: both halves
    rotated back into the one output) equals the reference op."""
    from lmdepot.runtime.ops import reference as ref_ops
    from lmdepot.runtime.ops import triton_ops

    monkeypatch.setattr(triton_ops, "MIXED_DECODES", 2)
    spec = make_spec(bits, DTYPES[0], 64, scheme=scheme)
    q, cache, tables, starts, lens = _batch(LEADING, spec, 16, 4, 2, 64, DTYPES[0], 9)
    monkeypatch.setattr(triton_ops, "_prefill_quant_state", {(bits, cache.key_channel, 64): True})
    ctx = _context(LEADING, tables, starts, lens, 16)
    y = triton_ops.paged_attention_quant_kernel(q, NEW_KV, NEW_KV, cache, ctx, 64 ** -0.5)
    want = ref_ops.paged_attention_quant(q, NEW_KV, NEW_KV, cache, ctx, 64 ** -0.5)
    torch.testing.assert_close(y, want, rtol=2e-2, atol=2e-2)


def test_static_scales_stay_on_the_reference(monkeypatch):
    from lmdepot.runtime.ops import triton_ops

    spec = make_spec(8, DTYPES[0], 64, kv_scales="static")
    params = [(torch.full((2,), 0.05), torch.zeros(2)), (torch.full((2,), 0.05), torch.zeros(2))]
    cache = allocate(spec, 4, 16, 2, 64, static_params=params, device=DEVICE)
    seqs = [(5, 5)]
    tables = torch.tensor([[2]], dtype=torch.int32, device=DEVICE)
    ctx = _context(seqs, tables, torch.tensor([0, 5], dtype=torch.int32, device=DEVICE),
                   torch.tensor([5], dtype=torch.int32, device=DEVICE), 16)
    store_kv_quant(torch.randn(5, 2, 64, device=DEVICE), torch.randn(5, 2, 64, device=DEVICE), cache,
                   torch.arange(32, 37, device=DEVICE))
    monkeypatch.setattr(triton_ops, "_prefill_quant", lambda *a: pytest.fail("static scales reached the kernel"))
    q = torch.randn(5, 4, 64, device=DEVICE, dtype=DTYPES[0])
    y = triton_ops.paged_attention_quant_kernel(q, NEW_KV, NEW_KV, cache, ctx, 0.125)
    assert y.shape == q.shape and not y.isnan().any()


@pytest.mark.skipif(DEVICE != "cuda", reason="the safety net only guards CUDA launches")
@pytest.mark.parametrize("launched_before, error, falls_back", [
    (False, RuntimeError("no compile\nsecond line"), True),   # the first launch raises: anything
    (True, None, True),                                        # later: a Triton compile/resource error
    (True, RuntimeError("device-side assert"), False),         # later: a runtime error propagates
])
def test_failed_launch_warns_once_and_uses_the_reference(monkeypatch, launched_before, error, falls_back):
    from triton.runtime.errors import OutOfResources

    from lmdepot.runtime.kernels import prefill_attention_quant as prefill_mod
    from lmdepot.runtime.ops import reference as ref_ops
    from lmdepot.runtime.ops import triton_ops

    error = error or OutOfResources(300000, 232448, "shared memory")

    def broken(*a, **kw):
        raise error

    monkeypatch.setattr(prefill_mod, "prefill_attention_quant", broken)
    monkeypatch.setattr(triton_ops, "_prefill_quant_state", {(8, False, 64): True} if launched_before else {})
    spec = make_spec(8, torch.float16, 64)
    q, cache, tables, starts, lens = _batch(MIXED, spec, 16, 4, 2, 64, torch.float16, 7)
    ctx = _context(MIXED, tables, starts, lens, 16)
    if not falls_back:
        with pytest.raises(RuntimeError, match="device-side assert"):
            triton_ops.paged_attention_quant(q, NEW_KV, NEW_KV, cache, ctx, 0.125)
        return
    want = ref_ops.paged_attention_quant(q, NEW_KV, NEW_KV, cache, ctx, 0.125)
    with pytest.warns(UserWarning, match=rf"^prefill_attention_quant kernel failed \({type(error).__name__}: "):
        y = triton_ops.paged_attention_quant(q, NEW_KV, NEW_KV, cache, ctx, 0.125)
    torch.testing.assert_close(y, want)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")   # warned once: later steps go to the reference silently
        torch.testing.assert_close(triton_ops.paged_attention_quant(q, NEW_KV, NEW_KV, cache, ctx, 0.125), want)


def _sm90_build(bits: int, key_channel: bool) -> dict:
    """The kernel built for sm_90 (tests/kernels/sm90.py) at the launch's default config:
    Llama-3-8B attention (head dim 128, GQA 4, 8 kv heads), pages of 64, the launch's constexpr
    in-block strides; the block strides 16-divisible, as a launch specializes them."""
    from lmdepot.runtime.kernels import prefill_attention_quant as m
    from tests.kernels.sm90 import build

    cfg = m.default_config(128)
    row = 128 * bits // 8   # bytes of a cached row of codes
    const = dict(C_S=8 * row, C_H=row, P_S=8, P_H=1, GROUPS=4, PAGE=64, D=128, BLOCK_M=cfg["block_m"],
                 BLOCK_N=cfg["block_n"], BITS=bits, KEY_CHANNEL=key_channel)
    types = {"q_ptr": "*fp16", "o_ptr": "*fp16", "kc_ptr": "*u8", "vc_ptr": "*u8", "ks_ptr": "*fp16", "kz_ptr": "*u8",
             "vs_ptr": "*fp16", "vz_ptr": "*u8", "kmin_ptr": "*fp16", "ksink_ptr": "*fp16", "bt_ptr": "*i32",
             "qsl_ptr": "*i32", "lens_ptr": "*i32", "qk_scale": "fp32"}
    return build(m._kernel, const, types, cfg["num_warps"], cfg["num_stages"], divisible=("c_b", "p_b", "ch_b", "ch_h"))


@pytest.mark.parametrize("bits, key_channel", [(8, False), (4, False), (4, True)])
def test_default_tiles_do_not_spill_on_sm90(bits, key_channel):
    """Built for an H100/H200 (no GPU needed): the default tiles fit in registers, on tensor cores,
    with the code loads pipelined (cp.async, 16 bytes a load). The previous kernel, which dequantized
    each element with its own scale and zero, took 1203 SASS per 32 keys (int8) where this one takes
    615 per 64."""
    from tests.kernels.sm90 import run_build

    built = run_build(f"from tests.kernels.test_prefill_attention_quant import _sm90_build as f; "
                      f"f({bits}, {key_channel})")
    assert built["stack"] == 0 and built["mma"] and built["cp_async"] and built["loop_vec16"]
    # no wait inside the loops drains the pipeline (at 2-4 stages each did), within an H100's shared memory
    assert built["loop_waits"] and min(built["loop_waits"]) >= 1 and built["smem"] <= 227 * 1024, built
