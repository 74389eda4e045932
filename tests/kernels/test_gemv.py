"""The dense split-K GEMV (kernels/gemv.py) against a float64 reference: Triton's interpreter on the
CPU, real Llama-2-7B sizes and CUDA graph replays on a GPU."""

import pytest
import torch

from lmdepot.runtime.kernels.gemv import MAX_M, gemv, heuristic_config, norm_reference, reference
from lmdepot.runtime.kernels.scratch import _SEMAPHORES, k_split
from tests.kernels.conftest import DEVICE, DTYPES, graph_replays, poisoned

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

    def check(y):
        torch.testing.assert_close(y, step(), rtol=0, atol=0)
        assert not _SEMAPHORES[x.device].any()

    graph_replays(step, [x], check, replays=2)   # the first call compiles, allocates the semaphores


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


# --- NORM: the residual add + RMSNorm computed in the one-row GEMV's input loads -------------------

def _norm_case(N, K, dtype, x_dtype, bias, seed=0, device=DEVICE):
    """x (the sublayer output, maybe a float32 tensor-parallel sum), the residual stream, the norm
    weight, W and a bias, at scales like a model's (an x of float32 values between the dtype's steps)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(1, K, generator=g) * 0.7).to(device, x_dtype)
    r = torch.randn(1, K, generator=g).to(device, dtype)
    nw = (1 + 0.2 * torch.randn(K, generator=g)).to(device, dtype)
    w = (torch.randn(N, K, generator=g) * 0.1).to(device, dtype)
    b = torch.randn(N, generator=g).to(device, dtype) if bias else None
    return x, r, nw, w, b


def _check_norm(y, h, x, r, nw, w, b, eps, unfused_y, unfused_h):
    """h (the new residual) is exact: bit-equal to the unfused kernel's and the reference's. y: the norm
    may differ from the unfused path in the last bit of 1/rms (the sum of squares in another order),
    which moves a normed element by at most one ulp: y stays within eps(dtype) * sum |nw * normed * W|
    (+ one rounding of y) of both the torch reference and the unfused two-kernel path."""
    dtype = r.dtype
    want_y, want_h = norm_reference(x, r, nw, eps, w, b)
    assert y.dtype == dtype and h.dtype == dtype and not y.isnan().any()
    assert torch.equal(h, want_h) and torch.equal(h, unfused_h)
    hf = want_h.double()
    normed = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).abs() * nw.double().abs()
    ulp = torch.finfo(dtype).eps
    bound = ulp * normed @ w.double().abs().t() + ulp * want_y.double().abs() + 1e-6
    for other in (want_y, unfused_y):
        assert ((y.double() - other.double()).abs() <= bound).all(), (y.double() - other.double()).abs().max()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("f32_x", [False, True])
@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("bias", [False, True])
def test_norm_input_is_add_rms_norm(dtype, f32_x, split_k, bias):
    """norm=(residual, norm_weight, eps): odd N and K (no block divides them), ragged K splits (with a
    sum of squares in 6 steps of 64 columns, the last one cut), an fp32 tensor-parallel sum as x; y and
    the new residual written into poisoned buffers. Against the torch reference and the unfused path
    (kernels/rms_norm.py, then the plain GEMV)."""
    from lmdepot.runtime.kernels import rms_norm

    N, K, eps = 37, 333, 1e-5
    x, r, nw, w, b = _norm_case(N, K, dtype, torch.float32 if f32_x else dtype, bias, seed=split_k)
    out, h_out = poisoned((1, N), dtype), poisoned((1, K), dtype)
    cfg = SMALL | {"split_k": split_k}
    y, h = gemv(x, w, b, config=cfg | {"norm_block": 64 if split_k > 1 else 512}, out=out, norm=(r, nw, eps, h_out))
    assert y.data_ptr() == out.data_ptr() and h.data_ptr() == h_out.data_ptr()
    normed, unfused_h = rms_norm.rms_norm(x, r, nw, eps)
    _check_norm(y, h, x, r, nw, w, b, eps, gemv(normed, w, b, config=cfg), unfused_h)
    assert not _SEMAPHORES[x.device].any()
    # the default residual_out is a fresh buffer; x and the residual are left as they were
    x0, r0 = x.clone(), r.clone()
    y2, h2 = gemv(x, w, b, config=cfg | {"norm_block": 64 if split_k > 1 else 512}, norm=(r, nw, eps))
    assert torch.equal(y2, y) and torch.equal(h2, h) and torch.equal(x, x0) and torch.equal(r, r0)


def test_norm_output_dtype_float32():
    """out_dtype=float32 keeps the sums unrounded (the normed input is still rounded to the stream's dtype)."""
    x, r, nw, w, b = _norm_case(24, 100, torch.float16, torch.float16, bias=True)
    y, _ = gemv(x, w, b, out_dtype=torch.float32, config=SMALL, norm=(r, nw, 1e-6))
    want, _ = norm_reference(x, r, nw, 1e-6, w, b, out_dtype=torch.float32)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, want, rtol=2e-3, atol=2e-3)


