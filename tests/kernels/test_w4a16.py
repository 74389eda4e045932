import pytest
import torch

from lmdepot.formats.int4 import dequantize_int4, quantize_int4_rtn
from lmdepot.runtime.kernels.scratch import _SEMAPHORES
from lmdepot.runtime.kernels.w4a16 import reference, w4a16_linear
from tests.kernels.conftest import DEVICE, DTYPES, poisoned


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 3, 17, 40])
@pytest.mark.parametrize("K, N, group", [(256, 96, 128), (576, 64, 128), (200, 48, 32), (192, 80, 64)])
@pytest.mark.parametrize("gemv_variant", [None, {"x_tile": True, "no_masks": True}])
def test_matches_reference(dtype, M, K, N, group, gemv_variant):
    """`gemv_variant`: the GEMV's x-tile loads without masks (masks stay where N or K are ragged)."""
    if gemv_variant and M > 4:
        pytest.skip("a GEMV launch option")
    w = torch.randn(K, N)
    q = {k: v.to(DEVICE) for k, v in quantize_int4_rtn(w, group).items()}
    x = torch.randn(M, K, device=DEVICE, dtype=dtype)
    out = poisoned((M, N), dtype)
    y = w4a16_linear(x, q["qweight"], q["scales"], q["zeros"], out=out, config=gemv_variant)
    ref = reference(x, q["qweight"], q["scales"], q["zeros"])
    assert y.data_ptr() == out.data_ptr() and not y.isnan().any()
    tol = 1e-3 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.float(), ref.float(), rtol=tol, atol=tol * K ** 0.5)


@pytest.mark.parametrize("variant", [{"unit_codes": True, "x_tile": False}, {"unit_codes": False, "x_tile": False},
                                     {"x_tile": True}, {"x_tile": True, "no_masks": True}])
@pytest.mark.parametrize("split_k", [1, 2, 5])
def test_gemv_split_k_variants_agree(split_k, variant):
    """Both nibble decodings (codes in the mantissa of 2^23, or of 1.0 as 1 + q/16), x loaded per code
    or as one tile split in registers, with and without masks; every split count."""
    K, N = 512, 64
    q = {k: v.to(DEVICE) for k, v in quantize_int4_rtn(torch.randn(K, N), 64).items()}
    x = torch.randn(2, 1, K, device=DEVICE, dtype=torch.float32)
    for _ in range(2):  # the second launch finds the split semaphores reset by the first
        y = w4a16_linear(x, q["qweight"], q["scales"], q["zeros"], config={"split_k": split_k} | variant)
        assert y.shape == (2, 1, N)
        torch.testing.assert_close(y, reference(x, q["qweight"], q["scales"], q["zeros"]), rtol=1e-4, atol=1e-3)
    assert not _SEMAPHORES[x.device].any()


@pytest.mark.skipif(DEVICE != "cuda", reason="real sizes need a GPU")
@pytest.mark.parametrize("M", [1, 16, 256, 1024])
def test_real_size_llama7b_mlp(M):
    K, N = 4096, 11008
    q = {k: v.to(DEVICE) for k, v in quantize_int4_rtn(torch.randn(K, N) * 0.02, 128).items()}
    x = torch.randn(M, K, device=DEVICE, dtype=torch.float16)
    y = w4a16_linear(x, q["qweight"], q["scales"], q["zeros"])
    torch.testing.assert_close(y.float(), reference(x, q["qweight"], q["scales"], q["zeros"]).float(),
                               rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("M, split_k", [(8, 1), (20, 3), (40, 2)])
def test_gemm_split_k_variants_agree(M, split_k):
    K, N = 256, 48
    q = {k: v.to(DEVICE) for k, v in quantize_int4_rtn(torch.randn(K, N), 32).items()}
    x = torch.randn(M, K, device=DEVICE, dtype=DTYPES[0])
    y = w4a16_linear(x, q["qweight"], q["scales"], q["zeros"], config={"split_k": split_k, "block_n": 32})
    torch.testing.assert_close(y.float(), reference(x, q["qweight"], q["scales"], q["zeros"]).float(),
                               rtol=2e-2, atol=2e-2 * K ** 0.5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K, N, group", [(256, 96, 128), (200, 48, 32), (192, 80, 64)])
@pytest.mark.parametrize("out_dtype", [None, torch.float32])
def test_prefill_path_dequantizes_then_multiplies(dtype, K, N, group, out_dtype, monkeypatch):
    """From DEQUANT_MIN_M rows on: the weight dequantized into a (poisoned) scratch matrix, then a
    plain matmul; a float32 `out` receives the unrounded sums (tensor-parallel partials)."""
    from lmdepot.runtime.kernels import scratch, w4a16

    monkeypatch.setattr(scratch, "POISON", True)
    q = {k: v.to(DEVICE) for k, v in quantize_int4_rtn(torch.randn(K, N), group).items()}
    w = w4a16.dequantize(q["qweight"], q["scales"], q["zeros"], K, dtype)
    want_w = dequantize_int4(q["qweight"].cpu(), q["scales"].cpu(), q["zeros"].cpu(), K, torch.float32)
    assert w.shape == (K, N) and not w.isnan().any()
    w_tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]   # one rounding to dtype
    torch.testing.assert_close(w.float().cpu(), want_w, rtol=w_tol, atol=w_tol)
    M = w4a16.DEQUANT_MIN_M + 3
    assert w4a16.heuristic_config(M, N, K, group)["dequant"]
    x = torch.randn(M, K, device=DEVICE, dtype=dtype)
    out = None if out_dtype is None else poisoned((M, N), out_dtype)
    y = w4a16_linear(x, q["qweight"], q["scales"], q["zeros"], out=out)
    assert y.dtype == (out_dtype or dtype) and not y.isnan().any()
    ref = reference(x, q["qweight"], q["scales"], q["zeros"]).float()
    tol = 1e-3 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol * K ** 0.5)
    tiled = w4a16_linear(x, q["qweight"], q["scales"], q["zeros"], config={"dequant": False})
    torch.testing.assert_close(tiled.float(), ref, rtol=tol, atol=tol * K ** 0.5)
