"""W4A16 linear: y = x @ dequant(W) with W in the workspace's int4 layout (docs/format.md).

The plain layout (int32 words packing 8 consecutive input rows, scales/zeros per group of input
rows) is already coalesced along the output dim, so the kernels read it as stored:
- `gemv`: small M. Split-K over input rows so that even one output tile row fills the GPU; each
  program writes a fp32 partial sum, reduced afterwards.
- `gemm`: mid-size M. Tiles of x and of dequantized W meet in `tl.dot`.
- from DEQUANT_MIN_M rows on (prefill), W is dequantized once into a scratch fp16/bf16 matrix and
  cuBLAS multiplies: the dequantization costs one pass over the weights (~25 us for 4096x11008),
  while the tl.dot path measured 2.5x cuBLAS's time at M=256 (docs/benchmarks.md).
A K tile never straddles a quantization group (BLOCK_K divides group_size), so each tile needs one
row of scales and zeros. Padded input rows (in_features not a multiple of group_size) dequantize to
zero and the matching x columns are masked to zero.

Nibbles become floats without an int-to-float conversion: OR-ing a 4-bit code into the mantissa of
2^23 (0x4B000000) and subtracting 2^23 gives the code exactly with full-rate integer and FP32 ops.
The conversion instruction runs at a quarter of that rate on Hopper and capped the GEMV at about
the time of reading the weights twice.

The GEMV's K splits meet in the kernel itself: every split writes its fp32 partial sum, counts
itself in on a per-tile semaphore, and the last one to arrive adds the partials and writes the
output (then resets the semaphore, so CUDA graph replays find it at zero). One launch per linear.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lmdepot.formats.int4 import dequantize_int4
from lmdepot.runtime.kernels.scratch import k_split, scratch, semaphores
from lmdepot.runtime.ops.reference import linear


def reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    w = dequantize_int4(qweight, scales, zeros, x.shape[-1], torch.float32)
    return (x.float() @ w).to(x.dtype)


MAGIC_BITS = tl.constexpr(0x4B000000)   # float32 2^23: its lowest mantissa bits hold a small integer exactly


@triton.jit
def _nibble(packed, j):
    """Code j (0..7) of each packed int32, as float32, without a conversion instruction."""
    return (((packed >> (4 * j)) & 0xF) | MAGIC_BITS).to(tl.float32, bitcast=True) - 8388608.0


ONE_BITS = tl.constexpr(0x3F800000)    # float32 1.0
CODE_BITS = tl.constexpr(0x00780000)   # the top 4 of float32's 23 mantissa bits


@triton.jit
def _nibble_unit(packed, j: tl.constexpr):
    """1 + code_j / 16 of each packed int32, as float32: the code moved into the top mantissa bits of
    1.0 costs a shift and one and-or (a single LOP3), with no float subtraction; the caller recovers
    sum(x * code) as 16 * (sum(x * unit) - sum(x))."""
    if 4 * j <= 19:
        moved = packed << (19 - 4 * j)
    else:
        moved = packed >> (4 * j - 19)
    return ((moved & CODE_BITS) | ONE_BITS).to(tl.float32, bitcast=True)


@triton.jit
def _columns8(t, R: tl.constexpr):
    """The 8 columns of an (R, 8) register tile as 8 (R,) tensors: register moves, no loads."""
    even, odd = tl.split(tl.reshape(t, (R, 4, 2)))            # columns 2i and 2i + 1
    c04, c26 = tl.split(tl.reshape(even, (R, 2, 2)))          # columns {0, 4} and {2, 6}
    c15, c37 = tl.split(tl.reshape(odd, (R, 2, 2)))           # columns {1, 5} and {3, 7}
    x0, x4 = tl.split(c04)
    x2, x6 = tl.split(c26)
    x1, x5 = tl.split(c15)
    x3, x7 = tl.split(c37)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _dequant_tile(qw_ptr, s_ptr, z_ptr, k0, offs_n, mask_n, N, GROUP: tl.constexpr, BLOCK_K: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    rows = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    packed = tl.load(qw_ptr + rows[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0)
    shifts = tl.arange(0, 8) * 4
    q = ((packed[:, None, :] >> shifts[None, :, None]) & 0xF) | MAGIC_BITS
    q = tl.reshape(q, (BLOCK_K, BLOCK_N)).to(tl.float32, bitcast=True) - 8388608.0
    g = k0 // GROUP
    s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    return (q - z[None, :]) * s[None, :]


@triton.jit
def store_row(acc, y_ptr, part_ptr, lock_ptr, m, M, N, offs_n, mask_n, stride_ym, pid_n, pid_k,
              SPLITS: tl.constexpr, SPLITS_POW2: tl.constexpr):
    """Row m of a GEMV's output tile: stored, or with K splits, this split's fp32 partial stored and
    counted in on the tile's semaphore; the last split adds the partials in split order
    (deterministic), writes y and resets the semaphore for CUDA graph replays. Shared with
    w4a16_gemv.py."""
    if SPLITS == 1:
        tl.store(y_ptr + m * stride_ym + offs_n, acc.to(y_ptr.dtype.element_ty), mask=mask_n)
    else:
        tl.store(part_ptr + (pid_k * M + m) * N + offs_n, acc, mask=mask_n)
        tl.debug_barrier()   # every thread's partial is written before the tile is counted in
        lock = lock_ptr + m * tl.num_programs(0) + pid_n
        if tl.atomic_add(lock, 1, sem="acq_rel") == SPLITS - 1:
            splits = tl.arange(0, SPLITS_POW2)
            parts = tl.load(part_ptr + (splits[:, None] * M + m) * N + offs_n[None, :],
                            mask=(splits[:, None] < SPLITS) & mask_n[None, :], other=0.0, cache_modifier=".cg")
            tl.store(y_ptr + m * stride_ym + offs_n, tl.sum(parts, axis=0).to(y_ptr.dtype.element_ty), mask=mask_n)
            tl.atomic_xchg(lock, 0)


@triton.jit
def _gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, part_ptr, y_ptr, lock_ptr, M, N, K, K_PADDED, stride_xm, stride_ym,
                 GROUP: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, K_PER_SPLIT,
                 SPLITS: tl.constexpr, SPLITS_POW2: tl.constexpr, UNIT_CODES: tl.constexpr, X_TILE: tl.constexpr,
                 NO_MASKS: tl.constexpr):
    pid_n, pid_k, m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_r = tl.arange(0, BLOCK_K // 8)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    k_begin = pid_k * K_PER_SPLIT
    # Exact loop bounds (no branch in the body) let the compiler pipeline the weight loads.
    for k0 in range(k_begin, tl.minimum(k_begin + K_PER_SPLIT, K_PADDED), BLOCK_K):
        w_ptrs = qw_ptr + (k0 // 8 + offs_r)[:, None] * N + offs_n[None, :]
        if NO_MASKS:   # N a multiple of BLOCK_N, no padded input rows: no compares in the loop
            packed = tl.load(w_ptrs)
        else:
            packed = tl.load(w_ptrs, mask=mask_n[None, :], other=0)
        # One tile lies in one group: sum x*(q - z)*s = s * (sum x*q - z * sum x), so the
        # inner loop is shift, mask, convert and FMA per weight, nothing else.
        xq = tl.zeros((BLOCK_K // 8, BLOCK_N), dtype=tl.float32)
        xsum = tl.zeros((BLOCK_K // 8,), dtype=tl.float32)
        if X_TILE:   # x's BLOCK_K values in one vector load, split into the 8 codes' columns in registers
            kk2 = k0 + offs_r[:, None] * 8 + tl.arange(0, 8)[None, :]
            if NO_MASKS:
                xt = tl.load(x_ptr + m * stride_xm + kk2)
            else:
                xt = tl.load(x_ptr + m * stride_xm + kk2, mask=kk2 < K, other=0.0)
            xcols = _columns8(xt, BLOCK_K // 8)
        for j in tl.static_range(8):
            if X_TILE:
                xj = xcols[j].to(tl.float32)   # kept in x's dtype until used: half the registers
            else:
                kk = k0 + offs_r * 8 + j
                xj = tl.load(x_ptr + m * stride_xm + kk, mask=kk < K, other=0.0).to(tl.float32)
            if UNIT_CODES:
                xq += xj[:, None] * _nibble_unit(packed, j)
            else:
                xq += xj[:, None] * _nibble(packed, j)
            xsum += xj
        g = k0 // GROUP
        s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        sx = tl.sum(xsum, axis=0)
        if UNIT_CODES:   # sum x*q = 16 * (sum x*(1 + q/16) - sum x)
            acc += s * (16.0 * tl.sum(xq, axis=0) - (16.0 + z) * sx)
        else:
            acc += s * (tl.sum(xq, axis=0) - z * sx)
    store_row(acc, y_ptr, part_ptr, lock_ptr, m, M, N, offs_n, mask_n, stride_ym, pid_n, pid_k, SPLITS, SPLITS_POW2)


@triton.jit
def _gemm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, M, N, K, K_PADDED, stride_xm, stride_ym,
                 GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                 K_PER_SPLIT):
    """With several K splits, y is a fp32 (splits, M, N) buffer of partial sums."""
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_begin = pid_k * K_PER_SPLIT
    for k0 in range(k_begin, tl.minimum(k_begin + K_PER_SPLIT, K_PADDED), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & (offs_k[None, :] < K), other=0.0)
        w = _dequant_tile(qw_ptr, s_ptr, z_ptr, k0, offs_n, mask_n, N, GROUP, BLOCK_K, BLOCK_N)
        acc += tl.dot(x, w.to(x.dtype))
    y_ptr += pid_k * M * N
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _dequant_kernel(qw_ptr, s_ptr, z_ptr, w_ptr, N, K, GROUP: tl.constexpr, BLOCK_K: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    pid_k, pid_n = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    k0 = pid_k * BLOCK_K
    w = _dequant_tile(qw_ptr, s_ptr, z_ptr, k0, offs_n, mask_n, N, GROUP, BLOCK_K, BLOCK_N)
    rows = k0 + tl.arange(0, BLOCK_K)
    tl.store(w_ptr + rows[:, None] * N + offs_n[None, :], w.to(w_ptr.dtype.element_ty),
             mask=(rows[:, None] < K) & mask_n[None, :])


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, K: int,
               dtype: torch.dtype) -> torch.Tensor:
    """The (K, N) matrix of the int4 weight (padded rows dropped), in a scratch buffer."""
    k_padded, N = qweight.shape[0] * 8, qweight.shape[1]
    group = k_padded // scales.shape[0]
    block_k, block_n = min(64, group), 128
    w = scratch((K, N), qweight.device, dtype)
    _dequant_kernel[(triton.cdiv(K, block_k), triton.cdiv(N, block_n))](
        qweight, scales, zeros, w, N, K, GROUP=group, BLOCK_K=block_k, BLOCK_N=block_n)
    return w


def _matmul(x2: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """x2 @ w by the dense linear op (a float32 `out` gets the unrounded sums, as there)."""
    y = linear(x2, w.t(), None, None if out is None else out.dtype)
    return y if out is None else out.copy_(y)


GEMV_MAX_M = 4
DEQUANT_MIN_M = 128


def w4a16_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 out: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """x (..., K) fp16/bf16 -> (..., N). `config` overrides the launch heuristics (tuning, tests)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M, K = x2.shape
    k_padded, N = qweight.shape[0] * 8, qweight.shape[1]
    group = k_padded // scales.shape[0]
    cfg = heuristic_config(M, N, k_padded, group) | (config or {})
    block_k, block_n, warps = min(cfg["block_k"], group), cfg["block_n"], cfg["num_warps"]
    per_split, splits = k_split(k_padded, block_k, cfg["split_k"])
    if M <= GEMV_MAX_M:
        y = out.view(M, N) if out is not None else torch.empty(M, N, device=x.device, dtype=x.dtype)
        tiles_n = triton.cdiv(N, block_n)
        partial = scratch((splits, M, N), x.device, torch.float32) if splits > 1 else y
        _gemv_kernel[(tiles_n, splits, M)](
            x2, qweight, scales, zeros, partial, y, semaphores(x.device, M * tiles_n), M, N, K, k_padded,
            x2.stride(0), y.stride(0), GROUP=group, BLOCK_K=block_k, BLOCK_N=block_n, K_PER_SPLIT=per_split,
            SPLITS=splits, SPLITS_POW2=triton.next_power_of_2(splits), UNIT_CODES=cfg.get("unit_codes", True),
            X_TILE=cfg.get("x_tile", False), NO_MASKS=cfg.get("no_masks", False) and K == k_padded
            and N % block_n == 0, num_warps=warps,
            num_stages=cfg.get("num_stages", 3))
        return y.view(*lead, N)
    if cfg.get("dequant"):
        y = _matmul(x2, dequantize(qweight, scales, zeros, K, x.dtype), None if out is None else out.view(M, N))
        return y.view(*lead, N)
    block_m = cfg["block_m"]
    partial = scratch((splits, M, N), x.device, torch.float32) if splits > 1 else (
        out.view(M, N) if out is not None else torch.empty(M, N, device=x.device, dtype=x.dtype))
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n), splits)
    _gemm_kernel[grid](x2, qweight, scales, zeros, partial, M, N, K, k_padded, x2.stride(0), N,
                       GROUP=group, BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_N=block_n, K_PER_SPLIT=per_split,
                       num_warps=warps, num_stages=cfg.get("num_stages", 3))
    if splits == 1:
        return partial.view(*lead, N)
    y = partial.sum(0).to(out.dtype if out is not None else x.dtype)
    if out is not None:
        y = out.view(M, N).copy_(y)
    return y.reshape(*lead, N)


