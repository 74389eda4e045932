"""W8A8 GEMM: y = (xq @ Wq^T) * x_scale[:, None] * w_scale[None, :] (+ bias), int8 in, int32 accumulate.

xq (M, K) int8 with per-token scales (rms_norm_quant.py); Wq (N, K) int8 with per-output-channel
scales: the runtime transposes the workspace's (in, out) qweight once at load so that both operands
are K-contiguous, the layout tensor cores want for 8-bit operands. tl.dot on int8 tiles gives exact
int32 sums; the epilogue scales in fp32 and rounds once to the output dtype.

Tiles run in grouped order (GROUP_M row tiles sweep the N tiles together) so that a wave of programs
shares A and B tiles in L2. When the output has too few tiles to fill the GPU (M of a few hundred
rows on a 4096-wide output gives 64 tiles of 128x128 for 132 SMs), K is split: each split stores
its exact int32 partial sums, counts itself in on the tile's semaphore (w4a16.py's scheme), and the
last one to arrive adds the partials and runs the epilogue, so a split costs no extra launch.
Launch parameters come from a small table by M (`heuristic_config`); `config=` overrides them for
tuning and tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lmdepot.runtime.kernels.scratch import k_split, scratch, semaphores, split_sum
from lmdepot.runtime.ops.reference import linear_w8a8 as reference  # noqa: F401 (the semantics)


@triton.jit(do_not_specialize=["M"])   # a step's row count: one build for all (paged_decode_attention.STEP_INTS)
def _kernel(a_ptr, b_ptr, as_ptr, bs_ptr, bias_ptr, c_ptr, part_ptr, lock_ptr, M, N, K, K_PER_SPLIT,
            stride_am, stride_bn, stride_cm, HAS_BIAS: tl.constexpr, RAW: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
            SPLITS: tl.constexpr):
    pid, pid_k = tl.program_id(0), tl.program_id(1)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    rows_in_group = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows_in_group
    pid_n = (pid % per_group) // rows_in_group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Out-of-range rows/columns wrap around to valid ones for the loads (no mask in the inner loop
    # but a K tail's); the stores are masked.
    rm = offs_m % M
    rn = offs_n % N
    k_begin = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_begin + K_PER_SPLIT, K)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None] * stride_am + (k_begin + offs_k)[None, :]
    b_ptrs = b_ptr + (k_begin + offs_k)[:, None] + rn[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        if EVEN_K:  # no K tail (real model widths): unmasked loads pipeline best
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = k_end - k0
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLITS == 1:
        _epilogue(acc, mask, offs_m, offs_n, as_ptr, bs_ptr, bias_ptr, c_ptr, M, N, stride_cm, HAS_BIAS, RAW)
    else:
        # partials are exact integers, so the order the splits add up in cannot change the result
        last, acc = split_sum(acc, part_ptr + offs_m[:, None] * N + offs_n[None, :], pid_k, M, N, mask,
                              lock_ptr + pid, SPLITS)
        if last:
            _epilogue(acc, mask, offs_m, offs_n, as_ptr, bs_ptr, bias_ptr, c_ptr, M, N, stride_cm, HAS_BIAS, RAW)
            tl.atomic_xchg(lock_ptr + pid, 0)


@triton.jit
def _epilogue(acc, mask, offs_m, offs_n, as_ptr, bs_ptr, bias_ptr, c_ptr, M, N, stride_cm, HAS_BIAS: tl.constexpr,
              RAW: tl.constexpr):
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :]
    if RAW:  # the int32 sums themselves (tests)
        tl.store(c_ptrs, acc, mask=mask)
    else:
        xs = tl.load(as_ptr + offs_m, mask=offs_m < M, other=0.0)
        ws = tl.load(bs_ptr + offs_n, mask=offs_n < N, other=0.0)
        out = acc.to(tl.float32) * xs[:, None] * ws[None, :]
        if HAS_BIAS:
            out += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=mask)


def heuristic_config(M: int, N: int, K: int) -> dict:
    """Tiles by M, from scripts/tune_w8a8.py on an H200 (docs/benchmarks.md). Small M is weight-bandwidth
    bound: narrow N tiles give many programs and deep K tiles long contiguous reads. From a few hundred
    rows on, 64- then 128-row tiles keep the tensor cores fed; 3 stages of 128x128 int8 tiles use 96 KiB
    of shared memory. Where the tiles cover less than one wave of 132 SMs, K is split in two."""
    if M <= 64:  # N tiles narrow enough for about one wave of 132 SMs (4096 columns: 128 programs)
        cfg = {"block_m": 16 if M <= 16 else (32 if M <= 32 else 64), "block_n": 64 if N >= 8192 else 32,
               "block_k": 128, "num_warps": 4, "num_stages": 4}
    elif M <= 256:
        cfg = {"block_m": 64, "block_n": 128, "block_k": 128, "num_warps": 4, "num_stages": 3}
    elif M <= 2048:
        cfg = {"block_m": 128, "block_n": 128, "block_k": 128, "num_warps": 8, "num_stages": 3}
    else:
        cfg = {"block_m": 128, "block_n": 256, "block_k": 128, "num_warps": 8, "num_stages": 3}
    tiles = -(-M // cfg["block_m"]) * -(-N // cfg["block_n"])
    if M > 64 and tiles < 132 and K >= 2048:
        cfg |= {"split_k": 2, "num_stages": 4}
    return cfg | {"group_m": 8}


def w8a8_linear(xq: torch.Tensor, x_scales: torch.Tensor, qweight: torch.Tensor, w_scales: torch.Tensor,
                bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float16,
                out: torch.Tensor | None = None, config: dict | None = None, raw: bool = False) -> torch.Tensor:
    """xq (..., K) int8, x_scales (...) fp32, qweight (N, K) int8 (K contiguous), w_scales (N,) fp32
    -> (..., N) out_dtype; with raw=True the int32 sums before the epilogue."""
    lead, K = xq.shape[:-1], xq.shape[-1]
    a = xq.reshape(-1, K)
    if a.stride(-1) != 1:
        a = a.contiguous()
    M, N = a.shape[0], qweight.shape[0]
    assert qweight.shape[1] == K and qweight.stride(1) == 1, "qweight must be (N, K), K contiguous"
    c = out.view(M, N) if out is not None else \
        torch.empty(M, N, device=xq.device, dtype=torch.int32 if raw else out_dtype)
    if M == 0:
        return c.view(*lead, N)
    cfg = heuristic_config(M, N, K) | (config or {})
    bm, bn, bk = cfg["block_m"], cfg["block_n"], cfg["block_k"]
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    per_split, splits = k_split(K, bk, cfg.get("split_k", 1))
    partial = scratch((splits, M, N), xq.device, torch.int32) if splits > 1 else c
    _kernel[(tiles, splits)](
        a, qweight, x_scales.reshape(-1).contiguous(), w_scales, bias if bias is not None else w_scales, c,
        partial, semaphores(xq.device, tiles), M, N, K, per_split, a.stride(0), qweight.stride(0), c.stride(0),
        HAS_BIAS=bias is not None, RAW=raw, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg["group_m"],
        EVEN_K=K % bk == 0, SPLITS=splits, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return c.view(*lead, N)
