"""The engine's int4 path on w4a16_gemv.repack's K-major layout: the GEMM (kernels/w4a16_gemm.py), the
dequantize kernel (kernels/w4a16_dequant.py) and the dispatcher (triton_ops.linear_int4_packed:
GEMV / GEMM / dequantize + matmul by M) against a float64 dequantize-then-matmul reference, under the
interpreter: groups 32..256, padded last groups, ragged N tiles, K splits, poisoned outputs and
scratch; which layout Linear gets (int4_layout); the GEMM's sm_90 build."""

import pytest
import torch

from lmdepot.formats.int4 import dequantize_int4, quantize_int4_rtn
from lmdepot.runtime.kernels import w4a16_dequant, w4a16_gemm, w4a16_gemv
from lmdepot.runtime.kernels.scratch import _SEMAPHORES
from lmdepot.runtime.ops import triton_ops
from tests.kernels.conftest import DEVICE, DTYPES, graph_replays, poisoned

# (K, N, group): K=200 pads the last group of 32 (rows 200..223 have no x); K=100 and 300 pad the
# last group of 64 / 128 (SPAN 128 slot dots with masked x); N=47, 80 leave ragged tiles of 32 rows
SHAPES = [(256, 96, 128), (200, 47, 32), (100, 80, 64), (192, 64, 64), (300, 40, 128), (512, 40, 256)]


def _quantized(K, N, group, seed):
    g = torch.Generator().manual_seed(seed)
    w = quantize_int4_rtn(torch.randn(K, N, generator=g), group)
    return {k: v.to(DEVICE) for k, v in w.items()}


def _packed(w):
    return w4a16_gemv.repack(w["qweight"], w["scales"], w["zeros"])


def _weight64(w, K):
    """The (K, N) weight in float64, from the workspace tensors (formats/int4.py)."""
    return dequantize_int4(w["qweight"].cpu(), w["scales"].cpu(), w["zeros"].cpu(), K, torch.float64)


def _check(y, x, w, out_dtype=None):
    ref = x.cpu().double() @ _weight64(w, x.shape[-1])
    assert y.dtype == (out_dtype or x.dtype) and not y.isnan().any()
    # exact operands (x, integer codes) and float32 sums: float32 output within 1e-5 (1e-4 for a
    # tensor-core dot), else one rounding to the output dtype
    if y.dtype == torch.float32:
        tol = 1e-5 if x.dtype == torch.float32 else 1e-4
    else:
        tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[y.dtype]
    torch.testing.assert_close(y.cpu().double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES + [torch.float32] if DEVICE == "cuda" else DTYPES)
@pytest.mark.parametrize("K, N, group", SHAPES)
def test_dequantize_matches_reference(dtype, K, N, group):
    """(N, K) weight into a poisoned scratch buffer, (q - z) * s rounded once to dtype: as the
    workspace's float64 dequantization rounded to dtype, and as the torch reference beside the kernel."""
    w = _quantized(K, N, group, seed=K + N)
    packed = _packed(w)
    got = w4a16_dequant.dequantize(packed, K, dtype)
    assert got.shape == (N, K) and got.dtype == dtype and not got.isnan().any()
    want = _weight64(w, K).t()
    assert torch.equal(got.cpu(), want.to(dtype))
    assert torch.equal(w4a16_dequant.reference(packed, K, dtype).cpu(), want.to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [5, 17, 64])
@pytest.mark.parametrize("K, N, group", SHAPES)
def test_gemm_matches_reference(dtype, M, K, N, group):
    """The heuristic launch (K split where the tiles are few) into a poisoned output, fresh random
    data per shape; the split semaphores are back at zero after it."""
    w = _quantized(K, N, group, seed=K * M + N)
    x = torch.randn(M, K, device=DEVICE, dtype=dtype)
    out = poisoned((M, N), dtype)
    y = w4a16_gemm.gemm(x, _packed(w), out=out, config={"block_n": 32})
    assert y.data_ptr() == out.data_ptr()
    _check(y, x, w)
    assert not _SEMAPHORES[x.device].any()


@pytest.mark.parametrize("split_k", [1, 3, 8])
@pytest.mark.parametrize("slot_dots", [True, False])
def test_gemm_splits_and_decodes_agree(split_k, slot_dots):
    """Ragged K splits (8 spans of 128 rows in 3 splits), both code decodings (8 slot dots a span, or
    one dot on the span decoded in row order, which groups of 32 and 64 take), a fp32 output (a
    row-parallel partial's unrounded sums), a second launch on the reset semaphores, a 3-d x."""
    K, N = 1024, 48
    w = _quantized(K, N, 128, seed=split_k)
    packed = _packed(w)
    x = torch.randn(2, 10, K, device=DEVICE, dtype=DTYPES[0])
    for _ in range(2):
        out = poisoned((20, N), torch.float32)
        y = w4a16_gemm.gemm(x, packed, out=out, config={"split_k": split_k, "block_n": 32, "slot_dots": slot_dots})
        assert y.shape == (2, 10, N)
        _check(y.view(20, N), x.view(20, K), w, torch.float32)
        assert not _SEMAPHORES[x.device].any()


