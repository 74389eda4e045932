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
- Fused input transforms (FMA loop only), each computed per tile exactly as its own kernel does, so
  the fused launch replaces that kernel without changing a bit of the GEMV's input:
  GATED: silu(gate) * up (kernels/silu_mul.py) for the down projection;
  NORM (one row): the residual add + RMSNorm (kernels/rms_norm.py) before q/k/v, gate/up and lm_head.
  Every program first sums the squares of h = x + residual over the whole row (16 KB of L2 reads at
  hidden 4096, against 50-400 KB of weights it then streams); program (0, 0) also writes h, the new
  residual stream, to its own buffer (never x's or the residual's: other programs still read them).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lmdepot.runtime.kernels.scratch import k_split, scratch, semaphores, split_sum

MAX_M = 4
DOT_M = 16   # tl.dot's smallest operand dim: x is padded to it on the DOT path
NORM_BLOCK = 2048   # columns per step of the NORM prologue's sum of squares (hidden 4096: two steps)


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
              out_dtype: torch.dtype | None = None) -> torch.Tensor:
    y = x.float() @ weight.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype or x.dtype)


def norm_reference(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                   weight: torch.Tensor, bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None):
    """(reference(rms_norm(x + residual) * norm_weight, weight, bias), x + residual), rounded as
    kernels/rms_norm.py does: x (maybe a float32 tensor-parallel sum) to the residual's dtype, the sum
    once, the normed value before the weight multiply. The output is in the residual's dtype by default."""
    h = x.to(residual.dtype) + residual
    hf = h.float()
    normed = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)
    return reference(norm_weight.to(h.dtype) * normed, weight, bias, out_dtype), h


@triton.jit
def _h_row(x_ptr, r_ptr, kk, mask):
    """The new residual stream x + residual at columns kk, in the residual's dtype: x (maybe a float32
    tensor-parallel sum) rounded to it first, then the exact sum rounded once (as kernels/rms_norm.py)."""
    dt = r_ptr.dtype.element_ty
    x = tl.load(x_ptr + kk, mask=mask, other=0.0)
    r = tl.load(r_ptr + kk, mask=mask, other=0.0)
    return (x.to(dt).to(tl.float32) + r.to(tl.float32)).to(dt)


@triton.jit
def _norm_prologue(x_ptr, r_ptr, h_ptr, K, eps, H_LEN, NORM_BLOCK: tl.constexpr):
    """1 / rms of the row h = x + residual (whole K, in NORM_BLOCK chunks: large, so that the whole
    row's loads are in flight at once and the prologue costs about two L2 round trips, not one per
    BLOCK_K tile); stores h's first H_LEN columns (K in program (0, 0), 0 elsewhere)."""
    offs_k = tl.arange(0, NORM_BLOCK)
    ss = tl.zeros((NORM_BLOCK,), dtype=tl.float32)
    for k0 in range(0, K, NORM_BLOCK):
        kk = k0 + offs_k
        h = _h_row(x_ptr, r_ptr, kk, kk < K)
        tl.store(h_ptr + kk, h, mask=kk < H_LEN)
        hf = h.to(tl.float32)
        ss += hf * hf
    return 1.0 / tl.sqrt(tl.sum(ss, axis=0) / K + eps)


@triton.jit
def _x_row(x_ptr, m, kk, M, K, stride_xm, EVEN_K: tl.constexpr, GATED: tl.constexpr, r_ptr, nw_ptr, inv,
           NORM: tl.constexpr):
    """Row m of x at columns kk as float32 (zeros past M or K). GATED: x is a fused gate/up row
    (gate in columns [0, K), up in [K, 2K)) and the input is silu(gate) * up, computed and rounded
    exactly as kernels/silu_mul.py does. NORM (one row): the input is norm_weight * (h * inv) with
    h = x + residual, rounded exactly as kernels/rms_norm.py does."""
    row_ok = (kk * 0 + m) < M   # a tensor, as masks must be (m and M may both be compile-time ints)
    mask = row_ok if EVEN_K else row_ok & (kk < K)
    if NORM:
        h = _h_row(x_ptr, r_ptr, kk, mask)
        normed = (h.to(tl.float32) * inv).to(h.dtype)
        x = tl.load(nw_ptr + kk, mask=mask, other=0.0).to(h.dtype) * normed
    else:
        x = tl.load(x_ptr + m * stride_xm + kk, mask=mask, other=0.0)
    if GATED:
        g = x.to(tl.float32)
        u = tl.load(x_ptr + m * stride_xm + K + kk, mask=mask, other=0.0).to(tl.float32)
        x = (g / (1.0 + tl.exp(-g)) * u).to(x_ptr.dtype.element_ty)
    return x.to(tl.float32)


