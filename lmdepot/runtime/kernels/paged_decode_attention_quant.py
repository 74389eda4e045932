"""Decode attention over a quantized paged KV cache (online int8 / int4, see runtime/ops/kv_quant.py).

Same split-K structure as paged_decode_attention.py (one program per (sequence, kv head, split),
GQA heads grouped, the same split plan and in-launch merge epilogue `finish_split`). The codes are
never dequantized element by element: both products run on the raw codes and the quantizers are
applied to the (heads x keys) scores and weights, which are 64x smaller than a tile of codes:
- per-token quantizers (K unless `key_channel`, V always; one (scale, zero) per token and kv head):
  q.k_t = scale_t (q.code_t - zero_t sum(q)), and sum_t p_t v_t = sum_t (p_t scale_t) code_t -
  sum_t p_t scale_t zero_t, a per-head correction subtracted once at the end;
- per-channel keys (`key_channel`, per block, kv head and channel: k = code * scale + min): q.k =
  (q * scale).code + q.min, and the block's first key scores against its exact fp16 sink row.
The codes become operands without an int-to-float conversion (a quarter-rate instruction, which with
~8 other instructions per code kept the first rewrite at ~40% of copy bandwidth; kv_quant_tile:
fp16 1024 + code for tensor cores, the offset taken out with the zero point, float32 for the CUDA
cores). Keys are scored on tensor cores;
the weighted sum of the values is
- on tensor cores for GQA (the group's heads are the tile's rows), the codes fed to tl.dot (Triton
  pipelines their loads with cp.async);
- on the CUDA cores for MHA (`VECTOR`): there 15 of a tensor-core tile's 16 rows would be padding and
  the V operand a byte transpose through shared memory. Each thread keeps (key slot, channel)
  partial sums for the whole loop, reduced once at the end; with one head the running max is a
  scalar, so the partials are rescaled only on tiles that raise it.
sm_90 SASS of the loop (Triton 3.9, 64 keys, int8): 1070 instructions a warp before (tensor cores,
int-to-float), 858 with the byte permutes, ~650 on the MHA path.
A Hadamard rotation is undone outside the kernel: q.k = (qH).(kH) for rotated keys, and sum p (vH) H
= (sum p vH) H for rotated values. Operands are fp16 (codes 0..255 are exact; p * scale keeps 11
bits where bf16 would keep 8), float32 for float32 queries (tests; TF32 on a GPU).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from lmdepot.runtime.kernels.kv_quant_tile import INTERPRETED, channels, codes_f16, codes_f32, nibbles, param_operands
from lmdepot.runtime.kernels.paged_decode_attention import (STEP_INTS, STEP_POINTERS, finish_split, split_buffers,
                                                             split_plan)

# LMDEPOT_KVQ_VECTOR=0 sends MHA models to the tensor-core path too (A/B runs); read once
VECTOR_MHA = os.environ.get("LMDEPOT_KVQ_VECTOR", "1") != "0"


def reference(q, cache, block_tables, seq_lens, sm_scale):
    """float32 attention of q (B, Hq, D) over the dequantized cache (ops/kv_quant.gather_kv_quant)."""
    from lmdepot.runtime.ops.kv_quant import gather_kv_quant

    out = torch.empty_like(q)
    page, hkv = cache.codes[0].shape[1], cache.codes[0].shape[2]
    for b in range(q.shape[0]):
        n = int(seq_lens[b])
        pages = block_tables[b, : -(-n // page)].long()
        slots = (pages[:, None] * page + torch.arange(page, device=q.device)).reshape(-1)[:n]
        k, v = (x.float().repeat_interleave(q.shape[1] // hkv, dim=1)
                for x in gather_kv_quant(cache, slots, torch.float32))
        scores = torch.einsum("hd,nhd->hn", q[b].float(), k) * sm_scale
        out[b] = torch.einsum("hn,nhd->hd", scores.softmax(-1), v).to(q.dtype)
    return out


@triton.jit
def _codes(x, op_ty: tl.constexpr, ASM: tl.constexpr):
    """Codes as tensor-core operands: fp16 1024 + code (codes_f16); float32 operands (tests) hold the
    code itself."""
    if op_ty == tl.float32:   # one return: Triton 3.6 unifies the types of every return statement
        y = x.to(op_ty)
    else:
        y = codes_f16(x, ASM)
    return y


@triton.jit
def _key_scores(kc, q0, q1, qo0, qo1, q_sum, pos, k_scale, k_zero, s0, s1, min0, min1, sink0, sink1,
                op_ty: tl.constexpr, OFF: tl.constexpr, BITS: tl.constexpr, KEY_CHANNEL: tl.constexpr,
                ASM: tl.constexpr):
    """(BLOCK_H, keys) q.k of a tile of key codes on tensor cores, unscaled (rows of padded heads: 0).
    Per-token keys: k_scale, k_zero; per-channel (`_channel_params`): the even / odd channels' scale,
    min and sink row of the tile's block."""
    if KEY_CHANNEL:
        lo = tl.sum(q0 * min0.to(tl.float32)[None, :], axis=1) + tl.sum(q1 * min1.to(tl.float32)[None, :], axis=1)
        sink = tl.sum(q0 * sink0.to(tl.float32)[None, :], axis=1) + tl.sum(q1 * sink1.to(tl.float32)[None, :], axis=1)
        qs0 = (q0 * s0.to(tl.float32)[None, :]).to(op_ty)
        qs1 = (q1 * s1.to(tl.float32)[None, :]).to(op_ty)
        raw = tl.dot(qs0, tl.trans(_codes(kc & 0xF, op_ty, ASM)))
        raw += tl.dot(qs1, tl.trans(_codes(kc >> 4, op_ty, ASM)))
        lo -= OFF * (tl.sum(qs0.to(tl.float32), axis=1) + tl.sum(qs1.to(tl.float32), axis=1))
        score = tl.where(pos[None, :] == 0, sink[:, None], raw + lo[:, None])
    else:
        if BITS == 8:
            raw = tl.dot(qo0, tl.trans(_codes(kc, op_ty, ASM)))
        else:
            raw = tl.dot(qo0, tl.trans(_codes(kc & 0xF, op_ty, ASM)))
            raw += tl.dot(qo1, tl.trans(_codes(kc >> 4, op_ty, ASM)))
        score = (raw - q_sum[:, None] * (k_zero.to(tl.float32) + OFF)[None, :]) * k_scale[None, :]
    return score


