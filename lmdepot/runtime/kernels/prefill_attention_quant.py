"""Prefill/extend attention over a quantized paged KV cache (online int8 / int4, runtime/ops/kv_quant.py).

The float prefill kernel's structure (prefill_attention.py: flat varlen batch through q_start_loc,
context_lens and block_tables; BLOCK_M rows of (token, q head) of one kv head's GQA group; causal
diagonal and sliding window; decode rows in the same launch; online softmax in fp32 with exp2) over
tiles of raw codes. A tile's codes are loaded as they lie in the cache (pipelined by Triton:
cp.async, 16 bytes a load) and become fp16 with bitwise ops (`_codes`: exact 0..255); each
quantizer is a few vectors per tile, never a parameter gathered per element:
- per-token quantizers (K unless `key_channel`, V always; one (scale, zero) per token and kv head)
  are (BLOCK_N,) vectors applied to the tile rows, (code - zero) * scale (an exact fp16 difference,
  one rounding, as an fp16 cache holds the keys). On sm_90 a converted K or V tile goes back to
  shared memory for the tensor cores anyway (wgmma reads its second operand from there), so this
  is two packed fp16 ops per two codes. The decode kernel's alternative, the quantizers applied
  to the scores and weights, was built and timed here too: with BLOCK_M rows of queries (not
  decode's 16 heads) each thread holds a quarter of the tile's keys in the accumulator layout, so
  each param vector costs BLOCK_N / 4 loads a thread plus (rows x keys) scale and correction work;
  sm_90 (Triton 3.9, 128 x 64 tiles, 8 warps, int8): 1363 SASS in the masked loop and 8 bytes
  spilled vs 819 on the tiles; on an H200 it was 5-27% slower in every case and scheme
  (docs/benchmarks.md, sixth session), so it went;
- per-channel keys (`key_channel`, per block, kv head and channel: k = code * scale + min; the
  block's first key exact in its fp16 sink row): (D,) vectors applied to the key tile and the
  sink row selected for the block's position 0. Applying them to q instead ((q * scale).code +
  q.min and q.sink, as the decode kernel does) costs (BLOCK_M x D) work a tile and three
  reductions: 3142 SASS with spills at 128 x 64 (a build during this rewrite), vs 1020 on the tile;
- int4: two codes per byte (channel 2i in the low nibble), split and interleaved in registers.
Tiles never straddle a cache block: BLOCK_N is at most the page's largest power-of-two divisor
and tiles start at its multiples, so one block's channel params hold for a whole tile, its
block-table entry is one scalar load, and with the in-block strides constant (constexpr) its
code and param offsets fold into the load instructions. (The float kernel gathers BLOCK_N keys
across pages; with pages of 16 this kernel's tiles are 16 keys.) The previous version
dequantized every K/V tile element by element with a scale and zero gathered per element (1203 /
1222 / 699 SASS per 32 keys unmasked for int8 / int4 / int4 channel, now 615 / 682 / 818 per 64)
and was 7.4x slower than the float kernel for int8 on an H200 (scripts/bench_prefill_quant.py).
A Hadamard rotation is folded into q (rotated keys) and the output (rotated values). Operands are
fp16 (bf16 queries are converted: p and the dequantized keys keep 11 bits), float32 for float32
queries (tests). Static scales (--kv-scales static) and per-token quantizers of fewer channels
than the head stay on the torch reference (triton_ops._kv_kernels_fit); the launcher refuses the
latter, and head dims that are not a power of two.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from lmdepot.runtime.kernels.kv_quant_tile import channels, codes_f16, nibbles, param_operands
from lmdepot.runtime.kernels.prefill_attention import LOG2E, NO_WINDOW, STEP_INTS, STEP_POINTERS


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
def _codes(x, BITS: tl.constexpr):
    """A tile of cached rows as fp16 (N, D) of 1024 + code (kv_quant_tile; int4: x holds each byte
    twice, the channels come out in `channels` order)."""
    if BITS == 4:
        x = nibbles(x)
    return codes_f16(x, False)


@triton.jit
def _token_params(s_ptr, z_ptr, off, live, MASK: tl.constexpr):
    """(scale, zero) of a tile's keys, one per key (BLOCK_N,). MASK: keys past the sequence's last
    (not `live`) get scale 0: their slots may hold anything (never-written cache memory)."""
    if MASK:
        scale = tl.load(s_ptr + off, mask=live, other=0.0)
    else:
        scale = tl.load(s_ptr + off)
    return scale, tl.load(z_ptr + off)


@triton.jit
def _tile(acc, m_i, l_i, q, start, qpos, hi, window, seq, kvh, bt_ptr, kc_ptr, vc_ptr,
          ks_ptr, kz_ptr, vs_ptr, vz_ptr, kmin_ptr, ksink_ptr, qk_scale, stride_bt, c_b, p_b, ch_b, ch_h,
          C_S: tl.constexpr, C_H: tl.constexpr, P_S: tl.constexpr, P_H: tl.constexpr, PAGE: tl.constexpr,
          D: tl.constexpr, BLOCK_N: tl.constexpr, BITS: tl.constexpr, KEY_CHANNEL: tl.constexpr,
          MASK: tl.constexpr):
    """The BLOCK_N keys from position `start`, all in one cache block; MASK=False: every key is
    visible to every row. Codes are loaded unmasked: the tile lies in a block of the sequence, and
    codes past its last key are finite and meet zero weights."""
    op_ty = q.dtype
    offs_n = tl.arange(0, BLOCK_N)
    kpos = start + offs_n
    live = kpos < hi
    blk = tl.load(bt_ptr + seq * stride_bt + start // PAGE).to(tl.int64)
    first = start % PAGE
    # constexpr strides: a tile's element offsets are constants from one scalar base
    c_off = blk * c_b + first * C_S + kvh * C_H + (offs_n[:, None] * C_S + (tl.arange(0, D) % (D * BITS // 8))[None, :])
    kc = _codes(tl.load(kc_ptr + c_off), BITS).to(op_ty)
    vc = _codes(tl.load(vc_ptr + c_off), BITS).to(op_ty)
    p_off = blk * p_b + first * P_S + kvh * P_H + offs_n * P_S
    if KEY_CHANNEL:   # the block's per-channel (scale, min) on the key tile; its first key exact
        ch = blk * ch_b + kvh * ch_h + channels(D, BITS)
        k = (kc - 1024.0) * tl.load(ks_ptr + ch).to(op_ty)[None, :] + tl.load(kmin_ptr + ch).to(op_ty)[None, :]
        k = tl.where((first + offs_n == 0)[:, None], tl.load(ksink_ptr + ch).to(op_ty)[None, :], k)
        qk = tl.dot(q, tl.trans(k)) * qk_scale
    else:
        k_scale, k_zero = _token_params(ks_ptr, kz_ptr, p_off, live, MASK)
        # (code - zero) * scale on the tile: an exact fp16 difference, one rounding
        k = (kc - (k_zero.to(op_ty) + 1024.0)[:, None]) * k_scale.to(op_ty)[:, None]
        qk = tl.dot(q, tl.trans(k)) * qk_scale
    if MASK:
        valid = (kpos[None, :] <= qpos[:, None]) & (kpos[None, :] > qpos[:, None] - window) & live[None, :]
        qk = tl.where(valid, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v_scale, v_zero = _token_params(vs_ptr, vz_ptr, p_off, live, MASK)
    v = (vc - (v_zero.to(op_ty) + 1024.0)[:, None]) * v_scale.to(op_ty)[:, None]
    acc = acc * alpha[:, None] + tl.dot(p.to(op_ty), v)
    return acc, m_new, l_i


@triton.jit(do_not_specialize=STEP_INTS, do_not_specialize_on_alignment=STEP_POINTERS)
def _kernel(q_ptr, o_ptr, kc_ptr, vc_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, kmin_ptr, ksink_ptr,
            bt_ptr, qsl_ptr, lens_ptr, qk_scale, window,
            stride_qt, stride_qh, stride_ot, stride_oh, c_b, p_b, ch_b, ch_h, stride_bt,
            C_S: tl.constexpr, C_H: tl.constexpr, P_S: tl.constexpr, P_H: tl.constexpr, GROUPS: tl.constexpr,
            PAGE: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BITS: tl.constexpr,
            KEY_CHANNEL: tl.constexpr):
    mblk, seq, kvh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    if mblk * BLOCK_M >= q_len * GROUPS:   # the grid is sized for the longest sequence
        return
    ctx_len = tl.load(lens_ptr + seq)
    past = ctx_len - q_len
    op_ty = tl.float32 if q_ptr.dtype.element_ty == tl.float32 else tl.float16

    rows = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
    tok = rows // GROUPS
    head = kvh * GROUPS + rows % GROUPS
    mask_m = tok < q_len
    qpos = past + tok
    offs_d = channels(D, BITS)
    q_rows = (q_start + tok)[:, None].to(tl.int64) * stride_qt + head[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptr + q_rows, mask=mask_m[:, None], other=0.0).to(op_ty)

    # Key ranges as in prefill_attention.py: [lo, hi) needed, [full_lo, full_hi) seen whole by all rows.
    first_tok = (mblk * BLOCK_M) // GROUPS
    last_tok = tl.minimum((mblk * BLOCK_M + BLOCK_M - 1) // GROUPS, q_len - 1)
    hi = past + last_tok + 1
    lo = (tl.maximum(past + first_tok - window + 1, 0) // BLOCK_N) * BLOCK_N
    full_lo = tl.maximum(lo, tl.cdiv(tl.maximum(past + last_tok - window + 1, 0), BLOCK_N) * BLOCK_N)
    full_hi = tl.maximum(full_lo, ((past + first_tok + 1) // BLOCK_N) * BLOCK_N)

    m_i = tl.full((BLOCK_M,), -1e30, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, D), dtype=tl.float32)
    for start in range(lo, full_lo, BLOCK_N):
        acc, m_i, l_i = _tile(acc, m_i, l_i, q, start, qpos, hi, window, seq, kvh, bt_ptr, kc_ptr,
                              vc_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, kmin_ptr, ksink_ptr, qk_scale, stride_bt,
                              c_b, p_b, ch_b, ch_h, C_S, C_H, P_S, P_H, PAGE, D, BLOCK_N, BITS, KEY_CHANNEL, True)
    for start in range(full_lo, full_hi, BLOCK_N):
        acc, m_i, l_i = _tile(acc, m_i, l_i, q, start, qpos, hi, window, seq, kvh, bt_ptr, kc_ptr,
                              vc_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, kmin_ptr, ksink_ptr, qk_scale, stride_bt,
                              c_b, p_b, ch_b, ch_h, C_S, C_H, P_S, P_H, PAGE, D, BLOCK_N, BITS, KEY_CHANNEL, False)
    for start in range(full_hi, hi, BLOCK_N):
        acc, m_i, l_i = _tile(acc, m_i, l_i, q, start, qpos, hi, window, seq, kvh, bt_ptr, kc_ptr,
                              vc_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, kmin_ptr, ksink_ptr, qk_scale, stride_bt,
                              c_b, p_b, ch_b, ch_h, C_S, C_H, P_S, P_H, PAGE, D, BLOCK_N, BITS, KEY_CHANNEL, True)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(o_ptr + (q_start + tok)[:, None].to(tl.int64) * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=mask_m[:, None])


def default_config(head_dim: int) -> dict:
    """Tiles for an H100/H200-class GPU, whatever the rows (longest q_len x GQA group) and bits:
    64 x 64, 4 warps, 5 stages. Timed on an H200 (scripts/bench_prefill_quant.py --sweep, tenth
    session, docs/benchmarks.md): the fastest or within 4% of it for int8 and int4 in prefill 1 x 4096,
    extend and mixed batches; 128 x 64 tiles (8 warps), the earlier int4 choice for rows >= 512, win
    prefill and extend by 0.5-4% and lose a mixed batch (4 chunks of 512 and 64 decodes, what a
    serving step looks like) by 20-25%. 5 stages: below 5 each of the loops waited for every copy it
    had issued; 1-7% faster than 2. sm_90 builds (head dim 128, int8 / int4 / int4 channel;
    tests/kernels/test_prefill_attention_quant.py checks no spills): 64 x 64, 4 warps 213 / 222 / 178
    registers. Head dim 256: 128 x 32, 8 warps (238 / 250 for int8 / channel; 64 x 64 spills 240
    bytes)."""
    if head_dim > 128:
        return dict(block_m=128, block_n=32, num_warps=8, num_stages=5)
    return dict(block_m=64, block_n=64, num_warps=4, num_stages=5)


def prefill_attention_quant(q, cache, block_tables, q_start_loc, context_lens, max_q_len: int,
                            sm_scale: float | None = None, sliding_window: int = 0,
                            out: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """q (T, Hq, D), D a power of two; cache an online QuantKVCache with one quantizer per token and
    kv head (group = head_dim: triton_ops._kv_kernels_fit) holding every key, the new ones included;
    block_tables (S, max_pages) int32; q_start_loc (S + 1,) int32; context_lens (S,) int32;
    max_q_len (python int >= every q_len) only sizes the grid: no device sync. The result goes to
    `out` ((T, Hq, D), unit stride along D) where given. `config` (tuning): block_m, block_n
    (capped at the page's largest power-of-two divisor: tiles never straddle a block), num_warps,
    num_stages."""
    from lmdepot.runtime.ops.kv_quant import hadamard_on

    T, Hq, D = q.shape
    kc, vc = cache.codes
    page, Hkv = kc.shape[1], kc.shape[2]
    if cache.group != D:
        raise ValueError(f"prefill attention over a quantized cache: one quantizer per head (group {D}), "
                         f"got group {cache.group}")
    if D & (D - 1):
        raise ValueError(f"prefill attention over a quantized cache: head_dim {D} is not a power of two")
    groups = Hq // Hkv
    sm_scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    rot = hadamard_on(D, str(q.device)) if cache.rotate else None
    qr = (q.float() @ rot).to(q.dtype) if rot is not None and not cache.key_channel else q
    cfg = default_config(D)
    cfg.update(config or {})
    y = out if out is not None else torch.empty_like(q)
    ks, kz, kmin, ksink, vs, vz, ch = param_operands(cache)
    grid = (triton.cdiv(max(max_q_len, 1) * groups, cfg["block_m"]), block_tables.shape[0], Hkv)
    _kernel[grid](
        qr, y, kc, vc, ks, kz, vs, vz, kmin, ksink, block_tables, q_start_loc, context_lens, sm_scale * LOG2E,
        sliding_window if sliding_window else NO_WINDOW, qr.stride(0), qr.stride(1), y.stride(0), y.stride(1),
        kc.stride(0), vs.stride(0), ch.stride(0), ch.stride(1), block_tables.stride(0),
        # the in-block strides are constants of the kernel (one build per model): tile offsets fold away
        C_S=kc.stride(1), C_H=kc.stride(2), P_S=vs.stride(1), P_H=vs.stride(2), GROUPS=groups, PAGE=page, D=D,
        BLOCK_M=cfg["block_m"], BLOCK_N=min(cfg["block_n"], page & -page), BITS=cache.bits,
        KEY_CHANNEL=cache.key_channel, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    if rot is not None:   # values were quantized rotated: rotate the weighted sum back
        y.copy_(y.float() @ rot)
    return y
