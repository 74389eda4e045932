"""W4A16 decode GEMV (M <= 4) on a K-major repacked int4 weight: y = x @ dequant(W).

The workspace layout (formats/int4.py: int32 words of 8 consecutive input rows, (K/8, N)) makes a
GEMV thread fetch one 4-byte word per output column and 8 strided x values per word. `repack` turns
it, once at load time, into what a streaming GEMV wants (dense kernels/gemv.py's access pattern):

- `qt` (N, K_padded / 8) int32: each output row's codes contiguous along K, so one 16-byte load is
  32 codes of one row. Codes are interleaved within spans of SPAN = min(group, 128) input rows: word
  w of a span holds, in slot s (0..7), input row span_start + s * (SPAN / 8) + w. A thread holding
  words w..w+3 then multiplies slot s by x[span_start + s * SPAN / 8 + w .. + 3]: one 8-byte load of
  x per slot, no strided or per-element x loads. A span never straddles a quantization group.
- `scales`, `zeros` (N, groups) fp16: the transposed workspace tensors (one load per row and group).

Decoding, 21 instructions per word of 8 weights (3 shifts, 8 LOP3, 8 FMAs, and 2 FMAs for zero and
scale), no int-to-float conversion: one LOP3 ORs a code into float32's mantissa as u = 1 + q/16
(code at bits 19..22 of 1.0, even slots) or u = 16 + q/16 (bits 15..18 of 16.0, odd slots). Each
slot's code sits in the stored word at the offset that a shift by 0, 8 or -8 bits or a rotate by 16
moves to 19 or 15, so one shift serves two codes. Then sum x q / 16 = sum x u - (sum_even x +
16 sum_odd x), all in float32: the subtracted carrier is at most ~20x the wanted sum (a few of
float32's 24 bits), where fp16 partial sums of x q would overflow for activations of a few thousand.
The x side (8 conversions and 9 adds per word and step) is shared by the rows of a thread.
sm_90 build (tests/kernels/test_w4a16_gemv.py, Triton 3.9): ~3.6 SASS instructions a weight in the
K loop at the default launch (one stage, 128 registers; the workspace-layout kernel: 6.2), no spills.

`prefetch`: each step loads the next step's words and group params, so a warp has a tile in flight
while it decodes (sm_90: ptxas issues them mid-step; 3.8 SASS a weight, 128 registers): the kernel was
found latency-bound with few warps resident. The tuning chose it, with 2 stages, for Llama-2-7B's
widest linears (qkv 4096 x 12288, gate/up 4096 x 22016; TUNED).

Split-K partial sums meet in the kernel as in w4a16.py (per-tile semaphore, last split adds them).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lmdepot.formats.int4 import unpack_int4
from lmdepot.runtime.kernels.scratch import k_split, scratch, semaphores
from lmdepot.runtime.kernels.w4a16 import store_row

MAX_M = 4
MAX_SPAN = 128
# Bit offset of slot s's code in a stored word: rotated left by 8 * (s // 2) it lands at 19 (even
# slots, u = 1 + q/16) or 15 (odd slots, u = 16 + q/16). Offset 31 wraps (bits 31, 0, 1, 2).
SLOT_OFFSETS = (19, 15, 11, 7, 3, 31, 27, 23)


def span_of(group: int) -> int:
    if group not in (32, 64) and group % MAX_SPAN:   # a span is a power of two of at least 4 words
        raise ValueError(f"w4a16 gemv: group size {group} must be 32, 64 or a multiple of {MAX_SPAN}")
    return min(group, MAX_SPAN)


def repack(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> dict:
    """Workspace int4 tensors (formats/int4.py) -> this kernel's layout (module docstring)."""
    k_padded, N = qweight.shape[0] * 8, qweight.shape[1]
    group = k_padded // scales.shape[0]
    span = span_of(group)
    codes = unpack_int4(qweight).view(k_padded // span, 8, span // 8, N)   # uint8 (span, slot, word, n)
    words = torch.zeros(k_padded // span, span // 8, N, dtype=torch.int64, device=qweight.device)
    for s, off in enumerate(SLOT_OFFSETS):   # int64 one slot at a time: 1/8 of the codes' int64 bytes
        c = codes[:, s].to(torch.int64)
        words |= ((c << off) | (c >> (32 - off))) & 0xFFFFFFFF   # rotate left by off within 32 bits
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return {"qt": words.reshape(k_padded // 8, N).t().contiguous(), "scales": scales.t().contiguous(),
            "zeros": zeros.t().contiguous(), "group": group}


def unpack(packed: dict) -> torch.Tensor:
    """Inverse of repack's code layout: (K_padded, N) codes (uint8), for tests."""
    qt = packed["qt"].to(torch.int64) & 0xFFFFFFFF
    N, kw = qt.shape
    span = span_of(packed["group"])
    words = qt.t().reshape(kw * 8 // span, span // 8, N)
    slots = [(((words >> off) | (words << (32 - off))) & 0xF) for off in SLOT_OFFSETS]
    return torch.stack(slots, dim=1).reshape(kw * 8, N).to(torch.uint8)


@triton.jit
def _rotl(p, n: tl.constexpr):
    """Rotate uint32 left by n (one funnel shift, SHF.L.W)."""
    return (p << n) | (p >> (32 - n))


@triton.jit
def _unit(r, mask, HI: tl.constexpr):
    """HI: 1 + q/16 (mask 0x00780000: code at bits 19..22 of 1.0); else 16 * (1 + q/256) = 16 + q/16
    (mask 0x00078000: bits 15..18 of 16.0), so both slots' codes count q/16 and x needs no scaling.
    One LOP3. `mask` is a kernel argument, not a literal: a LOP3 takes one immediate, and ptxas
    re-materialized a second literal before every use (one more instruction per weight)."""
    if HI:
        return ((r & mask) | 0x3F800000).to(tl.float32, bitcast=True)
    return ((r & mask) | 0x41800000).to(tl.float32, bitcast=True)


@triton.jit
def _x_slot(xb, s: tl.constexpr, kk, K, SPAN: tl.constexpr, EVEN_K: tl.constexpr):
    """x at input rows kk + s * SPAN/8 (the words' slot s) as float32; zero past K."""
    if EVEN_K:
        return tl.load(xb + s * (SPAN // 8)).to(tl.float32)
    return tl.load(xb + s * (SPAN // 8), mask=kk + s * (SPAN // 8) < K, other=0.0).to(tl.float32)


@triton.jit
def _kernel(x_ptr, qt_ptr, s_ptr, z_ptr, part_ptr, y_ptr, lock_ptr, M, N, K, K_PADDED, stride_xm, stride_ym,
            K_PER_SPLIT, KW, SPLIT_WORDS, MASK_HI, MASK_LO, GROUP: tl.constexpr, SPAN: tl.constexpr,
            BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, SPLITS_POW2: tl.constexpr, STAGES: tl.constexpr,
            EVEN_K: tl.constexpr, VEC: tl.constexpr, PREFETCH: tl.constexpr):
    pid_n, pid_k, m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    WORDS: tl.constexpr = SPAN // 8
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = tl.minimum(offs_n, N - 1)   # rows past N re-read row N - 1 (dropped at the store): no load masks
    offs_w = tl.max_contiguous(tl.arange(0, WORDS), VEC)   # VEC words a thread per row and step
    groups = K_PADDED // GROUP
    k_begin = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_begin + K_PER_SPLIT, K_PADDED)
    # word offsets from KW and SPLIT_WORDS (not K_PADDED // 8): Triton then knows the rows start
    # 16-byte aligned and loads 4 words a thread at once
    w_ptrs = qt_ptr + rows.to(tl.int64)[:, None] * KW + (pid_k * SPLIT_WORDS + offs_w)[None, :]
    acc = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
    if PREFETCH:   # the split's first step; an empty split (k_begin >= k_end) loads nothing
        # masks compared as blocks: the interpreter turns a block & a scalar bool into integers
        zeros = tl.zeros((BLOCK_N, WORDS), dtype=tl.int32)
        nxt = tl.load(w_ptrs, mask=k_begin + zeros < k_end, other=0, eviction_policy="evict_first")
        live = k_begin + rows * 0 < k_end
        nsc = tl.load(s_ptr + rows * groups + k_begin // GROUP, mask=live, other=0.0)
        nzc = tl.load(z_ptr + rows * groups + k_begin // GROUP, mask=live, other=0.0)
    for k0 in tl.range(k_begin, k_end, SPAN, num_stages=STAGES):
        if PREFETCH:   # this step's words and group params came one step ahead; the next step's go out now
            p, sc, zc = nxt.to(tl.uint32, bitcast=True), nsc.to(tl.float32), nzc.to(tl.float32)
            k1 = k0 + SPAN
            nxt = tl.load(w_ptrs + WORDS, mask=k1 + zeros < k_end, other=0, eviction_policy="evict_first")
            live = k1 + rows * 0 < k_end
            nsc = tl.load(s_ptr + rows * groups + k1 // GROUP, mask=live, other=0.0)
            nzc = tl.load(z_ptr + rows * groups + k1 // GROUP, mask=live, other=0.0)
        else:
            p = tl.load(w_ptrs, eviction_policy="evict_first").to(tl.uint32, bitcast=True)
            g = k0 // GROUP
            sc = tl.load(s_ptr + rows * groups + g).to(tl.float32)
            zc = tl.load(z_ptr + rows * groups + g).to(tl.float32)
        kk = k0 + offs_w
        xb = x_ptr + m * stride_xm + kk
        x0 = _x_slot(xb, 0, kk, K, SPAN, EVEN_K)
        x1 = _x_slot(xb, 1, kk, K, SPAN, EVEN_K)
        x2 = _x_slot(xb, 2, kk, K, SPAN, EVEN_K)
        x3 = _x_slot(xb, 3, kk, K, SPAN, EVEN_K)
        x4 = _x_slot(xb, 4, kk, K, SPAN, EVEN_K)
        x5 = _x_slot(xb, 5, kk, K, SPAN, EVEN_K)
        x6 = _x_slot(xb, 6, kk, K, SPAN, EVEN_K)
        x7 = _x_slot(xb, 7, kk, K, SPAN, EVEN_K)
        even = (x0 + x2) + (x4 + x6)
        odd = (x1 + x3) + (x5 + x7)
        carrier = odd * 16.0 + even        # sum of x * u over the word's 8 slots at q = 0
        sx16 = (even + odd) * 0.0625      # sum of x over them, / 16
        # per word: sum x (q - z) / 16 = sum x u - carrier - z * sum x / 16
        t = -carrier[None, :] - zc[:, None] * sx16[None, :]
        t += x0[None, :] * _unit(p, MASK_HI, True)
        t += x1[None, :] * _unit(p, MASK_LO, False)
        r = p << 8         # slots 2, 3 (offsets 11, 7): a plain shift, nothing needed wraps
        t += x2[None, :] * _unit(r, MASK_HI, True)
        t += x3[None, :] * _unit(r, MASK_LO, False)
        r = _rotl(p, 16)   # slots 4, 5 (offsets 3, 31): slot 5 wraps around bit 0
        t += x4[None, :] * _unit(r, MASK_HI, True)
        t += x5[None, :] * _unit(r, MASK_LO, False)
        r = p >> 8         # slots 6, 7 (offsets 27, 23): rotl 24 = rotr 8, nothing needed wraps
        t += x6[None, :] * _unit(r, MASK_HI, True)
        t += x7[None, :] * _unit(r, MASK_LO, False)
        acc += sc[:, None] * t
        w_ptrs += WORDS
    acc = tl.sum(acc, axis=1) * 16.0
    store_row(acc, y_ptr, part_ptr, lock_ptr, m, M, N, offs_n, mask_n, stride_ym, pid_n, pid_k, SPLITS, SPLITS_POW2)


def operands(x: torch.Tensor, packed: dict, kernel: str, max_m: int | None = None):
    """(leading dims, x as unit-stride rows, (N, K_padded / 8), K, group) for the kernels on the repacked
    layout (this GEMV, w4a16_gemm.py), after checking x against the weight."""
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    shape, group = packed["qt"].shape, packed["group"]
    k_padded = shape[1] * 8
    if (max_m is not None and x2.shape[0] > max_m) or not k_padded - group < K <= k_padded:
        rows = f"<= {max_m} rows and " if max_m is not None else ""
        raise ValueError(f"w4a16 {kernel}: needs {rows}{k_padded - group + 1}..{k_padded} input features; "
                         f"got x {tuple(x.shape)}")
    return lead, x2, shape, K, group


def gemv(x: torch.Tensor, packed: dict, out: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """x (..., K) fp16/bf16/fp32 with at most MAX_M rows, `packed` from repack -> (..., N) in x's dtype
    (or into `out`, whose dtype it keeps). `config` overrides heuristic_config (tuning, tests)."""
    lead, x2, (N, kw), K, group = operands(x, packed, "gemv", MAX_M)
    qt, M, k_padded = packed["qt"], x2.shape[0], kw * 8
    span = span_of(group)
    cfg = heuristic_config(M, N, k_padded, group) | (config or {})
    per_split, splits = k_split(k_padded, span, cfg["split_k"])
    tiles_n = triton.cdiv(N, cfg["block_n"])
    y = out.view(M, N) if out is not None else torch.empty(M, N, device=x.device, dtype=x.dtype)
    partial = scratch((splits, M, N), x.device, torch.float32) if splits > 1 else y
    _kernel[(tiles_n, splits, M)](
        x2, qt, packed["scales"], packed["zeros"], partial, y,
        semaphores(x.device, M * tiles_n if splits > 1 else 1),
        M, N, K, k_padded, x2.stride(0), y.stride(0), per_split, kw, per_split // 8, 0x00780000, 0x00078000,
        GROUP=group, SPAN=span, BLOCK_N=cfg["block_n"], SPLITS=splits, SPLITS_POW2=triton.next_power_of_2(splits),
        STAGES=cfg["num_stages"],
        EVEN_K=K == k_padded, VEC=cfg.get("vec", 4), PREFETCH=cfg.get("prefetch", False), num_warps=cfg["num_warps"],
        **({"maxnreg": cfg["maxnreg"]} if cfg.get("maxnreg") else {}))
    return y.view(*lead, N)


SMS = 132   # H100 / H200


# (K, N) -> the best config of `scripts/tune_w4a16.py 1 --only kmajor` at M = 1, group 128, fp16, on an
# H200 (docs/benchmarks.md): the GEMV and the down projection (2026-11-21: 12.4 us, 46% of copy
# bandwidth; 13.2 us, 43%), Llama-2-7B's fused qkv, o and gate/up projections (2026-11-22, `--shape
# llama2-7b`; the heuristic's launch 15.4, 7.1 and 21.9 us).
TUNED = {(4096, 11008): {"block_n": 32, "num_warps": 1, "num_stages": 1, "split_k": 7, "vec": 4, "maxnreg": 128},
         (11008, 4096): {"block_n": 16, "num_warps": 1, "num_stages": 1, "split_k": 8, "vec": 4, "maxnreg": 128},
         (4096, 12288): {"block_n": 32, "num_warps": 1, "num_stages": 2, "split_k": 4, "vec": 4, "prefetch": True},  # 13.1
         (4096, 4096): {"block_n": 32, "num_warps": 1, "num_stages": 1, "split_k": 24, "vec": 4},  # 6.9 us
         (4096, 22016): {"block_n": 32, "num_warps": 1, "num_stages": 2, "split_k": 3, "vec": 4, "maxnreg": 128,
                         "prefetch": True}}   # 21.3 us


def heuristic_config(M: int, N: int, K: int, group: int) -> dict:
    """TUNED where measured (one row, group 128); elsewhere the pattern both measured shapes chose over
    this function's earlier default (a 3-stage cp.async pipeline capped at 104 registers): one-warp
    programs of 32 rows (16 when K > N, as for the down projection), 4 words a thread per step, no
    pipeline, 128 registers (16 programs resident a SM), and K split until the programs about fill
    that one wave (the TUNED splits: 2,408 and 2,048 programs for 2,112 resident). Timed against the
    tuned best on Llama-2-7B's linears: 1-18% slower (`scripts/tune_w4a16.py 1 --only kmajor --shape`)."""
    if M == 1 and group == 128 and (K, N) in TUNED:
        return dict(TUNED[K, N])
    maxnreg = 128
    block_n = 16 if K > N else 32
    resident = SMS * (65536 // (maxnreg * 32))
    split_k = max(1, min(K // span_of(group), round(resident / (triton.cdiv(N, block_n) * M))))
    return {"block_n": block_n, "num_warps": 1, "num_stages": 1, "split_k": split_k, "vec": 4, "maxnreg": maxnreg}