@pytest.mark.parametrize("M", [1, 4, 5, 17, 64, 127, 130])
@pytest.mark.parametrize("out_dtype", [None, torch.float32])
def test_dispatch_by_rows(M, out_dtype, monkeypatch):
    """triton_ops.linear_int4_packed: GEMV up to 4 rows, GEMM to 127, from 128 the weight dequantized
    (poisoned scratch) and multiplied; bias added; a padded last group and a ragged N; float32 out_dtype
    keeps the sums unrounded. Each path is the one called (the others raise)."""
    K, N, group = 200, 47, 64
    w = _quantized(K, N, group, seed=M)
    packed = _packed(w)
    path = "gemv" if M <= 4 else ("gemm" if M < 128 else "dequantize")
    for mod, name in ((w4a16_gemv, "gemv"), (w4a16_gemm, "gemm"), (w4a16_dequant, "dequantize")):
        if name != path:
            monkeypatch.setattr(mod, name, lambda *a, _n=name, **k: pytest.fail(f"{_n} called for M={M}"))
    x = torch.randn(M, K, device=DEVICE, dtype=DTYPES[0])
    bias = torch.randn(N, device=DEVICE, dtype=DTYPES[0])
    y = triton_ops.linear_int4_packed(x, packed, bias, out_dtype)
    assert y.shape == (M, N) and y.dtype == (out_dtype or x.dtype)
    ref = x.cpu().double() @ _weight64(w, K) + bias.cpu().double()
    # fp16 x: the dequantize path rounds the weight to fp16 (as w4a16.py's did), the others the output
    tol = 1e-5 if x.dtype == torch.float32 else 2e-3
    torch.testing.assert_close(y.cpu().double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_dispatch_empty_and_op_routing():
    """No rows: an empty output. triton_ops.linear_int4 takes a repacked dict to the dispatcher and a
    workspace dict on the CPU to the reference, with the same result."""
    K, N = 256, 32
    w = _quantized(K, N, 128, seed=1)
    packed = _packed(w)
    assert triton_ops.linear_int4_packed(torch.zeros(0, K, device=DEVICE), packed).shape == (0, N)
    x = torch.randn(3, K, device=DEVICE)
    a = triton_ops.linear_int4(x, packed, K)
    b = triton_ops.linear_int4(x.cpu(), {k: v.cpu() for k, v in w.items()}, K)
    torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize("group, repacked", [(32, True), (64, True), (128, True), (256, True), (96, False),
                                             (48, False)])
def test_int4_layout_repacks_spannable_groups(group, repacked):
    """Groups of 32, 64 and multiples of 128 get the K-major layout (codes kept exactly); others (96,
    48) keep the workspace tensors, for w4a16.py's kernels."""
    w = _quantized(2 * group + 8, 24, group, seed=group)
    got = triton_ops.int4_layout(w)
    if repacked:
        assert set(got) == {"qt", "scales", "zeros", "group"} and got["group"] == group
        assert torch.equal(got["qt"], _packed(w)["qt"])
    else:
        assert got is w


def sm90_build(block_m: int, block_n: int, num_warps: int, stages: int, dtype: str = "fp16",
               group: int = 128) -> dict:
    """A Llama-2-7B-shaped launch (K 4096 split 4 ways) built for sm_90 (tests/kernels/sm90.py), with
    the integer args a real launch specializes as 16-divisible."""
    from tests.kernels.sm90 import build

    span = w4a16_gemv.span_of(group)
    const = {"GROUP": group, "SPAN": span, "BLOCK_M": block_m, "BLOCK_N": block_n, "SPLITS": 4, "EVEN_K": True,
             "IEEE": False, "SLOT_DOTS": span == 128}
    types = {"x_ptr": f"*{dtype}", "qt_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16", "y_ptr": f"*{dtype}",
             "part_ptr": "*fp32", "lock_ptr": "*i32", "MASK": "u32"}
    return build(w4a16_gemm._kernel, const, types, num_warps, stages,
                 divisible=("N", "K", "K_PADDED", "KW", "K_PER_SPLIT", "SPLIT_WORDS"))


@pytest.mark.parametrize("M", [16, 32, 64])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_compiles_for_sm90_without_spills(M, dtype):
    """heuristic_config's launches: no spills, tensor cores, 16-byte cp.async weight loads, and a budget
    of SASS instructions a weight in the K loop (Triton 3.9, fp16 / bf16: 16 rows 5.8 / 5.9, 32 rows
    6.2 / 6.3, 64 rows (8.9 / 9.2 on 8 warps): the per-span zero/scale FMAs on the wider tile, over half
    the weights a thread; the decode alone is 2.5)."""
    from tests.kernels.sm90 import run_build

    cfg = w4a16_gemm.heuristic_config(M, 11008, 4096, 128)
    b = run_build(f"from tests.kernels.test_w4a16_gemm import sm90_build as f; "
                  f"f({cfg['block_m']}, {cfg['block_n']}, {cfg['num_warps']}, {cfg['num_stages']}, '{dtype}')")
    weights = cfg["block_n"] * 128 // (32 * cfg["num_warps"])   # per thread and loop step (one span)
    assert (b["stack"], b["mma"], b["cp_async"], b["loop_vec16"]) == (0, True, True, True), b
    assert b["loop_sass"] / weights <= {16: 6.0, 32: 6.5, 64: 9.4}[M], b


@pytest.mark.parametrize("group", [32, 64])
def test_small_group_decoding_compiles_for_sm90(group):
    """Groups of 32 / 64 (one dot on the span decoded in row order): builds, no spills."""
    from tests.kernels.sm90 import run_build

    b = run_build(f"from tests.kernels.test_w4a16_gemm import sm90_build as f; f(16, 128, 4, 3, 'fp16', {group})")
    assert (b["stack"], b["mma"]) == (0, True), b


def sm90_dequant_build(group: int, dtype: str = "fp16") -> dict:
    from tests.kernels.sm90 import build

    span = w4a16_gemv.span_of(group)
    const = {"GROUP": group, "SPAN": span, "BLOCK_N": max(32, 8192 // span)}   # dequantize()'s launch
    types = {"qt_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16", "w_ptr": f"*{dtype}"}
    return build(w4a16_dequant._kernel, const, types, 4, 3, divisible=("N", "K", "KW"))


@pytest.mark.parametrize("group", [32, 128])
def test_dequantize_compiles_for_sm90_without_spills(group):
    from tests.kernels.sm90 import run_build

    b = run_build(f"from tests.kernels.test_w4a16_gemm import sm90_dequant_build as f; f({group})")
    assert b["stack"] == 0, b


GPU = pytest.mark.skipif(DEVICE != "cuda", reason="real sizes need a GPU")


@GPU
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [16, 64, 256])
@pytest.mark.parametrize("K, N", [(4096, 11008), (11008, 4096)])
def test_real_size_llama7b_mlp(dtype, M, K, N):
    """The dispatcher's heuristic launches (GEMM at 16 and 64 rows, dequantize + cuBLAS at 256) at
    Llama-2-7B's MLP shapes against the float64 reference."""
    w = _quantized(K, N, 128, seed=M)
    x = torch.randn(M, K, device=DEVICE).to(dtype)
    _check(triton_ops.linear_int4_packed(x, _packed(w)), x, w)
    assert not _SEMAPHORES[x.device].any()


@GPU
@pytest.mark.parametrize("group", [16, 96])
def test_workspace_layout_fallback(group):
    """Groups repack cannot span keep the workspace layout (int4_layout); the op takes them to
    w4a16.py's kernels where its tiles fit (16) and to the reference where they do not (96)."""
    K, N = 2 * group + 8, 40
    w = _quantized(K, N, group, seed=group)
    assert triton_ops.int4_layout(w) is w
    for M in (1, 17, 130):
        x = torch.randn(M, K, device=DEVICE, dtype=torch.float16)
        _check(triton_ops.linear_int4(x, w, K), x, w)


@GPU
def test_cuda_graph_replay():
    """A captured split GEMM launch replayed with new inputs: its semaphores are back at zero each time."""
    w = _quantized(4096, 4096, 128, seed=0)
    packed = _packed(w)
    x = torch.randn(16, 4096, device=DEVICE, dtype=torch.float16)
    out = torch.empty(16, 4096, device=DEVICE, dtype=torch.float16)
    assert w4a16_gemm.heuristic_config(16, 4096, 4096, 128)["split_k"] > 1
    def check(_):
        _check(out, x, w)
        assert not _SEMAPHORES[x.device].any()

    graph_replays(lambda: w4a16_gemm.gemm(x, packed, out=out), [x], check)
