"""The dense split-K GEMV (kernels/gemv.py) against a float64 reference: Triton's interpreter on the
CPU, real Llama-2-7B sizes and CUDA graph replays on a GPU."""

import pytest
import torch

from lmdepot.runtime.kernels.gemv import MAX_M, gemv, heuristic_config, reference
from lmdepot.runtime.kernels.scratch import _SEMAPHORES, k_split
from tests.kernels.conftest import DEVICE, DTYPES, poisoned

SMALL = {"block_n": 16, "block_k": 32}   # several N tiles and K tiles at interpreter sizes


def _case(M, N, K, dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(DEVICE, dtype)
    w = torch.randn(N, K, generator=g).to(DEVICE, dtype)
    b = torch.randn(N, generator=g).to(DEVICE, dtype) if bias else None
    want = x.double() @ w.double().t() + (0 if b is None else b.double())
    return x, w, b, want


def _check(y, want, dtype):
    """Sums of K products rounded once to the output dtype (fp32: summation order only)."""
    assert not y.isnan().any()
    rtol = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-5}[y.dtype]
    torch.testing.assert_close(y.double(), want, rtol=rtol, atol=rtol * want.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 2, 3, 4])
@pytest.mark.parametrize("use_dot", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_float64_reference(dtype, M, use_dot, bias):
    """Odd N and K (no block divides them); K=333 in 32-wide tiles split 3 ways: 4, 4 and 3 tiles,
    the last one cut at K."""
    N, K = 37, 333
    x, w, b, want = _case(M, N, K, dtype, bias)
    out = poisoned((M, N), dtype)
    y = gemv(x, w, b, config=SMALL | {"use_dot": use_dot, "split_k": 3}, out=out)
    assert y.data_ptr() == out.data_ptr() and y.shape == (M, N)
    _check(y, want, dtype)
    assert not _SEMAPHORES[x.device].any()


@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("K", [256, 250])
@pytest.mark.parametrize("split_k", [1, 2, 3, 7, 100])
def test_split_counts_agree(M, K, split_k):
    """Even and ragged splits (8 tiles in 3 splits: 3, 3, 2; split_k=7: 4 splits of 2; more splits
    than tiles: one tile each); every launch leaves the semaphores at zero for the next one."""
    per_split, splits = k_split(K, SMALL["block_k"], split_k)
    assert per_split % SMALL["block_k"] == 0 and (splits - 1) * per_split < K <= splits * per_split
    x, w, b, want = _case(M, 45, K, DTYPES[0], bias=True, seed=split_k)
    for _ in range(2):
        y = gemv(x.view(M, 1, K), w, b, config=SMALL | {"split_k": split_k}, out=poisoned((M, 1, 45), DTYPES[0]))
        assert y.shape == (M, 1, 45)
        _check(y.view(M, 45), want, DTYPES[0])
        assert not _SEMAPHORES[x.device].any()


@pytest.mark.parametrize("use_dot", [False, True])
@pytest.mark.parametrize("split_k", [1, 4])
def test_float32_out_keeps_unrounded_sums(use_dot, split_k):
    """out_dtype=float32 (tensor-parallel partials): fp16 products are exact in fp32, so the result is
    the float64 sum up to fp32 summation error, far below one fp16 rounding."""
    x, w, b, want = _case(2, 40, 256, torch.float16, bias=True)
    y = gemv(x, w, b, out_dtype=torch.float32, config=SMALL | {"use_dot": use_dot, "split_k": split_k})
    assert y.dtype == torch.float32
    _check(y, want, torch.float32)
    # the plain reference rounds the same sums to fp16
    torch.testing.assert_close(y.to(torch.float16), reference(x, w, b), rtol=1e-3, atol=1e-2)


@pytest.mark.parametrize("M", [1, 2, 4])
def test_heuristic_config(M):
    """The launch heuristic as used by default (no override), on a shape it splits."""
    N, K = 24, 1100
    assert heuristic_config(M, N, K)["split_k"] > 1
    x, w, _, want = _case(M, N, K, DTYPES[0], bias=False)
    _check(gemv(x, w, out=poisoned((M, N), DTYPES[0])), want, DTYPES[0])
    assert not _SEMAPHORES[x.device].any()


def test_rejects_more_rows_than_max_m():
    x, w, _, _ = _case(MAX_M + 1, 16, 32, DTYPES[0], bias=False)
    with pytest.raises(ValueError, match="needs <= 4 rows"):
        gemv(x, w)


def test_linear_op_routing(monkeypatch):
    """The op is registered (LMDEPOT_DENSE_GEMV unset or 1); with LMDEPOT_DENSE_GEMV=1 it sends 1-4
    fp16/bf16 rows to the kernel and everything else (more rows, fp32, non-contiguous x) to the reference."""
    from lmdepot.runtime import ops
    from lmdepot.runtime.ops import reference as ref_ops
    from lmdepot.runtime.ops import triton_ops

    monkeypatch.setattr(ops, "_TABLE", dict(ops._TABLE))
    monkeypatch.setattr(triton_ops, "_installed", False)
    monkeypatch.setattr(triton_ops, "DENSE_GEMV_ROWS", MAX_M)
    triton_ops.install()
    assert ops.get("linear") is triton_ops.linear
    x, w, b, _ = _case(5, 24, 64, torch.float16, bias=True)
    assert torch.equal(triton_ops.linear_gemv(x[:3], w, b), gemv(x[:3], w, b))
    calls = []
    monkeypatch.setattr("lmdepot.runtime.kernels.gemv.gemv", lambda *a, **k: calls.append(a))
    for xs in (x, x.float()[:2], x[:2, ::2]):
        ws = w.float() if xs.dtype == torch.float32 else w[:, : xs.shape[-1]]
        torch.testing.assert_close(triton_ops.linear_gemv(xs, ws, None), ref_ops.linear(xs, ws, None))
    assert calls == []
    triton_ops.linear_gemv(x[:4], w, b, torch.float32)
    assert len(calls) == 1


GPU = pytest.mark.skipif(DEVICE != "cuda", reason="real sizes need a GPU")
LLAMA7B = [(4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096), (4096, 32000)]   # (K, N)


@GPU
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 2, 3])
@pytest.mark.parametrize("K, N", LLAMA7B)
def test_real_size_llama7b(dtype, M, K, N):
    """Both loop bodies (FMA, DOT) at real sizes, heuristic tiles and splits, against F.linear in
    float32 (bf16/fp16 output: one rounding; M=3 pads to 4 rows)."""
    import torch.nn.functional as F

    w = (torch.randn(N, K, device="cuda") * 0.02).to(dtype)
    x = torch.randn(M, K, device="cuda").to(dtype)
    want = F.linear(x.float(), w.float())
    for use_dot in (False, True):
        y = gemv(x, w, config={"use_dot": use_dot})
        torch.testing.assert_close(y.float(), want, rtol=2e-2, atol=2e-2)
        y32 = gemv(x, w, out_dtype=torch.float32, config={"use_dot": use_dot})
        torch.testing.assert_close(y32, want, rtol=1e-4, atol=1e-3)
    assert not _SEMAPHORES[x.device].any()