@triton.jit
def _channel_key_row(kc, q0v, q1v, first, pos, s0, s1, min0, min1, sink0, sink1, op_ty: tl.constexpr,
                     OFF: tl.constexpr, ASM: tl.constexpr):
    """_key_scores for per-channel keys and one q head (MHA, q0v / q1v: its even / odd channels, (W,)),
    as (keys,) scores: the block's vectors meet the one row, not 16 rows of which 15 are padding
    (the tensor cores still take 16 rows: `first` keeps the scaled q in row 0)."""
    lo = tl.sum(q0v * min0.to(tl.float32), axis=0) + tl.sum(q1v * min1.to(tl.float32), axis=0)
    sink = tl.sum(q0v * sink0.to(tl.float32), axis=0) + tl.sum(q1v * sink1.to(tl.float32), axis=0)
    qs0v = (q0v * s0.to(tl.float32)).to(op_ty)
    qs1v = (q1v * s1.to(tl.float32)).to(op_ty)
    raw = tl.dot(first * qs0v[None, :], tl.trans(_codes(kc & 0xF, op_ty, ASM)))
    raw += tl.dot(first * qs1v[None, :], tl.trans(_codes(kc >> 4, op_ty, ASM)))
    lo -= OFF * (tl.sum(qs0v.to(tl.float32), axis=0) + tl.sum(qs1v.to(tl.float32), axis=0))
    return tl.where(pos == 0, sink, tl.sum(raw, axis=0) + lo)


