"""W4A16 GEMM for mid-size M (5..127 rows) on w4a16_gemv.repack's K-major int4 layout: y = x @ dequant(W).

The repacked weight is (N, K/8) words, each output row's codes contiguous along K: the A operand of
a `tl.dot` that computes y^T = W-tile @ x-tile^T. The weight rows (128 a program) take the dot's
M side and the few input rows its N side, so a 16-row input still fills Hopper's 64-row wgmma side.
One span (w4a16_gemv: SPAN = min(group, 128) input rows, never straddling a group) a loop step:

- SPAN 128 (groups of 128 and more), `SLOT_DOTS`: slot s of the span's 16 words holds input rows
  span_start + 16 s + (0..15), so each slot is one (BLOCK_N, 16) x (16, BLOCK_M) dot against 16
  contiguous x rows, 8 dots a span. A slot's codes become floats in 2.5 instructions a weight (one
  LOP3 masks the code in place into the mantissa of 2^23, one FFMA scales and subtracts it, half a
  F2FP packs it): slots 0..4 sit at bit offsets 19..3 as stored, slots 6, 7 after one shift of the
  word by 8 and slot 5 after one rotate by 16 (w4a16_gemv.SLOT_OFFSETS).
- SPAN 32 or 64 (groups of 32, 64): a slot has 4 or 8 rows, fewer than tl.dot's 16, so the span's
  codes are decoded as one (BLOCK_N, SPAN) tile in input-row order (w4a16_dequant.span_codes) and
  meet x in one dot (slower decode: shifts by a per-slot amount and a layout change).

The dots take the bare codes (integers 0..15, exact in fp16/bf16); the group's zero and scale apply
to their fp32 result once a span: sum_k x (q - z) s = s (sum_k x q - z sum_k x). That keeps the
operands exact for any zero (the format's zeros are fp16, not necessarily integers) and costs two
FMAs an output element and span instead of work per weight.

When the tiles do not fill the GPU, K is split; the splits meet in the kernel as in w4a16.py (fp32
partials, a per-tile semaphore, the last split adds them in split order and resets it).

sm_90 build (tests/kernels/test_w4a16_gemm.py, Triton 3.9, fp16, group 128, heuristic_config's
launches): wgmma (the decoded codes reach it through shared memory: stmatrix stores in the loop),
16-byte cp.async weight loads, no spills; 16 x 128 tiles on 4 warps: 128 registers, 5.8 SASS
instructions a weight in the K loop; 32 x 128: 168, 6.2; 64 x 128 on 8 warps: 146, 8.9. Not timed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lmdepot.runtime.kernels.scratch import k_split, scratch, semaphores, split_sum
from lmdepot.runtime.kernels.w4a16 import MAGIC_BITS
from lmdepot.runtime.kernels.w4a16_dequant import reference as dequant_reference
from lmdepot.runtime.kernels.w4a16_dequant import span_codes
from lmdepot.runtime.kernels.w4a16_gemv import SMS, operands, span_of


def reference(x: torch.Tensor, packed: dict) -> torch.Tensor:
    """x @ dequant(W) in float32, rounded to x's dtype."""
    w = dequant_reference(packed, x.shape[-1], torch.float32)
    return (x.float() @ w.t()).to(x.dtype)


@triton.jit
def _load_x(ptrs, kk, K, EVEN_K: tl.constexpr):
    if EVEN_K:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=kk[None, :] < K, other=0.0)   # rows of a padded last group have no x


