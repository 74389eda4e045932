import pytest
import torch

from lmdepot.runtime.kernels import rms_norm as rn
from lmdepot.runtime.kernels import silu_mul as sm
from tests.kernels.conftest import DEVICE, DTYPES, poisoned


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, H", [(1, 64), (7, 576), (5, 100)])
@pytest.mark.parametrize("with_residual", [True, False])
def test_rms_norm(dtype, rows, H, with_residual):
    x = torch.randn(rows, H, device=DEVICE, dtype=dtype)
    res = torch.randn(rows, H, device=DEVICE, dtype=dtype) if with_residual else None
    w = torch.randn(H, device=DEVICE, dtype=dtype)
    y, h = rn.rms_norm(x, res, w, 1e-5, out=poisoned((rows, H), dtype),
                       residual_out=poisoned((rows, H), dtype) if with_residual else None)
    ref_y, ref_h = rn.reference(x, res, w, 1e-5)
    torch.testing.assert_close(h, ref_h, rtol=0, atol=0)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(y, ref_y, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != torch.float32])
def test_add_rms_norm_rounds_a_float32_sum_first(dtype):
    """Tensor parallel: x is the float32 all-reduced partial sum; it is rounded to the stream's dtype
    before the add, exactly as a single rank's linear output would be."""
    rows, H = 3, 96
    x = torch.randn(rows, H, device=DEVICE, dtype=torch.float32) * 3
    res = torch.randn(rows, H, device=DEVICE, dtype=dtype)
    w = torch.randn(H, device=DEVICE, dtype=dtype)
    y, h = rn.rms_norm(x, res, w, 1e-5)
    assert y.dtype == h.dtype == dtype
    torch.testing.assert_close(h, x.to(dtype) + res, rtol=0, atol=0)
    torch.testing.assert_close(y, rn.reference(x.to(dtype), res, w, 1e-5)[0], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, I", [(1, 64), (3, 1536), (4, 1500)])
def test_silu_mul(dtype, rows, I):
    gu = torch.randn(rows, 2 * I, device=DEVICE, dtype=dtype) * 3
    y = sm.silu_mul(gu, out=poisoned((rows, I), dtype))
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(y, sm.reference(gu), rtol=tol, atol=tol)
