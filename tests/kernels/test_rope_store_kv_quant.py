"""Rope fused with the quantized KV-cache write (kernels/rope_store_kv_quant.py, routed by
ops/triton_ops.rope_store_kv_quant_kernel) against
- the reference: ops.apply_rope on q and k, then ops/kv_quant.store_kv_quant;
- the unfused kernels: the same apply_rope, then the existing store kernels (kv_store_quant.py,
  kv_store_channel.py), which run the same quantizer code on the same rotated k.
Every cache tensor starts poisoned (the same garbage for each run) and is compared whole, so a
write to the wrong slot or a missing write shows up too."""

import pytest
import torch

from lmdepot.runtime.context import Context, reset_context, set_context
from lmdepot.runtime.kv_cache import allocate, make_spec
from lmdepot.runtime.ops import kv_quant
from lmdepot.runtime.ops import reference as ref_ops
from lmdepot.runtime.ops import triton_ops
from lmdepot.runtime.ops.kv_quant import unpack_int4
from tests.kernels.conftest import DEVICE, DTYPES


def _qkv(T, hq, hkv, d, dtype, gen):
    """q, k, v as views of one qkv projection output (row stride (hq + 2 hkv) d), with an outlier
    key channel, as real keys have."""
    qkv = torch.randn(T, (hq + 2 * hkv) * d, generator=gen)
    qkv[:, hq * d + 3:(hq + hkv) * d:d] = qkv[:, hq * d + 3:(hq + hkv) * d:d] * 6 + 9
    qkv = qkv.to(DEVICE, dtype)
    return (x.view(T, n, d) for x, n in zip(qkv.split([hq * d, hkv * d, hkv * d], dim=-1), (hq, hkv, hkv)))


def _cos_sin(positions, rot_dim, dtype):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot_dim, 2).float() / rot_dim))
    return ref_ops.rope_cos_sin(inv_freq, positions.to(DEVICE), dtype)


def _tensors(cache):
    names = ["codes0", "codes1", "scales1", "zeros1"]
    out = [cache.codes[0], cache.codes[1], cache.scales[1], cache.zeros[1]]
    if cache.key_channel:
        names += ["key_scale", "key_min", "key_sink"]
        out += [cache.key_scale, cache.key_min, cache.key_sink]
    else:
        names += ["scales0", "zeros0"]
        out += [cache.scales[0], cache.zeros[0]]
    return dict(zip(names, out))


def _poisoned_caches(spec, n, blocks, page, hkv, d, seed=7):
    caches = [allocate(spec, blocks, page, hkv, d, device=DEVICE) for _ in range(n)]
    gen = torch.Generator().manual_seed(seed)
    for name, t in _tensors(caches[0]).items():
        junk = (torch.randint(0, 256, t.shape, generator=gen, dtype=torch.uint8) if t.dtype == torch.uint8
                else torch.full(t.shape, float("nan"), dtype=t.dtype)).to(DEVICE)
        for c in caches:
            _tensors(c)[name].copy_(junk)
    return caches


def _assert_caches(got, want, exact: bool):
    """Scales, zeros, key ranges and sinks equal bit for bit (unwritten NaNs included). Codes too, unless
    not `exact`: Hadamard-rotated heads are summed in float32 in another order by the reference
    (a matmul) than by the kernel (tl.sum), and on the GPU the unfused store kernel may contract
    multiply-adds into FMAs where the fused one (FMA contraction off, for the exact rope) does not;
    a last-bit difference can move a value across a rounding tie: one code, rarely."""
    for name, a in _tensors(got).items():
        b = _tensors(want)[name]
        if not name.startswith("codes"):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=name)
            continue
        if got.bits == 4:
            a, b = unpack_int4(a), unpack_int4(b)
        diff = (a.int() - b.int()).abs()
        if exact:
            assert diff.max() == 0, name
        else:
            assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01, name