@triton.jit
def _slot(acc, xsum, r, MASK, OFF: tl.constexpr, x_ptrs, kk, K, EVEN_K: tl.constexpr, IEEE: tl.constexpr):
    """One slot's dot: the codes at bits OFF..OFF+3 (OFF + 4 <= 23) of words r, with x's rows of that slot.
    A code becomes a float without a shift or a conversion: masked in place into the mantissa of 2^23
    (one LOP3, MASK = 0xF a kernel argument so the two literals need no extra instruction), the float
    2^23 + q 2^OFF times 2^-OFF minus 2^(23 - OFF) is q exactly (one FFMA)."""
    x = _load_x(x_ptrs, kk, K, EVEN_K)
    q = ((r & (MASK << OFF)) | MAGIC_BITS).to(tl.float32, bitcast=True) * (1.0 / (1 << OFF)) - (1 << (23 - OFF))
    return _dot(q.to(x.dtype), x, acc, IEEE), xsum + tl.sum(x.to(tl.float32), axis=1)


@triton.jit
def _dot(q, x, acc, IEEE: tl.constexpr):
    """acc + q @ x^T; float32 x takes exact float32 products (a tf32 dot would round x)."""
    if IEEE:
        return tl.dot(q, tl.trans(x), acc, input_precision="ieee")
    return tl.dot(q, tl.trans(x), acc)


@triton.jit(do_not_specialize=["M"])   # a step's row count: one build for all (paged_decode_attention.STEP_INTS)
def _kernel(x_ptr, qt_ptr, s_ptr, z_ptr, y_ptr, part_ptr, lock_ptr, M, N, K, K_PADDED, KW, GROUPS, stride_xm,
            stride_ym, K_PER_SPLIT, SPLIT_WORDS, MASK, GROUP: tl.constexpr, SPAN: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr,
            SLOT_DOTS: tl.constexpr):
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # rows past M or N re-read the last one (dropped at the store): no masks in the loop but a K tail's
    rm, rn = tl.minimum(offs_m, M - 1), tl.minimum(offs_n, N - 1)
    k_begin = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_begin + K_PER_SPLIT, K_PADDED)
    # one slot's SPAN/8 input rows (slot dots) or the whole span (one dot) of x a load
    XK: tl.constexpr = SPAN // 8 if SLOT_DOTS else SPAN
    offs_k = tl.arange(0, XK)
    # word offsets from SPLIT_WORDS (not k_begin // 8): Triton then knows rows start 16-byte aligned
    w_ptrs = qt_ptr + rn.to(tl.int64)[:, None] * KW + (pid_k * SPLIT_WORDS + tl.arange(0, SPAN // 8))[None, :]
    x_ptrs = x_ptr + rm[:, None] * stride_xm + (k_begin + offs_k)[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)   # y^T's tile
    for k0 in range(k_begin, k_end, SPAN):
        p = tl.load(w_ptrs)
        g = k0 // GROUP
        s = tl.load(s_ptr + rn * GROUPS + g).to(tl.float32)
        z = tl.load(z_ptr + rn * GROUPS + g).to(tl.float32)
        if SLOT_DOTS:
            u = p.to(tl.uint32, bitcast=True)
            r8 = u >> 8                       # slots 6, 7 (offsets 27, 23) at 19, 15
            r16 = (u << 16) | (u >> 16)       # slot 5 (offset 31, wrapping) at 15
            xq = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            xsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
            kk = k0 + offs_k
            xq, xsum = _slot(xq, xsum, u, MASK, 19, x_ptrs, kk, K, EVEN_K, IEEE)
            xq, xsum = _slot(xq, xsum, u, MASK, 15, x_ptrs + XK, kk + XK, K, EVEN_K, IEEE)
            xq, xsum = _slot(xq, xsum, u, MASK, 11, x_ptrs + 2 * XK, kk + 2 * XK, K, EVEN_K, IEEE)
            xq, xsum = _slot(xq, xsum, u, MASK, 7, x_ptrs + 3 * XK, kk + 3 * XK, K, EVEN_K, IEEE)
            xq, xsum = _slot(xq, xsum, u, MASK, 3, x_ptrs + 4 * XK, kk + 4 * XK, K, EVEN_K, IEEE)
            xq, xsum = _slot(xq, xsum, r16, MASK, 15, x_ptrs + 5 * XK, kk + 5 * XK, K, EVEN_K, IEEE)
            xq, xsum = _slot(xq, xsum, r8, MASK, 19, x_ptrs + 6 * XK, kk + 6 * XK, K, EVEN_K, IEEE)
            xq, xsum = _slot(xq, xsum, r8, MASK, 15, x_ptrs + 7 * XK, kk + 7 * XK, K, EVEN_K, IEEE)
        else:
            x = _load_x(x_ptrs, k0 + offs_k, K, EVEN_K)
            xq = _dot(span_codes(p, BLOCK_N, SPAN).to(x.dtype), x, tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32),
                      IEEE)
            xsum = tl.sum(x.to(tl.float32), axis=1)
        acc += (xq - z[:, None] * xsum[None, :]) * s[:, None]
        w_ptrs += SPAN // 8
        x_ptrs += SPAN
    mask = (offs_n < N)[:, None] & (offs_m < M)[None, :]
    y_ptrs = y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None]
    if SPLITS == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        lock = lock_ptr + pid_n * tl.num_programs(0) + pid_m
        last, acc = split_sum(acc, part_ptr + offs_m[None, :] * N + offs_n[:, None], pid_k, M, N, mask, lock, SPLITS)
        if last:
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(lock, 0)


