"""Store new keys into a paged cache with per-channel ranges over each block (the int4 `channel`
scheme, ops/kv_quant.py).

One program per (sequence, kv head, j-th block receiving new tokens): it rebuilds the block's keys
(older rows dequantized from the cache, its first row from the exact fp16 sink, new rows from k),
takes one range per channel over rows 1.. (fp16 min and scale), and rewrites the block's codes and
params. Only blocks at or after the sequence's first new token are touched, so full blocks shared
by prefix caching are never written. Batch layout comes from the step's device tensors
(context_lens, q_start_loc, block_tables): no host lists, CUDA-graph safe. Torch reference:
ops/kv_quant._store_keys_channel.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lmdepot.runtime.kernels.kv_store_quant import SCALE_FLOOR, round_half_even


@triton.jit
def _half(k_ptr, c_ptr, scale, lo, sink, blk, kvh, q_row, offs_s, offs_i, old, new, stride_kt, stride_kh,
          c_b, c_s, c_h, PARITY: tl.constexpr, BITS: tl.constexpr):
    """Rows of channels 2i + PARITY, (PAGE, D // 2) float32: old ones dequantized, new ones from k."""
    ch = 2 * offs_i + PARITY
    if BITS == 4:
        byte = tl.load(c_ptr + blk * c_b + offs_s[:, None] * c_s + kvh * c_h + offs_i[None, :],
                       mask=old[:, None], other=0)
        code = (byte >> (4 * PARITY)) & 0xF
    else:
        code = tl.load(c_ptr + blk * c_b + offs_s[:, None] * c_s + kvh * c_h + ch[None, :],
                       mask=old[:, None], other=0)
    x = code.to(tl.float32) * scale[None, :] + lo[None, :]
    x = tl.where(offs_s[:, None] == 0, sink[None, :], x)
    fresh = tl.load(k_ptr + q_row[:, None] * stride_kt + kvh * stride_kh + ch[None, :],
                    mask=new[:, None], other=0.0).to(tl.float32)
    return tl.where(new[:, None], fresh, x)


@triton.jit
def _channel_half(k_ptr, c_ptr, ks_ptr, kmin_ptr, sink_ptr, p, blk, kvh, q_row, offs_s, offs_i, old, new, rng,
                  sink_new, stride_kt, stride_kh, c_b, c_s, c_h, PARITY: tl.constexpr, BITS: tl.constexpr,
                  FLOOR: tl.constexpr):
    """New ranges, sink and codes of channels 2i + PARITY of one block; returns the (PAGE, D // 2) codes."""
    ch = 2 * offs_i + PARITY
    x = _half(k_ptr, c_ptr, tl.load(ks_ptr + p + ch).to(tl.float32), tl.load(kmin_ptr + p + ch).to(tl.float32),
              tl.load(sink_ptr + p + ch).to(tl.float32), blk, kvh, q_row, offs_s, offs_i, old, new,
              stride_kt, stride_kh, c_b, c_s, c_h, PARITY, BITS)
    qmax = 2.0 ** BITS - 1.0
    lo = tl.min(tl.where(rng[:, None], x, float("inf")), 0).to(tl.float16).to(tl.float32)
    hi = tl.max(tl.where(rng[:, None], x, float("-inf")), 0)
    scale = tl.maximum((hi - lo) / qmax, FLOOR).to(tl.float16).to(tl.float32)
    # only the sink in the block: no range to take, the old params stay (they are never read)
    has_rng = (offs_i * 0 + tl.sum(rng.to(tl.int32), 0)) > 0   # as a (D // 2,) mask
    tl.store(ks_ptr + p + ch, scale.to(tl.float16), mask=has_rng)
    tl.store(kmin_ptr + p + ch, lo.to(tl.float16), mask=has_rng)
    row0 = tl.sum(tl.where(offs_s[:, None] == 0, x, 0.0), 0)
    tl.store(sink_ptr + p + ch, row0.to(tl.float16), mask=(offs_i * 0 + sink_new.to(tl.int32)) > 0)
    q = tl.minimum(tl.maximum(round_half_even((x - lo[None, :]) / scale[None, :]), 0.0), qmax)
    return tl.where(rng[:, None], q, 0.0).to(tl.uint8)


@triton.jit(do_not_specialize=["stride_bt"])   # a step's table width: one build (paged_decode_attention.STEP_INTS)
def _store_kernel(k_ptr, c_ptr, ks_ptr, kmin_ptr, sink_ptr, bt_ptr, lens_ptr, qloc_ptr,
                  stride_kt, stride_kh, c_b, c_s, c_h, p_b, p_h, stride_bt,
                  D: tl.constexpr, PAGE: tl.constexpr, BITS: tl.constexpr, FLOOR: tl.constexpr):
    s, kvh, j = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    ctx_len = tl.load(lens_ptr + s)
    q_start = tl.load(qloc_ptr + s)
    first_pos = ctx_len - (tl.load(qloc_ptr + s + 1) - q_start)
    page = first_pos // PAGE + j
    if page * PAGE < ctx_len:   # this program's block exists (a step touches 1..cdiv(q_len, PAGE) + 1)
        blk = tl.load(bt_ptr + s * stride_bt + page).to(tl.int64)
        offs_s = tl.arange(0, PAGE)
        offs_i = tl.arange(0, D // 2)
        pos = page * PAGE + offs_s
        valid = pos < ctx_len
        old = pos < first_pos
        new = valid & (pos >= first_pos)
        q_row = q_start + pos - first_pos
        rng = valid & (offs_s >= 1)    # rows that set the ranges and get codes
        sink_new = first_pos <= page * PAGE
        p = blk * p_b + kvh * p_h
        even = _channel_half(k_ptr, c_ptr, ks_ptr, kmin_ptr, sink_ptr, p, blk, kvh, q_row, offs_s, offs_i, old,
                             new, rng, sink_new, stride_kt, stride_kh, c_b, c_s, c_h, 0, BITS, FLOOR)
        odd = _channel_half(k_ptr, c_ptr, ks_ptr, kmin_ptr, sink_ptr, p, blk, kvh, q_row, offs_s, offs_i, old,
                            new, rng, sink_new, stride_kt, stride_kh, c_b, c_s, c_h, 1, BITS, FLOOR)
        out = c_ptr + blk * c_b + offs_s[:, None] * c_s + kvh * c_h
        if BITS == 4:
            tl.store(out + offs_i[None, :], even | (odd << 4))
        else:
            tl.store(out + 2 * offs_i[None, :], even)
            tl.store(out + 2 * offs_i[None, :] + 1, odd)


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
        D=D, PAGE=page, BITS=cache.bits, FLOOR=SCALE_FLOOR)
