"""The K-major W4A16 decode GEMV (kernels/w4a16_gemv.py): its repacked layout round-trips the
workspace codes exactly; its outputs match the float32 dequantize-then-matmul reference under the
interpreter (odd N, a padded last group, groups 32..256, ragged K splits, poisoned outputs, large
activations); its sm_90 build keeps 16-byte loads without spills."""

import itertools

import pytest
import torch

from lmdepot.formats.int4 import quantize_int4_rtn, unpack_int4
from lmdepot.runtime.kernels import w4a16_gemv
from lmdepot.runtime.kernels.scratch import _SEMAPHORES
from lmdepot.runtime.kernels.w4a16 import reference
from tests.kernels.conftest import DEVICE, DTYPES, graph_replays, poisoned


def _quantized(K, N, group, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = quantize_int4_rtn(torch.randn(K, N, generator=g), group)
    return {k: v.to(DEVICE) for k, v in q.items()}


@pytest.mark.parametrize("K, N, group", [(256, 96, 128), (200, 47, 32), (192, 80, 64), (512, 40, 256)])
def test_repack_round_trips_codes(K, N, group):
    q = _quantized(K, N, group)
    packed = w4a16_gemv.repack(q["qweight"], q["scales"], q["zeros"])
    k_padded = q["qweight"].shape[0] * 8
    assert packed["qt"].shape == (N, k_padded // 8) and packed["qt"].dtype == torch.int32
    assert torch.equal(w4a16_gemv.unpack(packed), unpack_int4(q["qweight"]))
    assert torch.equal(packed["scales"], q["scales"].t()) and torch.equal(packed["zeros"], q["zeros"].t())


def test_repack_rejects_groups_without_whole_spans():
    q = _quantized(96, 16, 96)
    with pytest.raises(ValueError, match="group size 96 must be 32, 64 or a multiple of 128"):
        w4a16_gemv.repack(q["qweight"], q["scales"], q["zeros"])


def _check(y, x, q):
    ref = reference(x, q["qweight"], q["scales"], q["zeros"]).float()
    assert not y.isnan().any()
    tol = 1e-4 if x.dtype == torch.float32 else {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[x.dtype]
    torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("K, N, group", [(256, 96, 128), (200, 47, 32), (192, 80, 64), (512, 40, 256)])
@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("prefetch", [False, True])
def test_matches_reference(dtype, M, K, N, group, split_k, prefetch):
    """K=200 in groups of 32 pads the last group (input rows 200..223 have no x); N=47 leaves a ragged
    last tile of 16 rows; 3 splits of K=256 spans of 128 give 2 splits (1 span each); `prefetch` loads
    each step's words and group params one step ahead."""
    q = _quantized(K, N, group, seed=K + N)
    packed = w4a16_gemv.repack(q["qweight"], q["scales"], q["zeros"])
    x = torch.randn(M, K, device=DEVICE, dtype=dtype)
    out = poisoned((M, N), dtype)
    y = w4a16_gemv.gemv(x, packed, out=out, config={"block_n": 16, "split_k": split_k, "prefetch": prefetch})
    assert y.data_ptr() == out.data_ptr() and y.shape == (M, N)
    _check(y, x, q)
    assert not _SEMAPHORES[x.device].any()


@pytest.mark.parametrize("split_k", [2, 5])
@pytest.mark.parametrize("prefetch", [False, True])
def test_split_launches_reset_semaphores(split_k, prefetch):
    """Ragged splits (8 spans of 32 in 5 splits: 2, 2, 2, 2 and nothing left for a 5th, whose prefetch
    loads nothing) and a second launch that finds the semaphores back at zero; a (2, 1, K) input keeps
    its leading dims."""
    K, N = 256, 64
    q = _quantized(K, N, 32, seed=split_k)
    packed = w4a16_gemv.repack(q["qweight"], q["scales"], q["zeros"])
    x = torch.randn(2, 1, K, device=DEVICE, dtype=DTYPES[0])
    for _ in range(2):
        y = w4a16_gemv.gemv(x, packed, config={"block_n": 32, "split_k": split_k, "prefetch": prefetch})
        assert y.shape == (2, 1, N)
        _check(y.view(2, N), x.view(2, K), q)
        assert not _SEMAPHORES[x.device].any()


def test_large_activations_stay_accurate():
    """fp16 activations up to ~60000 (fp16 partial sums of x * q would overflow at ~4400): the float32
    sums with the 1 + q/16 and 16 + q/16 carriers keep the reference's accuracy."""
    K, N = 256, 32
    q = _quantized(K, N, 128, seed=7)
    packed = w4a16_gemv.repack(q["qweight"], q["scales"], q["zeros"])
    x = torch.randn(1, K, device=DEVICE) * 100
    x[0, ::17] = torch.linspace(-60000, 60000, len(range(0, K, 17)), device=DEVICE)
    x = x.to(torch.float16)
    ref = reference(x.float(), q["qweight"], q["scales"], q["zeros"])
    y = w4a16_gemv.gemv(x, packed, out=torch.empty(1, N, device=DEVICE, dtype=torch.float32))
    assert y.isfinite().all()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_rejects_more_rows_or_other_k():
    q = _quantized(256, 32, 128)
    packed = w4a16_gemv.repack(q["qweight"], q["scales"], q["zeros"])
    with pytest.raises(ValueError, match=r"needs <= 4 rows and 129..256 input features; got x \(5, 256\)"):
        w4a16_gemv.gemv(torch.zeros(5, 256, device=DEVICE), packed)
    with pytest.raises(ValueError, match=r"got x \(1, 128\)"):
        w4a16_gemv.gemv(torch.zeros(1, 128, device=DEVICE), packed)


def sm90_build(block_n: int, num_warps: int, stages: int, vec: int = 4, dtype: str = "fp16",
               maxnreg: int | None = None, prefetch: bool = False) -> dict:
    """The Llama-2-7B MLP-up shape's launch (K 4096, group 128) built for sm_90 (tests/kernels/sm90.py),
    with the integer args a real launch specializes as 16-divisible."""
    from tests.kernels.sm90 import build

    const = {"GROUP": 128, "SPAN": 128, "BLOCK_N": block_n, "SPLITS": 8, "SPLITS_POW2": 8, "STAGES": stages,
             "EVEN_K": True, "VEC": vec, "PREFETCH": prefetch}
    types = {"x_ptr": f"*{dtype}", "qt_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16", "part_ptr": "*fp32",
             "y_ptr": f"*{dtype}", "lock_ptr": "*i32", "MASK_HI": "i32", "MASK_LO": "i32"}
    return build(w4a16_gemv._kernel, const, types, num_warps, stages,
                 divisible=("N", "K", "K_PADDED", "K_PER_SPLIT", "KW", "SPLIT_WORDS"), maxnreg=maxnreg)


def test_heuristic_follows_the_tuned_configs():
    """Tuned shapes get their config; untuned ones the launch the first two tuned shapes chose (one
    stage, no prefetch: their neighbours reproduce them, the split within one) and about one wave of
    2,112 resident programs, where K allows that many splits: the decode linears of every bench model,
    at tp 1 and 2."""
    from lmdepot.bench.shapes import SHAPES, linear_shapes

    same = ("block_n", "num_warps", "num_stages", "vec", "maxnreg")
    for (K, N), tuned in w4a16_gemv.TUNED.items():
        assert w4a16_gemv.heuristic_config(1, N, K, 128) == tuned
        assert w4a16_gemv.heuristic_config(2, N, K, 128) != tuned or tuned["split_k"] == 1
    for K, N in ((4096, 11008), (11008, 4096)):
        tuned, near = w4a16_gemv.TUNED[K, N], w4a16_gemv.heuristic_config(1, N + 1, K, 128)
        assert {k: near[k] for k in same} == {k: tuned[k] for k in same}
        assert abs(near["split_k"] - tuned["split_k"]) <= 1
    for shape, tp in itertools.product(SHAPES, (1, 2)):
        for K, N, name in linear_shapes(shape, tp)[:4]:
            if (K, N) in w4a16_gemv.TUNED:
                continue
            cfg = w4a16_gemv.heuristic_config(1, N, K, 128)
            programs = -(-N // cfg["block_n"]) * cfg["split_k"]
            assert 0.7 * 2112 <= programs <= 1.3 * 2112 or cfg["split_k"] == K // 128, (shape, tp, name, cfg)


@pytest.mark.parametrize("block_n, num_warps, stages, vec, maxnreg, prefetch", [
    (32, 1, 1, 4, 128, False), (16, 1, 1, 4, 128, False),   # heuristic_config's launches, TUNED's too
    (32, 1, 1, 4, 128, True), (16, 1, 1, 4, 128, True),     # the same, each step's loads one step ahead
    (32, 1, 2, 4, None, True), (32, 1, 2, 4, 128, True),    # TUNED's qkv and gate/up
    (32, 1, 3, 4, 104, False),   # the earlier default
    (32, 1, 3, 4, None, False), (16, 1, 3, 4, None, False), (64, 2, 3, 4, None, False), (32, 1, 1, 4, None, False),
    (32, 1, 3, 2, None, False)])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_compiles_for_sm90_without_spills(block_n, num_warps, stages, vec, maxnreg, prefetch, dtype):
    """No spills; 16-byte weight loads in the K loop (through cp.async when STAGES > 1; vec=2 asks for
    8-byte ones); at most 4.2 SASS instructions a weight in the loop (5.4 with 2 rows a thread; the
    workspace-layout kernel: 6.2-6.6; with prefetch 4.5: Triton 3.6, the GPU image's, builds its bf16 loop
    at 4.23-4.41) and registers that leave room for 16+ resident warps a SM (12+ with prefetch at 2 stages)."""
    from tests.kernels.sm90 import run_build

    b = run_build(f"from tests.kernels.test_w4a16_gemv import sm90_build as f; "
                  f"f({block_n}, {num_warps}, {stages}, {vec}, '{dtype}', {maxnreg}, {prefetch})")
    weights = block_n * 128 // (32 * num_warps)   # per thread and loop step
    assert (b["stack"], b["mma"], b["cp_async"], b["loop_vec16"]) == (0, False, stages > 1, vec == 4), b
    # 16 rows: 2 a thread share the x work
    assert b["loop_sass"] / weights <= (5.4 if block_n == 16 else 4.5 if prefetch else 4.2), b
    assert b["regs"] <= (maxnreg or (168 if prefetch and stages > 1 else 128)), b


GPU = pytest.mark.skipif(DEVICE != "cuda", reason="real sizes need a GPU")


@GPU
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 4])
@pytest.mark.parametrize("K, N", [(4096, 11008), (11008, 4096)])
def test_real_size_llama7b_mlp(dtype, M, K, N):
    """The heuristic launch at Llama-2-7B's MLP shapes against the float32 reference."""
    q = _quantized(K, N, 128)
    packed = w4a16_gemv.repack(q["qweight"], q["scales"], q["zeros"])
    x = torch.randn(M, K, device=DEVICE).to(dtype)
    _check(w4a16_gemv.gemv(x, packed, out=poisoned((M, N), dtype)), x, q)
    assert not _SEMAPHORES[x.device].any()


@GPU
def test_cuda_graph_replay():
    """A captured launch replayed with new inputs: the split semaphores are back at zero every time."""
    q = _quantized(4096, 11008, 128)
    packed = w4a16_gemv.repack(q["qweight"], q["scales"], q["zeros"])
    x = torch.randn(1, 4096, device=DEVICE, dtype=torch.float16)
    out = torch.empty(1, 11008, device=DEVICE, dtype=torch.float16)
    def check(_):
        _check(out, x, q)
        assert not _SEMAPHORES[x.device].any()

    graph_replays(lambda: w4a16_gemv.gemv(x, packed, out=out), [x], check)
