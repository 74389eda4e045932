"""W8A8 kernels (interpreter on CPU): the int8 GEMM against an exact int32 matmul, its epilogue, and
the fused RMSNorm + per-token quant against the op reference. Outputs are poisoned before each run:
int8 codes with -128 (never produced: codes are clamped to ±127), int32 sums with INT32_MIN, floats
with NaN."""

import pytest
import torch

from lmdepot.runtime.kernels import rms_norm_quant as rq
from lmdepot.runtime.kernels.scratch import _SEMAPHORES
from lmdepot.runtime.kernels.w8a8 import heuristic_config, w8a8_linear
from lmdepot.runtime.ops import reference as ref
from tests.kernels.conftest import DEVICE, DTYPES, poisoned

SMALL = {"block_m": 16, "block_n": 32, "block_k": 32, "num_warps": 4, "num_stages": 2, "group_m": 2}


def _int8(*shape):
    return torch.randint(-127, 128, shape, device=DEVICE, dtype=torch.int8)


def _ones(*shape):
    return torch.ones(*shape, device=DEVICE)


@pytest.mark.parametrize("M, K, N", [(1, 64, 32), (5, 70, 37), (33, 96, 80), (18, 200, 48)])
@pytest.mark.parametrize("config", [SMALL, {**SMALL, "block_m": 32, "block_k": 64, "group_m": 1},
                                    {**SMALL, "split_k": 3}])
def test_int_gemm_is_exact(M, K, N, config):
    a, w = _int8(M, K), _int8(N, K)
    out = torch.full((M, N), -2**31, device=DEVICE, dtype=torch.int32)
    acc = w8a8_linear(a, _ones(M), w, _ones(N), out=out, config=config, raw=True)
    assert acc.data_ptr() == out.data_ptr()
    want = a.cpu().to(torch.int64).matmul(w.cpu().to(torch.int64).t()).to(torch.int32)   # CUDA has no int64 matmul
    torch.testing.assert_close(acc.cpu(), want, rtol=0, atol=0)


def test_int_gemm_exact_at_extreme_codes():
    """All codes ±127 over K = 512: |sum| = 127² · 512 ≈ 8.3M, past fp16/bf16 exactness; int32 keeps it."""
    M, K, N = 16, 512, 32
    a = torch.full((M, K), 127, device=DEVICE, dtype=torch.int8)
    w = torch.full((N, K), -127, device=DEVICE, dtype=torch.int8)
    w[::2] = 127
    acc = w8a8_linear(a, _ones(M), w, _ones(N), config=SMALL, raw=True)
    assert (acc.abs() == 127 * 127 * K).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("M, K, N, split_k", [(3, 64, 48, 1), (21, 100, 40, 1), (21, 100, 40, 2)])
def test_epilogue_matches_reference(dtype, with_bias, M, K, N, split_k):
    a, w = _int8(M, K), _int8(N, K)
    xs = torch.rand(M, device=DEVICE) * 0.01 + 1e-4
    ws = torch.rand(N, device=DEVICE) * 0.01 + 1e-4
    bias = torch.randn(N, device=DEVICE, dtype=dtype) if with_bias else None
    out = poisoned((M, N), dtype)
    y = w8a8_linear(a, xs, w, ws, bias, out_dtype=dtype, out=out, config=SMALL | {"split_k": split_k})
    assert not y.isnan().any()
    assert not _SEMAPHORES[y.device].any()   # the splits' counters are left at zero for the next launch
    # Same fp32 operations in the same order; a GPU may fuse the bias add into an FMA, and the final
    # rounding to dtype may then differ by one ulp (bf16: 2^-8).
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(y, ref.linear_w8a8(a, xs, w, ws, bias, dtype), rtol=tol, atol=1e-6)


def test_leading_dims_and_default_config():
    a, w = _int8(2, 3, 64), _int8(48, 64)
    y = w8a8_linear(a, _ones(2, 3), w, _ones(48), out_dtype=torch.float32)
    assert y.shape == (2, 3, 48)
    torch.testing.assert_close(y, ref.linear_w8a8(a, _ones(2, 3), w, _ones(48), None, torch.float32))