@GPU
def test_cuda_graph_replay():
    """Two split-K GEMVs in one captured graph (the decode step's pattern), replayed twice with new
    inputs: each replay finds the semaphores at zero and gives the eager results."""
    dtype = torch.bfloat16
    w1 = (torch.randn(4096, 4096, device="cuda") * 0.02).to(dtype)
    w2 = (torch.randn(4096, 11008, device="cuda") * 0.02).to(dtype)
    b2 = torch.randn(4096, device="cuda").to(dtype)
    x = torch.randn(2, 4096, device="cuda").to(dtype)
    split = {"split_k": 4}

    def step():
        h = gemv(x, w1, config=split)
        return gemv(torch.cat([h, h, h[:, :2816]], -1), w2, b2, config=split)

    step()   # compiles, allocates the semaphores outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = step()
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(y, step(), rtol=0, atol=0)
        assert not _SEMAPHORES[x.device].any()


def test_default_routing_takes_one_row_unsplit_shapes(monkeypatch):
    """By default one row goes to the kernel only where its launch needs no K split (the configs the
    GPU tuning verified, e.g. 4096 outputs); a split shape, or two rows, stay on the reference."""
    from lmdepot.runtime.ops import triton_ops

    monkeypatch.setattr(triton_ops, "DENSE_GEMV_ROWS", 1)
    calls = []
    monkeypatch.setattr("lmdepot.runtime.kernels.gemv.gemv", lambda x, w, *a, **k: calls.append(w.shape) or x)
    for m, n, k in [(1, 4096, 32), (1, 24, 1100), (2, 4096, 32)]:
        triton_ops.linear_gemv(torch.zeros(m, k, dtype=torch.float16), torch.zeros(n, k, dtype=torch.float16))
    assert heuristic_config(1, 24, 1100)["split_k"] > 1 and heuristic_config(1, 4096, 32)["split_k"] == 1
    assert calls == [(4096, 32)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("bias", [False, True])
def test_gated_input_is_silu_mul_of_gate_up(dtype, M, split_k, bias):
    """gated=True: x is a fused (gate | up) output of 2K columns; the product equals the silu_mul
    kernel's output (fp32 silu(gate) * up rounded once) times W, odd K and ragged splits included."""
    from lmdepot.runtime.kernels import silu_mul

    N, K = 37, 333
    g = torch.Generator().manual_seed(5)
    gate_up = torch.randn(M, 2 * K, generator=g).to(DEVICE, dtype)
    _, w, b, _ = _case(M, N, K, dtype, bias)
    act = silu_mul.silu_mul(gate_up)   # the unfused path's activation (the kernel)
    want = silu_mul.reference(gate_up).double() @ w.double().t() + (0 if b is None else b.double())
    y = gemv(gate_up, w, b, config=SMALL | {"split_k": split_k, "use_dot": True}, out=poisoned((M, N), dtype),
             gated=True)
    _check(y, want, dtype)
    # bit-identical to the unfused path: the silu_mul kernel's numbers, then the same GEMV
    torch.testing.assert_close(y, gemv(act, w, b, config=SMALL | {"split_k": split_k}), rtol=0, atol=0)
    assert not _SEMAPHORES[gate_up.device].any()


def test_silu_mul_linear_op_is_the_composition():
    """The op's reference and the Triton op's fallback (CPU tensors, or shapes the GEMV does not
    take) are linear(silu_mul(gate_up))."""
    from lmdepot.runtime.ops import reference as ref_ops
    from lmdepot.runtime.ops import triton_ops

    gate_up = torch.randn(6, 2 * 40, dtype=torch.float32)
    w, b = torch.randn(24, 40), torch.randn(24)
    want = ref_ops.linear(ref_ops.silu_mul(gate_up), w, b, torch.float32)
    torch.testing.assert_close(ref_ops.silu_mul_linear(gate_up, w, b, torch.float32), want, rtol=0, atol=0)
    torch.testing.assert_close(triton_ops.silu_mul_linear(gate_up, w, b, torch.float32), want, rtol=0, atol=0)


@pytest.mark.skipif(DEVICE != "cuda", reason="real sizes need a GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_real_size_gated_down_projection(dtype):
    """Llama-2-7B's down projection with silu·mul in the loads: bit-identical to the silu_mul kernel
    followed by the GEMV, at the engine's default (heuristic) launch."""
    from lmdepot.runtime.kernels import silu_mul

    gate_up = torch.randn(1, 2 * 11008, device=DEVICE, dtype=dtype)
    w = (torch.randn(4096, 11008, device=DEVICE) * 0.02).to(dtype)
    y = gemv(gate_up, w, gated=True)
    torch.testing.assert_close(y, gemv(silu_mul.silu_mul(gate_up), w), rtol=0, atol=0)
