"""Dense fp16/bf16 GEMV for decode (M <= 4 rows): y = x @ W^T (+ bias) in one launch.

W is the runtime's dense weight as `Linear` keeps it: (out, in) = (N, K), K contiguous (the loader
transposes the workspace's (in, out) tensor once). That is already the layout a small-M GEMV wants:
a program owns BLOCK_N output rows and streams each row's K elements as long contiguous runs (BLOCK_K
* 2 bytes per row per step, 16-byte vector loads), so no repacking at load time is needed.

- All M rows are handled in one program, so W is read once whatever M is.
- The K loop is a `tl.range(..., num_stages=STAGES)`: Triton then streams W through shared memory
  with cp.async, STAGES - 1 tiles in flight per program, without holding them in registers (a plain
  `range` left the FMA loop unpipelined: one tile in flight; checked in the sm_90 PTX).
- Two loop bodies, picked per config by `use_dot` (scripts/tune_gemv.py measures both):
  FMA: one (BLOCK_N, BLOCK_K) fp32 accumulator of elementwise products per row of x, summed over K
  once at the end (no cross-lane reduction per step); DOT: the W tile times the transposed x tile on
  the tensor cores, x padded to 16 rows (tl.dot's minimum).
- Split-K for shapes with few output tiles (o, down): the splits meet in the kernel as in
  w4a16.py's GEMV. Each split writes its fp32 partial, counts itself in on the tile's semaphore, and
  the last one adds the partials in split order (deterministic), adds the bias, writes y (x's dtype
  or float32 for tensor-parallel partials) and resets the semaphore so CUDA graph replays find zero.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lmdepot.runtime.kernels.scratch import k_split, scratch, semaphores

MAX_M = 4
DOT_M = 16   # tl.dot's smallest operand dim: x is padded to it on the DOT path


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
              out_dtype: torch.dtype | None = None) -> torch.Tensor:
    y = x.float() @ weight.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype or x.dtype)


@triton.jit
def _x_row(x_ptr, m, kk, M, K, stride_xm, EVEN_K: tl.constexpr, GATED: tl.constexpr):
    """Row m of x at columns kk as float32 (zeros past M or K). GATED: x is a fused gate/up row
    (gate in columns [0, K), up in [K, 2K)) and the input is silu(gate) * up, computed and rounded
    exactly as kernels/silu_mul.py does."""
    row_ok = (kk * 0 + m) < M   # a tensor, as masks must be (m and M may both be compile-time ints)
    mask = row_ok if EVEN_K else row_ok & (kk < K)
    x = tl.load(x_ptr + m * stride_xm + kk, mask=mask, other=0.0)
    if GATED:
        g = x.to(tl.float32)
        u = tl.load(x_ptr + m * stride_xm + K + kk, mask=mask, other=0.0).to(tl.float32)
        x = (g / (1.0 + tl.exp(-g)) * u).to(x_ptr.dtype.element_ty)
    return x.to(tl.float32)


@triton.jit
def _fma_loop(x_ptr, w_ptrs, offs_m, k_begin, k_end, M, K, stride_xm, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, STAGES: tl.constexpr,
              GATED: tl.constexpr):
    """One (BLOCK_N, BLOCK_K) fp32 accumulator per row of x (BLOCK_M <= 4), each in the weight tile's
    own layout: plain FMAs per step, one reduction over K at the end. (A single 3D accumulator made
    Triton move every weight tile through shared memory to change its layout.)"""
    acc0 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in tl.range(k_begin, k_end, BLOCK_K, num_stages=STAGES):
        kk = k0 + offs_k
        if EVEN_K:
            w = tl.load(w_ptrs, eviction_policy="evict_first").to(tl.float32)
        else:
            w = tl.load(w_ptrs, mask=kk[None, :] < K, other=0.0, eviction_policy="evict_first").to(tl.float32)
        acc0 += _x_row(x_ptr, 0, kk, M, K, stride_xm, EVEN_K, GATED)[None, :] * w
        if BLOCK_M > 1:
            acc1 += _x_row(x_ptr, 1, kk, M, K, stride_xm, EVEN_K, GATED)[None, :] * w
        if BLOCK_M > 2:
            acc2 += _x_row(x_ptr, 2, kk, M, K, stride_xm, EVEN_K, GATED)[None, :] * w
            acc3 += _x_row(x_ptr, 3, kk, M, K, stride_xm, EVEN_K, GATED)[None, :] * w
        w_ptrs += BLOCK_K
    rows = offs_m[:, None]
    acc = tl.where(rows == 0, tl.sum(acc0, axis=1)[None, :], 0.0)
    if BLOCK_M > 1:
        acc = tl.where(rows == 1, tl.sum(acc1, axis=1)[None, :], acc)
    if BLOCK_M > 2:
        acc = tl.where(rows == 2, tl.sum(acc2, axis=1)[None, :], acc)
        acc = tl.where(rows == 3, tl.sum(acc3, axis=1)[None, :], acc)
    return acc


@triton.jit
def _dot_loop(x_ptr, w_ptrs, offs_m, mask_m, k_begin, k_end, K, stride_xm, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, STAGES: tl.constexpr):
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in tl.range(k_begin, k_end, BLOCK_K, num_stages=STAGES):
        kk = k0 + offs_k
        if EVEN_K:
            w = tl.load(w_ptrs, eviction_policy="evict_first")
            xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + kk[:, None], mask=mask_m[None, :], other=0.0)
        else:
            w = tl.load(w_ptrs, mask=kk[None, :] < K, other=0.0, eviction_policy="evict_first")
            xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + kk[:, None],
                         mask=mask_m[None, :] & (kk[:, None] < K), other=0.0)
        acc = tl.dot(w, xt.to(w.dtype), acc)
        w_ptrs += BLOCK_K
    return tl.trans(acc)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, part_ptr, y_ptr, lock_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                 K_PER_SPLIT, SPLITS, HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr, EVEN_K: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
                 GATED: tl.constexpr):
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    # Rows past N re-read row N-1 (discarded at the store): the weight loads need no row mask.
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)
    k_begin = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_begin + K_PER_SPLIT, K)
    w_ptrs = w_ptr + rows[:, None] * stride_wn + (k_begin + tl.arange(0, BLOCK_K))[None, :]
    if USE_DOT:
        acc = _dot_loop(x_ptr, w_ptrs, offs_m, mask_m, k_begin, k_end, K, stride_xm, BLOCK_M, BLOCK_N, BLOCK_K,
                        EVEN_K, STAGES)
    else:
        acc = _fma_loop(x_ptr, w_ptrs, offs_m, k_begin, k_end, M, K, stride_xm, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K,
                        STAGES, GATED)
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLITS > 1:
        tl.store(part_ptr + (pid_k * M + offs_m[:, None]) * N + offs_n[None, :], acc, mask=mask)
        tl.debug_barrier()   # every thread's partial is written before the tile is counted in
        lock = lock_ptr + pid_n
        if tl.atomic_add(lock, 1, sem="acq_rel") == SPLITS - 1:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in range(0, SPLITS):   # split order: the same sums on every run
                acc += tl.load(part_ptr + (s * M + offs_m[:, None]) * N + offs_n[None, :], mask=mask, other=0.0,
                               cache_modifier=".cg")
            if HAS_BIAS:
                acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(lock, 0)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         out_dtype: torch.dtype | None = None, config: dict | None = None,
         out: torch.Tensor | None = None, gated: bool = False) -> torch.Tensor:
    """x (..., K) with at most MAX_M rows, weight (N, K) K-contiguous -> (..., N) in out_dtype (x's
    dtype by default; float32 keeps the unrounded sums), or into `out` (contiguous, its own dtype).
    gated: x is (..., 2K), a fused gate/up output, and the product is silu(gate) * up @ W^T (the
    activation computed in the loads: one launch less per MLP; FMA loop only).
    `config` overrides heuristic_config (tuning, tests)."""
    lead, K = x.shape[:-1], x.shape[-1] // (2 if gated else 1)
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M, N = x2.shape[0], weight.shape[0]
    if M > MAX_M or weight.shape[1] != K or weight.stride(1) != 1 or (bias is not None and bias.stride(0) != 1):
        raise ValueError(f"gemv: needs <= {MAX_M} rows and a K-contiguous (N, K) weight; got x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)} strides {weight.stride()}")
    cfg = heuristic_config(M, N, K) | (config or {})
    use_dot = bool(cfg["use_dot"]) and x.dtype != torch.float32 and not gated   # fp32 dots would run as tf32
    block_n, block_k = cfg["block_n"], cfg["block_k"]
    per_split, splits = k_split(K, block_k, cfg["split_k"])
    tiles_n = triton.cdiv(N, block_n)
    y = out.view(M, N) if out is not None else torch.empty(M, N, device=x.device, dtype=out_dtype or x.dtype)
    partial = scratch((splits, M, N), x.device, torch.float32) if splits > 1 else y
    _gemv_kernel[(tiles_n, splits)](
        # counters only where splits meet: an unsplit launch never grows the shared array (a CUDA graph
        # captured earlier keeps the address of the one it saw)
        x2, weight, bias if bias is not None else y, partial, y, semaphores(x.device, tiles_n if splits > 1 else 1),
        M, N, K,
        x2.stride(0), weight.stride(0), y.stride(0), per_split, splits, HAS_BIAS=bias is not None,
        USE_DOT=use_dot, EVEN_K=K % block_k == 0, BLOCK_M=DOT_M if use_dot else triton.next_power_of_2(M),
        BLOCK_N=block_n, BLOCK_K=block_k, STAGES=cfg["num_stages"], GATED=gated, num_warps=cfg["num_warps"])
    return y.view(*lead, N)


def heuristic_config(M: int, N: int, K: int) -> dict:
    """Launch parameters. One row (decode at batch 1): from scripts/tune_gemv.py on an H200
    (2026-11-21, docs/benchmarks.md): no K split where the output tiles alone give >= 128 programs,
    16-row tiles of 256 K (512 for long K or a vocab-size N), 4 warps; an o_proj-like square 4096
    weight wants 32-row tiles and 8 warps. Measured 92-100% of copy bandwidth on Llama-2-7B's five
    shapes (cuBLAS: 74-94%). 2-4 rows (not tuned): 16 rows x 256 (M <= 2) or 128 (M > 2) K elements
    per step keep the fp32 accumulators at 32-64 registers a thread (sm_90 compile: ~120 registers at
    M=2 and 4, no spills); K is split until (N tiles x splits) gives ~8 programs per SM of a 132-SM GPU."""
    if M == 1:
        square = N <= 4096 and K <= 4096
        block_n, block_k = (32, 128) if square else (16, 512 if K >= 8192 or N >= 30000 else 256)
        tiles_n = triton.cdiv(N, block_n)
        split_k = max(1, min(triton.cdiv(128, tiles_n), triton.cdiv(K, block_k)))
        return {"use_dot": False, "block_n": block_n, "block_k": block_k, "num_warps": 8 if square else 4,
                "num_stages": 3 if N >= 30000 else 4, "split_k": split_k}
    block_n, block_k = 16, (256 if M <= 2 else 128)
    tiles_n, tiles_k = triton.cdiv(N, block_n), triton.cdiv(K, block_k)
    split_k = max(1, min(triton.cdiv(1024, tiles_n), 16, tiles_k))
    return {"use_dot": False, "block_n": block_n, "block_k": block_k, "num_warps": 4,
            "num_stages": 3 if M <= 2 else 4, "split_k": split_k}
