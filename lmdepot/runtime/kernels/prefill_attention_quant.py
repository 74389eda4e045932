"""Prefill/extend attention over a quantized paged KV cache (online int8 / int4, runtime/ops/kv_quant.py).

The float prefill kernel's structure (prefill_attention.py: flat varlen batch through q_start_loc,
context_lens and block_tables; BLOCK_M rows of (token, q head) of one kv head's GQA group; BLOCK_N
key tiles gathered through the block table across pages; causal diagonal and sliding window; decode
rows in the same launch; online softmax in fp32 with exp2) with each K and V tile dequantized in
registers by the helpers the decode-quant kernel uses (kv_quant_tile.py), so cached keys are read at
their quantized size and never materialized in float. Schemes: int8 / int4 per-token (plain), int4
rotated per-token (rotate), int4 per-channel keys + rotated per-token values (channel); per-token
quantizers of GROUP channels (the routing sends only the default, the whole head). As in decode, a
Hadamard rotation is folded into q (rotated keys) and the output (rotated values). Static scales
(--kv-scales static) stay on the torch reference.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from lmdepot.runtime.kernels.kv_quant_tile import channel_key_tile, param_operands, per_token_tile
from lmdepot.runtime.kernels.prefill_attention import LOG2E, NO_WINDOW
from lmdepot.runtime.kernels.prefill_attention import default_config as float_config


def reference(q, cache, block_tables, q_start_loc, context_lens, sm_scale, sliding_window=0):
    """The float prefill reference over the whole cache dequantized (ops/kv_quant.gather_kv_quant);
    float32 math. Slots past each context are dequantized too but never read."""
    from lmdepot.runtime.kernels import prefill_attention
    from lmdepot.runtime.ops.kv_quant import gather_kv_quant

    n, page, hkv = cache.codes[0].shape[:3]
    k, v = gather_kv_quant(cache, torch.arange(n * page, device=q.device), torch.float32)
    return prefill_attention.reference(q, k.view(n, page, hkv, -1), v.view(n, page, hkv, -1), block_tables,
                                       q_start_loc, context_lens, sm_scale, sliding_window)


@triton.jit
def _tile(acc, m_i, l_i, q, start, qpos, hi, window, seq, kvh, bt_ptr, kc_ptr, vc_ptr, ks_ptr, kz_ptr,
          vs_ptr, vz_ptr, kmin_ptr, ksink_ptr, qk_scale, stride_bt, c_b, c_s, c_h, p_b, p_s, p_h, ch_b, ch_h,
          PAGE: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
          BITS: tl.constexpr, GROUP: tl.constexpr, KEY_CHANNEL: tl.constexpr, MASK: tl.constexpr):
    """One BLOCK_N tile of keys from position `start`; MASK=False: every key is visible to every row."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kpos = start + offs_n
    mask_n = kpos < hi
    mask = mask_n[:, None] & (offs_d < D)[None, :]
    blk = tl.load(bt_ptr + seq * stride_bt + kpos // PAGE, mask=mask_n, other=0).to(tl.int64)[:, None]
    slot = (kpos % PAGE)[:, None]
    c_row = blk * c_b + slot * c_s + kvh * c_h
    p_row = blk * p_b + slot * p_s + kvh * p_h
    rows = mask_n[:, None]   # whole rows (D == BLOCK_D): codes loaded as 32-bit words (kv_quant_tile.codes_tile)
    if KEY_CHANNEL:
        k = channel_key_tile(kc_ptr, ks_ptr, kmin_ptr, ksink_ptr, c_row, blk * ch_b + kvh * ch_h, slot == 0,
                             offs_d, mask, rows, mask, BITS, D == BLOCK_D)
    else:
        k = per_token_tile(kc_ptr, ks_ptr, kz_ptr, c_row, p_row, offs_d, mask, rows, BITS, GROUP, D == BLOCK_D)
    qk = tl.dot(q, tl.trans(k.to(q.dtype))) * qk_scale
    if MASK:
        valid = (kpos[None, :] <= qpos[:, None]) & (kpos[None, :] > qpos[:, None] - window) & mask_n[None, :]
        qk = tl.where(valid, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = per_token_tile(vc_ptr, vs_ptr, vz_ptr, c_row, p_row, offs_d, mask, rows, BITS, GROUP,
                       D == BLOCK_D)   # masked keys: 0
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
    return acc, m_new, l_i


@triton.jit
def _kernel(q_ptr, o_ptr, kc_ptr, vc_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, kmin_ptr, ksink_ptr,
            bt_ptr, qsl_ptr, lens_ptr, qk_scale, window,
            stride_qt, stride_qh, stride_ot, stride_oh, c_b, c_s, c_h, p_b, p_s, p_h, ch_b, ch_h, stride_bt,
            GROUPS: tl.constexpr, PAGE: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
            KEY_CHANNEL: tl.constexpr):
    mblk, seq, kvh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    if mblk * BLOCK_M >= q_len * GROUPS:   # the grid is sized for the longest sequence
        return
    ctx_len = tl.load(lens_ptr + seq)
    past = ctx_len - q_len

    rows = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
    tok = rows // GROUPS
    head = kvh * GROUPS + rows % GROUPS
    mask_m = tok < q_len
    qpos = past + tok
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    q = tl.load(q_ptr + (q_start + tok)[:, None].to(tl.int64) * stride_qt + head[:, None] * stride_qh
                + offs_d[None, :], mask=mask_m[:, None] & mask_d[None, :], other=0.0)

    # Key ranges as in prefill_attention.py: [lo, hi) needed, [full_lo, full_hi) seen whole by all rows.
    first_tok = (mblk * BLOCK_M) // GROUPS
    last_tok = tl.minimum((mblk * BLOCK_M + BLOCK_M - 1) // GROUPS, q_len - 1)
    hi = past + last_tok + 1
    lo = (tl.maximum(past + first_tok - window + 1, 0) // BLOCK_N) * BLOCK_N
    full_lo = tl.maximum(lo, tl.cdiv(tl.maximum(past + last_tok - window + 1, 0), BLOCK_N) * BLOCK_N)
    full_hi = tl.maximum(full_lo, ((past + first_tok + 1) // BLOCK_N) * BLOCK_N)

    m_i = tl.full((BLOCK_M,), -1e30, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start in range(lo, full_lo, BLOCK_N):
        acc, m_i, l_i = _tile(acc, m_i, l_i, q, start, qpos, hi, window, seq, kvh, bt_ptr, kc_ptr, vc_ptr,
                              ks_ptr, kz_ptr, vs_ptr, vz_ptr, kmin_ptr, ksink_ptr, qk_scale, stride_bt,
                              c_b, c_s, c_h, p_b, p_s, p_h, ch_b, ch_h, PAGE, D, BLOCK_D, BLOCK_N,
                              BITS, GROUP, KEY_CHANNEL, True)
    for start in range(full_lo, full_hi, BLOCK_N):
        acc, m_i, l_i = _tile(acc, m_i, l_i, q, start, qpos, hi, window, seq, kvh, bt_ptr, kc_ptr, vc_ptr,
                              ks_ptr, kz_ptr, vs_ptr, vz_ptr, kmin_ptr, ksink_ptr, qk_scale, stride_bt,
                              c_b, c_s, c_h, p_b, p_s, p_h, ch_b, ch_h, PAGE, D, BLOCK_D, BLOCK_N,
                              BITS, GROUP, KEY_CHANNEL, False)
    for start in range(full_hi, hi, BLOCK_N):
        acc, m_i, l_i = _tile(acc, m_i, l_i, q, start, qpos, hi, window, seq, kvh, bt_ptr, kc_ptr, vc_ptr,
                              ks_ptr, kz_ptr, vs_ptr, vz_ptr, kmin_ptr, ksink_ptr, qk_scale, stride_bt,
                              c_b, c_s, c_h, p_b, p_s, p_h, ch_b, ch_h, PAGE, D, BLOCK_D, BLOCK_N,
                              BITS, GROUP, KEY_CHANNEL, True)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(o_ptr + (q_start + tok)[:, None].to(tl.int64) * stride_ot + head[:, None] * stride_oh
             + offs_d[None, :], out.to(o_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def default_config(rows: int, head_dim: int) -> dict:
    """Tiles for an H100/H200-class GPU; rows = longest q_len x GQA group. The float kernel's 64-key
    tiles spill here (sm_90 build, head dim 128: 1.2 KB a thread at 128 x 64, 8 warps: the dequantized
    K/V tiles live in registers beside the accumulator); 32-key tiles of 128 rows fit in 252 registers,
    16-key tiles of 64 rows spill 32 bytes (tests/kernels/test_prefill_attention_quant.py checks)."""
    if head_dim > 128:
        return float_config(rows, head_dim)
    if rows >= 512:
        return dict(block_m=128, block_n=32, num_warps=8, num_stages=2)
    return dict(block_m=64, block_n=16, num_warps=4, num_stages=2)


def prefill_attention_quant(q, cache, block_tables, q_start_loc, context_lens, max_q_len: int,
                            sm_scale: float | None = None, sliding_window: int = 0,
                            out: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """q (T, Hq, D); cache an online QuantKVCache (triton_ops._kv_kernels_fit) holding every key, the new ones included;
    block_tables (S, max_pages) int32; q_start_loc (S + 1,) int32; context_lens (S,) int32;
    max_q_len (python int >= every q_len) only sizes the grid: no device sync."""
    from lmdepot.runtime.ops.kv_quant import hadamard_on

    T, Hq, D = q.shape
    kc, vc = cache.codes
    page, Hkv = kc.shape[1], kc.shape[2]
    groups = Hq // Hkv
    sm_scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    rot = hadamard_on(D, str(q.device)) if cache.rotate else None
    qr = (q.float() @ rot).to(q.dtype) if rot is not None and not cache.key_channel else q
    cfg = default_config(max_q_len * groups, D)
    cfg.update(config or {})
    y = out if out is not None else torch.empty_like(q)
    ks, kz, kmin, ksink, vs, vz, ch = param_operands(cache)
    grid = (triton.cdiv(max(max_q_len, 1) * groups, cfg["block_m"]), block_tables.shape[0], Hkv)
    _kernel[grid](
        qr, y, kc, vc, ks, kz, vs, vz, kmin, ksink, block_tables, q_start_loc, context_lens, sm_scale * LOG2E,
        sliding_window if sliding_window else NO_WINDOW,
        qr.stride(0), qr.stride(1), y.stride(0), y.stride(1), kc.stride(0), kc.stride(1), kc.stride(2),
        vs.stride(0), vs.stride(1), vs.stride(2), ch.stride(0), ch.stride(1), block_tables.stride(0),
        GROUPS=groups, PAGE=page, D=D, BLOCK_D=triton.next_power_of_2(D), BLOCK_M=cfg["block_m"],
        BLOCK_N=cfg["block_n"], BITS=cache.bits, GROUP=cache.group, KEY_CHANNEL=cache.key_channel,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if rot is not None:   # values were quantized rotated: rotate the weighted sum back
        y.copy_(y.float() @ rot)
    return y
