"""Decode attention over a quantized paged KV cache (online int8 / int4, see runtime/ops/kv_quant.py).

Same split-K structure as paged_decode_attention.py (one program per (sequence, kv head, split),
GQA heads grouped, the same split plan and in-launch merge epilogue `finish_split`); each page's
codes are dequantized in registers right after the load, so the cache is read at its quantized size:
- per-token quantizers (K unless `key_channel`, V always): x^ = (code - zero) * scale with
  scale/zero per token, kv head and group of GROUP channels;
- per-channel keys (`key_channel`): x^ = code * scale + min with scale/min per block, kv head and
  channel, and the block's first key read exactly from its fp16 sink row.
int4 codes sit two per byte (channel 2i in the low nibble). A Hadamard rotation is undone outside
the kernel: q.k = (qH).(kH) for rotated keys, and sum p (vH) H = (sum p vH) H for rotated values.
The tile loaders live in kv_quant_tile.py, shared with prefill_attention_quant.py.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from lmdepot.runtime.kernels.kv_quant_tile import channel_key_tile, param_operands, per_token_tile
from lmdepot.runtime.kernels.paged_decode_attention import finish_split, split_buffers, split_plan


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
def _split_kernel(q_ptr, kc_ptr, vc_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, kmin_ptr, ksink_ptr,
                  bt_ptr, lens_ptr, o_ptr, lse_ptr, out_ptr, sem_ptr, sm_scale,
                  stride_qb, stride_qh, c_b, c_s, c_h, p_b, p_s, p_h, ch_b, ch_h,
                  stride_bt, stride_ob, stride_oh, NUM_SPLITS, PAGES_PER_SPLIT, Hq, Hkv,
                  GROUPS: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                  PAGE: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, KEY_CHANNEL: tl.constexpr,
                  SUB: tl.constexpr, SPLIT: tl.constexpr):
    b, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq_len = tl.load(lens_ptr + b)
    offs_h = tl.arange(0, BLOCK_H)
    heads = kvh * GROUPS + offs_h
    mask_h = offs_h < GROUPS
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_h[:, None] & mask_d[None, :], other=0.0)
    m = tl.full((BLOCK_H,), -1e30, dtype=tl.float32)
    l = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_D), dtype=tl.float32)
    offs_s = tl.arange(0, SUB)
    first = split * PAGES_PER_SPLIT
    last = tl.minimum(first + PAGES_PER_SPLIT, tl.cdiv(seq_len, PAGE))
    for p in range(first, last):
        blk = tl.load(bt_ptr + b * stride_bt + p).to(tl.int64)
        # Codes by byte (kv_quant_tile.codes_tile's word loads took 110 -> 221 registers here on sm_90).
        # A page in SUB-key tiles: whole 64-key pages of dequantized K and V made ptxas spill kilobytes
        # a thread on sm_90 (tests/kernels/test_kv_quant_decode_attention.py checks the build).
        for t0 in range(0, tl.minimum(PAGE, seq_len - p * PAGE), SUB):
            pos = t0 + offs_s   # key positions within the page
            mask_s = p * PAGE + pos < seq_len
            kv_mask = mask_s[:, None] & mask_d[None, :]
            c_row = blk * c_b + pos[:, None] * c_s + kvh * c_h
            p_row = blk * p_b + pos[:, None] * p_s + kvh * p_h
            if KEY_CHANNEL:   # one block: its per-channel params are one (1, BLOCK_D) row
                k = channel_key_tile(kc_ptr, ks_ptr, kmin_ptr, ksink_ptr, c_row, blk * ch_b + kvh * ch_h,
                                     pos[:, None] == 0, offs_d, kv_mask, kv_mask, mask_d[None, :], BITS, False)
            else:
                k = per_token_tile(kc_ptr, ks_ptr, kz_ptr, c_row, p_row, offs_d, kv_mask, kv_mask, BITS, GROUP, False)
            s = tl.dot(q, tl.trans(k.to(q.dtype))) * sm_scale
            s = tl.where(mask_s[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = tl.exp(m - m_new)
            prob = tl.exp(s - m_new[:, None])
            v = per_token_tile(vc_ptr, vs_ptr, vz_ptr, c_row, p_row, offs_d, kv_mask, kv_mask, BITS, GROUP, False)
            v = tl.where(kv_mask, v, 0.0)
            l = l * alpha + tl.sum(prob, axis=1)
            acc = acc * alpha[:, None] + tl.dot(prob.to(q.dtype), v.to(q.dtype))
            m = m_new
    finish_split(acc, m, l, o_ptr, lse_ptr, out_ptr, sem_ptr, b, kvh, split, seq_len, heads, mask_h, offs_d, mask_d,
                 stride_ob, stride_oh, Hq, Hkv, NUM_SPLITS, PAGES_PER_SPLIT, D, BLOCK_H, BLOCK_D, PAGE, SPLIT)


DECODE_SUB = 16   # keys per tile (see the page loop); a page of fewer keys is one tile


def paged_decode_attention_quant(q, cache, block_tables, seq_lens, sm_scale: float | None = None,
                                 num_splits: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """q (B, Hq, D), cache an online QuantKVCache whose K/V code tensors share one layout; the result
    goes to `out` ((B, Hq, D), unit stride along D) where given."""
    from lmdepot.runtime.ops.kv_quant import hadamard_on

    B, Hq, D = q.shape
    kc, vc = cache.codes
    page, Hkv = kc.shape[1], kc.shape[2]
    sm_scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    rot = hadamard_on(D, str(q.device)) if cache.rotate else None
    if rot is not None and not cache.key_channel:   # rotated keys: score with the rotated query
        q = (q.float() @ rot).to(q.dtype)
    num_splits, pages_per_split = split_plan(B, Hkv, block_tables.shape[1], num_splits)
    part_o, part_lse, y, sems = split_buffers(q, Hkv, num_splits, None if rot is not None else out)
    ks, kz, kmin, ksink, vs, vz, ch = param_operands(cache)
    _split_kernel[(B, Hkv, num_splits)](
        q, kc, vc, ks, kz, vs, vz, kmin, ksink, block_tables, seq_lens, part_o, part_lse, y, sems, sm_scale,
        q.stride(0), q.stride(1), kc.stride(0), kc.stride(1), kc.stride(2),
        vs.stride(0), vs.stride(1), vs.stride(2), ch.stride(0), ch.stride(1), block_tables.stride(0),
        y.stride(0), y.stride(1), num_splits, pages_per_split, Hq, Hkv,
        GROUPS=Hq // Hkv, BLOCK_H=max(16, triton.next_power_of_2(Hq // Hkv)), D=D,
        BLOCK_D=triton.next_power_of_2(D), PAGE=page, BITS=cache.bits, GROUP=cache.group,
        KEY_CHANNEL=cache.key_channel, SUB=min(page, DECODE_SUB), SPLIT=num_splits > 1)
    if rot is not None:   # values were quantized rotated: rotate the weighted sum back
        y = (y.float() @ rot).to(y.dtype) if out is None else out.copy_(y.float() @ rot)
    return y