def _run_three_ways(q, k, v, cos, sin, rot_dim, caches, slots, ctx):
    """(fused, reference, unfused kernels) on three equal caches; checks the rotated q and k."""
    fused, ref, unfused = caches
    set_context(ctx)
    try:
        q_ref, k_ref = ref_ops.apply_rope(q, cos, sin, rot_dim), ref_ops.apply_rope(k, cos, sin, rot_dim)
        kv_quant.store_kv_quant(k_ref, v, ref, slots)
        triton_ops.store_kv_quant_kernel(k_ref, v, unfused, slots)
        q_out, k_out = triton_ops.rope_store_kv_quant_kernel(q, k, v, cos, sin, rot_dim, fused, slots)
    finally:
        reset_context()
    # rotated in place, bit-identical to apply_rope (the float kernel's rotation)
    assert q_out.data_ptr() == q.data_ptr() and k_out.data_ptr() == k.data_ptr()
    torch.testing.assert_close(q, q_ref, rtol=0, atol=0)
    torch.testing.assert_close(k, k_ref, rtol=0, atol=0)


# (hq, hkv, head_dim, rot_dim, page): MHA, GQA 4 with partial rotary, GQA 6 (a group that is not a
# power of two) with a single kv head
SHAPES = [(4, 4, 32, 32, 8), (8, 2, 64, 32, 16), (6, 1, 32, 32, 4)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits, scheme", [(8, "plain"), (4, "plain"), (8, "rotate"), (4, "rotate")])
@pytest.mark.parametrize("hq, hkv, d, rot_dim, page", SHAPES)
def test_per_token_schemes_match_rope_then_store(dtype, bits, scheme, hq, hkv, d, rot_dim, page):
    _check_per_token(dtype, bits, scheme, hq, hkv, d, rot_dim, page, T=13, blocks=6)


@pytest.mark.skipif(DEVICE != "cuda", reason="real sizes need a GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits, scheme", [(8, "plain"), (4, "rotate")])
def test_real_size_per_token_schemes(dtype, bits, scheme):
    _check_per_token(dtype, bits, scheme, 32, 8, 128, 128, 64, T=3000, blocks=64)


def _check_per_token(dtype, bits, scheme, hq, hkv, d, rot_dim, page, T, blocks):
    gen = torch.Generator().manual_seed(hq * d + bits)
    q, k, v = _qkv(T, hq, hkv, d, dtype, gen)
    cos, sin = _cos_sin(torch.randint(0, 3000, (T,), generator=gen), rot_dim, dtype)
    slots = torch.randperm(blocks * page, generator=gen)[:T].to(DEVICE)
    caches = _poisoned_caches(make_spec(bits, dtype, d, scheme=scheme), 3, blocks, page, hkv, d)
    _run_three_ways(q, k, v, cos, sin, rot_dim, caches, slots, Context(slot_mapping=slots, block_size=page))
    rotate = scheme == "rotate"
    _assert_caches(caches[0], caches[1], exact=not rotate)
    _assert_caches(caches[0], caches[2], exact=not (rotate and DEVICE == "cuda"))
    assert (_tensors(caches[0])["scales1"].isnan().sum()
            == (blocks * page - T) * hkv)   # the T slots written, no other


def _channel_step(page, tables, done, new):
    """Slots, positions and the step's device tensors for sequences with `done` cached and `new` tokens."""
    slots, pos = [], []
    for i, n in enumerate(new):
        p = torch.arange(done[i], done[i] + n)
        slots.append(tables[i].long().cpu()[p // page] * page + p % page)
        pos.append(p)
    lens = torch.tensor([c + n for c, n in zip(done, new)], dtype=torch.int32, device=DEVICE)
    qloc = torch.tensor([0] + torch.tensor(new).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    slots = torch.cat(slots).to(DEVICE)
    ctx = Context(slot_mapping=slots, block_size=page, block_tables=tables, context_lens=lens, q_start_loc=qloc,
                  max_q_len=max(new), max_ctx_len=int(lens.max()))
    return slots, torch.cat(pos), ctx


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq, hkv, page", [(4, 2, 8), (3, 1, 4)])
def test_channel_scheme_matches_rope_then_store_over_steps(dtype, hq, hkv, page):
    """Three sequences: prefills of odd lengths split mid-block, then steps where some rows prefill
    and others decode in the same call, appends crossing block boundaries (the last block's key
    ranges re-derived each time); after every step all caches agree."""
    d = 32
    gen = torch.Generator().manual_seed(page + hq)
    spec = make_spec(4, dtype, d)
    assert spec.key_channel and spec.rotate
    caches = _poisoned_caches(spec, 3, 16, page, hkv, d)
    for c in caches:   # the per-block key params start as finite garbage (NaN would stay NaN in a range)
        c.key_scale.fill_(0.5), c.key_min.fill_(-1.0), c.key_sink.fill_(3.0)
    tables = torch.tensor([[3, 7, 1, 9, 12], [0, 11, 5, 2, 14], [4, 6, 8, 10, 13]], dtype=torch.int32, device=DEVICE)
    done = [0, 0, 0]
    for new in ([5, 3, 0], [1, 1, 7], [page + 3, 1, 1], [1, 2 * page - 1, 1], [1, 1, 1]):
        live = [i for i, n in enumerate(new) if n]
        slots, pos, ctx = _channel_step(page, tables[live], [done[i] for i in live], [new[i] for i in live])
        q, k, v = _qkv(len(slots), hq, hkv, d, dtype, gen)
        cos, sin = _cos_sin(pos, d, dtype)
        _run_three_ways(q, k, v, cos, sin, d, caches, slots, ctx)
        done = [c + n for c, n in zip(done, new)]
        # keys: the same channel kernel as the unfused path, exact vs the reference too; values are
        # rotated per token (one code at a rare tie)
        _assert_caches(caches[0], caches[1], exact=False)
        _assert_caches(caches[0], caches[2], exact=DEVICE != "cuda")
        for name in ("codes0", "key_scale", "key_min", "key_sink"):
            for other in caches[1:]:
                torch.testing.assert_close(_tensors(caches[0])[name], _tensors(other)[name], rtol=0, atol=0,
                                           msg=name)


@pytest.mark.parametrize("scheme_kw", [dict(group=16), dict(scales="static")])
def test_caches_without_kernels_take_the_unfused_ops(monkeypatch, scheme_kw):
    """Groups smaller than a head and static scales have no store kernel: rope_store_kv_quant_kernel
    runs the table's apply_rope and store_kv_quant (the reference here), with identical results."""
    from lmdepot.runtime.kernels import rope_store_kv_quant as mod

    monkeypatch.setattr(mod, "_kernel", None)   # would fail if launched
    d, hkv = 32, 2
    gen = torch.Generator().manual_seed(3)
    q, k, v = _qkv(5, 4, hkv, d, torch.float32, gen)
    cos, sin = _cos_sin(torch.arange(5), d, torch.float32)
    if "group" in scheme_kw:
        spec, static = make_spec(8, torch.float32, d, group=16), None
    else:
        spec = make_spec(8, torch.float32, d, "static")
        static = [(torch.full((hkv,), 0.05), torch.full((hkv,), 128.0))] * 2
    a, b = (allocate(spec, 4, 8, hkv, d, static_params=static, device=DEVICE) for _ in range(2))
    for c in (a, b):
        for t in c.codes:
            t.zero_()
    slots = torch.arange(5, device=DEVICE)
    q_ref, k_ref = mod.reference(q.clone(), k.clone(), v, cos, sin, d, a, slots)
    set_context(Context(slot_mapping=slots, block_size=8))
    try:
        q_out, k_out = triton_ops.rope_store_kv_quant_kernel(q, k, v, cos, sin, d, b, slots)
    finally:
        reset_context()
    assert torch.equal(q_out, q_ref) and torch.equal(k_out, k_ref)
    assert all(torch.equal(x, y) for x, y in zip(a.codes, b.codes))


def test_empty_batch_is_a_no_op():
    from lmdepot.runtime.kernels.rope_store_kv_quant import rope_store_kv_quant

    gen = torch.Generator().manual_seed(0)
    q, k, v = _qkv(0, 4, 2, 32, torch.float32, gen)
    cos, sin = _cos_sin(torch.arange(0), 32, torch.float32)
    cache = allocate(make_spec(8, torch.float32, 32), 2, 8, 2, 32, device=DEVICE)
    assert rope_store_kv_quant(q, k, v, cos, sin, 32, cache, torch.zeros(0, dtype=torch.long))[0].shape == (0, 4, 32)