def gemm(x: torch.Tensor, packed: dict, out: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """x (..., K) fp16/bf16 (fp32: exact but slow dots), `packed` from w4a16_gemv.repack -> (..., N) in
    x's dtype (or into `out`, whose dtype it keeps). `config` overrides heuristic_config (tuning, tests)."""
    lead, x2, (N, kw), K, group = operands(x, packed, "gemm")
    qt, M, k_padded = packed["qt"], x2.shape[0], kw * 8
    span = span_of(group)
    cfg = heuristic_config(M, N, k_padded, group) | (config or {})
    per_split, splits = k_split(k_padded, span, cfg["split_k"])
    tiles_m, tiles_n = triton.cdiv(M, cfg["block_m"]), triton.cdiv(N, cfg["block_n"])
    y = out.view(M, N) if out is not None else torch.empty(M, N, device=x.device, dtype=x.dtype)
    partial = scratch((splits, M, N), x.device, torch.float32) if splits > 1 else y
    _kernel[(tiles_m, tiles_n, splits)](
        x2, qt, packed["scales"], packed["zeros"], y, partial,
        semaphores(x.device, tiles_m * tiles_n if splits > 1 else 1), M, N, K, k_padded, kw,
        packed["scales"].shape[1], x2.stride(0), y.stride(0), per_split, per_split // 8, 0xF, GROUP=group,
        SPAN=span, BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], SPLITS=splits, EVEN_K=K == k_padded,
        IEEE=x.dtype == torch.float32, SLOT_DOTS=span // 8 >= 16 and cfg.get("slot_dots", True),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y.view(*lead, N)


def heuristic_config(M: int, N: int, K: int, group: int) -> dict:
    """16/32/64 input rows a tile by M and 128 weight rows (two 64-row wgmma sides for 4 warps), 4
    warps; 3 pipeline stages, 2 for 64-row tiles. K split until the programs cover about two waves of
    132 SMs, at most 8 ways (each split writes an fp32 partial of M x N, read back by the last).
    H200, `scripts/tune_w4a16.py 16 64 --only kmajor_gemm` (session 7): within 2% of the best config
    at M = 16; at M = 64 (4096 x 11008) 57.3 -> 39.5 us with 4 warps and 2 stages instead of 8 and 3."""
    block_m = 16 if M <= 16 else (32 if M <= 32 else 64)
    block_n = 128
    programs = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    split_k = max(1, min(K // span_of(group), triton.cdiv(2 * SMS, programs), 8))
    return {"block_m": block_m, "block_n": block_n, "num_warps": 4, "num_stages": 2 if block_m == 64 else 3,
            "split_k": split_k}