def heuristic_config(M: int, N: int, K: int, group: int) -> dict:
    """Launch parameters, from sweeps of scripts/tune_w4a16.py on an H200 (docs/benchmarks.md):
    split K until (N tiles x M tiles x splits) covers several waves of a 132-SM GPU. GEMV: the
    x_tile option (not yet timed) cuts the sm_90 PTX of a launch from 2,228 to 1,501 instructions but
    holds all of a tile's x values live: 255 registers a thread instead of 148, half the resident
    warps of a kernel that ncu found register-limited; off until a sweep says otherwise."""
    if M <= GEMV_MAX_M:
        tiles_k = K // min(128, group)
        return {"block_m": 1, "block_n": 64, "block_k": 128, "num_warps": 1, "num_stages": 3,
                "split_k": max(1, min(tiles_k // 2, 32)), "unit_codes": True, "x_tile": False}
    if M >= DEQUANT_MIN_M:
        return {"dequant": True, "block_m": 64, "block_k": 64, "block_n": 128, "num_warps": 4, "num_stages": 3,
                "split_k": 1}
    block_m = 16 if M <= 16 else (32 if M <= 32 else 64)
    programs = triton.cdiv(N, 128) * triton.cdiv(M, block_m)
    split_k = max(1, min(triton.cdiv(1056, programs), 16)) if M <= 64 else max(1, min(triton.cdiv(264, programs), 8))
    return {"block_m": block_m, "block_n": 128, "block_k": 64, "num_warps": 4, "num_stages": 3, "split_k": split_k}