def test_norm_rejects_aliasing_and_several_rows():
    """The new residual must land apart from x and the residual (other programs still read them), and
    the norm takes one row: each misuse is one ValueError."""
    x, _, nw, w, _ = _norm_case(16, 64, torch.float16, torch.float16, bias=False)
    stream = torch.randn(128, dtype=torch.float16, device=DEVICE)
    r = stream[:64].view(1, 64)
    for bad in (r, x, stream[32:96], torch.empty(64, dtype=torch.float32, device=DEVICE)):
        with pytest.raises(ValueError, match="overlaps neither x nor the residual"):
            gemv(x, w, norm=(r, nw, 1e-5, bad))
    gemv(x, w, norm=(r, nw, 1e-5, stream[64:]))   # adjacent, not overlapping: fine
    with pytest.raises(ValueError, match="one contiguous row"):
        gemv(x.expand(2, 64), w, norm=(r.expand(2, 64), nw, 1e-5))


def test_norm_linear_op_routing(monkeypatch):
    """ops.add_rms_norm_linear's Triton op takes the NORM GEMV for one row (x in the stream's dtype or a
    float32 sum) whose linear takes the GEMV; more rows, a split shape, or LMDEPOT_DENSE_GEMV=0 run
    ops.add_rms_norm then ops.linear (the unfused path as before)."""
    from lmdepot.runtime import ops
    from lmdepot.runtime.ops import triton_ops

    calls = []
    monkeypatch.setattr("lmdepot.runtime.kernels.gemv.gemv", lambda *a, **k: calls.append(k.get("norm") is not None)
                        or (a[0], a[0]))
    unfused = []
    monkeypatch.setattr(ops, "norm_then_linear", lambda *a: unfused.append(a[0].shape) or (a[0], a[1]))
    f16 = dict(dtype=torch.float16)
    for rows, n, k, x_dtype, gemv_rows in [(1, 4096, 32, torch.float16, 1), (1, 4096, 32, torch.float32, 1),
                                           (2, 4096, 32, torch.float16, 4), (1, 24, 1100, torch.float16, 1),
                                           (1, 4096, 32, torch.float16, 0)]:
        monkeypatch.setattr(triton_ops, "DENSE_GEMV_ROWS", gemv_rows)
        x, r = torch.zeros(rows, k, dtype=x_dtype), torch.zeros(rows, k, **f16)
        triton_ops.add_rms_norm_linear_gemv(x, r, torch.ones(k, **f16), 1e-5, torch.zeros(n, k, **f16))
    assert calls == [True, True] and unfused == [(2, 32), (1, 1100), (1, 32)]


