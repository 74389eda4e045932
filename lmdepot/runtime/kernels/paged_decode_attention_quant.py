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
So the loop body is a load of codes, one conversion per code and the two tensor-core products, like
the float kernel's: the codes feed tl.dot directly, so Triton pipelines their loads (cp.async) as it
does the float cache's pages. The first version dequantized each (16-key) tile in registers, with a
scale and zero gathered per element: 6.5% of copy bandwidth on an H200 (int8, 64 x 3000 tokens,
scripts/bench_decode_quant.py), 8x slower than the float kernel reading twice the bytes.
int4 codes sit two per byte (channel 2i in the low nibble): the low and high nibbles are two
operands against the even and odd channels of q, and V's two halves are interleaved at the end.
A Hadamard rotation is undone outside the kernel: q.k = (qH).(kH) for rotated keys, and sum p (vH) H
= (sum p vH) H for rotated values. Operands are fp16 (codes 0..255 are exact; p * scale keeps 11
bits where bf16 would keep 8), float32 for float32 queries (tests; TF32 on a GPU).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from lmdepot.runtime.kernels.kv_quant_tile import param_operands
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
                  PAGE: tl.constexpr, BITS: tl.constexpr, KEY_CHANNEL: tl.constexpr, SUB: tl.constexpr,
                  SPLIT: tl.constexpr):
    b, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq_len = tl.load(lens_ptr + b)
    op_ty = tl.float32 if q_ptr.dtype.element_ty == tl.float32 else tl.float16
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
    q_sum = tl.sum(q0, axis=1) + tl.sum(q1, axis=1)
    m = tl.full((BLOCK_H,), -1e30, dtype=tl.float32)
    l = tl.zeros((BLOCK_H,), dtype=tl.float32)
    corr = tl.zeros((BLOCK_H,), dtype=tl.float32)    # sum_t p_t scale_t zero_t of V
    acc0 = tl.zeros((BLOCK_H, W), dtype=tl.float32)  # int4: even channels; int8: all
    acc1 = tl.zeros((BLOCK_H, W), dtype=tl.float32)  # int4: odd channels
    offs_s = tl.arange(0, SUB)
    TILES: tl.constexpr = PAGE // SUB
    first = split * PAGES_PER_SPLIT
    last = tl.minimum((first + PAGES_PER_SPLIT) * TILES, tl.cdiv(seq_len, SUB))
    for t in range(first * TILES, last):
        page = t // TILES
        blk = tl.load(bt_ptr + b * stride_bt + page).to(tl.int64)
        pos = (t % TILES) * SUB + offs_s   # key positions within the page
        mask_s = page * PAGE + pos < seq_len
        c_off = blk * c_b + pos[:, None] * c_s + kvh * c_h + offs_w[None, :]
        c_mask = mask_s[:, None] & mask_w[None, :]
        kc = tl.load(kc_ptr + c_off, mask=c_mask, other=0)
        vc = tl.load(vc_ptr + c_off, mask=c_mask, other=0)
        p_off = blk * p_b + pos * p_s + kvh * p_h
        if KEY_CHANNEL:   # int4: per-block, per-channel params of this page, split by nibble
            ch = blk * ch_b + kvh * ch_h + offs_w * 2
            s0 = tl.load(ks_ptr + ch, mask=mask_w, other=0.0).to(tl.float32)
            s1 = tl.load(ks_ptr + ch + 1, mask=mask_w, other=0.0).to(tl.float32)
            lo = tl.sum(q0 * tl.load(kmin_ptr + ch, mask=mask_w, other=0.0).to(tl.float32)[None, :], axis=1) + \
                tl.sum(q1 * tl.load(kmin_ptr + ch + 1, mask=mask_w, other=0.0).to(tl.float32)[None, :], axis=1)
            sink = tl.sum(q0 * tl.load(ksink_ptr + ch, mask=mask_w, other=0.0).to(tl.float32)[None, :], axis=1) + \
                tl.sum(q1 * tl.load(ksink_ptr + ch + 1, mask=mask_w, other=0.0).to(tl.float32)[None, :], axis=1)
            raw = tl.dot((q0 * s0[None, :]).to(op_ty), tl.trans((kc & 0xF).to(op_ty)))
            raw += tl.dot((q1 * s1[None, :]).to(op_ty), tl.trans((kc >> 4).to(op_ty)))
            score = tl.where(pos[None, :] == 0, sink[:, None], raw + lo[:, None])
        else:
            k_scale = tl.load(ks_ptr + p_off, mask=mask_s, other=0.0).to(tl.float32)
            k_zero = tl.load(kz_ptr + p_off, mask=mask_s, other=0).to(tl.float32)
            if BITS == 8:
                raw = tl.dot(q0.to(op_ty), tl.trans(kc.to(op_ty)))
            else:
                raw = tl.dot(q0.to(op_ty), tl.trans((kc & 0xF).to(op_ty)))
                raw += tl.dot(q1.to(op_ty), tl.trans((kc >> 4).to(op_ty)))
            score = (raw - q_sum[:, None] * k_zero[None, :]) * k_scale[None, :]
        s = tl.where(mask_s[None, :], score * sm_scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        prob = tl.exp(s - m_new[:, None])
        v_scale = tl.load(vs_ptr + p_off, mask=mask_s, other=0.0).to(tl.float32)
        v_zero = tl.load(vz_ptr + p_off, mask=mask_s, other=0).to(tl.float32)
        w = prob * v_scale[None, :]
        l = l * alpha + tl.sum(prob, axis=1)
        corr = corr * alpha + tl.sum(w * v_zero[None, :], axis=1)
        if BITS == 8:
            acc0 = acc0 * alpha[:, None] + tl.dot(w.to(op_ty), vc.to(op_ty))
        else:
            acc0 = acc0 * alpha[:, None] + tl.dot(w.to(op_ty), (vc & 0xF).to(op_ty))
            acc1 = acc1 * alpha[:, None] + tl.dot(w.to(op_ty), (vc >> 4).to(op_ty))
        m = m_new
    if BITS == 8:
        acc = acc0 - corr[:, None]
    else:   # even and odd channels back in order
        acc = tl.reshape(tl.join(acc0 - corr[:, None], acc1 - corr[:, None]), (BLOCK_H, BLOCK_D))
    offs_d = tl.arange(0, BLOCK_D)
    finish_split(acc, m, l, o_ptr, lse_ptr, out_ptr, sem_ptr, b, kvh, split, seq_len, heads, mask_h, offs_d,
                 offs_d < D, stride_ob, stride_oh, Hq, Hkv, NUM_SPLITS, PAGES_PER_SPLIT, D, BLOCK_H, BLOCK_D, PAGE,
                 SPLIT)


def default_config(bits: int, key_channel: bool) -> dict:
    """Keys per tile (a page of fewer keys is one tile), warps, pipeline stages: the fastest on an H200
    (scripts/bench_decode_quant.py --sweep, 128 sequences x 3000 tokens, 32q/32kv and 32q/8kv; docs/
    benchmarks.md). sm_90 builds (Triton 3.9) of these: 124 / 161 / 241 registers, no spills."""
    if bits == 8:
        return {"sub": 32, "num_warps": 4, "num_stages": 2}
    return {"sub": 64, "num_warps": 4, "num_stages": 3 if key_channel else 2}



def paged_decode_attention_quant(q, cache, block_tables, seq_lens, sm_scale: float | None = None,
                                 num_splits: int | None = None, out: torch.Tensor | None = None,
                                 config: dict | None = None) -> torch.Tensor:
    """q (B, Hq, D), cache an online QuantKVCache with one quantizer per token and kv head (group =
    head_dim; what the engine routes here) whose K/V code tensors share one layout; the result goes
    to `out` ((B, Hq, D), unit stride along D) where given. `config` (tuning): `sub` keys per tile,
    `num_warps`, `num_stages`."""
    from lmdepot.runtime.ops.kv_quant import hadamard_on

    B, Hq, D = q.shape
    kc, vc = cache.codes
    page, Hkv = kc.shape[1], kc.shape[2]
    if cache.group != D:
        raise ValueError(f"decode attention over a quantized cache: one quantizer per head (group {D}), "
                         f"got group {cache.group}")
    cfg = default_config(cache.bits, cache.key_channel) | (config or {})
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
        BLOCK_D=triton.next_power_of_2(D), PAGE=page, BITS=cache.bits,
        KEY_CHANNEL=cache.key_channel, SUB=min(page, cfg["sub"]), SPLIT=num_splits > 1,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if rot is not None:   # values were quantized rotated: rotate the weighted sum back
        y = (y.float() @ rot).to(y.dtype) if out is None else out.copy_(y.float() @ rot)
    return y
