"""Store new keys into a paged cache with per-channel ranges over each block (the int4 `channel`
scheme, ops/kv_quant.py).

One program per (sequence, kv head, j-th block receiving new tokens): it rebuilds the block's keys
(older rows dequantized from the cache, its first row from the exact fp16 sink, new rows from k),
takes one range per channel over rows 1.. (fp16 min and scale), and rewrites the block's codes and
params. Only blocks at or after the sequence's first new token are touched, so full blocks shared
by prefix caching are never written. Batch layout comes from the step's device tensors
(context_lens, q_start_loc, block_tables): no host lists, CUDA-graph safe. Torch reference:
ops/kv_quant._store_keys_channel.

Every thread owns one byte column of the block (int4: channels 2i and 2i + 1; int8: a pair of
columns) and walks the rows itself, twice (ranges, then codes): the ranges are reductions over rows,
so they stay inside the thread. The first version held the block as a (rows, channels) tile spread
over 4 warps, whose row reductions went through shuffles and shared memory: 7,200 sm_90 instructions
a warp, 255 registers plus spills, ~0.3 ms a launch at 128 sequences x 32 heads on an H200 (session
11: 11 ms of an 80 ms int4 decode step).
"""

from __future__ import annotations

import triton
import triton.language as tl

from lmdepot.runtime.kernels.kv_quant_tile import INTERPRETED, codes_f32
from lmdepot.runtime.kernels.kv_store_quant import SCALE_FLOOR, rint


@triton.jit
def _row(k_ptr, c_ptr, r, n_old, n_rows, k_row0, code_row0, offs_i, se, so, me, mo, stride_kt, c_s,
         BITS: tl.constexpr):
    """Row r of the block as float32 channels (2i, 2i + 1): dequantized below n_old, from k up to
    n_rows (0 past it); and whether it is a coded row (1..n_rows - 1: row 0 is the exact sink)."""
    old = (offs_i * 0 + r) < n_old
    new = ((offs_i * 0 + r) >= n_old) & ((offs_i * 0 + r) < n_rows)
    if BITS == 4:
        byte = tl.load(code_row0 + r * c_s + offs_i, mask=old, other=0)
        ce, co = byte & 0xF, byte >> 4
    else:
        ce = tl.load(code_row0 + r * c_s + 2 * offs_i, mask=old, other=0)
        co = tl.load(code_row0 + r * c_s + 2 * offs_i + 1, mask=old, other=0)
    krow = k_row0 + (r - n_old) * stride_kt + 2 * offs_i
    fe = tl.load(krow, mask=new, other=0.0).to(tl.float32)
    fo = tl.load(krow + 1, mask=new, other=0.0).to(tl.float32)
    coded = ((offs_i * 0 + r) < n_rows) & (r > 0)
    return tl.where(old, codes_f32(ce, False) * se + me, fe), tl.where(old, codes_f32(co, False) * so + mo, fo), coded


@triton.jit
def _codes(x, lo, scale, in_range, BITS: tl.constexpr, RINT: tl.constexpr):
    qmax = 2.0 ** BITS - 1.0
    q = tl.minimum(tl.maximum(rint((x - lo) / scale, RINT), 0.0), qmax)
    return tl.where(in_range, q, 0.0).to(tl.uint8)


