"""Decode attention over a paged KV cache (split-K flash-decoding, GQA heads grouped per program).

Cache layout: (num_blocks, block_size, kv_heads, head_dim), any strides. One program handles one
(sequence, kv head, split): all q heads sharing that kv head read each K/V page once, padded to 16
rows so the products run on tensor cores. Splits let a single long sequence spread over the whole GPU.
Multi-head models (Hq == Hkv) can take a vector path instead (VECTOR: no tl.dot, no padded rows;
opt-in through LMDEPOT_ATTN_VECTOR_MHA=1 or `config`); its splits end in the same epilogue.

The splits meet in the same launch (like the W4A16 GEMV's K splits): a split writes its partial
(output, log-sum-exp) rows, counts itself in on a per-(sequence, kv head) semaphore, and the last
one to arrive merges them in split order (so the result does not depend on arrival order), writes
the output and resets the semaphore for the next launch or CUDA graph replay. Only the splits that
hold pages of the sequence take part: the split count comes from the block table's width (a CUDA
graph's is fixed), so at short contexts most splits are empty and return at once, and when one
split holds the whole sequence it writes the output directly. One launch per layer: at batch 1 the
former split + merge launches cost ~8 us per layer, mostly launch latency (docs/benchmarks.md).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from lmdepot.runtime.kernels.scratch import scratch, semaphores


def reference(q, k_cache, v_cache, block_tables, seq_lens, sm_scale):
    """q (B, Hq, D); caches (blocks, page, Hkv, D); block_tables (B, max_pages); seq_lens (B,)."""
    out = torch.empty_like(q)
    groups = q.shape[1] // k_cache.shape[2]
    page = k_cache.shape[1]
    for b in range(q.shape[0]):
        n = int(seq_lens[b])
        pages = block_tables[b, : -(-n // page)].long()
        k = k_cache[pages].reshape(-1, *k_cache.shape[2:])[:n].float().repeat_interleave(groups, dim=1)
        v = v_cache[pages].reshape(-1, *v_cache.shape[2:])[:n].float().repeat_interleave(groups, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[b].float(), k) * sm_scale
        out[b] = torch.einsum("hn,nhd->hd", scores.softmax(-1), v).to(q.dtype)
    return out


@triton.jit
def finish_split(acc, m, l, o_ptr, lse_ptr, out_ptr, sem_ptr, b, kvh, split, seq_len, heads, mask_h, offs_d,
                 mask_d, stride_ob, stride_oh, Hq, Hkv, NUM_SPLITS, PAGES_PER_SPLIT,
                 D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr,
                 SPLIT: tl.constexpr):
    """A split's epilogue (shared with the quantized-cache kernel): given its online-softmax state
    (acc, running max m, sum l) of the GROUPS q heads `heads`, write the output directly when it is
    the only split holding pages, else write partial rows and let the last live split merge."""
    empty = l == 0.0   # no tokens: output 0 (a zero-length sequence), log-sum-exp -inf
    res = tl.where(empty[:, None], 0.0, acc / tl.where(empty, 1.0, l)[:, None])
    mask = mask_h[:, None] & mask_d[None, :]
    out_ptrs = out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
    if not SPLIT:
        tl.store(out_ptrs, res.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        # Splits holding at least one page; split 0 always counts so that every output row is written.
        live = tl.minimum(tl.maximum(tl.cdiv(tl.cdiv(seq_len, PAGE), PAGES_PER_SPLIT), 1), NUM_SPLITS)
        if live == 1:
            if split == 0:
                tl.store(out_ptrs, res.to(out_ptr.dtype.element_ty), mask=mask)
        elif split < live:
            rows = (b * Hq + heads) * NUM_SPLITS
            lse = tl.where(empty, float("-inf"), m + tl.log(tl.where(empty, 1.0, l)))
            tl.store(o_ptr + (rows + split)[:, None] * D + offs_d[None, :], res, mask=mask)
            tl.store(lse_ptr + rows + split, lse, mask=mask_h)
            tl.debug_barrier()   # every thread's rows are written before the split is counted in
            sem = sem_ptr + b * Hkv + kvh
            if tl.atomic_add(sem, 1, sem="acq_rel") == live - 1:
                # The last live split merges all of them, in split order; .cg reads past L1 (other SMs wrote).
                top = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
                for s in range(live):
                    top = tl.maximum(top, tl.load(lse_ptr + rows + s, mask=mask_h, other=0.0, cache_modifier=".cg"))
                num = tl.zeros((BLOCK_H, BLOCK_D), dtype=tl.float32)
                den = tl.zeros((BLOCK_H,), dtype=tl.float32)
                for s in range(live):
                    w = tl.exp(tl.load(lse_ptr + rows + s, mask=mask_h, other=0.0, cache_modifier=".cg") - top)
                    o = tl.load(o_ptr + (rows + s)[:, None] * D + offs_d[None, :], mask=mask, other=0.0,
                                cache_modifier=".cg")
                    num += o * w[:, None]
                    den += w
                tl.store(out_ptrs, (num / den[:, None]).to(out_ptr.dtype.element_ty), mask=mask)
                tl.atomic_xchg(sem, 0)


# Arguments that change from step to step (a block table's width, the split plan, the slices of a
# mixed step's tables): one build for all their values. Triton builds a kernel once per class of
# launch (each integer 1, divisible by 16 or neither; each pointer 16-byte aligned or not), seconds
# each, paid in the middle of serving; these are only scalar loads' addresses and loop bounds.
# tests/kernels/test_launch_keys.py counts the builds.
STEP_INTS, STEP_POINTERS = ["stride_bt", "NUM_SPLITS", "PAGES_PER_SPLIT"], ["bt_ptr", "lens_ptr"]


@triton.jit(do_not_specialize=STEP_INTS, do_not_specialize_on_alignment=STEP_POINTERS)
def _split_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, o_ptr, lse_ptr, out_ptr, sem_ptr, sm_scale,
                  stride_qb, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                  stride_bt, stride_ob, stride_oh, NUM_SPLITS, PAGES_PER_SPLIT, Hq, Hkv,
                  GROUPS: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                  PAGE: tl.constexpr, VECTOR: tl.constexpr, STAGES: tl.constexpr, SPLIT: tl.constexpr):
    b, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq_len = tl.load(lens_ptr + b)
    offs_h = tl.arange(0, BLOCK_H)
    heads = kvh * GROUPS + offs_h
    mask_h = offs_h < GROUPS
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    # vector path (VECTOR, GROUPS == 1, BLOCK_H == 1): a 16-row tl.dot would be 15/16 padding, so q is one
    # float32 vector and both products are broadcast multiplies + reductions (CUDA cores; the kernel is
    # bound by the K/V reads either way), with scalar m and l
    if VECTOR:
        q_1 = tl.load(q_ptr + b * stride_qb + kvh * stride_qh + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        m_1 = tl.full((), -1e30, dtype=tl.float32)
        l_1 = tl.zeros((), dtype=tl.float32)
        acc_1 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    else:
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=mask_h[:, None] & mask_d[None, :], other=0.0)
        m = tl.full((BLOCK_H,), -1e30, dtype=tl.float32)
        l = tl.zeros((BLOCK_H,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_H, BLOCK_D), dtype=tl.float32)
    offs_s = tl.arange(0, PAGE)
    first = split * PAGES_PER_SPLIT
    last = tl.minimum(first + PAGES_PER_SPLIT, tl.cdiv(seq_len, PAGE))
    if VECTOR:
        k_tile = k_ptr + offs_s[:, None] * stride_ks + kvh * stride_kh + offs_d[None, :]
        v_tile = v_ptr + offs_s[:, None] * stride_vs + kvh * stride_vh + offs_d[None, :]
        # the kernel-wide num_stages pipelines only loads that feed a tl.dot; the loop's own num_stages
        # pipelines these (cp.async into shared memory, STAGES - 1 pages ahead; 1: none)
        for p in tl.range(first, last, num_stages=STAGES):
            blk = tl.load(bt_ptr + b * stride_bt + p).to(tl.int64)
            mask_s = p * PAGE + offs_s < seq_len
            kv_mask = mask_s[:, None] & mask_d[None, :]
            # K and V loads both issued before the reductions, so they are in flight together
            k = tl.load(k_tile + blk * stride_kb, mask=kv_mask, other=0.0).to(tl.float32)
            v = tl.load(v_tile + blk * stride_vb, mask=kv_mask, other=0.0).to(tl.float32)
            s = tl.sum(q_1[None, :] * k, axis=1) * sm_scale
            s = tl.where(mask_s, s, float("-inf"))
            m_new = tl.maximum(m_1, tl.max(s, axis=0))
            alpha = tl.exp(m_1 - m_new)
            prob = tl.exp(s - m_new)
            l_1 = l_1 * alpha + tl.sum(prob, axis=0)
            acc_1 = acc_1 * alpha + tl.sum(prob[:, None] * v, axis=0)
            m_1 = m_new
        # as the grouped path's one-row state, so the epilogue below serves both
        acc = acc_1[None, :]
        m = tl.zeros((BLOCK_H,), dtype=tl.float32) + m_1
        l = tl.zeros((BLOCK_H,), dtype=tl.float32) + l_1
    else:
        for p in range(first, last):
            blk = tl.load(bt_ptr + b * stride_bt + p).to(tl.int64)
            mask_s = p * PAGE + offs_s < seq_len
            kv_mask = mask_s[:, None] & mask_d[None, :]
            k = tl.load(k_ptr + blk * stride_kb + offs_s[:, None] * stride_ks + kvh * stride_kh + offs_d[None, :],
                        mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k).to(q.dtype)) * sm_scale
            s = tl.where(mask_s[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = tl.exp(m - m_new)
            prob = tl.exp(s - m_new[:, None])
            v = tl.load(v_ptr + blk * stride_vb + offs_s[:, None] * stride_vs + kvh * stride_vh + offs_d[None, :],
                        mask=kv_mask, other=0.0)
            l = l * alpha + tl.sum(prob, axis=1)
            acc = acc * alpha[:, None] + tl.dot(prob.to(q.dtype), v.to(q.dtype))
            m = m_new
    finish_split(acc, m, l, o_ptr, lse_ptr, out_ptr, sem_ptr, b, kvh, split, seq_len, heads, mask_h, offs_d, mask_d,
                 stride_ob, stride_oh, Hq, Hkv, NUM_SPLITS, PAGES_PER_SPLIT, D, BLOCK_H, BLOCK_D, PAGE, SPLIT)


# LMDEPOT_ATTN_VECTOR_MHA=1 sends multi-head models (one q head per kv head) to the vector path;
# off by default until GPU measurements (scripts/tune_decode_attention.py) say it wins. Read once.
VECTOR_MHA = os.environ.get("LMDEPOT_ATTN_VECTOR_MHA", "") == "1"


def paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, sm_scale: float | None = None,
                           num_splits: int | None = None, out: torch.Tensor | None = None,
                           config: dict | None = None) -> torch.Tensor:
    """`config` (tuning, tests): `vector_mha` (bool, default VECTOR_MHA) takes the vector path where
    Hq == Hkv; `num_warps`, `num_stages` of the split kernel (default: Triton's; on the vector path
    num_stages is the page loop's pipelining depth, default 3)."""
    B, Hq, D = q.shape
    page, Hkv = k_cache.shape[1], k_cache.shape[2]
    groups = Hq // Hkv
    cfg = config or {}
    vector = groups == 1 and bool(cfg.get("vector_mha", VECTOR_MHA))
    launch = {key: cfg[key] for key in ("num_warps", "num_stages") if cfg.get(key) is not None}
    stages = launch.get("num_stages", 3) if vector else 1   # 3: Triton's default num_stages on CUDA
    sm_scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    num_splits, pages_per_split = split_plan(B, Hkv, block_tables.shape[1], num_splits)
    part_o, part_lse, y, sems = split_buffers(q, Hkv, num_splits, out)
    _split_kernel[(B, Hkv, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, part_o, part_lse, y, sems, sm_scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0), y.stride(0), y.stride(1),
        num_splits, pages_per_split, Hq, Hkv,
        GROUPS=groups, BLOCK_H=1 if vector else max(16, triton.next_power_of_2(groups)), D=D,
        BLOCK_D=triton.next_power_of_2(D), PAGE=page, VECTOR=vector, STAGES=stages, SPLIT=num_splits > 1, **launch)
    return y


def split_plan(batch: int, hkv: int, max_pages: int, num_splits: int | None = None) -> tuple[int, int]:
    """(splits, pages per split) of a (batch, kv heads) decode; shared with the quantized-cache kernel."""
    if num_splits is None:  # enough programs to fill ~2 waves of a large GPU, no device sync needed
        num_splits = max(1, min(max_pages, triton.cdiv(264, batch * hkv)))
    pages_per_split = triton.cdiv(max_pages, num_splits)
    return triton.cdiv(max_pages, pages_per_split), pages_per_split


def split_buffers(q: torch.Tensor, hkv: int, num_splits: int, out: torch.Tensor | None = None):
    """(partial outputs, partial log-sum-exps, output like q, semaphores) of a split launch; shared
    with the quantized-cache kernel. One split needs no partials nor counters. The default plan
    splits only below 264 (sequence, kv head) pairs: B * Hkv counters, far inside the shared 64 Ki array
    (a grown array would move under captured CUDA graphs)."""
    B, Hq, D = q.shape
    y = out if out is not None else scratch(q.shape, q.device, q.dtype)   # NaN under the tests' POISON
    assert y.shape == q.shape and y.stride(2) == 1, "out: (B, Hq, D) with unit stride along D"
    rows = B * Hq * num_splits if num_splits > 1 else 1
    return (scratch((rows, D), q.device, torch.float32), scratch((rows,), q.device, torch.float32), y,
            semaphores(q.device, B * hkv if num_splits > 1 else 1))