@triton.jit
def _fold(x, ROWS: tl.constexpr):
    """(SUB, W) -> (ROWS, W): rows r, r + ROWS, r + 2 ROWS, ... summed. With ROWS = the rows one pass of
    the tile's layout covers (`fold_rows`), those are the rows each thread holds: no data moves."""
    if ROWS < x.shape[0]:
        x = tl.sum(tl.reshape(x, (x.shape[0] // ROWS, ROWS, x.shape[1])), axis=0)
    return x


@triton.jit
def _tile_params(p_off, mask_s, ks_ptr, kz_ptr, vs_ptr, vz_ptr, KEY_CHANNEL: tl.constexpr):
    """A tile's keys' per-token (scale float32, zero code) of K (placeholders with per-channel keys)
    and V."""
    v_scale = tl.load(vs_ptr + p_off, mask=mask_s, other=0.0).to(tl.float32)
    v_zero = tl.load(vz_ptr + p_off, mask=mask_s, other=0)
    if KEY_CHANNEL:
        k_scale, k_zero = v_scale, v_zero
    else:
        k_scale = tl.load(ks_ptr + p_off, mask=mask_s, other=0.0).to(tl.float32)
        k_zero = tl.load(kz_ptr + p_off, mask=mask_s, other=0)
    return k_scale, k_zero, v_scale, v_zero


@triton.jit
def _block_of(t, t_last, b, bt_ptr, stride_bt, TILES: tl.constexpr):
    """The cache block of tile t (PREFETCH: past the split's last tile, the last one's)."""
    return tl.load(bt_ptr + b * stride_bt + tl.minimum(t, t_last - 1) // TILES).to(tl.int64)


@triton.jit
def _params_of(t, t_last, blk, kvh, seq_len, ks_ptr, kz_ptr, vs_ptr, vz_ptr, p_b, offs_s, P_S: tl.constexpr,
               P_H: tl.constexpr, PAGE: tl.constexpr, SUB: tl.constexpr, KEY_CHANNEL: tl.constexpr):
    """_tile_params of tile t in block `blk` (PREFETCH); past the split's last tile nothing is loaded."""
    TILES: tl.constexpr = PAGE // SUB
    mask_s = t * SUB + offs_s < tl.minimum(seq_len, t_last * SUB)
    return _tile_params(blk * p_b + kvh * P_H + ((t % TILES) * SUB + offs_s) * P_S, mask_s, ks_ptr, kz_ptr, vs_ptr,
                        vz_ptr, KEY_CHANNEL)


@triton.jit
def _channel_params(blk, kvh, ch_b, ch_h, offs_w, mask_w, ks_ptr, kmin_ptr, ksink_ptr):
    """Per-channel keys: the block's (scale, min, sink row) of the even and odd channels, fp16 (W,)."""
    ch = blk * ch_b + kvh * ch_h + offs_w * 2
    return (tl.load(ks_ptr + ch, mask=mask_w, other=0.0), tl.load(ks_ptr + ch + 1, mask=mask_w, other=0.0),
            tl.load(kmin_ptr + ch, mask=mask_w, other=0.0), tl.load(kmin_ptr + ch + 1, mask=mask_w, other=0.0),
            tl.load(ksink_ptr + ch, mask=mask_w, other=0.0), tl.load(ksink_ptr + ch + 1, mask=mask_w, other=0.0))


@triton.jit
def _loop(q0, q1, kc_ptr, vc_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, kmin_ptr, ksink_ptr, bt_ptr, b, kvh,
          seq_len, t_first, t_last, c_b, p_b, ch_b, ch_h, stride_bt, sm_scale, C_S: tl.constexpr, C_H: tl.constexpr,
          P_S: tl.constexpr, P_H: tl.constexpr, op_ty: tl.constexpr, OFF: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr,
          BLOCK_D: tl.constexpr, PAGE: tl.constexpr, BITS: tl.constexpr, KEY_CHANNEL: tl.constexpr,
          SUB: tl.constexpr, VECTOR: tl.constexpr, VROWS: tl.constexpr, STAGES: tl.constexpr, ASM: tl.constexpr,
          PREFETCH: tl.constexpr):
    """The split's keys, a tile of SUB at a time: scores on tensor cores (`_key_scores`), the online
    softmax, and the weighted sum of the values: on tensor cores for the GQA heads of the kv head
    (the codes as fp16 operands, `_codes`), or, with one q head (VECTOR: MHA, where 15 of a tensor-core
    tile's 16 rows would be padding and the V operand a byte transpose through shared memory), on the
    CUDA cores: each thread keeps (key slot, channel) partial sums for the whole loop, reduced once
    at the end, and with one running max (a scalar) they are rescaled only on tiles that raise it.
    The partial sums are VROWS key slots deep (`_fold`: a tile's rows that one thread holds are summed
    in the thread first), not SUB: a quarter of the registers at 64-key tiles."""
    PACK: tl.constexpr = 8 // BITS
    W: tl.constexpr = BLOCK_D // PACK
    offs_w = tl.arange(0, W)
    mask_w = offs_w < D // PACK
    qo0, qo1 = q0.to(op_ty), q1.to(op_ty)
    # over the operands as rounded: the 1024 offset cancels exactly against what the dot summed
    q_sum = tl.sum(qo0.to(tl.float32), axis=1) + tl.sum(qo1.to(tl.float32), axis=1)
    offs_s = tl.arange(0, SUB)
    if VECTOR:
        if KEY_CHANNEL:   # the one q head's channels as vectors (rows past the first are 0)
            q0v, q1v = tl.sum(q0, axis=0), tl.sum(q1, axis=0)
            first = (tl.arange(0, BLOCK_H) == 0).to(op_ty)[:, None]
        m = tl.full((), -1e30, dtype=tl.float32)
        l = tl.zeros((SUB,), dtype=tl.float32)       # by key slot
        corr = tl.zeros((SUB,), dtype=tl.float32)    # sum_t w_t zero_t of V, by key slot
        acc0 = tl.zeros((VROWS, W), dtype=tl.float32)  # int4: even channels; int8: all
        acc1 = tl.zeros((VROWS, W), dtype=tl.float32)  # int4: odd channels
    else:
        m = tl.full((BLOCK_H,), -1e30, dtype=tl.float32)
        l = tl.zeros((BLOCK_H,), dtype=tl.float32)
        corr = tl.zeros((BLOCK_H,), dtype=tl.float32)    # sum_t w_t (zero_t + OFF) of V
        acc0 = tl.zeros((BLOCK_H, BLOCK_D if BITS == 4 else W), dtype=tl.float32)   # int4: channels permuted
        acc1 = acc0
    TILES: tl.constexpr = PAGE // SUB
    # PREFETCH: the per-token params (and per-channel keys' block vectors) loaded one tile ahead: 1-2
    # bytes a thread cannot go through cp.async, so the pipeliner leaves them as plain loads, waited for
    # by the tile that issues them (GQA int8 on an H200: 410 -> 353 us)
    if PREFETCH:
        nblk = _block_of(t_first, t_last, b, bt_ptr, stride_bt, TILES)
        k_scale, k_zero, v_scale, v_zero = _params_of(t_first, t_last, nblk, kvh, seq_len, ks_ptr, kz_ptr, vs_ptr,
                                                      vz_ptr, p_b, offs_s, P_S, P_H, PAGE, SUB, KEY_CHANNEL)
        if KEY_CHANNEL:
            c0, c1, c2, c3, c4, c5 = _channel_params(nblk, kvh, ch_b, ch_h, offs_w, mask_w, ks_ptr, kmin_ptr,
                                                     ksink_ptr)
    for t in tl.range(t_first, t_last, num_stages=STAGES):
        blk = tl.load(bt_ptr + b * stride_bt + t // TILES).to(tl.int64)
        pos = (t % TILES) * SUB + offs_s   # key positions within the page
        mask_s = (t // TILES) * PAGE + pos < seq_len
        c_off = blk * c_b + kvh * C_H + pos[:, None] * C_S + offs_w[None, :]
        c_mask = mask_s[:, None] & mask_w[None, :]
        kc = tl.load(kc_ptr + c_off, mask=c_mask, other=0)
        if BITS == 4 and not VECTOR:   # every byte twice: (keys, channels [even..., odd...]) (kv_quant_tile)
            vcols = tl.arange(0, BLOCK_D) % W
            vc = tl.load(vc_ptr + blk * c_b + kvh * C_H + pos[:, None] * C_S + vcols[None, :],
                         mask=mask_s[:, None] & (vcols < D // PACK)[None, :], other=0)
        else:
            vc = tl.load(vc_ptr + c_off, mask=c_mask, other=0)
        if PREFETCH:
            cur_ks, cur_kz, cur_vs, cur_vz = k_scale, k_zero, v_scale, v_zero
            nblk = _block_of(t + 1, t_last, b, bt_ptr, stride_bt, TILES)
            k_scale, k_zero, v_scale, v_zero = _params_of(t + 1, t_last, nblk, kvh, seq_len, ks_ptr, kz_ptr, vs_ptr,
                                                          vz_ptr, p_b, offs_s, P_S, P_H, PAGE, SUB, KEY_CHANNEL)
            if KEY_CHANNEL:
                s0, s1, min0, min1, sink0, sink1 = c0, c1, c2, c3, c4, c5
                c0, c1, c2, c3, c4, c5 = _channel_params(nblk, kvh, ch_b, ch_h, offs_w, mask_w, ks_ptr, kmin_ptr,
                                                         ksink_ptr)
        else:
            cur_ks, cur_kz, cur_vs, cur_vz = _tile_params(blk * p_b + kvh * P_H + pos * P_S, mask_s, ks_ptr, kz_ptr,
                                                          vs_ptr, vz_ptr, KEY_CHANNEL)
            if KEY_CHANNEL:
                s0, s1, min0, min1, sink0, sink1 = _channel_params(blk, kvh, ch_b, ch_h, offs_w, mask_w, ks_ptr,
                                                                   kmin_ptr, ksink_ptr)
        if not KEY_CHANNEL:   # (unused)
            s0, s1, min0, min1, sink0, sink1 = cur_ks, cur_ks, cur_ks, cur_ks, cur_ks, cur_ks
        if VECTOR and KEY_CHANNEL:
            row = _channel_key_row(kc, q0v, q1v, first, pos, s0, s1, min0, min1, sink0, sink1, op_ty, OFF, ASM)
        else:
            score = _key_scores(kc, q0, q1, qo0, qo1, q_sum, pos, cur_ks, cur_kz, s0, s1, min0, min1, sink0, sink1,
                                op_ty, OFF, BITS, KEY_CHANNEL, ASM)
            if VECTOR:
                row = tl.sum(score, axis=0)   # row 0 (the rest: 0)
        if VECTOR:
            s = tl.where(mask_s, row * sm_scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=0))
            if m_new > m:
                alpha = tl.exp(m - m_new)
                acc0 *= alpha
                acc1 *= alpha
                l *= alpha
                corr *= alpha
                m = m_new
            prob = tl.exp(s - m)
            w = prob * cur_vs
            l += prob
            corr += w * codes_f32(cur_vz, ASM)
            if BITS == 8:
                acc0 += _fold(w[:, None] * codes_f32(vc, ASM), VROWS)
            else:
                acc0 += _fold(w[:, None] * codes_f32(vc & 0xF, ASM), VROWS)
                acc1 += _fold(w[:, None] * codes_f32(vc >> 4, ASM), VROWS)
        else:
            s = tl.where(mask_s[None, :], score * sm_scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = tl.exp(m - m_new)
            prob = tl.exp(s - m_new[:, None])
            w = (prob * cur_vs[None, :]).to(op_ty)
            l = l * alpha + tl.sum(prob, axis=1)
            if BITS == 8:
                corr = corr * alpha + tl.sum(w.to(tl.float32) * (cur_vz.to(tl.float32) + OFF)[None, :], axis=1)
                acc0 = acc0 * alpha[:, None] + tl.dot(w, _codes(vc, op_ty, ASM))
            else:   # code - zero exact on the operand (|.| <= 15): no 1024 carrier through the products
                v = _codes(nibbles(vc), op_ty, ASM) - (cur_vz.to(op_ty) + OFF)[:, None]
                acc0 = acc0 * alpha[:, None] + tl.dot(w, v)
            m = m_new
    if VECTOR:   # one row: reshaped, not indexed with [None, :], which would hand the epilogue's store
        # layout back to the loop's partial sums (one column a thread)
        corr = tl.sum(corr, axis=0)
        if BITS == 8:
            acc = tl.reshape(tl.sum(acc0, axis=0) - corr, (1, BLOCK_D))
        else:
            acc = tl.reshape(tl.join(tl.sum(acc0, axis=0) - corr, tl.sum(acc1, axis=0) - corr), (1, BLOCK_D))
        return acc, tl.zeros((1,), dtype=tl.float32) + m, tl.zeros((1,), dtype=tl.float32) + tl.sum(l, axis=0)
    else:
        acc = acc0 - corr[:, None]   # int4: channels [even..., odd...], stored by _split_kernel's `chan`
        return acc, m, l


@triton.jit(do_not_specialize=STEP_INTS, do_not_specialize_on_alignment=STEP_POINTERS)
def _split_kernel(q_ptr, kc_ptr, vc_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, kmin_ptr, ksink_ptr,
                  bt_ptr, lens_ptr, o_ptr, lse_ptr, out_ptr, sem_ptr, sm_scale,
                  stride_qb, stride_qh, c_b, p_b, ch_b, ch_h,
                  stride_bt, stride_ob, stride_oh, NUM_SPLITS, PAGES_PER_SPLIT, Hq, Hkv,
                  GROUPS: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                  PAGE: tl.constexpr, BITS: tl.constexpr, KEY_CHANNEL: tl.constexpr, SUB: tl.constexpr,
                  C_S: tl.constexpr, C_H: tl.constexpr, P_S: tl.constexpr, P_H: tl.constexpr, VECTOR: tl.constexpr,
                  VROWS: tl.constexpr, STAGES: tl.constexpr, ASM: tl.constexpr, PREFETCH: tl.constexpr,
                  SPLIT: tl.constexpr):
    b, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq_len = tl.load(lens_ptr + b)
    op_ty: tl.constexpr = tl.float32 if q_ptr.dtype.element_ty == tl.float32 else tl.float16
    # fp16 operands hold codes as 1024 + code (_codes); float32 ones (tests) the code itself
    OFF: tl.constexpr = 0.0 if q_ptr.dtype.element_ty == tl.float32 else 1024.0
    offs_h = tl.arange(0, BLOCK_H)
    heads = kvh * GROUPS + offs_h
    mask_h = offs_h < GROUPS
    PACK: tl.constexpr = 8 // BITS        # codes per byte
    W: tl.constexpr = BLOCK_D // PACK     # bytes of a row the tile spans
    offs_w = tl.arange(0, W)
    mask_w = offs_w < D // PACK
    # q by code slot: byte i holds channel i * PACK (+ 1 in the high nibble)
    q_rows = q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_w[None, :] * PACK
    q_mask = mask_h[:, None] & mask_w[None, :]
    q0 = tl.load(q_rows, mask=q_mask, other=0.0).to(tl.float32)
    q1 = tl.load(q_rows + 1, mask=q_mask & (PACK == 2), other=0.0).to(tl.float32)
    TILES: tl.constexpr = PAGE // SUB
    first = split * PAGES_PER_SPLIT
    t_first = first * TILES
    t_last = tl.minimum((first + PAGES_PER_SPLIT) * TILES, tl.cdiv(seq_len, SUB))
    acc, m, l = _loop(q0, q1, kc_ptr, vc_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, kmin_ptr, ksink_ptr, bt_ptr, b, kvh,
                      seq_len, t_first, t_last, c_b, p_b, ch_b, ch_h, stride_bt, sm_scale, C_S, C_H, P_S, P_H,
                      op_ty, OFF, BLOCK_H, D, BLOCK_D, PAGE, BITS, KEY_CHANNEL, SUB, VECTOR, VROWS, STAGES, ASM,
                      PREFETCH)
    EPI_H: tl.constexpr = 1 if VECTOR else BLOCK_H   # the epilogue's rows
    if VECTOR:
        heads = kvh + tl.arange(0, 1)
        mask_h = heads >= 0
    offs_d = tl.arange(0, BLOCK_D)
    if BITS == 4 and not VECTOR:   # the tensor-core sums' channels are [even..., odd...] (kv_quant_tile.channels)
        chan = channels(BLOCK_D, BITS)
    else:
        chan = offs_d
    finish_split(acc, m, l, o_ptr, lse_ptr, out_ptr, sem_ptr, b, kvh, split, seq_len, heads, mask_h, chan,
                 chan < D, stride_ob, stride_oh, Hq, Hkv, NUM_SPLITS, PAGES_PER_SPLIT, D, EPI_H, BLOCK_D, PAGE,
                 SPLIT)


def default_config(bits: int, key_channel: bool, mha: bool = False) -> dict:
    """Keys per tile (a page of fewer keys is one tile), warps, pipeline stages, per-token params one
    tile ahead (`prefetch`), byte-permute conversions (`asm`), and for MHA (one q head per kv head) the
    CUDA-core path (`vector`): warps, paths and conversions the fastest on an H200
    (scripts/bench_decode_quant.py --sweep, 128 sequences x 3000 tokens, 32q/32kv and 32q/8kv;
    docs/benchmarks.md, eighth, tenth and eleventh sessions). Stages: 5 (the ninth session's change,
    which keeps the next tile's codes in flight through a tile's compute in sm_90 builds) lost on the
    H200 in every case (MHA int8 1723 vs 1450 us at 2; GQA int4 510 vs 444). The MHA loops were bound by
    latency at few resident warps: folding their value sums (fold_rows) freed the registers that held
    them, and the fastest configs changed with it (eleventh session)."""
    if mha and bits == 8:   # CUDA cores, folded sums, 96 registers, 5 programs an SM: 1,111 us (unfolded at a
        # 168-register cap, the tenth session's default: 1,442; folded at that cap 1,345; 3 stages 1,829)
        return {"sub": 64, "num_warps": 4, "num_stages": 2, "prefetch": False, "vector": True}
    if mha and key_channel:   # 2 warps, folded: 1,295-1,298 us at 3 stages or 2 (unfolded 1,821; 4 warps 2,338+)
        return {"sub": 64, "num_warps": 2, "num_stages": 3, "prefetch": True, "vector": True}
    if mha:   # int4 rotate, 2 warps, folded, 168-register cap: 1,215 us (3 stages uncapped 1,279-1,303)
        return {"sub": 64, "num_warps": 2, "num_stages": 2, "prefetch": False, "vector": True, "maxnreg": 168}
    # GQA: int8 335-349 us at 3-6 stages (2: 353); int4 at 2 stages (5: 510 vs 444) with the bitwise
    # conversions (444-446 vs 472-475, 735-738 vs 794-800 us)
    return {"sub": 64, "num_warps": 4, "num_stages": 3 if bits == 8 else 2, "prefetch": True, "vector": False,
            "asm": bits == 8}


def fold_rows(sub: int, head_dim: int, bits: int, num_warps: int, fold: bool = True) -> int:
    """Key slots of the MHA path's partial value sums (`_fold`): the rows one pass of a (sub, bytes)
    code tile's layout covers (16-byte vectors along a row: 32 * 16 / bytes rows a warp), or all sub
    rows (`fold` False: the sums per key slot, as before the eleventh session)."""
    row_bytes = triton.next_power_of_2(head_dim) * bits // 8
    return min(sub, max(1, num_warps * 512 // row_bytes)) if fold else sub


def _register_cap(cfg: dict) -> dict:
    """`maxnreg` (tuning): a register cap per thread, for more programs an SM; not under the interpreter."""
    return {"maxnreg": cfg["maxnreg"]} if cfg.get("maxnreg") and not INTERPRETED else {}


def paged_decode_attention_quant(q, cache, block_tables, seq_lens, sm_scale: float | None = None,
                                 num_splits: int | None = None, out: torch.Tensor | None = None,
                                 config: dict | None = None) -> torch.Tensor:
    """q (B, Hq, D), cache an online QuantKVCache with one quantizer per token and kv head (group =
    head_dim; what the engine routes here) whose K/V code tensors share one layout; the result goes
    to `out` ((B, Hq, D), unit stride along D) where given. `config` (tuning): `sub` keys per tile,
    `num_warps`, `num_stages`, `prefetch`, `vector` (MHA on the CUDA-core path; LMDEPOT_KVQ_VECTOR=0
    never), `asm` (the byte-permute code conversions; False: the portable bitwise ones), `maxnreg`,
    `fold` (the MHA path's value sums folded to a thread's rows, `fold_rows`; default True)."""
    from lmdepot.runtime.ops.kv_quant import hadamard_on

    B, Hq, D = q.shape
    kc, vc = cache.codes
    page, Hkv = kc.shape[1], kc.shape[2]
    if cache.group != D:
        raise ValueError(f"decode attention over a quantized cache: one quantizer per head (group {D}), "
                         f"got group {cache.group}")
    cfg = default_config(cache.bits, cache.key_channel, Hq == Hkv) | (config or {})
    vector = Hq == Hkv and VECTOR_MHA and cfg["vector"]
    tile = min(page, cfg["sub"])   # keys per tile: a page of fewer keys is one tile
    sm_scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    rot = hadamard_on(D, str(q.device)) if cache.rotate else None
    if rot is not None and not cache.key_channel:   # rotated keys: score with the rotated query
        q = (q.float() @ rot).to(q.dtype)
    num_splits, pages_per_split = split_plan(B, Hkv, block_tables.shape[1], num_splits)
    part_o, part_lse, y, sems = split_buffers(q, Hkv, num_splits, None if rot is not None else out)
    ks, kz, kmin, ksink, vs, vz, ch = param_operands(cache)
    _split_kernel[(B, Hkv, num_splits)](
        q, kc, vc, ks, kz, vs, vz, kmin, ksink, block_tables, seq_lens, part_o, part_lse, y, sems, sm_scale,
        q.stride(0), q.stride(1), kc.stride(0), vs.stride(0), ch.stride(0), ch.stride(1), block_tables.stride(0),
        y.stride(0), y.stride(1), num_splits, pages_per_split, Hq, Hkv,
        GROUPS=Hq // Hkv, BLOCK_H=max(16, triton.next_power_of_2(Hq // Hkv)), D=D,
        BLOCK_D=triton.next_power_of_2(D), PAGE=page, BITS=cache.bits, KEY_CHANNEL=cache.key_channel,
        SUB=tile, C_S=kc.stride(1), C_H=kc.stride(2), P_S=vs.stride(1), P_H=vs.stride(2),
        VECTOR=vector, VROWS=fold_rows(tile, D, cache.bits, cfg["num_warps"], cfg.get("fold", True)),
        STAGES=cfg["num_stages"], ASM=cfg.get("asm", True) and not INTERPRETED,
        PREFETCH=cfg["prefetch"], SPLIT=num_splits > 1,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **_register_cap(cfg))
    if rot is not None:   # values were quantized rotated: rotate the weighted sum back
        y = (y.float() @ rot).to(y.dtype) if out is None else out.copy_(y.float() @ rot)
    return y