def test_heuristic_table_covers_sizes():
    for M in (1, 16, 17, 64, 256, 1024, 4096):
        cfg = heuristic_config(M, 11008, 4096)
        assert cfg["block_m"] >= 16 and cfg["block_k"] >= 32 and cfg["group_m"] >= 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, H", [(1, 64), (7, 576), (5, 100)])
def test_quant_per_token_exact(dtype, rows, H):
    x = torch.randn(rows, H, device=DEVICE, dtype=dtype) * 3
    x[0, 3] = 40.0  # an outlier channel
    q, s = rq.quant_per_token(x, out=torch.full((rows, H), -128, device=DEVICE, dtype=torch.int8),
                              scales_out=poisoned((rows,), torch.float32))
    rq_, rs = ref.quant_per_token(x)
    assert q.min() >= -127
    torch.testing.assert_close(q, rq_, rtol=0, atol=0)
    torch.testing.assert_close(s, rs, rtol=0, atol=0)
    # Round trip: every element within half a step of its token's scale.
    assert ((q.float() * s[:, None] - x.float()).abs() <= s[:, None] * 0.5 * (1 + 1e-5)).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, H", [(1, 64), (7, 576), (5, 100)])
def test_rms_norm_quant_matches_reference(dtype, rows, H):
    x = torch.randn(rows, H, device=DEVICE, dtype=dtype)
    w = torch.randn(H, device=DEVICE, dtype=dtype)
    q, s = rq.rms_norm_quant(x, w, 1e-5, out=torch.full((rows, H), -128, device=DEVICE, dtype=torch.int8),
                             scales_out=poisoned((rows,), torch.float32))
    rq_, rs = ref.rms_norm_quant(x, w, 1e-5)
    assert q.min() >= -127 and not s.isnan().any()
    # The norm's 1/sqrt may differ from torch.rsqrt in the last bit: codes then differ by one, rarely.
    diff = (q.int() - rq_.int()).abs()
    assert diff.max() <= 1 and diff.float().mean() < 0.01
    tol = 1e-6 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(s, rs, rtol=tol, atol=0)


def test_zero_row_quantizes_to_zero():
    x = torch.zeros(2, 64, device=DEVICE)
    q, s = rq.quant_per_token(x)
    assert (q == 0).all() and (s > 0).all()


def test_bench_rows_run_through(monkeypatch):
    """The bench's W8A8 section on tiny shapes (interpreter, each case run once instead of timed)."""
    from lmdepot.bench import kernels as bk

    monkeypatch.setattr(bk, "_time_us", lambda fn: (fn(), 10.0)[1])
    rows = bk.bench_w8a8(DEVICE, 1e12, shapes=((64, 48),), ms=(1, 20), config=SMALL)
    impls = [r.impl for r in rows]
    assert impls == ["cublas bf16", "lmdepot w8a8 gemm", "lmdepot w8a8 quant + gemm", "torch _int_mm (int32 out)"] * 2
    assert "needs M > 16" in rows[3].note and rows[7].us == 10.0


@pytest.mark.skipif(DEVICE != "cuda", reason="real sizes need a GPU")
@pytest.mark.parametrize("M", [1, 16, 256, 1024, 4096])
def test_real_size_llama7b_mlp_exact(M):
    """Every heuristic-table row at 4096 x 11008: int32 sums equal torch's exact int matmul."""
    K, N = 4096, 11008
    a, w = _int8(M, K), _int8(N, K)
    acc = w8a8_linear(a, _ones(M), w, _ones(N), raw=True)
    torch.testing.assert_close(acc, ref.int_mm(a, w) if M > 16 else (a.double() @ w.double().t()).int(), rtol=0,
                               atol=0)
    xs, ws = torch.rand(M, device=DEVICE) * 1e-3, torch.rand(N, device=DEVICE) * 1e-3
    y = w8a8_linear(a, xs, w, ws, out_dtype=torch.bfloat16)
    torch.testing.assert_close(y, ref.linear_w8a8(a, xs, w, ws, None, torch.bfloat16), rtol=1e-2, atol=1e-2)
