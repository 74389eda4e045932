"""Dequantize an int4 weight in w4a16_gemv.repack's K-major layout into an (N, K) matrix.

For 128+ row inputs (prefill) the engine dequantizes the weight once into a scratch fp16/bf16 matrix
and lets cuBLAS multiply (as w4a16.py does on the workspace layout): one pass over the weight, while
a tl.dot kernel measured 2.5x cuBLAS's time there (docs/benchmarks.md). The (N, K) result is
nn.Linear's layout: `x @ W^T` is cuBLAS's usual TN GEMM, and each program writes whole spans of a
row contiguously.

`span_codes` (shared with w4a16_gemm.py) turns a span's stored words into its codes in input-row
order: slot s of word w holds input row span_start + s * SPAN/8 + w (w4a16_gemv's docstring), so the
(BLOCK_N, 8 slots, SPAN/8 words) tensor of codes, reshaped to (BLOCK_N, SPAN), is the span's rows in
their natural order. Slot s's code sits at bit offset (19 - 4 s) mod 32 of the word
(w4a16_gemv.SLOT_OFFSETS): a rotate right by it brings the code to bits 0..3.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lmdepot.runtime.kernels.scratch import scratch
from lmdepot.runtime.kernels.w4a16 import MAGIC_BITS
from lmdepot.runtime.kernels.w4a16_gemv import span_of, unpack


def reference(packed: dict, K: int, dtype: torch.dtype) -> torch.Tensor:
    """The (N, K) weight, (q - z) * s in float32 rounded once to dtype (formats.int4.dequantize_int4)."""
    group = packed["group"]
    q = unpack(packed).to(torch.float32).t()                          # (N, K_padded)
    s = packed["scales"].to(torch.float32).repeat_interleave(group, dim=1)
    z = packed["zeros"].to(torch.float32).repeat_interleave(group, dim=1)
    return ((q - z) * s)[:, :K].to(dtype)


@triton.jit
def span_codes(p, BLOCK_N: tl.constexpr, SPAN: tl.constexpr):
    """(BLOCK_N, SPAN/8) int32 words of one span -> (BLOCK_N, SPAN) float32 codes in input-row order.
    Codes become floats without a conversion instruction (w4a16.py's _nibble: OR-ed into the mantissa
    of 2^23, which is then subtracted)."""
    u = p.to(tl.uint32, bitcast=True)[:, None, :]
    off = ((19 - 4 * tl.arange(0, 8)) & 31).to(tl.uint32)[None, :, None]   # w4a16_gemv.SLOT_OFFSETS
    q = (((u >> off) | (u << (32 - off))) & 0xF) | MAGIC_BITS               # rotate right, 4 bits, into 2^23
    q = q.to(tl.float32, bitcast=True) - 8388608.0
    return tl.reshape(q, (BLOCK_N, SPAN))


@triton.jit
def _kernel(qt_ptr, s_ptr, z_ptr, w_ptr, N, K, KW, GROUPS, GROUP: tl.constexpr, SPAN: tl.constexpr,
            BLOCK_N: tl.constexpr):
    """One span of BLOCK_N rows a program; rows past N re-read row N - 1 (dropped at the store)."""
    pid_k, pid_n = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, N - 1)
    k0 = pid_k * SPAN
    p = tl.load(qt_ptr + rows.to(tl.int64)[:, None] * KW + (k0 // 8 + tl.arange(0, SPAN // 8))[None, :])
    g = k0 // GROUP   # a span never straddles a group
    s = tl.load(s_ptr + rows * GROUPS + g).to(tl.float32)
    z = tl.load(z_ptr + rows * GROUPS + g).to(tl.float32)
    w = (span_codes(p, BLOCK_N, SPAN) - z[:, None]) * s[:, None]
    offs_k = k0 + tl.arange(0, SPAN)
    tl.store(w_ptr + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :], w.to(w_ptr.dtype.element_ty),
             mask=(offs_n < N)[:, None] & (offs_k < K)[None, :])


def dequantize(packed: dict, K: int, dtype: torch.dtype) -> torch.Tensor:
    """The (N, K) weight of `packed` (w4a16_gemv.repack; input rows past K, a padded last group's,
    dropped) in a scratch buffer of `dtype`."""
    qt, group = packed["qt"], packed["group"]
    (N, kw), span = qt.shape, span_of(group)
    block_n = max(32, 8192 // span)   # 8 Ki weights a program
    w = scratch((N, K), qt.device, dtype)
    _kernel[(kw * 8 // span, triton.cdiv(N, block_n))](
        qt, packed["scales"], packed["zeros"], w, N, K, kw, packed["scales"].shape[1],
        GROUP=group, SPAN=span, BLOCK_N=block_n, num_warps=4)
    return w