@triton.jit
def _fma_loop(x_ptr, w_ptrs, offs_m, k_begin, k_end, M, K, stride_xm, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, STAGES: tl.constexpr,
              GATED: tl.constexpr, r_ptr, nw_ptr, inv, NORM: tl.constexpr):
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
        acc0 += _x_row(x_ptr, 0, kk, M, K, stride_xm, EVEN_K, GATED, r_ptr, nw_ptr, inv, NORM)[None, :] * w
        if BLOCK_M > 1:
            acc1 += _x_row(x_ptr, 1, kk, M, K, stride_xm, EVEN_K, GATED, r_ptr, nw_ptr, inv, NORM)[None, :] * w
        if BLOCK_M > 2:
            acc2 += _x_row(x_ptr, 2, kk, M, K, stride_xm, EVEN_K, GATED, r_ptr, nw_ptr, inv, NORM)[None, :] * w
            acc3 += _x_row(x_ptr, 3, kk, M, K, stride_xm, EVEN_K, GATED, r_ptr, nw_ptr, inv, NORM)[None, :] * w
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
def _gemv_kernel(x_ptr, w_ptr, b_ptr, part_ptr, y_ptr, lock_ptr, r_ptr, nw_ptr, h_ptr, eps, M, N, K, stride_xm,
                 stride_wn, stride_ym, K_PER_SPLIT, SPLITS, HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr,
                 EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 STAGES: tl.constexpr, GATED: tl.constexpr, NORM: tl.constexpr, NORM_BLOCK: tl.constexpr):
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    inv = 1.0
    if NORM:
        inv = _norm_prologue(x_ptr, r_ptr, h_ptr, K, eps, K - K * tl.minimum(pid_n + pid_k, 1), NORM_BLOCK)
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
                        STAGES, GATED, r_ptr, nw_ptr, inv, NORM)
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLITS > 1:
        last, acc = split_sum(acc, part_ptr + offs_m[:, None] * N + offs_n[None, :], pid_k, M, N, mask,
                              lock_ptr + pid_n, SPLITS)
        if last:
            if HAS_BIAS:
                acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(lock_ptr + pid_n, 0)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         out_dtype: torch.dtype | None = None, config: dict | None = None,
         out: torch.Tensor | None = None, gated: bool = False, norm: tuple | None = None):
    """x (..., K) with at most MAX_M rows, weight (N, K) K-contiguous -> (..., N) in out_dtype (x's
    dtype by default; float32 keeps the unrounded sums), or into `out` (contiguous, its own dtype).
    gated: x is (..., 2K), a fused gate/up output, and the product is silu(gate) * up @ W^T (the
    activation computed in the loads: one launch less per MLP; FMA loop only).
    norm = (residual, norm_weight, eps[, residual_out]): one row; the product is
    rms_norm(x + residual) * norm_weight @ W^T (kernels/rms_norm.py's numbers, computed in the loads:
    one launch less per norm; FMA loop only), output in the residual's dtype by default, and the
    call returns (y, x + residual), the latter written to residual_out (a fresh buffer by default;
    it must not overlap x or the residual). x may be a float32 tensor-parallel sum.
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
    use_dot = bool(cfg["use_dot"]) and x.dtype != torch.float32 and not gated and norm is None   # fp32 dots: tf32
    block_n, block_k = cfg["block_n"], cfg["block_k"]
    per_split, splits = k_split(K, block_k, cfg["split_k"])
    tiles_n = triton.cdiv(N, block_n)
    r2 = nw = h = None
    if norm is not None:
        r2, nw, h = _norm_args(x2, *norm)
    dtype = out_dtype or (r2.dtype if norm is not None else x.dtype)
    y = out.view(M, N) if out is not None else torch.empty(M, N, device=x.device, dtype=dtype)
    partial = scratch((splits, M, N), x.device, torch.float32) if splits > 1 else y
    _gemv_kernel[(tiles_n, splits)](
        # counters only where splits meet: an unsplit launch never grows the shared array (a CUDA graph
        # captured earlier keeps the address of the one it saw)
        x2, weight, bias if bias is not None else y, partial, y, semaphores(x.device, tiles_n if splits > 1 else 1),
        r2 if norm is not None else y, nw if norm is not None else y, h if norm is not None else y,
        float(norm[2]) if norm is not None else 0.0, M, N, K,
        x2.stride(0), weight.stride(0), y.stride(0), per_split, splits, HAS_BIAS=bias is not None,
        USE_DOT=use_dot, EVEN_K=K % block_k == 0, BLOCK_M=DOT_M if use_dot else triton.next_power_of_2(M),
        BLOCK_N=block_n, BLOCK_K=block_k, STAGES=cfg["num_stages"], GATED=gated, NORM=norm is not None,
        NORM_BLOCK=min(triton.next_power_of_2(K), cfg.get("norm_block", NORM_BLOCK)), num_warps=cfg["num_warps"])
    y = y.view(*lead, N)
    return y if norm is None else (y, h.view(x.shape))


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


def _norm_args(x2, residual, norm_weight, eps, residual_out=None):
    """The NORM launch's residual row, norm weight and output buffer for x + residual, checked."""
    K = x2.shape[1]
    r2 = residual.reshape(-1, residual.shape[-1])
    if x2.shape[0] != 1 or r2.shape != x2.shape or not r2.is_contiguous() or norm_weight.shape != (K,) \
            or norm_weight.stride(0) != 1 or r2.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"gemv(norm=...): needs one contiguous row and a (K,) norm weight; got x "
                         f"{tuple(x2.shape)}, residual {tuple(residual.shape)}, norm weight {tuple(norm_weight.shape)}")
    h = torch.empty_like(r2) if residual_out is None else residual_out.view(r2.shape)
    # other programs of the launch still read x and the residual while program (0, 0) writes h
    if h.dtype != r2.dtype or not h.is_contiguous() or _overlap(h, x2) or _overlap(h, r2):
        raise ValueError("gemv(norm=...): residual_out must be a contiguous buffer of the residual's dtype "
                         "that overlaps neither x nor the residual")
    return r2, norm_weight, h


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
