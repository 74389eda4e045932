"""Prefill/extend attention over a paged KV cache: causal, variable length, prefix-cache aware, GQA.

One flat batch of new tokens from many sequences (q_start_loc), each with ctx_len keys already in
the cache (its own new keys included: store_kv ran first). Query i of a sequence of q_len new tokens
sits at position ctx_len - q_len + i and sees keys 0 ..= that position (and, with a sliding window
w, only the last w of them). Decode rows are just q_len = 1, so a mixed prefill + decode batch
(continuous batching with chunked prefill) is one launch.

One program handles BLOCK_M rows of one (sequence, kv head): a row is a (token, q head) pair of that
kv head's group, so every K/V tile is read once for all the heads sharing it, and a decode row of a
GQA model still fills GROUPS rows of the tile. Keys come in BLOCK_N tiles gathered through the
block table (a tile may span pages or cover part of one, so BLOCK_N does not depend on the page
size). Flash-attention online softmax in fp32, exp2 with log2(e) folded into the scale; key tiles
that every row of the block sees whole (below its causal diagonal, inside its window) skip masking.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
NO_WINDOW = 1 << 30   # a window wider than any context: one code path for both cases


def reference(q, k_cache, v_cache, block_tables, q_start_loc, context_lens, sm_scale, sliding_window=0):
    """q (T, Hq, D); caches (blocks, page, Hkv, D); block_tables (S, max_pages); q_start_loc (S + 1,);
    context_lens (S,). Float32 math, one sequence at a time."""
    out = torch.empty_like(q)
    groups = q.shape[1] // k_cache.shape[2]
    page = k_cache.shape[1]
    for s in range(block_tables.shape[0]):
        q0, q1, n = int(q_start_loc[s]), int(q_start_loc[s + 1]), int(context_lens[s])
        pages = block_tables[s, : -(-n // page)].long()
        k = k_cache[pages].reshape(-1, *k_cache.shape[2:])[:n].float().repeat_interleave(groups, dim=1)
        v = v_cache[pages].reshape(-1, *v_cache.shape[2:])[:n].float().repeat_interleave(groups, dim=1)
        qpos = torch.arange(n - (q1 - q0), n, device=q.device)[:, None]
        kpos = torch.arange(n, device=q.device)[None, :]
        mask = kpos <= qpos
        if sliding_window:
            mask &= kpos > qpos - sliding_window
        scores = torch.einsum("thd,nhd->htn", q[q0:q1].float(), k) * sm_scale
        scores = scores.masked_fill(~mask, float("-inf"))
        out[q0:q1] = torch.einsum("htn,nhd->thd", scores.softmax(-1), v).to(q.dtype)
    return out


@triton.jit
def _tile(acc, m_i, l_i, q, start, qpos, hi, window, seq, kvh, bt_ptr, k_ptr, v_ptr, qk_scale, stride_bt,
          stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
          PAGE: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr):
    """One BLOCK_N tile of keys starting at position `start`. MASK=False: every key of the tile is
    visible to every row (below the causal diagonal, inside the window), so no masking at all."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kpos = start + offs_n
    mask_n = kpos < hi
    mask_d = offs_d < D
    blk = tl.load(bt_ptr + seq * stride_bt + kpos // PAGE, mask=mask_n, other=0).to(tl.int64)
    slot = kpos % PAGE
    kt = tl.load(k_ptr + blk[None, :] * stride_kb + slot[None, :] * stride_ks + kvh * stride_kh + offs_d[:, None],
                 mask=mask_n[None, :] & mask_d[:, None], other=0.0)   # (D, N)
    qk = tl.dot(q, kt.to(q.dtype)) * qk_scale
    if MASK:
        valid = (kpos[None, :] <= qpos[:, None]) & (kpos[None, :] > qpos[:, None] - window) & mask_n[None, :]
        qk = tl.where(valid, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = tl.load(v_ptr + blk[:, None] * stride_vb + slot[:, None] * stride_vs + kvh * stride_vh + offs_d[None, :],
                mask=mask_n[:, None] & mask_d[None, :], other=0.0)   # (N, D)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
    return acc, m_new, l_i


# per-step arguments built once for all their values, as paged_decode_attention.STEP_INTS says why
STEP_INTS, STEP_POINTERS = ["stride_bt"], ["bt_ptr", "qsl_ptr", "lens_ptr"]


@triton.jit(do_not_specialize=STEP_INTS, do_not_specialize_on_alignment=STEP_POINTERS)
def _kernel(q_ptr, k_ptr, v_ptr, o_ptr, bt_ptr, qsl_ptr, lens_ptr, qk_scale, window,
            stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_ks, stride_kh,
            stride_vb, stride_vs, stride_vh, stride_bt,
            GROUPS: tl.constexpr, PAGE: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    mblk, seq, kvh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    if mblk * BLOCK_M >= q_len * GROUPS:   # the grid is sized for the longest sequence
        return
    ctx_len = tl.load(lens_ptr + seq)
    past = ctx_len - q_len                 # keys cached before this step (prefix hit / earlier chunks)

    rows = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
    tok = rows // GROUPS
    head = kvh * GROUPS + rows % GROUPS
    mask_m = tok < q_len
    qpos = past + tok
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    q = tl.load(q_ptr + (q_start + tok)[:, None].to(tl.int64) * stride_qt + head[:, None] * stride_qh
                + offs_d[None, :], mask=mask_m[:, None] & mask_d[None, :], other=0.0)

    # Keys this block needs: [lo, hi), from the window start of its first token to its last token.
    # Tiles in [full_lo, full_hi) are visible to all its rows and skip the masking.
    first_tok = (mblk * BLOCK_M) // GROUPS
    last_tok = tl.minimum((mblk * BLOCK_M + BLOCK_M - 1) // GROUPS, q_len - 1)
    hi = past + last_tok + 1
    lo = (tl.maximum(past + first_tok - window + 1, 0) // BLOCK_N) * BLOCK_N
    full_lo = tl.maximum(lo, tl.cdiv(tl.maximum(past + last_tok - window + 1, 0), BLOCK_N) * BLOCK_N)
    full_hi = tl.maximum(full_lo, ((past + first_tok + 1) // BLOCK_N) * BLOCK_N)

    m_i = tl.full((BLOCK_M,), -1e30, dtype=tl.float32)   # finite: a fully masked tile gives p = 0, not NaN
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start in range(lo, full_lo, BLOCK_N):
        acc, m_i, l_i = _tile(acc, m_i, l_i, q, start, qpos, hi, window, seq, kvh, bt_ptr, k_ptr, v_ptr, qk_scale,
                              stride_bt, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                              PAGE, D, BLOCK_D, BLOCK_N, True)
    for start in range(full_lo, full_hi, BLOCK_N):
        acc, m_i, l_i = _tile(acc, m_i, l_i, q, start, qpos, hi, window, seq, kvh, bt_ptr, k_ptr, v_ptr, qk_scale,
                              stride_bt, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                              PAGE, D, BLOCK_D, BLOCK_N, False)
    for start in range(full_hi, hi, BLOCK_N):
        acc, m_i, l_i = _tile(acc, m_i, l_i, q, start, qpos, hi, window, seq, kvh, bt_ptr, k_ptr, v_ptr, qk_scale,
                              stride_bt, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                              PAGE, D, BLOCK_D, BLOCK_N, True)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(o_ptr + (q_start + tok)[:, None].to(tl.int64) * stride_ot + head[:, None] * stride_oh
             + offs_d[None, :], out.to(o_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def default_config(rows: int, head_dim: int) -> dict:
    """Tile sizes for an H100/H200-class GPU; rows = longest q_len x GQA group."""
    if rows >= 512 and head_dim <= 128:
        return dict(block_m=128, block_n=64, num_warps=8, num_stages=2)
    return dict(block_m=64, block_n=64 if head_dim <= 128 else 32, num_warps=4, num_stages=2)


def prefill_attention(q, k_cache, v_cache, block_tables, q_start_loc, context_lens, max_q_len: int,
                      sm_scale: float | None = None, sliding_window: int = 0, out: torch.Tensor | None = None,
                      config: dict | None = None) -> torch.Tensor:
    """q (T, Hq, D) new queries; caches (blocks, page, Hkv, D), any strides, new keys already stored;
    block_tables (S, max_pages) int32; q_start_loc (S + 1,) int32; context_lens (S,) int32.
    max_q_len (a python int, >= every q_len) only sizes the grid: no device sync."""
    T, Hq, D = q.shape
    page, Hkv = k_cache.shape[1], k_cache.shape[2]
    groups = Hq // Hkv
    sm_scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    cfg = default_config(max_q_len * groups, D)
    cfg.update(config or {})
    y = out if out is not None else torch.empty_like(q)
    S = block_tables.shape[0]
    grid = (triton.cdiv(max(max_q_len, 1) * groups, cfg["block_m"]), S, Hkv)
    _kernel[grid](
        q, k_cache, v_cache, y, block_tables, q_start_loc, context_lens, sm_scale * LOG2E,
        sliding_window if sliding_window else NO_WINDOW,
        q.stride(0), q.stride(1), y.stride(0), y.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        GROUPS=groups, PAGE=page, D=D, BLOCK_D=triton.next_power_of_2(D),
        BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y