@triton.jit(do_not_specialize=["stride_bt"])   # a step's table width: one build (paged_decode_attention.STEP_INTS)
def _store_kernel(k_ptr, c_ptr, ks_ptr, kmin_ptr, sink_ptr, bt_ptr, lens_ptr, qloc_ptr,
                  stride_kt, stride_kh, c_b, c_s, c_h, p_b, p_h, stride_bt,
                  D: tl.constexpr, PAGE: tl.constexpr, BITS: tl.constexpr, FLOOR: tl.constexpr,
                  RINT: tl.constexpr, ROWS: tl.constexpr):
    s, kvh, j = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    ctx_len = tl.load(lens_ptr + s)
    q_start = tl.load(qloc_ptr + s)
    first_pos = ctx_len - (tl.load(qloc_ptr + s + 1) - q_start)
    page = first_pos // PAGE + j
    base = page * PAGE
    if base < ctx_len:   # this program's block exists (a step touches 1..cdiv(q_len, PAGE) + 1)
        blk = tl.load(bt_ptr + s * stride_bt + page).to(tl.int64)
        n_rows = tl.minimum(ctx_len - base, PAGE)              # rows holding tokens
        n_old = tl.minimum(tl.maximum(first_pos - base, 0), n_rows)   # of them already cached
        offs_i = tl.arange(0, D // 2)
        p = ks_ptr + blk * p_b + kvh * p_h + 2 * offs_i
        pm = kmin_ptr + blk * p_b + kvh * p_h + 2 * offs_i
        se, so = tl.load(p).to(tl.float32), tl.load(p + 1).to(tl.float32)
        me, mo = tl.load(pm).to(tl.float32), tl.load(pm + 1).to(tl.float32)
        code_row0 = c_ptr + blk * c_b + kvh * c_h
        # k's row of block row 0 (rows before n_old are never read from k)
        k_row0 = k_ptr + (q_start + base + n_old - first_pos) * stride_kt + kvh * stride_kh
        lo_e = tl.full((D // 2,), float("inf"), tl.float32)
        lo_o, hi_e, hi_o = lo_e, -lo_e, -lo_e
        # rows 1..n_rows - 1 set the ranges (row 0: the exact sink), ROWS at a time: their loads in flight
        # together, and few enough registers that nothing spills
        for r0 in range(0, n_rows, ROWS):
            for u in tl.static_range(ROWS):
                r = r0 + u
                xe, xo, live = _row(k_ptr, c_ptr, r, n_old, n_rows, k_row0, code_row0, offs_i, se, so, me, mo,
                                    stride_kt, c_s, BITS)
                lo_e, hi_e = tl.minimum(lo_e, tl.where(live, xe, lo_e)), tl.maximum(hi_e, tl.where(live, xe, hi_e))
                lo_o, hi_o = tl.minimum(lo_o, tl.where(live, xo, lo_o)), tl.maximum(hi_o, tl.where(live, xo, hi_o))
        qmax = 2.0 ** BITS - 1.0
        lo_e, lo_o = lo_e.to(tl.float16).to(tl.float32), lo_o.to(tl.float16).to(tl.float32)
        ne = tl.maximum((hi_e - lo_e) / qmax, FLOOR).to(tl.float16).to(tl.float32)
        no = tl.maximum((hi_o - lo_o) / qmax, FLOOR).to(tl.float16).to(tl.float32)
        if n_old == 0:   # row 0 is new: the block's exact sink
            sp = sink_ptr + blk * p_b + kvh * p_h + 2 * offs_i
            tl.store(sp, tl.load(k_row0 + 2 * offs_i).to(tl.float16))
            tl.store(sp + 1, tl.load(k_row0 + 2 * offs_i + 1).to(tl.float16))
        # the codes of rows 1..n_rows - 1, row 0's 0 (the sink is exact); a block's first store (no old
        # rows) zeroes the rows past n_rows too, which later stores then never need to touch
        rows_out = tl.where(n_old == 0, PAGE, n_rows)
        for r0 in range(0, rows_out, ROWS):
            for u in tl.static_range(ROWS):
                r = r0 + u
                xe, xo, in_range = _row(k_ptr, c_ptr, r, n_old, n_rows, k_row0, code_row0, offs_i, se, so, me, mo,
                                        stride_kt, c_s, BITS)
                qe = _codes(xe, lo_e, ne, in_range, BITS, RINT)
                qo = _codes(xo, lo_o, no, in_range, BITS, RINT)
                if BITS == 4:
                    tl.store(code_row0 + r * c_s + offs_i, qe | (qo << 4), mask=(offs_i * 0 + r) < rows_out)
                else:
                    tl.store(code_row0 + r * c_s + 2 * offs_i, qe, mask=(offs_i * 0 + r) < rows_out)
                    tl.store(code_row0 + r * c_s + 2 * offs_i + 1, qo, mask=(offs_i * 0 + r) < rows_out)
        if n_rows > 1:   # only the sink in the block: no range to take, the old params (never read) stay
            tl.store(p, ne.to(tl.float16))
            tl.store(p + 1, no.to(tl.float16))
            tl.store(pm, lo_e.to(tl.float16))
            tl.store(pm + 1, lo_o.to(tl.float16))


def store_keys_channel(k, cache, block_tables, context_lens, q_start_loc, max_q_len: int) -> None:
    """k (T, hkv, D) new keys of the step's sequences (rows in q_start_loc order) into `cache`."""
    codes = cache.codes[0]
    page, hkv, D = codes.shape[1], codes.shape[2], k.shape[-1]
    if k.shape[0] == 0:
        return
    blocks_touched = triton.cdiv(max_q_len, page) + 1   # a step's tokens may start mid-block
    _store_kernel[(context_lens.shape[0], hkv, blocks_touched)](
        k, codes, cache.key_scale, cache.key_min, cache.key_sink, block_tables, context_lens, q_start_loc,
        k.stride(0), k.stride(1), codes.stride(0), codes.stride(1), codes.stride(2),
        cache.key_scale.stride(0), cache.key_scale.stride(1), block_tables.stride(0),
        D=D, PAGE=page, BITS=cache.bits, FLOOR=SCALE_FLOOR, RINT=not INTERPRETED, ROWS=min(8, page),
        num_warps=max(1, min(4, D // 64)))