def _sm90_norm_build(block_n: int, block_k: int, warps: int, stages: int, x_type: str) -> dict:
    """The one-row NORM GEMV at a tuned launch, built for sm_90 (tests/kernels/sm90.py), with the
    16-divisible sizes a Llama launch specializes on."""
    from lmdepot.runtime.kernels.gemv import _gemv_kernel
    from tests.kernels.sm90 import build

    const = dict(HAS_BIAS=False, USE_DOT=False, EVEN_K=True, BLOCK_M=1, BLOCK_N=block_n, BLOCK_K=block_k,
                 STAGES=stages, GATED=False, NORM=True, NORM_BLOCK=2048)
    types = {"x_ptr": x_type, "w_ptr": "*fp16", "b_ptr": "*fp16", "part_ptr": "*fp16", "y_ptr": "*fp16",
             "lock_ptr": "*i32", "r_ptr": "*fp16", "nw_ptr": "*fp16", "h_ptr": "*fp16", "eps": "fp32"}
    return build(_gemv_kernel, const, types, warps, stages, divisible=("N", "K", "K_PER_SPLIT"))


@pytest.mark.parametrize("tiles", [(16, 256, 4, 4), (16, 512, 4, 3), (32, 128, 8, 4)])
@pytest.mark.parametrize("x_type", ["*fp16", "*fp32"])
def test_norm_variant_does_not_spill_on_sm90(tiles, x_type):
    """The tuned one-row launches (q/k/v and gate/up: 16 x 256, lm_head: 16 x 512 with 3 stages, a
    square weight: 32 x 128 and 8 warps) with the norm in their loads: no spills, the weight still
    streamed through cp.async (sm_90 build on the CPU: 90-125 registers against 80-118 without)."""
    from tests.kernels.sm90 import run_build

    built = run_build(f"from tests.kernels.test_gemv import _sm90_norm_build as b; b{tiles + (x_type,)}")
    assert (built["stack"], built["mma"], built["cp_async"]) == (0, False, True)


@GPU
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("f32_x", [False, True])
@pytest.mark.parametrize("K, N", [(4096, 12288), (4096, 22016), (4096, 32000)])
def test_real_size_norm_gemv(dtype, f32_x, K, N):
    """Llama-2-7B's q/k/v, gate/up and lm_head with the residual add + norm in the loads at the
    engine's default launch: the new residual bit-equal to kernels/rms_norm.py's, y within one ulp of
    the normed input of the reference and of the unfused two kernels."""
    from lmdepot.runtime.kernels import rms_norm

    x, r, nw, w, _ = _norm_case(N, K, dtype, torch.float32 if f32_x else dtype, bias=False, device="cuda")
    w = (w * 0.2).to(dtype)
    assert heuristic_config(1, N, K)["split_k"] == 1
    y, h = gemv(x, w, norm=(r, nw, 1e-5))
    normed, unfused_h = rms_norm.rms_norm(x, r, nw, 1e-5)
    _check_norm(y.cpu(), h.cpu(), x.cpu(), r.cpu(), nw.cpu(), w.cpu(), None, 1e-5, gemv(normed, w).cpu(),
                unfused_h.cpu())


@GPU
def test_cuda_graph_replay_norm():
    """A decode layer's pattern in one captured graph: o (plain GEMV) -> add + norm + gate/up (NORM
    GEMV) twice, the second reading the first's new residual; replayed with new inputs it gives the
    eager results, and no new residual overwrote the one its launch read."""
    dtype = torch.float16
    wo = (torch.randn(4096, 4096, device="cuda") * 0.02).to(dtype)
    w13 = (torch.randn(22016, 4096, device="cuda") * 0.02).to(dtype)
    nw = (1 + 0.1 * torch.randn(4096, device="cuda")).to(dtype)
    a = torch.randn(1, 4096, device="cuda").to(dtype)
    r = torch.randn(1, 4096, device="cuda").to(dtype)

    def step():
        y1, h1 = gemv(gemv(a, wo), w13, norm=(r, nw, 1e-5))
        y2, h2 = gemv(gemv(y1[:, :4096], wo), w13, norm=(h1, nw, 1e-5))
        return y1, h1, y2, h2

    def check(outs):
        for got, want in zip(outs, step()):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(outs[1], gemv(a, wo) + r, rtol=0, atol=0)

    graph_replays(step, [a, r], check, replays=2)
